"""The provider check against a real inference engine nobody here wrote: llama.cpp's server.

Not part of CI (building llama-cpp-python takes minutes). What it does, on a fresh machine:

1. builds a tiny Llama pair (a base, then a full fine-tune of it) with a byte-level BPE
   tokenizer that llama.cpp reads, trained on CPU in about a minute;
2. converts both to GGUF with llama.cpp's own ``convert_hf_to_gguf.py`` (F32 and F16), quantizes
   the fine-tune with llama.cpp itself (Q8_0, Q4_K_M), extracts rank-r adapters with
   ``lorafid extract`` and converts them with ``convert_lora_to_gguf.py``;
3. serves each variant with ``python -m llama_cpp.server`` (``--logits_all true``; adapters
   hot-swapped on the base with ``--lora_path``) and runs ``lorafid probe`` against it on the
   channels asked for, within a request budget;
4. prints one line per served variant and channel: what was served, the verdict, requests sent.

Usage::

    pip install llama-cpp-python==0.3.36 gguf   # builds llama.cpp with cmake
    python scripts/llama_cpp_check.py --llama-cpp <llama-cpp-python sdist>/vendor/llama.cpp \\
        [--channels completions-echo,completions-text] [--max-requests 5] [--work DIR]

``--llama-cpp`` is the folder holding ``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``,
``conversion/`` and ``gguf-py/`` (the sdist ships them under ``vendor/llama.cpp``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.llama_models import CORPUS, FINETUNE_CORPUS  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 256, 2, 4, 2, 512, 512
RANKS = (4, 16, 64)


# -- the model pair ---------------------------------------------------------------------------


def build_tokenizer(folder: Path) -> Any:
    """A GPT-2 style byte-level BPE (llama.cpp's "gpt-2" pre-tokenizer) with <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([*CORPUS, *FINETUNE_CORPUS] * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def build_pair(work: Path) -> tuple[Path, Path]:
    """Train a base on CORPUS, then fine-tune every weight on FINETUNE_CORPUS; save both."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir, finetune_dir = work / "base", work / "finetune"
    if (finetune_dir / "model.safetensors").exists():
        return base_dir, finetune_dir
    torch.manual_seed(0)
    tokenizer = build_tokenizer(work / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)

    def train(lines: tuple[str, ...], steps: int, lr: float) -> None:
        # Lines run on into each other with no EOS, so the models write long continuations (a
        # model that ends every line would give the text channel a dozen tokens per request).
        texts = [" ".join(lines[i:] + lines[:i]) for i in range(len(lines))]
        batch = tokenizer(texts, padding=False)["input_ids"]
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(steps):
            for ids in batch:
                optimizer.zero_grad()
                x = torch.tensor([ids])
                model(input_ids=x, labels=x).loss.backward()
                optimizer.step()
        model.eval()

    train(CORPUS, 25, 3e-3)
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    train(FINETUNE_CORPUS, 20, 1e-3)
    model.save_pretrained(finetune_dir)
    tokenizer.save_pretrained(finetune_dir)
    return base_dir, finetune_dir


# -- llama.cpp's converters ---------------------------------------------------------------------


def run(command: list[str], **options: Any) -> None:
    result = subprocess.run(command, capture_output=True, text=True, **options)
    if result.returncode:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def converter_env(llama_cpp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{llama_cpp}{os.pathsep}{llama_cpp / 'gguf-py'}", "NO_LOCAL_GGUF": ""}


# Our tokenizer is new to llama.cpp's table of pre-tokenizer hashes; it is GPT-2's byte-level BPE.
_CONVERT = """
import runpy, sys
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def to_gguf(llama_cpp: Path, model_dir: Path, out: Path, outtype: str) -> Path:
    if not out.exists():
        run(
            [sys.executable, "-c", _CONVERT, str(model_dir), "--outfile", str(out), "--outtype", outtype],
            cwd=llama_cpp,
            env=converter_env(llama_cpp),
        )
    return out


def quantize(source: Path, out: Path, kind: str) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``), as ``llama-quantize`` runs it."""
    import llama_cpp

    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
        if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
            raise SystemExit(f"llama.cpp could not quantize {source} to {kind}")
    return out


def extract_adapter(llama_cpp: Path, base_dir: Path, finetune_dir: Path, work: Path, rank: int) -> Path:
    """``lorafid extract`` writes a PEFT adapter; llama.cpp's converter makes it a GGUF LoRA."""
    adapter_dir, out = work / f"adapter-{rank}", work / f"adapter-{rank}.gguf"
    if not out.exists():
        extract = [sys.executable, "-m", "lorafid", "extract", str(base_dir), str(finetune_dir)]
        run([*extract, "--rank", str(rank), "--dtype", "float32", "--out", str(adapter_dir), "--quiet"], cwd=ROOT)
        run(
            [sys.executable, str(llama_cpp / "convert_lora_to_gguf.py"), str(adapter_dir), "--base", str(base_dir),
             "--outfile", str(out), "--outtype", "f32"],
            cwd=llama_cpp,
            env=converter_env(llama_cpp),
        )  # fmt: skip
    return out


# -- llama.cpp's server ---------------------------------------------------------------------------

# Quantized models crashed this CPU's server in llama.cpp's extra buffer types (repacked weights);
# the plain CPU buffers avoid it and compute the same numbers.
_SERVE = """
import runpy, sys
import llama_cpp.llama_cpp as native
default = native.llama_model_default_params
def plain_buffers():
    params = default()
    params.use_extra_bufts = False
    return params
native.llama_model_default_params = plain_buffers
sys.argv = ["llama_cpp.server", *sys.argv[1:]]
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


class LlamaServer:
    """``python -m llama_cpp.server`` on a free loopback port, stopped on exit."""

    def __init__(self, model: Path, lora: Path | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        command = [sys.executable, "-c", _SERVE, "--model", str(model), "--model_alias", "served",
                   "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(CONTEXT),
                   "--logits_all", "true", "--n_threads", "2", "--verbose", "false"]  # fmt: skip
        if lora is not None:
            command += ["--lora_path", str(lora)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> LlamaServer:
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"llama.cpp's server stopped: {self.process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                urllib.request.urlopen(f"{self.url}/models", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.5)
        raise SystemExit("llama.cpp's server did not start in 120 s")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def probe(
    server: LlamaServer, base_dir: Path, finetune_dir: Path, channel: str, budget: int, out: Path
) -> dict[str, Any]:
    command = [sys.executable, "-m", "lorafid", "probe", str(base_dir), str(finetune_dir), "--endpoint", server.url,
               "--model", "served", "--ranks", ",".join(map(str, RANKS)), "--channel", channel,
               "--max-requests", str(budget), "--max-retries", "0", "--out", str(out), "--quiet",
               "--candidates", "int4-g128,q8_0,q4_0", "--prompts", str(out.parent / "prompts.txt")]  # fmt: skip
    out.unlink(missing_ok=True)
    env = {**os.environ, "OPENAI_API_KEY": ""}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if not out.exists():
        why = (result.stderr or result.stdout).strip()[-400:]
        return {"verdict": {"sentence": f"no report: {why}"}, "requests": {}}
    return dict(json.loads(out.read_text()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp's folder with the converters")
    parser.add_argument("--channels", default="completions-echo,completions-text,completions-greedy")
    parser.add_argument("--max-requests", type=int, default=5)
    parser.add_argument("--work", type=Path, help="keep the models here (default: a temporary folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lorafid-llama-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    base_dir, finetune_dir = build_pair(work)
    f32 = to_gguf(args.llama_cpp, finetune_dir, work / "finetune-f32.gguf", "f32")
    base = to_gguf(args.llama_cpp, base_dir, work / "base-f32.gguf", "f32")
    served: list[tuple[str, Path, Path | None]] = [
        ("finetune F32", f32, None),
        ("finetune F16", to_gguf(args.llama_cpp, finetune_dir, work / "finetune-f16.gguf", "f16"), None),
        ("finetune Q8_0", quantize(f32, work / "finetune-q8_0.gguf", "Q8_0"), None),
        ("finetune Q4_K_M", quantize(f32, work / "finetune-q4_k_m.gguf", "Q4_K_M"), None),
        *(
            (f"base + rank-{r} adapter", base, extract_adapter(args.llama_cpp, base_dir, finetune_dir, work, r))
            for r in (16, 64)
        ),
        ("base", base, None),
    ]
    # Prompts the tiny models know: the fine-tune's lines cut after a few words. (The built-in set
    # is English the 465-token vocabulary spells in bytes; its continuations hold invalid UTF-8.)
    lines = [" ".join(line.split()[:k]) for line in (*FINETUNE_CORPUS, *CORPUS) for k in (3, 5)]
    (work / "prompts.txt").write_text("\n".join(lines) + "\n")
    print(f"# models built and converted in {time.time() - started:.0f} s ({work})")
    for label, model, lora in served:
        with LlamaServer(model, lora) as server:
            for channel in args.channels.split(","):
                report = probe(server, base_dir, finetune_dir, channel, args.max_requests, work / "probe.json")
                sentence = report["verdict"]["sentence"] if report.get("verdict") else report.get("error")
                sent = report.get("requests", {}).get("sent", "?")
                print(f"{label:<24} {channel:<18} {sent} requests  {sentence}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
