"""report.py: JSON round trip, re-deriving ranks, the seed post's view, summaries by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafid import spectrum as sp
from lorafid.errors import LorafidError
from lorafid.pairing import SkippedTensor
from lorafid.report import (
    RANK_GRID,
    SCHEMA,
    AuditSettings,
    MatrixResult,
    Report,
    SourceRecord,
    SpectrumNotLoadedError,
    VectorResult,
    aggregate_rank_for_energy,
    load_spectra,
    save_spectra,
    spectra_path,
)


def result(name: str, layer: int, module: str, base: torch.Tensor, finetune: torch.Tensor) -> MatrixResult:
    spectrum = sp.delta_spectrum(base, finetune)
    return MatrixResult.from_spectrum(name=name, layer=layer, module=module, dtype="F32", spectrum=spectrum)


def diag_result(name: str, layer: int, module: str, values: list[float]) -> MatrixResult:
    n = len(values)
    return result(name, layer, module, torch.zeros(n, n), torch.diag(torch.tensor(values, dtype=torch.float32)))


def make_report(matrices: tuple[MatrixResult, ...], rank: int = 2, **kw: object) -> Report:
    source = SourceRecord("org/base", "hub", "org/base", None, "a" * 40, None, ("model.safetensors",))
    other = SourceRecord("org/ft@v2", "hub", "org/ft", "v2", "b" * 40, None, ("model.safetensors",))
    return Report(base=source, finetune=other, settings=AuditSettings(rank=rank, device="cpu"), matrices=matrices, **kw)  # type: ignore[arg-type]


@pytest.fixture
def report() -> Report:
    generator = torch.Generator().manual_seed(3)
    random = result(
        "model.layers.1.mlp.down_proj.weight",
        1,
        "mlp.down_proj",
        torch.zeros(40, 24),
        torch.randn(40, 24, generator=generator),
    )
    return make_report(
        (diag_result("model.layers.0.self_attn.q_proj.weight", 0, "self_attn.q_proj", [4, 3, 2, 1]), random),
        vectors=(VectorResult("model.norm.weight", None, "norm", (4,), 0.5, 4.0),),
        skipped=(SkippedTensor("lm_head.weight", "embedding", "embedding", (10, 4), (10, 4)),),
        pending=("model.layers.1.mlp.up_proj.weight",),
        status="partial",
    )


def test_json_round_trip_is_exact(report: Report) -> None:
    text = report.to_json()
    again = Report.from_json(text)
    assert again == report
    # JSON + the spectra reproduce the JSON byte for byte (the summary is derived from both).
    spectra = {m.name: m.sigma_sq for m in report.matrices if m.sigma_sq is not None}
    assert again.with_spectra(spectra).to_json() == text
    data = json.loads(text)
    assert list(data)[:4] == ["schema", "tool_version", "created", "status"]
    assert data["schema"] == SCHEMA
    assert data["finetune"]["resolved_sha"] == "b" * 40
    assert data["settings"]["numerics"]["tf32"] is False


def test_any_rank_is_rederived_exactly_from_spectra(report: Report) -> None:
    for rank in (1, 3, 7, 23):
        at = report.with_rank(rank)
        for m in at.matrices:
            assert m.metrics(rank) == sp.metrics_at_rank(m.spectrum(), rank)


def test_without_spectra_grid_ranks_still_work_and_others_say_what_to_do(report: Report) -> None:
    loaded = Report.from_json(report.to_json())
    assert not loaded.has_spectra()
    for m, original in zip(loaded.matrices, report.matrices, strict=True):
        for rank in (1, 2, 4, 8, 16):
            assert m.metrics(rank) == original.metrics(rank)
    with pytest.raises(SpectrumNotLoadedError, match=r"spectra\.safetensors"):
        loaded.matrices[1].metrics(3)
    with pytest.raises(SpectrumNotLoadedError):
        loaded.with_rank(3)


def test_spectra_sidecar_round_trip(report: Report, tmp_path: Path) -> None:
    path = spectra_path(tmp_path / "report.json")
    assert path.name == "report.spectra.safetensors"
    save_spectra(report, path)
    loaded = Report.from_json(report.to_json()).with_spectra(load_spectra(path))
    assert loaded.has_spectra()
    for m, original in zip(loaded.matrices, report.matrices, strict=True):
        assert original.sigma_sq is not None and m.sigma_sq is not None
        np.testing.assert_array_equal(m.sigma_sq, original.sigma_sq)
        assert m.metrics(3) == original.metrics(3)


def test_compare_py_view_has_the_post_layout(report: Report) -> None:
    view = report.compare_py()
    entry = view["model.layers.0.self_attn.q_proj.weight"]
    assert entry == {
        "loss": {"mse": pytest.approx(5 / 16), "cosine_distance": pytest.approx(1 - math.sqrt(25 / 30))},
        "mean_diff_value": pytest.approx(10 / 16),
        "diff_rank": 4,
    }
    assert isinstance(entry["diff_rank"], int)
    json.dumps(view, allow_nan=False)


def test_compare_py_follows_the_post_filter() -> None:
    embed = diag_result("model.embed_tokens.weight", 0, "embed_tokens", [1, 1])
    head = diag_result("lm_head.weight", 0, "lm_head", [1, 1])
    kept = diag_result("model.layers.0.mlp.up_proj.weight", 0, "mlp.up_proj", [1, 1])
    assert list(make_report((embed, head, kept)).compare_py()) == ["model.layers.0.mlp.up_proj.weight"]


def test_summary_is_energy_weighted_by_hand() -> None:
    # Matrix A: σ² = (16, 9, 4, 1), E = 30, keeps 25 at rank 2. Matrix B: σ² = (1, 1), E = 2, keeps 2.
    a = diag_result("model.layers.0.mlp.up_proj.weight", 0, "mlp.up_proj", [4, 3, 2, 1])
    b = diag_result("model.layers.1.self_attn.o_proj.weight", 1, "self_attn.o_proj", [1, 1])
    summary = make_report((a, b), rank=2).summary()
    assert summary.overall.energy == pytest.approx(32)
    assert summary.overall.energy_retained == pytest.approx(27 / 32)
    by_module = {g.key: g for g in summary.by_module}
    assert by_module["mlp.up_proj"].energy_retained == pytest.approx(25 / 30)
    assert by_module["self_attn.o_proj"].energy_retained == pytest.approx(1.0)
    assert [g.key for g in summary.by_layer] == ["0", "1"]
    # 90% of 32 = 28.8: rank 3 keeps 29 + 2 = 31 ≥ 28.8, rank 2 keeps 27 < 28.8.
    assert summary.rank_for_90 == 3
    assert summary.worst[0][0] == a.name
    sentence = summary.sentence()
    assert sentence.startswith("Rank 2 keeps 84% of this fine-tune's change")
    assert "mlp.up_proj loses most (keeps 83%)" in sentence
    assert "rank 3 would be needed for 90%" in sentence


def test_aggregate_rank_on_grid_without_spectra() -> None:
    a = diag_result("m.layers.0.x.weight", 0, "x", [4, 3, 2, 1])
    loaded = Report.from_json(make_report((a,)).to_json())
    # Exact answer is 3; without spectra only grid ranks are known: 4 is the first that reaches 90%.
    assert aggregate_rank_for_energy(list(loaded.matrices), 0.9) == 4


def test_unchanged_model_summary_is_not_nan() -> None:
    zero = result("m.layers.0.x.weight", 0, "x", torch.ones(4, 4), torch.ones(4, 4))
    summary = make_report((zero,)).summary()
    assert summary.overall.energy_retained == 1.0
    assert summary.rank_for_90 is None
    json.dumps(make_report((zero,)).to_dict(), allow_nan=False)


def test_rank_must_be_positive(report: Report) -> None:
    with pytest.raises(LorafidError, match="positive"):
        report.with_rank(0)


def test_foreign_json_is_refused() -> None:
    with pytest.raises(LorafidError, match="Not a lorafid report"):
        Report.from_json(json.dumps({"schema": "other"}))
    with pytest.raises(LorafidError, match="not valid JSON"):
        Report.from_json("{")


def test_grid_covers_provider_ranks() -> None:
    assert {8, 16, 32, 64, 128, 256, 512} <= set(RANK_GRID)


@pytest.mark.parametrize(
    ("share", "text"),
    [(0.3141, "31%"), (0.99949, "99.95%"), (0.991, "99.1%"), (1.0, "100%"), (0.0, "0%"), (0.00002, "0.002%")],
)
def test_percent_never_rounds_a_loss_away(share: float, text: str) -> None:
    from lorafid.report import percent

    assert percent(share) == text
