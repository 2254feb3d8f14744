"""The behaviour check's forward: tokens scored per second, bytes read per second, peak memory vs depth.

    python -m bench.behaviour                            # 2-core CPU, test size: ~2 min
    python -m bench.behaviour --hidden 4096 --intermediate 14336 --heads 32 --kv-heads 8 \\
        --vocab 128256 --layers 2 4 --tokens 128 --device cuda  # Llama-3-8B block shapes, on a GPU

A whole 8B pair on a GPU is the CLI itself (about 32 GB read from the Hub, 2 × 16 GB bf16):

    lorafid behave meta-llama/Llama-3.1-8B ORG/FINETUNE --ranks 16,64,256 --device cuda --out b.json

For each ``--layers`` count a random Llama pair is written as bf16 safetensors with its
config.json (base: N(0, 0.02); fine-tune: base + a rank-32 change + small full-rank noise,
norms and embeddings nudged), then, each in a fresh process so that its peak RSS (VmHWM)
is its own:

1. ``streamed``: ``forward.LayerStream`` with five variants (fine-tune, base, rank 16 and 64
   lora-only, rank 64 keep-extras) over ``--texts`` texts of ``--tokens`` tokens: wall time,
   positions scored per second (texts × tokens × 4 scored variants / wall), weight bytes read
   per second, ``stats.peak_weight_bytes`` and peak RSS;
2. ``whole``: the baseline, ``transformers``' ``from_pretrained`` of the fine-tune alone and one
   forward of the same texts: wall and peak RSS.

Children run with ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB (``--glibc-default`` to keep glibc's
dynamic one, under which freed buffers stay in the heap and RSS creeps up a few MB per layer).
Ratios printed: streamed 8-layer / 2-layer peak (flat = 1.0), and streamed / whole wall for
the same model (the cost of five variants and layer streaming against one plain forward).
Not timed: writing the random pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

_STREAMED = """
import json, sys, time, torch
import transformers, accelerate  # imported before the clock starts, as in the baseline
from lorafid.behaviour.forward import ForwardConfig, LayerStream
from lorafid.behaviour.variants import BASE, FINETUNE, served
base, tuned, device = sys.argv[1], sys.argv[2], sys.argv[6]
texts, tokens, vocab = map(int, sys.argv[3:6])
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, vocab, (texts, tokens), generator=g).tolist()
variants = [FINETUNE, BASE, served(16), served(64), served(64, keep_extras=True)]
started = time.perf_counter()
with LayerStream(base, tuned, ForwardConfig(device=device)) as stream:
    for _ in stream.logprobs(ids, variants):
        pass
    stats = stream.stats
wall = time.perf_counter() - started
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print(json.dumps({"wall_s": wall, "bytes_read": stats.bytes_read, "peak_weight_bytes": stats.peak_weight_bytes,
                  "peak_rss": peak, "gpu_peak": gpu, "positions": texts * tokens, "compute_s": stats.compute_s}))
"""

_WHOLE = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_config  # resolve the lazy import before the clock starts
tuned, texts, tokens, vocab, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, vocab, (texts, tokens), generator=g)
started = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32).to(device).eval()
with torch.no_grad():
    for row in ids:
        torch.log_softmax(model(row[None].to(device)).logits.float(), -1).cpu()
wall = time.perf_counter() - started
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"wall_s": wall, "peak_rss": peak}))
"""


def write_pair(folder: Path, args: argparse.Namespace, layers: int) -> tuple[Path, Path]:
    """A random bf16 Llama base / fine-tune pair with config.json, ``layers`` blocks."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(512, args.tokens),
        tie_word_embeddings=False,
    )
    g = torch.Generator().manual_seed(0)
    head_dim = args.hidden // args.heads
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (args.vocab, args.hidden),
        "model.norm.weight": (args.hidden,),
        "lm_head.weight": (args.vocab, args.hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (args.hidden, args.hidden),
            p + "self_attn.k_proj.weight": (args.kv_heads * head_dim, args.hidden),
            p + "self_attn.v_proj.weight": (args.kv_heads * head_dim, args.hidden),
            p + "self_attn.o_proj.weight": (args.hidden, args.hidden),
            p + "mlp.gate_proj.weight": (args.intermediate, args.hidden),
            p + "mlp.up_proj.weight": (args.intermediate, args.hidden),
            p + "mlp.down_proj.weight": (args.hidden, args.intermediate),
            p + "input_layernorm.weight": (args.hidden,),
            p + "post_attention_layernorm.weight": (args.hidden,),
        }
    base: dict[str, torch.Tensor] = {}
    tuned: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            w = torch.ones(shape)
            d = 0.01 * torch.randn(shape, generator=g)
        else:
            w = 0.02 * torch.randn(shape, generator=g)
            d = 0.002 * torch.randn(shape, generator=g)
            if "layers" in name:
                d += 0.02 * torch.randn(shape[0], 32, generator=g) @ torch.randn(32, shape[1], generator=g) / 32
        base[name] = w.to(torch.bfloat16)
        tuned[name] = (w + d).to(torch.bfloat16)
    out = []
    for side, tensors in (("base", base), ("tuned", tuned)):
        path = folder / f"{side}-{layers}"
        path.mkdir()
        save_file(tensors, str(path / "model.safetensors"))
        (path / "config.json").write_text(config.to_json_string())
        out.append(path)
    return out[0], out[1]


def child(code: str, *argv: Any, fixed_mmap_threshold: bool = True) -> dict[str, Any]:
    env = dict(os.environ)
    if fixed_mmap_threshold:
        # glibc raises its mmap threshold (up to 32 MB) each time a large block is freed, after
        # which freed block-sized buffers stay in the heap and RSS creeps up by a few MB per
        # layer (measured: +44 MB over 6 layers) although no tensor is kept. A fixed threshold
        # returns them to the system; both children run under the same setting.
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, check=False, env=env
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--texts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorafid-bench-behaviour-") as work:
        for layers in args.layers:
            base, tuned = write_pair(Path(work), args, layers)
            common = (args.texts, args.tokens, args.vocab, args.device)
            streamed = child(_STREAMED, base, tuned, *common, fixed_mmap_threshold=not args.glibc_default)
            whole = child(_WHOLE, tuned, *common, fixed_mmap_threshold=not args.glibc_default)
            rows.append({"layers": layers, "streamed": streamed, "whole": whole})
    print(f"{'layers':>6} {'wall s':>8} {'pos/s':>8} {'MB/s':>8} {'weights held MB':>16} {'peak RSS MB':>12} "
          f"{'whole wall s':>13} {'whole RSS MB':>13} {'wall ratio':>11}")  # fmt: skip
    for row in rows:
        s, w = row["streamed"], row["whole"]
        scored = s["positions"] * 4  # four variants scored against the fine-tune
        mb_s = s["bytes_read"] / s["wall_s"] / 1e6
        print(
            f"{row['layers']:>6} {s['wall_s']:>8.2f} {scored / s['wall_s']:>8.0f} {mb_s:>8.1f} "
            f"{s['peak_weight_bytes'] / 1e6:>16.2f} {s['peak_rss'] / 1e6:>12.0f} {w['wall_s']:>13.2f} "
            f"{w['peak_rss'] / 1e6:>13.0f} {s['wall_s'] / w['wall_s']:>11.2f}"
        )
    if len(rows) > 1:
        first, last = rows[0]["streamed"], rows[-1]["streamed"]
        held = last["peak_weight_bytes"] / first["peak_weight_bytes"]
        print(
            f"{rows[-1]['layers']} vs {rows[0]['layers']} layers: weights held {held:.2f}x, "
            f"peak RSS {last['peak_rss'] / first['peak_rss']:.2f}x (whole model: "
            f"{rows[-1]['whole']['peak_rss'] / rows[0]['whole']['peak_rss']:.2f}x)"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
