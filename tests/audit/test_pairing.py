"""pairing.py: names across unaligned shards, prefixes, classification, every skip reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorafid.audit.engine import Audit, AuditConfig
from lorafid.audit.pairing import classify, learn_prefixes, match_names, plan_pairs
from lorafid.audit.store import Store
from lorafid.errors import AmbiguousPairingError, NoCommonTensorsError, UnsupportedDtypeError
from lorafid.weights.safetensors_format import TensorInfo


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


def test_match_names_prefers_exact_then_the_learned_prefix() -> None:
    base = ["model.layers.0.w", "model.layers.1.w", "lm_head.weight"]
    finetune = ["layers.0.w", "layers.1.w", "lm_head.weight"]
    assert match_names(base, finetune) == [
        ("lm_head.weight", "lm_head.weight"),
        ("model.layers.0.w", "layers.0.w"),
        ("model.layers.1.w", "layers.1.w"),
    ]


# Real wrappers: encoder heads, GPT-NeoX, OPT's decoder, DDP, torch.compile, nested, PEFT merges,
# multimodal wrappers (one wrapper replaced by another), on either side.
@pytest.mark.parametrize(
    ("base_prefix", "finetune_prefix"),
    [
        ("", "bert."),
        ("roberta.", ""),
        ("", "gpt_neox."),
        ("", "model.decoder."),
        ("", "module."),
        ("_orig_mod.", ""),
        ("", "module._orig_mod."),
        ("", "base_model.model."),
        ("model.", "model.language_model."),
    ],
)
def test_the_wrapper_prefix_is_learned_from_the_names(base_prefix: str, finetune_prefix: str) -> None:
    bare = [f"layers.{i}.{m}.weight" for i in range(3) for m in ("attn.q", "attn.k", "mlp.up")] + ["norm.weight"]
    base = {base_prefix + n: info(base_prefix + n, (4, 4) if "layers" in n else (4,)) for n in bare}
    extra = {"cls.head.weight": info("cls.head.weight", (4, 4))}  # a head only the fine-tune has
    finetune = {finetune_prefix + n: info(finetune_prefix + n, (4, 4) if "layers" in n else (4,)) for n in bare}
    plan = plan_pairs(base, finetune | extra)
    assert (plan.base_prefix, plan.finetune_prefix) == (base_prefix, finetune_prefix)
    assert sorted((p.base.name, p.name) for p in plan.matrices) == sorted(
        (base_prefix + n, finetune_prefix + n) for n in bare if "layers" in n
    )
    assert [p.name for p in plan.vectors] == [finetune_prefix + "norm.weight"]
    assert {(s.name, s.reason) for s in plan.skipped} == {("cls.head.weight", "only_in_finetune")}
    assert {p.layer for p in plan.matrices} == {0, 1, 2}


def test_ambiguous_prefixes_are_refused_with_a_message() -> None:
    # "model.x.w" and "transformer.x.w" both become "x.w" once a prefix is stripped: which one is it?
    with pytest.raises(AmbiguousPairingError, match=r"more than one wrapper prefix.*'model\.'.*'transformer\.'"):
        learn_prefixes(["model.x.w", "transformer.x.w"], ["x.w"])
    assert learn_prefixes(["a.w"], ["a.w"]) == ("", "")  # exact names need no prefix


def test_an_encoder_and_its_masked_lm_fine_tune_saved_by_transformers(tmp_path: Path) -> None:
    """BertModel saves bare names, BertForMaskedLM prefixes them with "bert.": they pair, exactly."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    base = transformers.BertModel(config, add_pooling_layer=False)
    base.save_pretrained(tmp_path / "base")
    tuned = transformers.BertForMaskedLM(config)
    tuned.bert.load_state_dict(base.state_dict())
    query = tuned.bert.encoder.layer[1].attention.self.query.weight
    with torch.no_grad():
        query += torch.randn(16, 2) @ torch.randn(2, 16) * 0.1  # a rank-2 fine-tune of one matrix
    tuned.save_pretrained(tmp_path / "tuned")
    store = Store(tmp_path / "store")
    with Audit(str(tmp_path / "base"), str(tmp_path / "tuned"), AuditConfig(rank=2, device="cpu", store=store)) as job:
        for _ in job.run():
            pass
        report = job.report()
    assert (report.settings.base_name_prefix, report.settings.finetune_name_prefix) == ("", "bert.")
    assert json.loads(report.to_json())["settings"]["finetune_name_prefix"] == "bert."
    assert len(report.matrices) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    by_name = {m.name: m for m in report.matrices}
    changed = by_name["bert.encoder.layer.1.attention.self.query.weight"]
    delta = (query.detach() - base.encoder.layer[1].attention.self.query.weight.detach()).double()
    assert changed.energy == pytest.approx(float(delta.square().sum()), rel=1e-6)
    assert changed.energy_retained(2) == pytest.approx(1.0, abs=1e-6)  # rank 2 keeps a rank-2 change
    assert sum(m.energy > 0 for m in report.matrices) == 1
    assert {s.reason for s in report.skipped if s.name.startswith("cls.")} == {"only_in_finetune"}


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
