"""Quantized copies of the fine-tune, as providers serve them, for the provider check's candidates.

A provider that serves the original weights often serves them quantized; a quantized
original must never be called an extraction, so each quantization is a candidate of its
own. Every function here maps one weight (model parameter name, float tensor) to the
weight a server running that scheme computes with (quantize, then dequantize), and is
applied by the layer-streamed forward as a ``Variant.weight_hook``.

Schemes (the 2-D matrices of the decoder blocks, ``...layers.N...``; embeddings, ``lm_head``
and norms stay, as weight-only schemes leave them):

- ``int8``: round to nearest, absmax per output row (the 8-bit reference);
- ``fp8``: float8 e4m3 with one scale per tensor (vLLM's dynamic ``fp8`` weight quantization);
- ``fp8-channel``: float8 e4m3 with one scale per output row;
- ``int4-g128``: asymmetric 4-bit round to nearest in groups of 128 input columns with a
  scale and zero point per group (what AWQ / GPTQ approximate, without their calibration);
- ``q8_0``, ``q5_0``, ``q4_0``: llama.cpp's GGUF block formats, computed with the ``gguf``
  package's own quantizers (``pip install gguf``), in blocks of 32 along each row.

Not here: choosing candidates (``lorafid.providers.probe``), the forward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorafid.errors import LorafidError, MissingExtraError

WeightHook = Callable[[str, torch.Tensor], torch.Tensor]

FP8_E4M3_MAX = 448.0  # the largest finite float8 e4m3 value
INT4_GROUP = 128


def quantized_here(name: str, weight: torch.Tensor) -> bool:
    """Weight-only schemes quantize the decoder blocks' matrices, nothing else."""
    return weight.ndim == 2 and ".layers." in name


def int8_rows(name: str, weight: torch.Tensor) -> torch.Tensor:
    """8-bit round to nearest with an absmax scale per row.

    Example: a row (0.5, -1.0, 0.26) has scale 1/127, so 0.26 -> round(33.02)/127 = 0.2598.
    """
    if not quantized_here(name, weight):
        return weight
    w = weight.to(torch.float32)
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    return (torch.round(w / scale).clamp_(-127, 127) * scale).to(weight.dtype)


def _fp8(w: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    scale = amax.clamp_min(torch.finfo(torch.float32).tiny) / FP8_E4M3_MAX
    return (w / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32) * scale


def fp8_tensor(name: str, weight: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 with one scale per tensor: amax / 448 (vLLM ``--quantization fp8``)."""
    if not quantized_here(name, weight):
        return weight
    w = weight.to(torch.float32)
    return _fp8(w, w.abs().amax()).to(weight.dtype)


def fp8_channel(name: str, weight: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 with one scale per output row."""
    if not quantized_here(name, weight):
        return weight
    w = weight.to(torch.float32)
    return _fp8(w, w.abs().amax(dim=1, keepdim=True)).to(weight.dtype)


def int4_groups(name: str, weight: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """Asymmetric 4-bit round to nearest per group of ``group`` input columns (a last, shorter
    group where the width is not a multiple). Levels 0..15: scale = (max − min) / 15, zero
    point = round(−min / scale); a constant group is kept exactly.

    Example: the group (0, 1, 2, 3) has scale 0.2, zero 0: 1 -> 5 -> 1.0, 2 -> 10 -> 2.0.
    """
    if not quantized_here(name, weight):
        return weight
    w = weight.to(torch.float32)
    out = torch.empty_like(w)
    for start in range(0, w.shape[1], group):
        g = w[:, start : start + group]
        low, high = g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)
        scale = ((high - low) / 15.0).clamp_min(torch.finfo(torch.float32).tiny)
        zero = torch.round(-low / scale)
        q = (torch.round(g / scale) + zero).clamp_(0, 15)
        out[:, start : start + group] = torch.where(high > low, (q - zero) * scale, g)
    return out.to(weight.dtype)


def _gguf_hook(type_name: str) -> WeightHook:
    def hook(name: str, weight: torch.Tensor) -> torch.Tensor:
        if not quantized_here(name, weight):
            return weight
        try:
            from gguf import GGMLQuantizationType, quants
        except ImportError as e:
            raise MissingExtraError(
                f"The {type_name.lower()} candidate is computed with the gguf package's quantizers: pip install gguf"
            ) from e
        qtype = GGMLQuantizationType[type_name]
        rows = weight.detach().to("cpu", torch.float32).numpy()
        if rows.shape[1] % 32:
            raise LorafidError(f"{name}: {rows.shape[1]} columns are not a whole number of GGUF blocks of 32.")
        restored = quants.dequantize(quants.quantize(rows, qtype), qtype).reshape(rows.shape)
        return torch.from_numpy(restored.copy()).to(weight.device, weight.dtype)

    hook.__name__ = f"gguf_{type_name.lower()}"
    return hook


SCHEMES: dict[str, WeightHook] = {
    "int8": int8_rows,
    "fp8": fp8_tensor,
    "fp8-channel": fp8_channel,
    "int4-g128": int4_groups,
    "q8_0": _gguf_hook("Q8_0"),
    "q5_0": _gguf_hook("Q5_0"),
    "q4_0": _gguf_hook("Q4_0"),
}
"""Every quantization a candidate can be served with, by the name used in ``--candidates``."""


def scheme(name: str) -> WeightHook:
    """The weight hook of a scheme named in ``SCHEMES``; a clear error for any other name."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise LorafidError(f"Unknown quantization {name!r}; choose from {', '.join(SCHEMES)}.") from None
