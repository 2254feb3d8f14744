"""pairing.py: names across unaligned shards, prefixes, classification, every skip reason."""

from __future__ import annotations

import pytest

from lorafid.errors import NoCommonTensorsError, UnsupportedDtypeError
from lorafid.pairing import classify, match_names, plan_pairs
from lorafid.safetensors_format import TensorInfo


def info(
    name: str, shape: tuple[int, ...], dtype: str = "BF16", file: str = "a.safetensors", start: int = 100
) -> TensorInfo:
    numel = 1
    for d in shape:
        numel *= d
    itemsize = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "F8_E4M3": 1, "U8": 1}[dtype]
    return TensorInfo(name=name, dtype=dtype, shape=shape, file=file, start=start, end=start + numel * itemsize)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.12.mlp.down_proj.weight", (12, "mlp.down_proj")),
        ("model.layers.0.self_attn.q_proj.weight", (0, "self_attn.q_proj")),
        ("transformer.h.3.attn.c_attn.weight", (3, "attn.c_attn")),
        ("encoder.layer.5.attention.self.query.weight", (5, "attention.self.query")),
        ("model.embed_tokens.weight", (None, "embed_tokens")),
        ("lm_head.weight", (None, "lm_head")),
        ("model.norm.weight", (None, "norm")),
    ],
)
def test_classify(name: str, expected: tuple[int | None, str]) -> None:
    assert classify(name) == expected


def test_match_names_tolerates_wrapper_prefixes_but_prefers_exact() -> None:
    base = ["model.layers.0.w", "model.layers.1.w", "lm_head.weight"]
    finetune = ["layers.0.w", "base_model.model.layers.1.w", "lm_head.weight"]
    assert match_names(base, finetune) == [
        ("lm_head.weight", "lm_head.weight"),
        ("model.layers.0.w", "layers.0.w"),
        ("model.layers.1.w", "base_model.model.layers.1.w"),
    ]


def test_ambiguous_canonical_names_are_not_guessed() -> None:
    # "model.x" and "transformer.x" both canonicalize to "x": neither is paired with "x".
    assert match_names(["model.x", "transformer.x"], ["x"]) == []


def test_plan_classifies_and_lists_every_skip_with_a_reason() -> None:
    base = {
        "model.layers.0.mlp.up_proj.weight": info("model.layers.0.mlp.up_proj.weight", (8, 4), file="b1"),
        "model.layers.0.input_layernorm.weight": info("model.layers.0.input_layernorm.weight", (4,), file="b2"),
        "model.layers.0.self_attn.q_proj.weight": info("model.layers.0.self_attn.q_proj.weight", (4, 4)),
        "model.layers.0.self_attn.k_proj.weight": info("model.layers.0.self_attn.k_proj.weight", (4, 4)),
        "model.embed_tokens.weight": info("model.embed_tokens.weight", (10, 4)),
        "model.only_base.weight": info("model.only_base.weight", (2, 2)),
    }
    finetune = {
        "model.layers.0.mlp.up_proj.weight": info("model.layers.0.mlp.up_proj.weight", (8, 4), file="f9"),
        "model.layers.0.input_layernorm.weight": info("model.layers.0.input_layernorm.weight", (4,)),
        "model.layers.0.self_attn.q_proj.weight": info("model.layers.0.self_attn.q_proj.weight", (4, 8)),
        "model.layers.0.self_attn.k_proj.weight": info("model.layers.0.self_attn.k_proj.weight", (4, 4), dtype="I32"),
        "model.embed_tokens.weight": info("model.embed_tokens.weight", (12, 4)),
        "model.extra.weight": info("model.extra.weight", (2, 2)),
    }
    plan = plan_pairs(base, finetune)
    assert [(p.name, p.layer, p.module) for p in plan.matrices] == [
        ("model.layers.0.mlp.up_proj.weight", 0, "mlp.up_proj")
    ]
    assert plan.matrices[0].base.file == "b1" and plan.matrices[0].finetune.file == "f9"
    assert [p.name for p in plan.vectors] == ["model.layers.0.input_layernorm.weight"]
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons == {
        "model.only_base.weight": "only_in_base",
        "model.extra.weight": "only_in_finetune",
        "model.layers.0.self_attn.q_proj.weight": "shape_mismatch",
        "model.layers.0.self_attn.k_proj.weight": "unsupported_dtype",
        "model.embed_tokens.weight": "embedding",
    }
    mismatch = next(s for s in plan.skipped if s.reason == "shape_mismatch")
    assert "[4, 4] in the base, [4, 8] in the fine-tune" in mismatch.detail


def test_included_embeddings_compare_the_shared_vocabulary_rows() -> None:
    base = {"model.embed_tokens.weight": info("model.embed_tokens.weight", (10, 4), start=200)}
    finetune = {"model.embed_tokens.weight": info("model.embed_tokens.weight", (12, 4), start=300)}
    plan = plan_pairs(base, finetune, include_embeddings=True)
    (pair,) = plan.matrices
    assert pair.base.shape == pair.finetune.shape == (10, 4)
    assert pair.finetune.start == 300 and pair.finetune.end == 300 + 10 * 4 * 2  # first 10 rows only
    assert pair.base.end == 200 + 10 * 4 * 2


def test_include_and_exclude_filters() -> None:
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    tensors = {n: info(n, (4, 4)) for n in names}
    plan = plan_pairs(tensors, tensors, include=r"mlp")
    assert [p.name for p in plan.matrices] == [names[0]]
    plan = plan_pairs(tensors, tensors, exclude=r"mlp")
    assert [p.name for p in plan.matrices] == [names[1]]
    assert {s.reason for s in plan.skipped} == {"filtered"}


def test_quantized_model_is_refused_with_an_explanation() -> None:
    base = {"model.layers.0.mlp.up_proj.qweight": info("model.layers.0.mlp.up_proj.qweight", (4, 8), dtype="I32")}
    with pytest.raises(UnsupportedDtypeError, match="GPTQ/AWQ"):
        plan_pairs(base, base)


def test_fp8_with_scales_is_refused() -> None:
    tensors = {
        "model.layers.0.mlp.up_proj.weight": info("model.layers.0.mlp.up_proj.weight", (4, 8), dtype="F8_E4M3"),
        "model.layers.0.mlp.up_proj.weight_scale": info("model.layers.0.mlp.up_proj.weight_scale", (1,), dtype="F32"),
    }
    with pytest.raises(UnsupportedDtypeError, match="F8_E4M3"):
        plan_pairs(tensors, tensors)


def test_no_common_tensors() -> None:
    with pytest.raises(NoCommonTensorsError, match="made from this base model"):
        plan_pairs({"a.weight": info("a.weight", (2, 2))}, {"b.weight": info("b.weight", (2, 2))})
