"""Both models of a pair opened and checked for a layer-streamed forward: the ``ModelPlan``.

``check_pair`` reads the fine-tune's ``config.json`` (bounded by ``model_limits``), both headers,
and checks every limit from their byte counts before anything is built or read; then it maps
the architecture's parameter names onto each checkpoint's tensors (the audit's pairing rules,
a tied head allowed) and refuses a base of another vocabulary or shape. Nothing here reads a
tensor's data.

Not here: opening the sources (``weights.source``), running the blocks (``forward``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lorafid.audit.pairing import is_embedding, match_names
from lorafid.behaviour import model_limits
from lorafid.behaviour.architecture import load_config, parameter_names, read_config_json
from lorafid.errors import MissingModelFileError, VocabularyMismatchError
from lorafid.weights.safetensors_format import TensorInfo, header_cap
from lorafid.weights.source import Source
from lorafid.weights.tensors import tensor_indexes


@dataclass(frozen=True)
class ModelPlan:
    """Both models opened and checked, the architecture known: what a forward needs to start."""

    config: Any  # the fine-tune's transformers config
    base_tensors: dict[str, TensorInfo]  # model parameter name -> record in the base
    finetune_tensors: dict[str, TensorInfo]
    size_bytes: int  # weight bytes of both models

    @property
    def head_is_embedding(self) -> bool:
        """The fine-tune has no ``lm_head.weight``: its head is the embedding matrix (tied)."""
        return "lm_head.weight" not in self.finetune_tensors


def check_pair(
    specs: tuple[str, str],
    sources: tuple[Source, Source],
    *,
    max_tensors: int | None = None,
    max_tensor_bytes: int | None = None,
    max_model_bytes: int | None = None,
) -> ModelPlan:
    """The plan of a forward over the opened (base, fine-tune) ``sources`` named ``specs``.

    Raises:
        MissingModelFileError, UnsupportedArchitectureError, VocabularyMismatchError,
        LimitExceededError, and the sources' errors (gated, not found, ...).
    """
    base_source, finetune_source = sources
    model_config = load_config(finetune_source)  # its size fields are bounded there
    base_config = read_config_json(base_source)
    cap = header_cap(max_tensors) if max_tensors else None  # a flood of tiny tensors: refused unread
    base_raw, finetune_raw = tensor_indexes(base_source, finetune_source, max_header_bytes=cap)
    # Every limit from the headers' byte counts, before the skeleton is built or a tensor read.
    size = model_limits.check_headers(
        specs,
        (base_raw, finetune_raw),
        model_config.num_hidden_layers,
        max_tensors=max_tensors,
        max_tensor_bytes=max_tensor_bytes,
        max_model_bytes=max_model_bytes,
    )
    names = parameter_names(model_config)
    finetune_tensors = _map_names(names, finetune_raw, model_config, where=finetune_source.describe())
    base_tensors = _map_names(names, base_raw, model_config, where=base_source.describe(), head_may_be_tied=True)
    if "lm_head.weight" in finetune_tensors and "lm_head.weight" not in base_tensors:
        base_tensors["lm_head.weight"] = base_tensors["model.embed_tokens.weight"]  # a base with a tied head
    _check_shapes(model_config, base_config, base_tensors, finetune_tensors, specs)
    return ModelPlan(model_config, base_tensors, finetune_tensors, size)


def _map_names(
    names: list[str], tensors: Mapping[str, TensorInfo], config: Any, *, where: str, head_may_be_tied: bool = False
) -> dict[str, TensorInfo]:
    """Model parameter name -> the checkpoint's record, by exact name or under the wrapper prefix
    that the audit's pairing learns from the two name sets ("model." added or dropped, ...).

    A checkpoint with tied embeddings usually has no ``lm_head.weight``; it is left out here and
    the head reads ``model.embed_tokens.weight``.
    """
    found = dict(match_names(names, tensors))
    out = {name: tensors[found[name]] for name in names if name in found}
    missing = [
        n
        for n in names
        if n not in out
        and not (n == "lm_head.weight" and (head_may_be_tied or getattr(config, "tie_word_embeddings", False)))
    ]
    if missing:
        raise MissingModelFileError(
            f"{where} lacks {len(missing)} weight(s) of a {config.model_type} model with this config.json, "
            f"e.g. {missing[0]}. Is config.json the one of these weights?"
        )
    return out


def _check_shapes(
    config: Any,
    base_config: dict[str, Any] | None,
    base: dict[str, TensorInfo],
    finetune: dict[str, TensorInfo],
    specs: tuple[str, str],
) -> None:
    """Refuse a base of another vocabulary or shape: its distributions are not comparable."""
    base_vocab = base["model.embed_tokens.weight"].shape[0]
    finetune_vocab = finetune["model.embed_tokens.weight"].shape[0]
    config_vocab = (base_config or {}).get("vocab_size", base_vocab)
    if base_vocab != finetune_vocab or config_vocab != config.vocab_size:
        raise VocabularyMismatchError(
            f"The base {specs[0]} has a vocabulary of {base_vocab} tokens and the fine-tune {specs[1]} of "
            f"{finetune_vocab}: next-token distributions over different vocabularies cannot be compared. "
            "Use the base the fine-tune was trained from (the weight audit compares the shared rows)."
        )
    for name, info in finetune.items():
        if name in base and base[name].shape != info.shape:
            raise MissingModelFileError(
                f"{name} is {list(base[name].shape)} in the base and {list(info.shape)} in the fine-tune; "
                "the two are not the same architecture."
            )


def carried_info(name: str, info: TensorInfo) -> bool:
    """``variants.carried`` from a tensor's header record: a 2-D block matrix, not an embedding."""
    return name.startswith("model.layers.") and len(info.shape) == 2 and not is_embedding(name)
