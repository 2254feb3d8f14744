"""Synthetic base / fine-tune pairs at real layer shapes, written as sharded bf16 safetensors.

    python -m bench.synth --preset llama8b --layers 2 --out /tmp/pair

writes ``/tmp/pair/base`` and ``/tmp/pair/finetune``, each ``model-0000i-of-0000n.safetensors``
plus ``model.safetensors.index.json``, with the two models' shards cut at different places.

The fine-tune's delta is a full fine-tune's shape in miniature: a rank-64 component with a
decaying spectrum (what training moved most) plus a flat full-rank part, at about 1% of the
weight's scale. ``--low-rank`` writes the rank-64 part alone (a LoRA-trained fine-tune).
Generating costs one random matrix and one thin product per weight, so even 70B-shaped
layers are quick to make; the benchmark is about reading and measuring them, not this.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Preset:
    """Shapes of one transformer block's weight matrices: module -> (out, in)."""

    hidden: int
    modules: dict[str, tuple[int, int]]


PRESETS: dict[str, Preset] = {
    "tiny": Preset(256, {"self_attn.q_proj": (256, 256), "mlp.up_proj": (1024, 256), "mlp.down_proj": (256, 1024)}),
    "small": Preset(  # for the memory-versus-model-size runs: many layers in little time
        1024,
        {
            "self_attn.q_proj": (1024, 1024),
            "self_attn.k_proj": (256, 1024),
            "self_attn.v_proj": (256, 1024),
            "self_attn.o_proj": (1024, 1024),
            "mlp.gate_proj": (4096, 1024),
            "mlp.up_proj": (4096, 1024),
            "mlp.down_proj": (1024, 4096),
        },
    ),
    "nemo12b": Preset(
        5120,
        {
            "self_attn.q_proj": (4096, 5120),
            "self_attn.k_proj": (1024, 5120),
            "self_attn.v_proj": (1024, 5120),
            "self_attn.o_proj": (5120, 4096),
            "mlp.gate_proj": (14336, 5120),
            "mlp.up_proj": (14336, 5120),
            "mlp.down_proj": (5120, 14336),
        },
    ),
    "llama8b": Preset(
        4096,
        {
            "self_attn.q_proj": (4096, 4096),
            "self_attn.k_proj": (1024, 4096),
            "self_attn.v_proj": (1024, 4096),
            "self_attn.o_proj": (4096, 4096),
            "mlp.gate_proj": (14336, 4096),
            "mlp.up_proj": (14336, 4096),
            "mlp.down_proj": (4096, 14336),
        },
    ),
    "llama70b": Preset(
        8192,
        {
            "self_attn.q_proj": (8192, 8192),
            "self_attn.k_proj": (1024, 8192),
            "self_attn.v_proj": (1024, 8192),
            "self_attn.o_proj": (8192, 8192),
            "mlp.gate_proj": (28672, 8192),
            "mlp.up_proj": (28672, 8192),
            "mlp.down_proj": (8192, 28672),
        },
    ),
}


def parse_shape(text: str) -> tuple[int, int]:
    """``"4096x14336"`` -> (4096, 14336): a ROWSxCOLS command-line argument."""
    rows, cols = (int(x) for x in text.lower().split("x"))
    return rows, cols


def matrix_pair(
    shape: tuple[int, int], seed: int, *, low_rank: bool = False, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, fine-tune) of one weight, stored in ``dtype``; the fine-tune built from the stored base."""
    rows, cols = shape
    generator = torch.Generator().manual_seed(seed)
    scale = cols**-0.5  # the usual init scale: rows of unit norm in expectation
    base = (scale * torch.randn(rows, cols, generator=generator)).to(dtype)
    rank = min(64, rows, cols)
    strength = 0.01 * scale * torch.arange(1, rank + 1, dtype=torch.float32) ** -0.5
    left = torch.randn(rows, rank, generator=generator) * strength
    delta = left @ torch.randn(rank, cols, generator=generator) / rank**0.5
    if not low_rank:
        delta += 0.003 * scale * torch.randn(rows, cols, generator=generator)
    return base, (base.float() + delta).to(dtype)


def layer_tensors(
    preset: Preset, layers: int, *, low_rank: bool = False
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, base, fine-tune) for every weight of ``layers`` blocks, plus one norm per block."""
    seed = 0
    for layer in range(layers):
        for module, shape in preset.modules.items():
            seed += 1
            yield f"model.layers.{layer}.{module}.weight", *matrix_pair(shape, seed, low_rank=low_rank)
        norm = torch.ones(preset.hidden, dtype=torch.bfloat16)
        yield f"model.layers.{layer}.input_layernorm.weight", norm, (norm.float() * 1.01).to(torch.bfloat16)


def write_pair(out: Path, preset: Preset, layers: int, *, low_rank: bool = False) -> tuple[Path, Path]:
    """Write both models; the fine-tune's shards hold 3 tensors each, the base's 5 (never aligned)."""
    writers = {"base": _ShardWriter(out / "base", per_shard=5), "finetune": _ShardWriter(out / "finetune", per_shard=3)}
    for name, base, finetune in layer_tensors(preset, layers, low_rank=low_rank):
        writers["base"].add(name, base)
        writers["finetune"].add(name, finetune)
    for writer in writers.values():
        writer.close()
    return out / "base", out / "finetune"


class _ShardWriter:
    """Writes tensors in shards of ``per_shard`` tensors, then the index; holds one shard at most."""

    def __init__(self, directory: Path, per_shard: int) -> None:
        self.directory = directory
        self.per_shard = per_shard
        self.pending: dict[str, torch.Tensor] = {}
        self.shards: list[dict[str, torch.Tensor] | list[str]] = []
        self.weight_map: dict[str, str] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        if len(self.pending) == self.per_shard:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            index = len(self.shards)
            filename = f"shard-{index:05d}.safetensors"  # renamed to model-i-of-n once n is known
            save_file(self.pending, str(self.directory / filename))
            self.shards.append(list(self.pending))
            self.pending = {}

    def close(self) -> None:
        self._flush()
        total = len(self.shards)
        for index, names in enumerate(self.shards):
            final = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
            (self.directory / f"shard-{index:05d}.safetensors").rename(self.directory / final)
            self.weight_map.update(dict.fromkeys(names, final))
        index_json = {"metadata": {}, "weight_map": self.weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--low-rank", action="store_true", help="a LoRA-trained fine-tune: Δ exactly rank 64")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    base, finetune = write_pair(args.out, PRESETS[args.preset], args.layers, low_rank=args.low_rank)
    print(f"wrote {base} and {finetune}")


if __name__ == "__main__":
    main()
