"""Summaries of a report at one rank: pooled per module kind, per layer and overall.

Input: the report's records (``MatrixResult``, ``VectorResult``); output: a ``Summary`` of
plain numbers and the summary card's sentence. One pooling rule throughout: a group of
matrices is read as one block-diagonal weight, so its retention is energy-weighted
(``Σ E_i·retained_i / Σ E_i``) and its cosine distance is ``1 − sqrt(retention)``, the same
relation as for one matrix. (An unweighted mean of per-matrix cosine distances would let a
matrix that barely changed count as much as the one that carries the fine-tune.)

Cost: every rank read is a lookup in each record's cumulative curve, so a summary of 560
matrices takes milliseconds at any rank (``bench/summary_speed.py``).

Not here: records and JSON (``report``), figures (``plots``), words for the terminal (``cli``).

Worked example: two matrices with E = 30 and 10, keeping 25/30 and 10/10 at rank 2: the
group keeps (25 + 10)/40 = 87.5%, cosine distance 1 − sqrt(0.875) ≈ 0.0646.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lorafid.audit.matrices import RANK_GRID, MatrixResult, VectorResult


@dataclass(frozen=True)
class GroupSummary:
    """A group of matrices (a module kind, a layer, the model) read as one weight: pooled.

    Every figure is that of the group's matrices side by side as one block-diagonal Δ, so the
    three agree with each other: ``cosine_distance = 1 − sqrt(energy_retained)`` exactly as
    for a single matrix, and a group whose energy sits in one matrix is read by that matrix.
    """

    key: str
    matrices: int
    energy: float  # Σ E_i
    energy_retained: float  # Σ E_i·retained_i / Σ E_i
    cosine_distance: float  # 1 − sqrt(energy_retained): the cosine distance of the pooled Δ
    weight_rel_error: float  # sqrt(Σ lost_i) / sqrt(Σ ‖W_ft,i‖²)


@dataclass(frozen=True)
class Summary:
    """A report's figures at one rank, pooled per module kind, per layer and overall."""

    rank: int
    overall: GroupSummary
    by_module: tuple[GroupSummary, ...]
    by_layer: tuple[GroupSummary, ...]
    worst: tuple[tuple[str, float], ...]  # (matrix, cosine distance), worst first
    rank_for_90: int | None  # smallest rank whose overall retention reaches 90% (None: beyond k)
    noise_floor_retained: float  # overall retention a pure-rounding remainder would allow
    lost_outside_lora: float  # Δ energy in 1-D tensors: not representable by any LoRA
    unchanged: int = 0  # matrices identical in both models (Δ = 0): nothing for a LoRA to keep
    full_rank: int = 0  # the largest matrix's full rank: a rank at or above it keeps everything

    def sentence(self) -> str:
        """The summary card in words; identical models are said to be identical, not "100% kept",
        a rank at or above every matrix's full rank is said to be full rank, and nothing computed
        yet (an audit stopped before its first matrix) is said so, not read as a result."""
        compared = self.overall.matrices
        if not compared:
            return "No weight matrix has been compared yet."
        if self.unchanged == compared:
            what = f"No weight matrix differs between the two models (all {compared} compared are identical)"
            if self.lost_outside_lora > 0:
                return what + "; only 1-D tensors (norms, biases) changed, and no LoRA can carry those."
            return what + ": there is no change for a LoRA to keep."
        if self.full_rank and self.rank >= self.full_rank:  # nothing is lost, nothing loses most
            first = f"Full rank ({self.full_rank}) keeps everything of this fine-tune's change"
            if self.rank_for_90 is None:
                return first + "."
            return f"{first}; rank {self.rank_for_90} already keeps 90%."
        parts = [f"Rank {self.rank} keeps {percent(self.overall.energy_retained)} of this fine-tune's change"]
        if self.unchanged:
            parts.append(f"only {compared - self.unchanged} of {compared} matrices changed")
        if len(self.by_module) > 1:
            worst = min(self.by_module, key=lambda g: g.energy_retained)
            parts.append(f"{worst.key} loses most (keeps {percent(worst.energy_retained)})")
        if self.rank_for_90 is None:
            parts.append("no rank below full rank reaches 90%")
        elif self.rank_for_90 <= self.rank:
            parts.append(f"rank {self.rank_for_90} already keeps 90%")
        else:
            parts.append(f"rank {self.rank_for_90} would be needed for 90%")
        floor = 1.0 - self.noise_floor_retained
        if floor > 1e-3:
            parts.append(f"about {floor:.1%} of the change is storage rounding that no rank recovers")
        return "; ".join(parts) + "."


def percent(share: float) -> str:
    """A share as a percentage that never rounds a loss of 0.001% or more away: 0.9995 -> "99.95%".

    At most three decimals: a loss below 0.0005% (float rounding of stored weights) reads "100%",
    not "100.000000%". Examples: 0.3141 -> "31%"; 0.99949 -> "99.95%"; 1.0 -> "100%";
    0.00002 -> "0.002%"; 1 - 4e-9 -> "100%".
    """
    if share in (0.0, 1.0) or 0.01 <= share <= 0.99:
        return f"{share:.0%}"
    gap = min(share, 1.0 - share)  # the part that whole percents would hide
    decimals = min(3, max(1, -math.floor(math.log10(gap * 100))))
    text = f"{share * 100:.{decimals}f}"
    return f"{float(text):.0f}%" if float(text) in (0.0, 100.0) else f"{text}%"


def summarize(matrices: Iterable[MatrixResult], vectors: Iterable[VectorResult], rank: int) -> Summary:
    """Energy-weighted summaries at ``rank`` over whatever matrices are done so far."""
    done = list(matrices)
    by_module: dict[str, list[MatrixResult]] = {}
    by_layer: dict[str, list[MatrixResult]] = {}
    for m in done:
        by_module.setdefault(m.module, []).append(m)
        by_layer.setdefault("-" if m.layer is None else str(m.layer), []).append(m)
    worst = sorted(((m.name, m.metrics(rank).cosine_distance) for m in done), key=lambda t: -t[1])[:10]
    total_energy = sum(m.energy for m in done)
    floor = sum(m.energy * m.noise_floor_retained(rank) for m in done) / total_energy if total_energy else 1.0
    vector_energy = sum(v.energy for v in vectors)
    return Summary(
        rank=rank,
        overall=_group("all", done, rank),
        by_module=tuple(_group(k, g, rank) for k, g in by_module.items()),
        by_layer=tuple(_group(k, g, rank) for k, g in sorted(by_layer.items(), key=lambda kv: _layer_key(kv[0]))),
        worst=tuple(worst),
        rank_for_90=aggregate_rank_for_energy(done, 0.9),
        noise_floor_retained=floor,
        lost_outside_lora=vector_energy,
        unchanged=sum(1 for m in done if m.energy == 0.0),
        full_rank=max((m.full_rank for m in done), default=0),
    )


def aggregate_rank_for_energy(matrices: list[MatrixResult], share: float) -> int | None:
    """Smallest rank r at which the energy-weighted retention of all matrices reaches ``share``.

    Exact (binary search over 1…max k) when every spectrum is loaded; the smallest grid
    rank that reaches it otherwise. None when no matrix changed or nothing reaches it.
    """
    total = sum(m.energy for m in matrices)
    if total == 0.0:
        return None

    def reaches(rank: int) -> bool:
        return sum(m.energy * m.energy_retained(rank) for m in matrices) >= share * total * (1 - 1e-12)

    top = max(m.full_rank for m in matrices)
    if all(m.sigma_sq is not None for m in matrices):
        return _first_true(reaches, 1, top)
    candidates = [r for r in RANK_GRID if r < top] + [top]
    return next((r for r in candidates if reaches(r)), None)


def _first_true(predicate: Callable[[int], bool], low: int, high: int) -> int | None:
    """Smallest x in [low, high] with predicate(x) for a monotone predicate, else None."""
    if not predicate(high):
        return None
    while low < high:
        mid = (low + high) // 2
        if predicate(mid):
            high = mid
        else:
            low = mid + 1
    return low


def _group(key: str, matrices: list[MatrixResult], rank: int) -> GroupSummary:
    energy = sum(m.energy for m in matrices)
    at = [m.metrics(rank) for m in matrices]
    lost = sum(m.energy * (1 - a.energy_retained) for m, a in zip(matrices, at, strict=True))
    weight = sum(m.finetune_norm_sq for m in matrices)
    retained = 1.0 - lost / energy if energy else 1.0
    return GroupSummary(
        key=key,
        matrices=len(matrices),
        energy=energy,
        energy_retained=retained,
        cosine_distance=1.0 - math.sqrt(max(0.0, retained)),
        weight_rel_error=math.sqrt(lost / weight) if weight else 0.0,
    )


def _layer_key(layer: str) -> tuple[int, int]:
    return (1, 0) if layer == "-" else (0, int(layer))
