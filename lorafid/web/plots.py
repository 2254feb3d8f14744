"""Plotly figures of a ``Report``: the dashboard's charts, at any rank, with no recompute.

Three figures, each a pure function of (report, metric) at ``report.rank``:

- ``heatmap``: layer × module grid of one metric. Shares and distances are coloured over
  the range of values present at this rank (stated on the colour bar), so that 85% and 97%
  differ; the log metrics keep fixed scales (1e-6 … 1 for the weight-relative error; for
  MSE, whose scale depends on the weights, six decades below the audit's largest mean
  squared Δ, i.e. the MSE of a rank-0 "LoRA"). Pending and unchanged cells are blank.
- ``module_lines``: the same numbers as one line per module kind across layers.
- ``loss_curves``: loss versus rank on log axes, per module kind and overall, with the
  chosen rank and the storage-precision noise floor (rounding no rank recovers) marked.

Readable at 390 px: legends below the plots, the colour bar above the grid, log ticks
thinned to at most six and written 1, 0.1, 0.01, 1e-3 … (not 100μ or 10⁻¹⁶); hovering
reads "layer 3 · mlp.up_proj · kept 83.3%".

Cells holding several matrices (rare: fused or repeated names) pool them exactly: the lost
energies add, so every metric of a cell is the metric of the concatenated matrices.

Not here: Gradio, I/O, any linear algebra beyond reading cumulative energies.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go

from lorafid.audit.matrices import RANK_GRID, MatrixResult
from lorafid.audit.pairing import classify
from lorafid.audit.report import PROVIDER_RANKS, Report
from lorafid.audit.summary import percent

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


def pooled_metric(matrices: Sequence[MatrixResult], retained: Sequence[float], metric: str) -> float:
    """``metric`` of a group of matrices whose energy retained at some rank is ``retained``.

    Lost energies add, so this is the metric of the matrices taken together; for one
    matrix it equals ``m.metrics(rank)``. Example: two matrices of energy 3 and 1 keeping
    1/3 and 1 keep (1 + 1)/4 = 0.5 together.
    """
    return float(pooled_curve(matrices, np.asarray(retained, dtype=np.float64)[:, None], metric)[0])


def pooled_curve(matrices: Sequence[MatrixResult], retained: np.ndarray, metric: str) -> np.ndarray:
    """``pooled_metric`` at several ranks at once: ``retained`` is (matrices × ranks)."""
    energies = np.array([m.energy for m in matrices], dtype=np.float64)
    energy = float(energies.sum())
    lost = (energies[:, None] * np.maximum(0.0, 1.0 - retained)).sum(axis=0) if len(matrices) else np.zeros(1)
    if metric == "mse":
        return lost / sum(m.shape[0] * m.shape[1] for m in matrices)
    if metric == "weight_rel_error":
        weight = sum(m.finetune_norm_sq for m in matrices)
        return np.sqrt(lost / weight) if weight > 0 else np.zeros_like(lost)
    share_lost = np.minimum(1.0, lost / energy) if energy > 0 else np.zeros_like(lost)
    if metric == "energy_retained":
        return 1.0 - share_lost
    if metric == "cosine_distance":
        return 1.0 - np.sqrt(1.0 - share_lost)
    if metric == "delta_rel_error":
        return np.sqrt(share_lost)
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


def colour_range(report: Report, metric: str, values: np.ndarray | None = None) -> tuple[float, float]:
    """The colour range of ``metric`` (in metric units, not log units).

    Log metrics have fixed ranges, so moving the rank changes colours only where numbers
    change: 1e-6 … 1 for the weight-relative error, and for MSE, whose scale depends on the
    weights, six decades below the audit's largest mean squared Δ (the MSE of a rank-0 "LoRA").
    Shares and distances span the ``values`` shown (the grid at this rank by default): on a
    fixed 0–1 scale 85% and 97% were the same green. The charts state the range they use.

    Example: cells keeping 0.85 and 0.97 -> (0.85, 0.97); cells all keeping 1.0 -> (0.99, 1.0).
    """
    if metric == "mse":
        top = max((m.energy / (m.shape[0] * m.shape[1]) for m in report.matrices), default=0.0)
        top = top if top > 0 else 1.0
        return top / 10**MSE_DECADES, top
    if metric == "weight_rel_error":
        return WEIGHT_REL_RANGE
    _metric(metric)
    values = grid(report, metric).values if values is None else values
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    if high - low < 1e-6:  # one value: a narrow band around it, inside [0, 1]
        high = min(1.0, max(0.0, low - 0.005) + 0.01)
        low = high - 0.01
    return low, high


def heatmap(report: Report, metric: str = "energy_retained") -> go.Figure:
    """Layer × module heatmap of ``metric`` at ``report.rank``; pending cells blank.

    Shares and distances are coloured over the range present (stated above the colour bar),
    brighter is better; log metrics over their fixed decades. The colour bar sits above the
    grid, so a phone's width goes to the cells.
    """
    spec = _metric(metric)
    table = grid(report, metric)
    values = table.values.copy()
    # A matrix the fine-tune left exactly as it was is no "100% kept": blank cell, said in words.
    unchanged = _unchanged_cells(report)
    for i, row in enumerate(table.rows):
        for j, module in enumerate(table.modules):
            if (row, module) in unchanged:
                values[i, j] = np.nan
    low, high = colour_range(report, metric, values)
    z = _log10(values, low, high) if spec.log else values
    text = [
        [
            _hover(table.rows[i], table.modules[j], table.names[i][j], table.values[i, j], spec)
            if (table.rows[i], table.modules[j]) not in unchanged
            else _unchanged_hover(table.rows[i], table.modules[j], table.names[i][j])
            for j in range(z.shape[1])
        ]
        for i in range(z.shape[0])
    ]
    colorbar: dict[str, object] = {
        "title": {"text": _scale_title(spec, low, high), "side": "top"},
        "orientation": "h",
        "x": 0,
        "xanchor": "left",
        "y": 1.0,
        "yanchor": "bottom",
        "len": 1.0,
        "thickness": 12,
    }
    if spec.log:
        exponents = [e for e in _decades(low, high) if math.log10(low) - 1e-9 <= e <= math.log10(high) + 1e-9]
        colorbar |= {"tickvals": exponents, "ticktext": [_decade_text(e) for e in exponents]}
    else:
        colorbar |= {"nticks": 5, "tickformat": ".1%" if spec.key == "energy_retained" else ".3g"}
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(),
            x=[_plain(m) for m in table.modules],
            y=list(table.rows),
            zmin=math.log10(low) if spec.log else low,
            zmax=math.log10(high) if spec.log else high,
            zauto=False,
            # Brighter is better on every metric: higher-is-better keeps Viridis, losses reverse it.
            colorscale="Viridis" if spec.higher_is_better else "Viridis_r",
            colorbar=colorbar,
            text=text,
            hovertemplate="%{text}<extra></extra>",
            xgap=1,
            ygap=1,
        )
    )
    fig.update_layout(
        title=f"{spec.label} at rank {report.rank}{_progress_note(report)}",  # above the colour bar (margin t)
        xaxis={"title": "module", "type": "category", "automargin": True},
        yaxis={"title": "layer", "type": "category", "autorange": "reversed", "automargin": True},
        height=max(450, 250 + 14 * len(table.rows)),
        margin={"l": 50, "r": 20, "t": 150, "b": 40},
    )
    return fig


def module_lines(report: Report, metric: str = "energy_retained") -> go.Figure:
    """One line per module kind across layers, at ``report.rank`` (gaps where pending).

    The y axis spans the values drawn (a 0–1 axis flattened 85–97% into one line); hovering a
    point reads "layer 3 · mlp.up_proj · kept 83.3%". The legend sits below the plot.
    """
    spec = _metric(metric)
    table = grid(report, metric)
    numbered = [i for i, row in enumerate(table.rows) if row != OTHER_ROW]
    fig = go.Figure()
    drawn: list[float] = []
    for j, module in enumerate(table.modules):
        ys = [table.values[i, j] for i in numbered]
        if all(math.isnan(y) for y in ys):
            continue
        drawn += [y for y in ys if not math.isnan(y)]
        fig.add_trace(
            go.Scatter(
                x=[int(table.rows[i]) for i in numbered],
                y=[None if math.isnan(y) else y for y in ys],
                mode="lines+markers",
                name=_plain(module),
                text=[
                    f"layer {table.rows[i]} · {_plain(module)} · "
                    + ("pending" if math.isnan(y) else _value_words(y, spec))
                    for i, y in zip(numbered, ys, strict=True)
                ],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    yaxis: dict[str, object] = {"title": spec.label, "automargin": True}
    if spec.log:
        low, high = colour_range(report, metric)
        yaxis |= {"type": "log", "range": [math.log10(low), math.log10(high)], **_log_ticks(low, high)}
    else:
        low, high = colour_range(report, metric, np.array(drawn))
        pad = (high - low) * 0.08
        yaxis |= {"range": [low - pad, high + pad], "nticks": 6}
        if spec.key == "energy_retained":
            yaxis["tickformat"] = ".1%" if high - low < 0.2 else ".0%"
    fig.update_layout(
        title=f"{spec.label} by layer at rank {report.rank}{_progress_note(report)}",
        xaxis={"title": "layer", "nticks": 8},
        yaxis=yaxis,
        height=460,
    )
    _finish_lines(fig, report)
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
    """Loss versus rank (log-log) per module kind and overall, with rank and noise floor marked.

    Rank ticks are powers of 4 (powers of 2 as minor ticks), loss ticks decades written
    1e-4 style, thinned to at most six, so a phone's width keeps them apart; the legend sits
    below the plot. Hover: "rank 64 · mlp.up_proj · lost 12.0%".
    """
    spec = _metric(metric)
    loss_metric = "energy_lost" if metric == "energy_retained" else metric
    loss_spec = Metric("energy_lost", "lost", spec.loss_label, True, False) if metric == "energy_retained" else spec
    ranks = curve_ranks(report)
    # One (matrices × ranks) array of energy retained: a slider move redraws this chart for
    # every matrix of a 70B report (560 × ~30 points), so no Python loop per point.
    retained = np.array([m.retained_at(ranks) for m in report.matrices]).reshape(len(report.matrices), len(ranks))
    row_of = {m.name: i for i, m in enumerate(report.matrices)}
    by_module: dict[str, list[MatrixResult]] = {}
    for m in report.matrices:
        by_module.setdefault(m.module, []).append(m)
    fig = go.Figure()
    groups = [*by_module.items(), ("all matrices", list(report.matrices))] if report.matrices else []
    plotted: list[float] = []

    def hover(label: str, ys: Sequence[float | None]) -> list[str]:
        return [
            f"rank {r} · {_plain(label)} · {'nothing' if y is None else _value_words(y, loss_spec)}"
            for r, y in zip(ranks, ys, strict=True)
        ]

    for label, group in groups:
        ys = _losses(group, retained[[row_of[m.name] for m in group]], loss_metric)
        plotted += [y for y in ys if y is not None]
        overall = label == "all matrices"
        fig.add_trace(
            go.Scatter(
                x=ranks,
                y=ys,
                mode="lines",
                name=_plain(label),
                line={"width": 4 if overall else 1.5, "color": "black" if overall else None},
                text=hover(label, ys),
                hovertemplate="%{text}<extra></extra>",
            )
        )
    if report.matrices:
        floor_retained = np.array([m.noise_floor_at(ranks) for m in report.matrices])
        floor = _losses(report.matrices, floor_retained, loss_metric)
        plotted += [y for y in floor if y is not None]
        fig.add_trace(
            go.Scatter(
                x=ranks,
                y=floor,
                mode="lines",
                name="noise floor (storage rounding)",
                line={"dash": "dot", "color": "grey", "width": 2},
                text=hover("noise floor", floor),
                hovertemplate="%{text}<extra></extra>",
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
            hoverinfo="skip",
        )
    )
    top = max(ranks)
    major = [4**e for e in range(0, 9) if 4**e <= top]
    minor = [2**e for e in range(0, 17) if 2**e <= top and 2**e not in major]
    fig.update_layout(
        title=f"{spec.loss_label}<br>versus LoRA rank{_progress_note(report)}",  # two lines: a phone's width
        xaxis={  # no axis title: the chart's says "versus LoRA rank", and a phone needs the room
            "type": "log",
            "tickvals": major,
            "ticktext": [str(t) for t in major],
            "tickangle": 0,
            "minor": {"tickvals": minor, "ticklen": 3, "showgrid": True},
        },
        yaxis={
            "title": spec.loss_label,
            "type": "log",
            "range": [math.log10(low), math.log10(high)],
            "automargin": True,
            **_log_ticks(low, high),
        },
        height=500,
    )
    _finish_lines(fig, report)
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


def _losses(matrices: Sequence[MatrixResult], retained: np.ndarray, metric: str) -> list[float | None]:
    """Losses of a group at each rank for the log-log curves (``retained``: matrices × ranks);
    None where a loss is exactly zero (nothing to draw on a log axis)."""
    if metric == "energy_lost":
        values = 1.0 - pooled_curve(matrices, retained, "energy_retained")
    else:
        values = pooled_curve(matrices, retained, metric)
    return [float(v) if v > 0 else None for v in values]


def _log10(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """log10 of values clipped into [low, high]; NaN stays NaN (a zero shows as ``low``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(np.clip(values, low, high))


def _scale_title(spec: Metric, low: float, high: float) -> str:
    """The colour bar's title: what the colours span, in the metric's units."""
    if spec.key == "mse":
        return f"MSE (log scale, fixed per audit: {MSE_DECADES} decades)"
    if spec.log:
        return f"{spec.label} (log scale, fixed)"
    return f"{spec.label}: colours span {_value_text(low, spec)} to {_value_text(high, spec)}"


def _value_text(value: float, spec: Metric) -> str:
    """One value as the charts write it: shares as percentages, logs in 1e-4 style."""
    if spec.key in ("energy_retained", "energy_lost"):
        return f"{value:.1%}" if 0.001 <= value <= 0.999 else percent(value)
    if spec.log:
        return f"{value:.2e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{value:.4f}"


def _value_words(value: float, spec: Metric) -> str:
    """A hovered value in words: "kept 83.3%", "lost 0.12%", "cosine distance 0.0523"."""
    if spec.key == "energy_retained":
        return f"kept {_value_text(value, spec)}"
    if spec.key == "energy_lost":
        return f"lost {_value_text(value, spec)}"
    return f"{spec.label} {_value_text(value, spec)}"


_LEGEND_BELOW = {"orientation": "h", "x": 0, "xanchor": "left", "y": -0.18, "yanchor": "top", "title": {"text": ""}}
"""Legends go below the plot: beside it, they squeezed the plot to a sliver on a phone."""


def _decades(low: float, high: float, most: int = 6) -> list[int]:
    """Powers of ten from ``high`` down to ``low``, every n-th so at most ``most`` are labelled."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    step = max(1, math.ceil((last - first + 1) / most))
    return list(range(last, first - 1, -step))


def _decade_text(exponent: int) -> str:
    """10**exponent as a reader of the post writes it: 1, 0.1, 0.01, 1e-3, 1e-4 … (not 100μ)."""
    return {0: "1", -1: "0.1", -2: "0.01", 1: "10", 2: "100"}.get(exponent, f"1e{exponent}")


def _log_ticks(low: float, high: float) -> dict[str, object]:
    """Tick settings of a log axis from ``low`` to ``high``: labelled decades, at most six."""
    exponents = _decades(low, high)
    return {"tickvals": [10.0**e for e in exponents], "ticktext": [_decade_text(e) for e in exponents]}


def _plain(text: str) -> str:
    """Repo-supplied text (tensor and module names) for Plotly, which renders a subset of HTML
    (``<a href>`` included) in labels and hovers: escaped, it shows as the characters it is."""
    return html.escape(text if len(text) <= 200 else text[:200] + "…", quote=False)


def _hover(row: str, module: str, names: tuple[str, ...], value: float, spec: Metric) -> str:
    where = f"layer {row}" if row != OTHER_ROW else "outside the blocks"
    module = _plain(module)
    if not names:
        return f"{where} · {module}: not in this model"
    shown = "pending" if math.isnan(value) else _value_words(value, spec)
    listed = "<br>".join(_plain(n) for n in names[:4]) + ("<br>…" if len(names) > 4 else "")
    return f"{where} · {module} · {shown}<br>{listed}"


def _unchanged_cells(report: Report) -> set[tuple[str, str]]:
    """(row, module) cells whose every matrix is identical in both models (Δ = 0)."""
    energy: dict[tuple[str, str], float] = {}
    for m in report.matrices:
        key = (_row(m.layer), m.module)
        energy[key] = energy.get(key, 0.0) + m.energy
    pending = {(_row(layer), module) for layer, module in map(classify, report.pending)}
    return {key for key, e in energy.items() if e == 0.0 and key not in pending}


def _unchanged_hover(row: str, module: str, names: tuple[str, ...]) -> str:
    where = f"layer {row}" if row != OTHER_ROW else "outside the blocks"
    listed = "<br>".join(_plain(n) for n in names[:4]) + ("<br>…" if len(names) > 4 else "")
    return f"{where} · {_plain(module)}<br>unchanged: identical in both models (nothing to lose)<br>{listed}"


def _progress_note(report: Report) -> str:
    if report.status == "complete" and not report.pending:
        return ""
    done = len(report.matrices)
    return f" ({done}/{done + len(report.pending)} matrices)"


def _finish_lines(fig: go.Figure, report: Report) -> None:
    """What every line chart of an audit shares: margins, the legend below, nearest-point hover,
    and a note while no matrix is done yet."""
    fig.update_layout(margin={"l": 50, "r": 20, "t": 60, "b": 40}, legend=_LEGEND_BELOW, hovermode="closest")
    if not report.matrices:
        fig.add_annotation(text="waiting for the first matrix…", showarrow=False, xref="paper", yref="paper")


def probe_distances(document: dict[str, Any]) -> go.Figure:
    """A ``lorafid.probe/1`` result: each candidate's distance from the provider against its rank.

    One line per serving mode (rank-r: the base's embeddings and norms; rank-r+extras: the
    fine-tune's), with 95% bootstrap intervals, and horizontal lines for the candidates with no
    rank: the fine-tune (solid), its quantized copies (dotted) and the base (dashed), named in
    the legend (labels on the plot sat on the axis ticks). Lower is closer; the verdict is the
    title. A log-probability check plots KL(provider ‖ candidate); a text check plots each
    candidate's log-likelihood gap to the closest (KL(P‖Q) − KL(P‖closest)). The distance axis
    is logarithmic (the base sits decades above the ranks); a distance of 0 (the closest, in a
    text check) is drawn at the floor, a decade under the smallest positive one.
    """
    candidates: dict[str, dict[str, Any]] = document.get("candidates") or {}
    text = document.get("method") in ("completions-text", "completions-greedy")
    key = "gap" if text else "distance"
    positive = [float(c[key]) for c in candidates.values() if float(c[key]) > 0]
    floor = min(positive) / 10 if positive else 1e-6

    def shown(value: float) -> float:
        return max(float(value), floor)

    fig = go.Figure()
    for serving, label in (("lora-only", "rank r (base extras)"), ("keep-extras", "rank r + fine-tune extras")):
        rows = sorted((c["rank"], c) for c in candidates.values() if c.get("serving") == serving)
        if not rows:
            continue
        fig.add_trace(
            go.Scatter(
                x=[r for r, _ in rows],
                y=[shown(c[key]) for _, c in rows],
                customdata=[c[key] for _, c in rows],
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [max(c["interval"][1] - shown(c[key]), 0.0) for _, c in rows],
                    "arrayminus": [max(shown(c[key]) - shown(c["interval"][0]), 0.0) for _, c in rows],
                },
                mode="lines+markers",
                name=label,
                hovertemplate="rank %{x}: %{customdata:.4g} nats/token<extra>" + label + "</extra>",
            )
        )
    ranks = sorted({c["rank"] for c in candidates.values() if c.get("rank")})
    unranked = [n for n in candidates if n == "base" or n == "finetune" or n.startswith("finetune-")]
    span = [ranks[0], ranks[-1]] if ranks else [1, 2]
    for name in unranked:
        dash = "solid" if name == "finetune" else "dash" if name == "base" else "dot"
        value = candidates[name][key]
        fig.add_trace(
            go.Scatter(
                x=span,
                y=[shown(value)] * 2,
                mode="lines",
                line={"dash": dash, "color": "grey", "width": 1.5},
                name=f"{html.escape(name)}: {value:.3g}",
                hovertemplate=f"{html.escape(name)}: {value:.4g} nats/token<extra></extra>",
            )
        )
    verdict = (document.get("verdict") or {}).get("sentence", "")
    axis = "gap to the closest, nats/token" if text else "KL(provider ‖ candidate), nats/token"
    fig.update_layout(
        title={"text": html.escape(verdict.split(". The fine-tune rounded")[0])[:160], "font": {"size": 13}},
        xaxis={"title": "candidate rank", "type": "log", "tickvals": ranks, "ticktext": [str(r) for r in ranks]},
        yaxis={"title": axis, "type": "log", "exponentformat": "power"},
        legend={"orientation": "h", "y": -0.25, "x": 0},
        margin={"t": 60, "l": 60, "r": 20},
    )
    return fig


def adapter_curve(report: Report) -> go.Figure:
    """A published adapter's loss next to the optimum: energy lost versus rank (log-log).

    The line is the best adapter of each rank over the fine-tune's changed matrices (from
    their spectra); the marker is the adapter in the report's ``adapter`` section at its rank,
    over the same matrices (those it leaves out count as wholly lost). A marker on the line is
    an adapter as good as any of its rank; above it, the adapter loses more than it had to.
    Hover: "rank 8 · this adapter · lost 0.52%".
    """
    section = report.adapter or {}
    summary = section.get("summary") or {}
    changed = [m for m in report.matrices if m.energy > 0]
    ranks = curve_ranks(report)
    fig = go.Figure()
    if changed:
        energies = np.array([m.energy for m in changed])
        kept = energies @ np.array([m.retained_at(ranks) for m in changed]) / energies.sum()
        lost = [float(1.0 - k) for k in kept]
        shown = [(r, y) for r, y in zip(ranks, lost, strict=True) if y > 0]
        fig.add_trace(
            go.Scatter(
                x=[r for r, _ in shown],
                y=[y for _, y in shown],
                mode="lines",
                name="best adapter of each rank",
                line={"width": 3, "color": "black"},
                text=[f"rank {r} · best possible · lost {percent(y)}" for r, y in shown],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    kept = summary.get("energy_kept_all")
    if kept is not None and summary.get("rank"):
        rank, loss = int(summary["rank"]), max(1.0 - float(kept), 1e-12)  # a log axis has no zero
        fig.add_trace(
            go.Scatter(
                x=[rank],
                y=[loss],
                mode="markers",
                name="this adapter",
                marker={"size": 14, "color": "crimson", "symbol": "diamond"},
                text=[f"rank {rank} · this adapter · lost {percent(min(1.0, 1.0 - float(kept)))}"],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    fig.update_layout(
        title={"text": html.escape(str(summary.get("sentence", "")))[:200], "font": {"size": 13}},
        xaxis={"title": "rank", "type": "log"},
        yaxis={"title": "share of the fine-tune's change lost", "type": "log"},
        legend=_LEGEND_BELOW,
        margin={"t": 60},
    )
    return fig
