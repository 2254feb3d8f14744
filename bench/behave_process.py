"""The whole ``lorafid behave`` process against a plain process doing the same forwards.

    OMP_NUM_THREADS=1 python -m bench.behave_process              # hidden 1024, 4 layers, 4 variants
    python -m bench.behave_process --device cuda --hidden 4096 --intermediate 14336 --heads 32 \\
        --kv-heads 8 --vocab 128256 --layers 4                     # 8B block shapes (GPU row: unmeasured)

A random bf16 Llama pair (``bench.behaviour.write_pair``) gets a word-level tokenizer (the test
suite's, ``tests.llama_models.build_tokenizer``), and ``--prompts`` texts of ``--words`` known
words. Each round runs, interleaved (``bench.timing``), two fresh processes:

- ``lorafid behave BASE FINETUNE --ranks 16,64 --serving lora-only --continuation-tokens 0``
  (4 variants: fine-tune, base, rank 16, rank 64), ``--threads`` as given;
- a plain ``transformers`` process: load both models with ``from_pretrained`` (float32),
  tokenize the same prompts with the same tokenizer, and run 4 forwards + log-softmax per
  prompt (the fine-tune and the base twice each: as many forwards as the check's variants).

Both include interpreter start, imports and loading the models. The ratio per round is the
issue's target: ≤ 1.5×. ``--direction-cache off`` (default) runs ``behave --no-direction-cache``:
every round decomposes, a first check of the pair; ``warm`` lets it use a direction cache filled
by an untimed run before the rounds: a later check of the same pair.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.behaviour import write_pair
from bench.candidates import add_pair_arguments
from bench.timing import interleaved, ratios, spread

_PLAIN = """
import sys, torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
base, tuned, prompts, max_tokens, device = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
tokenizer = PreTrainedTokenizerFast.from_pretrained(tuned, local_files_only=True)
models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).to(device).eval() for p in (tuned, base)]
texts = [line for line in open(prompts).read().splitlines() if line.strip()]
with torch.no_grad():
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"][:max_tokens]], device=device)
        for model in (*models, *models):
            torch.log_softmax(model(ids).logits.float(), -1).cpu()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_arguments(parser)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--words", type=int, default=128, help="words per prompt (one token each)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--direction-cache", choices=("off", "warm"), default="off")
    args = parser.parse_args()
    args.tokens = args.words
    from transformers import PreTrainedTokenizerFast

    from tests.llama_models import build_tokenizer
    from tests.openai_server import vocabulary_prompts

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    with tempfile.TemporaryDirectory(prefix="lorafid-bench-behave-") as work:
        env["LORAFID_HOME"] = str(Path(work) / "home")  # the direction cache of this run only
        base, tuned = write_pair(Path(work), args, args.layers)
        for name, content in build_tokenizer().items():
            (tuned / name).write_bytes(content)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tuned), local_files_only=True)
        prompts = Path(work) / "prompts.txt"
        prompts.write_text("\n".join(vocabulary_prompts(tokenizer, args.prompts, words=args.words)) + "\n")
        out = Path(work) / "report.json"
        behave = [
            sys.executable, "-m", "lorafid", "behave", str(base), str(tuned), "--ranks", "16,64",
            "--serving", "lora-only", "--continuation-tokens", "0", "--prompts", str(prompts),
            "--max-tokens", str(args.words + 2), "--threads", str(args.threads), "--device", args.device,
            "--quiet", "--out", str(out),
        ]  # fmt: skip
        if args.direction_cache == "off":
            behave.append("--no-direction-cache")
        else:
            subprocess.run(behave, check=True, env=env, capture_output=True)  # untimed: fills the cache
        plain = [sys.executable, "-c", _PLAIN, str(base), str(tuned), str(prompts), str(args.words + 2), args.device]
        seconds, _ = interleaved(
            {
                "lorafid behave": lambda: subprocess.run(behave, check=True, env=env, capture_output=True),
                "plain": lambda: subprocess.run(plain, check=True, env=env, capture_output=True),
            },
            args.repeats,
        )
    print(
        f"hidden {args.hidden} · {args.layers} layers · {args.prompts} prompts x ~{args.words} tokens · "
        f"{args.threads} threads · {args.repeats} interleaved rounds · 4 variants / 4 forwards per prompt · "
        f"direction cache {args.direction_cache}"
    )
    print(f"lorafid behave process: {spread(seconds['lorafid behave'], ' s')}")
    print(f"plain transformers process: {spread(seconds['plain'], ' s')}")
    print(f"lorafid / plain: {spread(ratios(seconds['lorafid behave'], seconds['plain']), 'x')} (target ≤ 1.5x)")


if __name__ == "__main__":
    main()
