"""Figures from a synthetic report: the numbers drawn are the report's numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lorafid.audit.matrices import MatrixResult
from lorafid.audit.report import AuditSettings, Report, SourceRecord
from lorafid.audit.spectrum import delta_spectrum
from lorafid.web import plots

MODULES = {"self_attn.q_proj": (24, 16), "mlp.down_proj": (16, 40)}


def _matrix(layer: int | None, module: str, seed: int, dtype: torch.dtype = torch.bfloat16) -> MatrixResult:
    generator = torch.Generator().manual_seed(seed)
    rows, cols = MODULES.get(module, (20, 12))
    base = (0.05 * torch.randn(rows, cols, generator=generator)).to(dtype)
    scale = torch.arange(1, cols + 1, dtype=torch.float32) ** -(0.5 + seed % 3 * 0.3)
    finetune = (base.float() + 0.01 * torch.randn(rows, cols, generator=generator) * scale).to(dtype)
    prefix = "model" if layer is None else f"model.layers.{layer}"
    return MatrixResult.from_spectrum(
        name=f"{prefix}.{module}.weight",
        layer=layer,
        module=module,
        dtype=str(dtype),
        spectrum=delta_spectrum(base, finetune),
    )


def _source(spec: str) -> SourceRecord:
    return SourceRecord(spec, "hub", spec, None, "0" * 40, None, ("model.safetensors",))


def _report(rank: int = 4, layers: int = 3, pending_last: bool = False) -> Report:
    matrices = [
        _matrix(layer, module, seed=10 * layer + j) for layer in range(layers) for j, module in enumerate(MODULES)
    ]
    pending: tuple[str, ...] = ()
    if pending_last:
        pending = (matrices[-1].name,)
        matrices = matrices[:-1]
    return Report(
        base=_source("org/base"),
        finetune=_source("org/tuned"),
        settings=AuditSettings(rank=rank, device="cpu"),
        matrices=tuple(matrices),
        pending=pending,
        status="partial" if pending else "complete",
    )


def _cell(fig, layer: str, module: str) -> float:
    heat = fig.data[0]
    return heat.z[list(heat.y).index(layer)][list(heat.x).index(module)]


@pytest.mark.parametrize("metric", ["energy_retained", "cosine_distance", "delta_rel_error"])
@pytest.mark.parametrize("rank", [1, 4, 7])
def test_heatmap_cells_equal_the_metric_at_rank(metric: str, rank: int) -> None:
    report = _report().with_rank(rank)
    fig = plots.heatmap(report, metric)
    for m in report.matrices:
        expected = getattr(m.metrics(rank), metric)
        assert _cell(fig, str(m.layer), m.module) == pytest.approx(expected, abs=1e-12)


def test_log_metrics_are_log10_of_the_metric_on_a_fixed_scale() -> None:
    report = _report(rank=3)
    for metric in ("mse", "weight_rel_error"):
        fig = plots.heatmap(report, metric)
        low, high = plots.colour_range(report, metric)
        assert (fig.data[0].zmin, fig.data[0].zmax) == pytest.approx((math.log10(low), math.log10(high)))
        for m in report.matrices:
            value = min(max(getattr(m.metrics(3), metric), low), high)
            assert _cell(fig, str(m.layer), m.module) == pytest.approx(math.log10(value), abs=1e-9)
    assert plots.colour_range(report, "weight_rel_error") == plots.WEIGHT_REL_RANGE


def _zrange(report: Report, metric: str) -> tuple[float, float]:
    heat = plots.heatmap(report, metric).data[0]
    return heat.zmin, heat.zmax


def test_log_colour_scales_are_fixed_across_ranks() -> None:
    report = _report()
    for metric in ("mse", "weight_rel_error"):
        assert len({_zrange(report.with_rank(r), metric) for r in (1, 2, 8, 64)}) == 1, metric
    assert plots.heatmap(report, "energy_retained").data[0].zauto is False


@pytest.mark.parametrize("metric", ["energy_retained", "cosine_distance", "delta_rel_error"])
@pytest.mark.parametrize("rank", [1, 3])
def test_share_colour_scales_span_the_values_present_and_say_so(metric: str, rank: int) -> None:
    report = _report().with_rank(rank)
    values = [getattr(m.metrics(rank), metric) for m in report.matrices]
    fig = plots.heatmap(report, metric)
    assert _zrange(report, metric) == pytest.approx((min(values), max(values)))
    assert max(values) - min(values) < 0.9  # narrower than the old fixed 0-1 scale
    title = fig.data[0].colorbar.title.text
    spec = plots.METRICS[metric]
    assert f"colours span {plots._value_text(min(values), spec)} to {plots._value_text(max(values), spec)}" in title


def test_one_value_gets_a_narrow_band_inside_zero_one() -> None:
    report = _report()
    assert plots.colour_range(report, "energy_retained", np.array([1.0, 1.0, np.nan])) == (0.99, 1.0)
    assert plots.colour_range(report, "cosine_distance", np.array([0.0])) == (0.0, 0.01)
    assert plots.colour_range(report, "energy_retained", np.array([np.nan])) == (0.0, 1.0)


def _labels(axis: object) -> list[str]:
    return [str(t) for t in axis.ticktext]  # type: ignore[attr-defined]


def test_log_ticks_are_decades_a_reader_recognises() -> None:
    report = _report(rank=3)
    curves = plots.loss_curves(report, "energy_retained")
    texts = _labels(curves.layout.yaxis)
    assert 2 <= len(texts) <= 6
    assert all(t in ("1", "0.1", "0.01", "10", "100") or t.startswith("1e") for t in texts), texts
    assert [10.0 ** -int(t[3:]) if t.startswith("1e-") else float(t) for t in texts] == pytest.approx(
        list(curves.layout.yaxis.tickvals)
    )
    assert plots._decade_text(-4) == "1e-4" and plots._decade_text(-16) == "1e-16"
    assert plots._decades(1e-16, 1.0) == [0, -3, -6, -9, -12, -15]  # 17 decades, six labels
    lines = plots.module_lines(report, "weight_rel_error")
    assert lines.layout.yaxis.type == "log" and len(_labels(lines.layout.yaxis)) <= 6
    heat = plots.heatmap(report, "mse").data[0]
    assert all(t == "1" or t.startswith(("0.", "1e")) for t in heat.colorbar.ticktext)


def test_rank_ticks_are_powers_of_four_with_minor_powers_of_two() -> None:
    fig = plots.loss_curves(_report(rank=3), "energy_retained")
    top = max(m.full_rank for m in _report().matrices)  # 16 and 12 here
    assert list(fig.layout.xaxis.tickvals) == [r for r in (1, 4, 16) if r <= top]
    assert list(fig.layout.xaxis.minor.tickvals) == [r for r in (2, 8) if r <= top]


def test_legends_sit_below_the_plots() -> None:
    _, lines, curves = plots.figures(_report(), "energy_retained")
    for fig in (lines, curves):
        assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0
    assert plots.heatmap(_report()).data[0].colorbar.orientation == "h"


def test_by_layer_axis_spans_the_values_drawn() -> None:
    report = _report(rank=3)
    fig = plots.module_lines(report, "energy_retained")
    values = [m.energy_retained(3) for m in report.matrices]
    low, high = fig.layout.yaxis.range
    assert low < min(values) and high > max(values)
    assert (high - low) < 1.04 * (max(values) - min(values)) * 1.2
    assert fig.layout.yaxis.tickformat in (".0%", ".1%")


def test_hover_names_layer_module_and_value_in_words() -> None:
    report = _report(rank=3)
    m = next(m for m in report.matrices if m.layer == 1 and m.module == "mlp.down_proj")
    kept = m.energy_retained(3)
    lines = plots.module_lines(report, "energy_retained")
    trace = next(t for t in lines.data if t.name == "mlp.down_proj")
    assert trace.text[1] == f"layer 1 · mlp.down_proj · kept {kept:.1%}"
    assert trace.hovertemplate == "%{text}<extra></extra>"  # no side box cutting the name
    distance = plots.module_lines(report, "cosine_distance").data[0].text[0]
    assert distance.startswith("layer 0 · ") and "cosine distance 0." in distance
    curves = plots.loss_curves(report, "energy_retained")
    overall = next(t for t in curves.data if t.name == "all matrices")
    i = list(overall.x).index(3)
    assert overall.text[i] == f"rank 3 · all matrices · lost {overall.y[i]:.1%}"
    heat = plots.heatmap(report, "energy_retained").data[0]
    cell = heat.text[list(heat.y).index("1")][list(heat.x).index("mlp.down_proj")]
    assert cell.startswith(f"layer 1 · mlp.down_proj · kept {kept:.1%}")


def test_pending_cells_are_nan_and_titles_say_partial() -> None:
    report = _report(pending_last=True)
    fig = plots.heatmap(report, "energy_retained")
    last_layer, last_module = "2", list(MODULES)[-1]
    assert math.isnan(_cell(fig, last_layer, last_module))
    assert not math.isnan(_cell(fig, "0", last_module))
    assert "5/6 matrices" in fig.layout.title.text
    lines = plots.module_lines(report, "energy_retained")
    down = next(t for t in lines.data if t.name == last_module)
    assert down.y[-1] is None and down.y[0] is not None


def test_matrices_outside_blocks_get_their_own_row() -> None:
    report = _report()
    extra = _matrix(None, "lm_head", seed=99)
    report = Report(report.base, report.finetune, report.settings, (*report.matrices, extra))
    table = plots.grid(report, "energy_retained")
    assert table.rows[-1] == plots.OTHER_ROW
    assert table.values[-1, table.modules.index("lm_head")] == pytest.approx(extra.energy_retained(report.rank))
    assert np.isnan(table.values[0, table.modules.index("lm_head")])  # absent, not pending


def test_pooled_metric_of_one_matrix_is_its_metric_and_pools_lost_energy() -> None:
    a, b = _matrix(0, "self_attn.q_proj", 1), _matrix(0, "mlp.down_proj", 2)
    for metric in plots.METRICS:
        expected = getattr(a.metrics(5), metric)
        assert plots.pooled_metric([a], [a.energy_retained(5)], metric) == pytest.approx(expected, rel=1e-9, abs=1e-15)
    kept = (a.energy * a.energy_retained(2) + b.energy * b.energy_retained(2)) / (a.energy + b.energy)
    both = plots.pooled_metric([a, b], [a.energy_retained(2), b.energy_retained(2)], "energy_retained")
    assert both == pytest.approx(kept)


def test_module_lines_follow_layers() -> None:
    report = _report(rank=2)
    fig = plots.module_lines(report, "cosine_distance")
    assert {t.name for t in fig.data} == set(MODULES)
    for trace in fig.data:
        expected = [m.metrics(2).cosine_distance for m in report.matrices if m.module == trace.name]
        assert list(trace.x) == [0, 1, 2]
        assert list(trace.y) == pytest.approx(expected)


@pytest.mark.parametrize("metric", list(plots.METRICS))
def test_loss_curves_mark_rank_and_noise_floor(metric: str) -> None:
    report = _report(rank=5)
    fig = plots.loss_curves(report, metric)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    marker = next(t for t in fig.data if t.name.startswith("chosen rank"))
    assert list(marker.x) == [5, 5]
    floor = next(t for t in fig.data if t.name.startswith("noise floor"))
    ranks = list(floor.x)
    assert 5 in ranks
    i = ranks.index(5)
    lost = sum(m.energy * (1 - m.noise_floor_retained(5)) for m in report.matrices)
    if metric == "energy_retained":
        assert floor.y[i] == pytest.approx(lost / sum(m.energy for m in report.matrices))
    overall = next(t for t in fig.data if t.name == "all matrices")
    if metric == "energy_retained":
        energy = sum(m.energy for m in report.matrices)
        retained = sum(m.energy * m.energy_retained(5) for m in report.matrices) / energy
        assert overall.y[i] == pytest.approx(1 - retained)
        assert overall.y[i] >= floor.y[i]  # real loss is never below pure rounding loss
        # Every module's line at every rank: its matrices' lost energy over theirs, summed here by hand.
        for module in {m.module for m in report.matrices}:
            group = [m for m in report.matrices if m.module == module]
            line = next(t for t in fig.data if t.name == module)
            for r, y in zip(ranks, line.y, strict=True):
                lost_share = sum(m.energy * (1 - m.energy_retained(r)) for m in group) / sum(m.energy for m in group)
                assert (y is None and lost_share <= 0) or y == pytest.approx(lost_share, rel=1e-9, abs=1e-15)


def test_loss_curve_at_full_rank_is_a_gap_not_zero() -> None:
    report = _report(rank=4)
    fig = plots.loss_curves(report)
    overall = next(t for t in fig.data if t.name == "all matrices")
    top = max(m.full_rank for m in report.matrices)
    assert overall.y[list(overall.x).index(top)] is None


def test_report_without_spectra_uses_grid_ranks_only() -> None:
    report = Report.from_json(_report(rank=8).to_json())
    assert not report.has_spectra()
    fig = plots.loss_curves(report)
    assert set(next(t for t in fig.data if t.name == "all matrices").x) <= {1, 2, 4, 8, 16, 24}


def test_empty_report_draws_placeholders() -> None:
    report = Report(
        _source("a/b"),
        _source("c/d"),
        AuditSettings(rank=8, device="cpu"),
        (),
        pending=("model.layers.0.mlp.down_proj.weight",),
        status="partial",
    )
    heat, _, curves = plots.figures(report, "energy_retained")
    assert math.isnan(heat.data[0].z[0][0])
    assert any("waiting" in a.text for a in curves.layout.annotations)


def test_figures_serialize_to_json() -> None:
    for fig in plots.figures(_report(pending_last=True), "mse"):
        assert fig.to_json()


def test_unknown_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        plots.heatmap(_report(), "accuracy")
