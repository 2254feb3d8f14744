"""A model's architecture from its ``config.json``, through ``transformers``, without its weights.

``load_config`` reads and bounds the fine-tune's config (``model_limits``) and checks the model
type is one the layer-streamed forward supports; ``meta_skeleton`` builds the model on the meta
device (no memory); ``parameter_names``, ``layer_types``, ``rotary_embedding`` and ``block_masks``
are what a block needs besides its weights. ``transformers`` is imported only here and when a
check runs (``require_transformers`` says which extra to install).

Not here: reading weights or running blocks (``forward``, ``blocks``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lorafid.behaviour import model_limits
from lorafid.errors import (
    MissingExtraError,
    MissingModelFileError,
    UnsupportedArchitectureError,
)
from lorafid.weights.source import Source

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
"""``config.json`` model types whose blocks share Llama's call signature (checked in tests)."""
MAX_CONFIG_BYTES = 2**20  # a config.json is a few kB


def require_transformers() -> None:
    """Raise a clear error when the ``behaviour`` extra (transformers, accelerate) is not installed.

    Raises:
        MissingExtraError: naming ``pip install lorafid[behaviour]``.
    """
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(
            "The behaviour check builds models with transformers and accelerate, which are not installed: "
            "pip install lorafid[behaviour]"
        ) from e


def full_rank_of(config: Mapping[str, Any]) -> int | None:
    """The model's full rank (``LayerStream.full_rank``) from a Llama-family ``config.json``
    without reading a weight: the largest min(m, n) of q/k/v/o and the MLP matrices; None when
    the config lacks the sizes.

    Example: hidden 4096, 32 heads of 128, 8 KV heads, MLP 14336 -> 4096.
    """
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        mlp = int(config["intermediate_size"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return max(min(hidden, heads * head_dim), min(hidden, kv_heads * head_dim), min(hidden, mlp))


def read_config_json(source: Source) -> dict[str, Any] | None:
    """The source's ``config.json`` as a dict, or None when it has none."""
    raw = source.read_small_file("config.json", MAX_CONFIG_BYTES)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise MissingModelFileError(f"{source.describe('config.json')} is not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise MissingModelFileError(f"{source.describe('config.json')} is not a JSON object.")
    return data


def load_config(source: Source) -> Any:
    """The transformers config of a supported architecture, from the source's ``config.json``.

    Raises:
        MissingModelFileError: no config.json (a forward needs the architecture).
        UnsupportedArchitectureError: a model type outside ``SUPPORTED_MODEL_TYPES``.
    """
    from transformers import AutoConfig

    data = read_config_json(source)
    if data is None:
        raise MissingModelFileError(
            f"{source.describe()} has no config.json; the behaviour check builds the architecture from the "
            "fine-tune's config.json. Pass the repo or directory that holds it beside the weights."
        )
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"{source.describe()} is a {model_type or 'model of unknown type'!s} model; the behaviour check runs "
            f"the Llama family only ({', '.join(SUPPORTED_MODEL_TYPES)}). The weight audit works for any model."
        )
    model_limits.check_config(data, source.describe("config.json"))  # before transformers reads a field
    fields = {k: v for k, v in data.items() if k != "model_type"}
    config = AutoConfig.for_model(model_type, **fields)
    # The math is ours to fix: SDPA without padding is exact attention and runs on every device.
    config._attn_implementation = "sdpa"
    return config


# -- helpers -------------------------------------------------------------------------------


def meta_skeleton(config: Any) -> Any:
    """The causal LM on the meta device: its modules, no weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


_SKELETONS: dict[str, Any] = {}  # config JSON -> meta skeleton; one entry, for block_forward


def meta_skeleton_cached(config: Any) -> Any:
    """``meta_skeleton(config)``, built once per architecture in this process (meta: no memory)."""
    key = config.to_json_string()
    if key not in _SKELETONS:
        _SKELETONS.clear()
        _SKELETONS[key] = meta_skeleton(config)
    return _SKELETONS[key]


def rotary_embedding(skeleton: Any, config: Any, device: torch.device, dtype: torch.dtype) -> Callable[..., Any]:
    """The rotary embedding rebuilt on the real device (its buffers are on meta in the skeleton)."""
    rotary = type(skeleton.model.rotary_emb)(config=config).to(device)

    def embed(hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rotary(hidden, positions)
        return cos.to(dtype), sin.to(dtype)

    return embed


def layer_types(config: Any) -> list[str]:
    """ "full_attention" or "sliding_attention" for each block, as the model classes decide it."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    sliding = getattr(config, "sliding_window", None) is not None and config.model_type == "mistral"
    return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers


def block_masks(config: Any, hidden: torch.Tensor, positions: torch.Tensor) -> dict[str, Any]:
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    common = {"config": config, "inputs_embeds": hidden, "attention_mask": None, "past_key_values": None}
    masks = {"full_attention": create_causal_mask(**common, position_ids=positions)}
    if "sliding_attention" in layer_types(config):
        masks["sliding_attention"] = create_sliding_window_causal_mask(**common, position_ids=positions)
    return masks


def parameter_names(config: Any) -> list[str]:
    """The parameter names of the architecture, without building it."""
    model = meta_skeleton(config)
    names = [n for n, _ in model.named_parameters()]
    if "lm_head.weight" not in names:
        names.append("lm_head.weight")  # tied: named_parameters lists the shared tensor once
    return names
