"""Greedy continuations in batches (``lorafid.behaviour.generation``) against one prompt at a time.

    OMP_NUM_THREADS=1 python -m bench.generation                  # hidden 1024, 4 layers, 12 prompts
    python -m bench.generation --device cuda --hidden 4096 --intermediate 14336 --heads 32 \\
        --kv-heads 8 --vocab 128256 --layers 4                     # 8B block shapes (GPU row: unmeasured)

The fine-tune of a random bf16 Llama pair (``bench.behaviour.write_pair``), loaded in float32,
continues ``--prompts`` random prompts of 16 to ``--tokens`` tokens by ``--new`` greedy tokens,
both ways, interleaved and repeated (``bench.timing``). This is the behaviour check's
continuation step for one variant; the check repeats it per variant.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.behaviour import write_pair
from bench.candidates import add_pair_arguments
from bench.timing import interleaved, ratios, spread
from lorafid.behaviour.generation import greedy_continuations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_arguments(parser)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=128, help="longest prompt, in tokens")
    parser.add_argument("--new", type=int, default=24, help="greedy tokens per prompt (the check's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="lorafid-bench-generation-") as work:
        _, tuned = write_pair(Path(work), args, args.layers)
        model = AutoModelForCausalLM.from_pretrained(str(tuned), dtype=torch.float32).to(device).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, args.tokens + 1, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(4, args.vocab, (n,), generator=g).tolist() for n in lengths]
    pad, eos = 0, None  # no end-of-sequence: every prompt runs its --new tokens, both ways

    def one_at_a_time() -> list[list[int]]:
        out = []
        for ids in prompts:
            prompt = torch.tensor([ids], device=device)
            with torch.no_grad():
                generated = model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new, do_sample=False,
                    pad_token_id=pad, eos_token_id=eos,
                )  # fmt: skip
            out.append(generated[0, len(ids) :].tolist())
        return out

    def batched() -> list[list[int]]:
        found: dict[int, list[int]] = {}
        for part in greedy_continuations(model, prompts, args.new, pad_id=pad, eos_id=eos, device=device):
            found.update(part)
        return [found[i] for i in range(len(prompts))]

    seconds, values = interleaved({"batched": batched, "one at a time": one_at_a_time}, args.repeats, device)
    same = sum(a == b for a, b in zip(values["batched"], values["one at a time"], strict=True))
    print(
        f"hidden {args.hidden} · {args.layers} layers · {args.prompts} prompts of {min(lengths)}-{max(lengths)} "
        f"tokens · {args.new} new tokens · {torch.get_num_threads()} threads · {args.repeats} interleaved rounds"
    )
    print(f"batched: {spread(seconds['batched'], ' s')}")
    print(f"one at a time: {spread(seconds['one at a time'], ' s')}")
    print(f"batched / one at a time: {spread(ratios(seconds['batched'], seconds['one at a time']), 'x')}")
    print(f"continuations identical: {same} of {len(prompts)}")


if __name__ == "__main__":
    main()
