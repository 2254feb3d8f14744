"""One decoder block as a pure function, and a whole model built from tensors already in hand.

``block_forward`` runs block ``layer`` of an architecture over hidden states with the weights it
is given; ``block_on_device`` is the same as a ``lorafid.compute`` kernel (CPU tensors in and
out, picklable by name, for a ZeroGPU worker). ``build_model`` assembles a whole causal LM from a
state dict for generation, without reading or copying weights.

Not here: streaming weights block by block (``forward``), the architecture (``architecture``).
"""

from __future__ import annotations

from typing import Any

import torch

from lorafid.audit import spectrum as sp
from lorafid.behaviour.architecture import (
    block_masks,
    layer_types,
    meta_skeleton,
    meta_skeleton_cached,
    rotary_embedding,
)
from lorafid.compute import kernel_device
from lorafid.errors import (
    LorafidError,
)


def block_forward(
    config: Any, layer: int, weights: dict[str, torch.Tensor], hidden: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Block ``layer`` of the architecture ``config`` with ``weights`` over each text's hidden states.

    A pure function: it changes none of its arguments and returns new tensors on the device of
    ``hidden``, so it can run in another process (a ZeroGPU worker pickles arguments and
    results). Rotary embeddings and masks are rebuilt from ``config`` and each tensor's length
    (positions 0..n-1), exactly as ``LayerStream.logprobs`` builds them.

    Args:
        config: the transformers config (``load_config``), ``_attn_implementation`` "sdpa".
        weights: parameter names relative to the block ("self_attn.q_proj.weight", ...), in
            the compute dtype, on the device of ``hidden``.
        hidden: (texts, tokens, hidden_size) tensors, each holding texts of one length.

    Example: ``block_forward(config, 0, weights, [torch.randn(1, 5, config.hidden_size)])``.
    """
    if not hidden:
        return []
    device, dtype = hidden[0].device, hidden[0].dtype
    skeleton = meta_skeleton_cached(config)
    block = skeleton.model.layers[layer]
    embed = rotary_embedding(skeleton, config, device, dtype)
    kind = layer_types(config)[layer]
    out: list[torch.Tensor] = []
    with torch.no_grad(), sp.exact_matmul():
        for h in hidden:
            positions = torch.arange(h.shape[1], device=device).unsqueeze(0)
            result = torch.func.functional_call(
                block,
                weights,
                (h,),
                {
                    "attention_mask": block_masks(config, h, positions)[kind],
                    "position_ids": positions,
                    "position_embeddings": embed(h, positions),
                },
            )
            out.append(result[0] if isinstance(result, tuple) else result)
    return out


def block_on_device(
    config: Any,
    layer: int,
    weights: dict[str, torch.Tensor],
    hidden: list[torch.Tensor],
    device: str | torch.device | None = None,
) -> list[torch.Tensor]:
    """``block_forward`` as a ``lorafid.compute`` kernel: CPU tensors in and out, run on
    ``device`` (None: the first CUDA device where there is one, else the CPU).

    Module-level (picklable by name) so a worker process can run it.
    """
    device = kernel_device(device)
    on_device = {name: t.to(device) for name, t in weights.items()}
    result = block_forward(config, layer, on_device, [h.to(device) for h in hidden])
    return [h.cpu() for h in result]


def build_model(config: Any, state: dict[str, torch.Tensor], device: torch.device) -> Any:
    """A whole causal LM holding ``state`` (from ``LayerStream.state_dicts``), for generation.

    Built on the meta device and given the tensors themselves (no random init, no copy); the
    rotary embedding, whose buffers are not weights, is rebuilt on the device.
    """
    model = meta_skeleton(config)
    model.load_state_dict(state, strict=False, assign=True)
    if "lm_head.weight" not in state:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    left = [n for n, t in model.named_parameters() if t.is_meta]
    if left:
        raise LorafidError(f"Internal error: no weight for {left[0]} when building the whole model.")
    return model.eval()
