"""Tiny base / fine-tune model pairs, as safetensors bytes, for local dirs and the loopback Hub.

Shapes follow a Llama block at toy size; the fine-tune's delta has a decaying spectrum, so
every rank gives a different answer. Shards of the two models are cut at different
places on purpose (the pairing must not assume aligned shards).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save

MODULES: dict[str, tuple[int, int]] = {
    "self_attn.q_proj": (32, 32),
    "self_attn.k_proj": (16, 32),
    "mlp.up_proj": (48, 32),
    "mlp.down_proj": (32, 48),
}


def model_pair(
    layers: int = 2, dtype: torch.dtype = torch.bfloat16, seed: int = 0, low_rank: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base, fine-tune) tensors: 2-D matrices per layer, a norm per layer, embeddings."""
    generator = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    finetune: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for module, (rows, cols) in MODULES.items():
            name = f"model.layers.{layer}.{module}.weight"
            weight = 0.05 * torch.randn(rows, cols, generator=generator)
            if low_rank:
                delta = (
                    0.01
                    * torch.randn(rows, low_rank, generator=generator)
                    @ torch.randn(low_rank, cols, generator=generator)
                )
            else:
                scale = torch.arange(1, cols + 1, dtype=torch.float32) ** -0.8
                delta = 0.01 * torch.randn(rows, cols, generator=generator) * scale
            base[name] = weight.to(dtype)
            finetune[name] = (base[name].float() + delta).to(dtype)
        norm = f"model.layers.{layer}.input_layernorm.weight"
        base[norm] = torch.ones(32).to(dtype)
        finetune[norm] = (1 + 0.01 * torch.randn(32, generator=generator)).to(dtype)
    base["model.embed_tokens.weight"] = 0.05 * torch.randn(64, 32, generator=generator).to(dtype)
    finetune["model.embed_tokens.weight"] = base["model.embed_tokens.weight"].clone()
    return base, finetune


def shard_files(tensors: dict[str, torch.Tensor], shards: int, offset: int = 0) -> dict[str, bytes]:
    """Safetensors shards + ``model.safetensors.index.json``; ``offset`` shifts the cut points."""
    names = sorted(tensors)
    if shards == 1:
        return {"model.safetensors": save(tensors)}
    files: dict[str, bytes] = {}
    weight_map: dict[str, str] = {}
    cuts = [0] + [min(len(names), (i * len(names)) // shards + offset) for i in range(1, shards)] + [len(names)]
    for i in range(shards):
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[cuts[i] : cuts[i + 1]]}
        files[filename] = save(part)
        weight_map.update(dict.fromkeys(part, filename))
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    files["config.json"] = b'{"model_type": "llama"}'
    return files


def write_dir(files: dict[str, bytes], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_bytes(content)
    return directory
