"""Plotly figures of a ``Report``: the dashboard's charts, at any rank, with no recompute.

Three figures, each a pure function of (report, metric) at ``report.rank``:

- ``heatmap``: layer × module grid of one metric. Colour scales are fixed per metric so
  that moving the rank slider changes colours only where numbers change: 0–1 for shares
  and distances, a fixed log scale (1e-6 … 1) for the weight-relative error, and for MSE,
  whose scale depends on the weights, a log scale fixed per audit (six decades below the
  audit's largest mean squared Δ, i.e. the MSE of a rank-0 "LoRA"). Pending cells are NaN.
- ``module_lines``: the same numbers as one line per module kind across layers.
- ``loss_curves``: loss versus rank on log axes, per module kind and overall, with the
  chosen rank and the storage-precision noise floor (rounding no rank recovers) marked.

Cells holding several matrices (rare: fused or repeated names) pool them exactly: the lost
energies add, so every metric of a cell is the metric of the concatenated matrices.

Not here: Gradio, I/O, any linear algebra beyond reading cumulative energies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from lorafid import spectrum as sp
from lorafid.pairing import classify
from lorafid.report import PROVIDER_RANKS, RANK_GRID, MatrixResult, Report

OTHER_ROW = "other"
"""Heatmap row for matrices outside the numbered blocks (embeddings, heads...)."""
MSE_DECADES = 6  # width of the per-audit MSE colour scale, in powers of ten
WEIGHT_REL_RANGE = (1e-6, 1.0)  # fixed log colour scale of weight_rel_error
_CURVE_POINTS = 64  # ranks sampled (log-spaced) for the loss-vs-rank curves


@dataclass(frozen=True)
class Metric:
    """How one metric is read and drawn."""

    key: str
    label: str  # heatmap / lines label
    loss_label: str  # y axis of the loss-vs-rank curves (a quantity that falls with rank)
    log: bool  # drawn on a log scale
    higher_is_better: bool


METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        Metric("energy_retained", "energy retained", "energy lost (1 − retained)", False, True),
        Metric("cosine_distance", "cosine distance", "cosine distance", False, False),
        Metric("delta_rel_error", "‖Δ − Δr‖ / ‖Δ‖", "‖Δ − Δr‖ / ‖Δ‖", False, False),
        Metric("mse", "MSE", "MSE", True, False),
        Metric("weight_rel_error", "error relative to the weight", "error relative to the weight", True, False),
    )
}
"""Metrics the dashboard offers, by ``RankMetrics`` field name."""


def metric_label(key: str) -> str:
    return _metric(key).label


def pooled_metric(matrices: Sequence[MatrixResult], retained: Sequence[float], metric: str) -> float:
    """``metric`` of a group of matrices whose energy retained at some rank is ``retained``.

    Lost energies add, so this is the metric of the matrices taken together; for one
    matrix it equals ``m.metrics(rank)``. Example: two matrices of energy 3 and 1 keeping
    1/3 and 1 keep (1 + 1)/4 = 0.5 together.
    """
    energy = sum(m.energy for m in matrices)
    lost = sum(m.energy * max(0.0, 1.0 - r) for m, r in zip(matrices, retained, strict=True))
    if metric == "mse":
        return lost / sum(m.shape[0] * m.shape[1] for m in matrices)
    if metric == "weight_rel_error":
        weight = sum(m.finetune_norm_sq for m in matrices)
        return math.sqrt(lost / weight) if weight > 0 else 0.0
    share_lost = min(1.0, lost / energy) if energy > 0 else 0.0
    if metric == "energy_retained":
        return 1.0 - share_lost
    if metric == "cosine_distance":
        return 1.0 - math.sqrt(1.0 - share_lost)
    if metric == "delta_rel_error":
        return math.sqrt(share_lost)
    raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)}")


@dataclass(frozen=True)
class Grid:
    """The layer × module table behind the heatmap and the module lines."""

    rows: tuple[str, ...]  # layer numbers as text, then OTHER_ROW if any
    modules: tuple[str, ...]
    values: np.ndarray  # rows × modules; NaN where pending or absent
    names: tuple[tuple[tuple[str, ...], ...], ...]  # rows × modules: matrix names per cell


def grid(report: Report, metric: str) -> Grid:
    """Metric at ``report.rank`` per (layer, module) cell; pending and absent cells are NaN."""
    _metric(metric)
    cells: dict[tuple[str, str], list[MatrixResult]] = {}
    pending: dict[tuple[str, str], list[str]] = {}
    modules: dict[str, None] = {}
    layers: set[int] = set()
    has_other = False
    for m in report.matrices:
        cells.setdefault((_row(m.layer), m.module), []).append(m)
        modules[m.module] = None
        has_other |= m.layer is None
        layers |= {m.layer} if m.layer is not None else set()
    for name in report.pending:
        layer, module = classify(name)
        pending.setdefault((_row(layer), module), []).append(name)
        modules[module] = None
        has_other |= layer is None
        layers |= {layer} if layer is not None else set()
    rows = tuple(str(i) for i in sorted(layers)) + ((OTHER_ROW,) if has_other else ())
    values = np.full((len(rows), len(modules)), np.nan)
    names: list[tuple[str, ...]] = []
    for i, row in enumerate(rows):
        for j, module in enumerate(modules):
            group = cells.get((row, module), [])
            waiting = pending.get((row, module), [])
            names.append(tuple(m.name for m in group) + tuple(waiting))
            if group and not waiting:
                values[i, j] = pooled_metric(group, [m.energy_retained(report.rank) for m in group], metric)
    width = len(modules)
    return Grid(
        rows, tuple(modules), values, tuple(tuple(names[i * width : (i + 1) * width]) for i in range(len(rows)))
    )


def colour_range(report: Report, metric: str) -> tuple[float, float]:
    """The fixed colour range of ``metric`` (in metric units, not log units)."""
    if metric == "mse":
        top = max((m.energy / (m.shape[0] * m.shape[1]) for m in report.matrices), default=0.0)
        top = top if top > 0 else 1.0
        return top / 10**MSE_DECADES, top
    if metric == "weight_rel_error":
        return WEIGHT_REL_RANGE
    _metric(metric)
    return 0.0, 1.0


def heatmap(report: Report, metric: str = "energy_retained") -> go.Figure:
    """Layer × module heatmap of ``metric`` at ``report.rank``; pending cells blank."""
    spec = _metric(metric)
    table = grid(report, metric)
    low, high = colour_range(report, metric)
    z = _log10(table.values, low, high) if spec.log else table.values
    text = [
        [
            _hover(table.rows[i], table.modules[j], table.names[i][j], table.values[i, j], spec)
            for j in range(z.shape[1])
        ]
        for i in range(z.shape[0])
    ]
    colorbar: dict[str, object] = {"title": {"text": _scale_title(spec)}}
    if spec.log:
        exponents = list(range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1))
        colorbar |= {"tickvals": exponents, "ticktext": [f"1e{e}" for e in exponents]}
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(),
            x=list(table.modules),
            y=list(table.rows),
            zmin=math.log10(low) if spec.log else low,
            zmax=math.log10(high) if spec.log else high,
            zauto=False,
            colorscale="RdYlGn" if spec.higher_is_better else "RdYlGn_r",
            colorbar=colorbar,
            text=text,
            hovertemplate="%{text}<extra></extra>",
            xgap=1,
            ygap=1,
        )
    )
    fig.update_layout(
        title=f"{spec.label} at rank {report.rank}{_progress_note(report)}",
        xaxis={"title": "module", "type": "category"},
        yaxis={"title": "layer", "type": "category", "autorange": "reversed"},
        height=max(360, 160 + 14 * len(table.rows)),
        margin={"l": 60, "r": 20, "t": 60, "b": 100},
    )
    return fig


def module_lines(report: Report, metric: str = "energy_retained") -> go.Figure:
    """One line per module kind across layers, at ``report.rank`` (gaps where pending)."""
    spec = _metric(metric)
    table = grid(report, metric)
    numbered = [i for i, row in enumerate(table.rows) if row != OTHER_ROW]
    fig = go.Figure()
    for j, module in enumerate(table.modules):
        ys = [table.values[i, j] for i in numbered]
        if all(math.isnan(y) for y in ys):
            continue
        fig.add_trace(
            go.Scatter(
                x=[int(table.rows[i]) for i in numbered],
                y=[None if math.isnan(y) else y for y in ys],
                mode="lines+markers",
                name=module,
            )
        )
    low, high = colour_range(report, metric)
    yaxis: dict[str, object] = {"title": spec.label}
    if spec.log:
        yaxis |= {"type": "log", "range": [math.log10(low), math.log10(high)]}
    else:
        yaxis |= {"range": [-0.02, 1.02]}
    fig.update_layout(
        title=f"{spec.label} by layer at rank {report.rank}{_progress_note(report)}",
        xaxis={"title": "layer"},
        yaxis=yaxis,
        height=380,
        margin={"l": 60, "r": 20, "t": 60, "b": 50},
        legend={"title": {"text": "module"}},
    )
    _empty_note(fig, report)
    return fig


def curve_ranks(report: Report) -> list[int]:
    """Ranks sampled for the loss curves: log-spaced up to the largest k, plus the chosen one.

    Without full spectra only the stored grid ranks are exact, so only those are used.
    """
    top = max((m.full_rank for m in report.matrices), default=1)
    if report.has_spectra():
        ranks = {int(r) for r in np.unique(np.geomspace(1, max(top, 1), _CURVE_POINTS).round())}
        ranks |= {r for r in PROVIDER_RANKS if r <= top} | {top, min(report.rank, top)}
    else:
        ranks = {r for r in RANK_GRID if r <= top} | {top} | ({report.rank} if report.rank in RANK_GRID else set())
    return sorted(ranks)


def loss_curves(report: Report, metric: str = "energy_retained") -> go.Figure:
    """Loss versus rank (log-log) per module kind and overall, with rank and noise floor marked."""
    spec = _metric(metric)
    loss_metric = "energy_lost" if metric == "energy_retained" else metric
    ranks = curve_ranks(report)
    curves = {m.name: _retained_curve(m, ranks) for m in report.matrices}
    by_module: dict[str, list[MatrixResult]] = {}
    for m in report.matrices:
        by_module.setdefault(m.module, []).append(m)
    fig = go.Figure()
    groups = [*by_module.items(), ("all matrices", list(report.matrices))] if report.matrices else []
    plotted: list[float] = []
    for label, group in groups:
        ys = [_loss(group, [curves[m.name][i] for m in group], loss_metric) for i in range(len(ranks))]
        plotted += [y for y in ys if y is not None]
        overall = label == "all matrices"
        fig.add_trace(
            go.Scatter(
                x=ranks,
                y=ys,
                mode="lines",
                name=label,
                line={"width": 4 if overall else 1.5, "color": "black" if overall else None},
            )
        )
    if report.matrices:
        floor = [
            _loss(report.matrices, [m.noise_floor_retained(r) for m in report.matrices], loss_metric) for r in ranks
        ]
        plotted += [y for y in floor if y is not None]
        fig.add_trace(
            go.Scatter(
                x=ranks,
                y=floor,
                mode="lines",
                name="noise floor (storage rounding)",
                line={"dash": "dot", "color": "grey", "width": 2},
            )
        )
    low, high = (min(plotted) / 2, max(plotted) * 2) if plotted else (1e-6, 1.0)
    fig.add_trace(
        go.Scatter(
            x=[report.rank, report.rank],
            y=[low, high],
            mode="lines",
            name=f"chosen rank ({report.rank})",
            line={"dash": "dash", "color": "crimson", "width": 2},
        )
    )
    ticks = [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384) if r <= max(ranks)]
    fig.update_layout(
        title=f"{spec.loss_label} versus rank{_progress_note(report)}",
        xaxis={"title": "LoRA rank", "type": "log", "tickvals": ticks, "ticktext": [str(t) for t in ticks]},
        yaxis={"title": spec.loss_label, "type": "log", "range": [math.log10(low), math.log10(high)]},
        height=420,
        margin={"l": 60, "r": 20, "t": 60, "b": 50},
    )
    _empty_note(fig, report)
    return fig


def figures(report: Report, metric: str = "energy_retained") -> tuple[go.Figure, go.Figure, go.Figure]:
    """(heatmap, module lines, loss curves) of one report at its rank."""
    return heatmap(report, metric), module_lines(report, metric), loss_curves(report, metric)


# -- helpers ---------------------------------------------------------------------------------


def _metric(key: str) -> Metric:
    try:
        return METRICS[key]
    except KeyError:
        raise ValueError(f"unknown metric {key!r}; expected one of {sorted(METRICS)}") from None


def _row(layer: int | None) -> str:
    return OTHER_ROW if layer is None else str(layer)


def _retained_curve(m: MatrixResult, ranks: Sequence[int]) -> list[float]:
    """energy_retained of one matrix at each rank, from one cumulative sum (not one per rank)."""
    if m.sigma_sq is None or m.energy == 0.0:
        return [m.energy_retained(r) for r in ranks]
    cumulative = sp.cumulative_energy(m.spectrum())
    return [1.0 if r >= m.full_rank else float(cumulative[r - 1]) for r in ranks]


def _loss(matrices: Sequence[MatrixResult], retained: Sequence[float], metric: str) -> float | None:
    """A loss for the log-log curves; None where it is exactly zero (nothing to draw on a log axis)."""
    if metric == "energy_lost":
        value = 1.0 - pooled_metric(matrices, retained, "energy_retained")
    else:
        value = pooled_metric(matrices, retained, metric)
    return value if value > 0 else None


def _log10(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """log10 of values clipped into [low, high]; NaN stays NaN (a zero shows as ``low``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(np.clip(values, low, high))


def _scale_title(spec: Metric) -> str:
    if spec.key == "mse":
        return f"MSE<br>(log, fixed per audit:<br>{MSE_DECADES} decades)"
    if spec.log:
        return f"{spec.label}<br>(log, fixed)"
    return spec.label


def _hover(row: str, module: str, names: tuple[str, ...], value: float, spec: Metric) -> str:
    where = f"layer {row}" if row != OTHER_ROW else "outside the blocks"
    if not names:
        return f"{where} · {module}: not in this model"
    shown = "pending" if math.isnan(value) else (f"{value:.3g}" if spec.log else f"{value:.4f}")
    listed = "<br>".join(names[:4]) + ("<br>…" if len(names) > 4 else "")
    return f"{where} · {module}<br>{spec.label}: {shown}<br>{listed}"


def _progress_note(report: Report) -> str:
    if report.status == "complete" and not report.pending:
        return ""
    done = len(report.matrices)
    return f" ({done}/{done + len(report.pending)} matrices)"


def _empty_note(fig: go.Figure, report: Report) -> None:
    if not report.matrices:
        fig.add_annotation(text="waiting for the first matrix…", showarrow=False, xref="paper", yref="paper")
