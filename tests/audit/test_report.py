"""report.py: JSON round trip, re-deriving ranks, the seed post's view, summaries by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafid.audit import spectrum as sp
from lorafid.audit.matrices import RANK_GRID, MatrixResult, VectorResult
from lorafid.audit.pairing import SkippedTensor
from lorafid.audit.report import (
    SCHEMA,
    AuditSettings,
    Report,
    SourceRecord,
    load_spectra,
    save_spectra,
    spectra_path,
)
from lorafid.audit.summary import aggregate_rank_for_energy
from lorafid.errors import LorafidError, SpectrumNotLoadedError


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
    # One pooling rule: the group read as one block-diagonal Δ, so cos. distance = 1 − sqrt(27/32).
    assert summary.overall.cosine_distance == pytest.approx(1 - math.sqrt(27 / 32))
    assert by_module["mlp.up_proj"].cosine_distance == pytest.approx(1 - math.sqrt(25 / 30))


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
    from lorafid.audit.summary import percent

    assert percent(share) == text


def test_rank_reads_sum_each_spectrum_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slider move must not re-sum every spectrum for every rank it asks about (issue: 5 s at 70B)."""
    generator = torch.Generator().manual_seed(5)
    matrices = tuple(
        result(
            f"model.layers.{i}.mlp.up_proj.weight",
            i,
            "mlp.up_proj",
            torch.zeros(48, 32),
            torch.randn(48, 32, generator=generator),
        )
        for i in range(6)
    )
    loaded = Report.from_json(make_report(matrices).to_json()).with_spectra({m.name: m.sigma_sq for m in matrices})
    calls = []
    real = sp.cumulative_energy
    monkeypatch.setattr(sp, "cumulative_energy", lambda spectrum: calls.append(1) or real(spectrum))
    for rank in (3, 17, 5, 30):
        loaded.with_rank(rank).summary()
    assert len(calls) == len(matrices)
    # ...and the cached curve gives exactly what the spectrum gives, at every rank.
    for m, fresh in zip(loaded.matrices, matrices, strict=True):
        for rank in range(0, 34):
            assert m.energy_retained(rank) == sp.energy_retained(fresh.spectrum(), rank)


def test_records_pickle_without_their_derived_curve() -> None:
    import pickle

    m = diag_result("model.layers.0.mlp.up_proj.weight", 0, "mlp.up_proj", [4, 3, 2, 1])
    m.energy_retained(2)  # fills the cache
    state = m.__getstate__()
    assert "_cumulative" not in state and "_spectrum" not in state
    again = pickle.loads(pickle.dumps(m))
    assert again == m and again.energy_retained(2) == pytest.approx(25 / 30)


def test_damaged_report_fields_are_one_lorafid_error() -> None:
    good = make_report((diag_result("model.layers.0.mlp.up_proj.weight", 0, "mlp.up_proj", [2, 1]),)).to_dict()
    for damage in ({"base": None}, {"matrices": [{"name": "x"}]}, {"timings": {"elapsed": 1}}):
        with pytest.raises(LorafidError, match="incomplete or damaged"):
            Report.from_dict({**good, **damage})
    with pytest.raises(LorafidError, match="missing field 'settings'"):
        Report.from_dict({k: v for k, v in good.items() if k != "settings"})


def test_a_source_record_is_the_source_info_plus_its_files() -> None:
    """audit.py builds one from the other by field name: they must not drift apart."""
    from dataclasses import fields

    from lorafid.weights.source import SourceInfo

    assert [f.name for f in fields(SourceRecord)] == [f.name for f in fields(SourceInfo)] + ["files"]


def test_rank_reads_as_arrays_equal_the_scalar_reads() -> None:
    """``retained_at`` / ``noise_floor_at`` (what the charts draw) equal one read per rank."""
    import torch

    from lorafid.audit import spectrum as sp
    from lorafid.audit.report import MatrixResult

    base = torch.zeros(4, 4)
    finetune = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])).to(torch.bfloat16)
    m = MatrixResult.from_spectrum(
        name="w", layer=0, module="m", dtype="BF16", spectrum=sp.delta_spectrum(base, finetune)
    )
    ranks = [0, 1, 2, 3, 4, 9]
    np.testing.assert_allclose(m.retained_at(ranks), [0.0, 16 / 30, 25 / 30, 29 / 30, 1.0, 1.0], atol=1e-12)
    assert list(m.retained_at(ranks)) == [m.energy_retained(r) for r in ranks]
    floor = [1.0 - m.noise_energy * (1 - min(r, 4) / 4) / m.energy for r in ranks]
    np.testing.assert_allclose(m.noise_floor_at(ranks), floor, rtol=0, atol=1e-15)
    assert m.noise_energy > 0 and list(m.noise_floor_at(ranks)) == [m.noise_floor_retained(r) for r in ranks]
    unchanged = MatrixResult.from_spectrum(
        name="u", layer=0, module="m", dtype="BF16", spectrum=sp.delta_spectrum(finetune, finetune.clone())
    )
    assert list(unchanged.retained_at(ranks)) == [1.0] * 6 and list(unchanged.noise_floor_at(ranks)) == [1.0] * 6
