"""Bounds on a model's ``config.json`` and headers, checked before anything is built or read.

A forward builds the architecture from the fine-tune's ``config.json`` (a meta skeleton: no
weights, but one Python module per layer) and plans from the safetensors headers. A small
file of a public repo could otherwise make a server spend minutes and gigabytes before any
size check: 8,000 layers took 74 s and 0.7 GB to build, a huge ``head_dim`` allocated 51.5 GB
while planning. So, in this order, each check raising ``LimitExceededError`` naming the field:

1. ``check_config``: every size field of ``config.json`` is a positive whole number within
   ``CONFIG_LIMITS`` (generous: the largest open models are well inside them);
2. ``check_headers``: the headers' tensor count (``max_tensors``), the largest tensor
   (``max_tensor_bytes``) and both models' bytes (``max_model_bytes``), from the byte counts
   the headers declare; and the config's layer count against the layers the weights hold
   (a config claiming more layers than its checkpoint has is refused before the skeleton).

Settings only, no I/O. Not here: reading the config or the headers (``forward``, ``weights``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from lorafid.errors import LimitExceededError
from lorafid.weights.safetensors_format import TensorInfo

CONFIG_LIMITS: dict[str, int] = {
    # Llama 3.1 405B: 126 layers, hidden 16,384, intermediate 53,248, 128 heads of 128, vocab 128,256.
    "num_hidden_layers": 512,
    "hidden_size": 65_536,
    "intermediate_size": 262_144,
    "head_dim": 1_024,
    "num_attention_heads": 1_024,
    "num_key_value_heads": 1_024,
    "vocab_size": 1_048_576,  # Gemma's 262,144 is the largest in use
    "max_position_embeddings": 16_777_216,  # 16M tokens; 1M-token contexts exist
}
"""The largest value each ``config.json`` field may hold; a field that is absent takes
transformers' default for the architecture."""

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_config(data: Mapping[str, Any], where: str) -> None:
    """Refuse a ``config.json`` whose size fields are not positive whole numbers within ``CONFIG_LIMITS``.

    ``where`` names the file in the message ("org/tuned@abc123: config.json").

    Raises:
        LimitExceededError: naming the field, its value and the limit.
    """
    for name, limit in CONFIG_LIMITS.items():
        if name not in data or data[name] is None:
            continue
        value = data[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LimitExceededError(
                f"{where}: {name} is {str(value)[:40]!r}, not a positive whole number; this is not a model lorafid "
                "can build. Check the repo's config.json."
            )
        if value > limit:
            raise LimitExceededError(
                f"{where}: {name} is {value:,}, above the {limit:,} lorafid builds (the largest open models stay "
                "well under it). Check the repo's config.json."
            )


def check_headers(
    specs: tuple[str, str],
    indexes: tuple[Mapping[str, TensorInfo], Mapping[str, TensorInfo]],
    layers: int,
    *,
    max_tensors: int | None = None,
    max_tensor_bytes: int | None = None,
    max_model_bytes: int | None = None,
    command: str = "lorafid behave",
) -> int:
    """Check both models' headers against the limits and the config's layer count; return
    both models' weight bytes (the sum of the sizes the headers declare).

    ``specs`` are (base, fine-tune) as typed; ``indexes`` their tensors by name; ``layers`` the
    fine-tune config's ``num_hidden_layers``; ``command`` what to run on one's own machine.

    Raises:
        LimitExceededError: too many tensors, a tensor or the pair too large, or more layers in
            the config than in the fine-tune's weights.
    """
    own = f"Run it with the CLI on your own machine: {command} {specs[0][:200]} {specs[1][:200]}"
    for spec, tensors in zip(specs, indexes, strict=True):
        if max_tensors is not None and len(tensors) > max_tensors:
            raise LimitExceededError(
                f"{spec[:200]} lists {len(tensors):,} tensors, above this server's limit of {max_tensors:,} per "
                f"model. {own}"
            )
        if max_tensor_bytes is not None:
            for name, info in tensors.items():
                if info.size_bytes > max_tensor_bytes:
                    raise LimitExceededError(
                        f"Tensor {name[:200]} of {spec[:200]} takes {info.size_bytes / 1e9:.2f} GB, above this "
                        f"server's per-tensor limit of {max_tensor_bytes / 1e9:.2f} GB. {own}"
                    )
    size = sum(t.size_bytes for tensors in indexes for t in tensors.values())
    if max_model_bytes is not None and size > max_model_bytes:
        raise LimitExceededError(
            f"This check would read {size / 1e9:.1f} GB, above this server's limit of {max_model_bytes / 1e9:.1f} GB. "
            f"{own}"
        )
    held = {int(m.group(1)) for name in indexes[1] for m in [_LAYER.search(name)] if m}
    if layers > len(held):
        raise LimitExceededError(
            f"{specs[1][:200]}: config.json says num_hidden_layers is {layers:,} but the weights hold "
            f"{len(held):,} layer(s). Is config.json the one of these weights?"
        )
    return size
