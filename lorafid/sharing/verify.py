"""Integrity: ``compare`` re-checks a published result against a re-run, within the precision
bar (energy retained and cosine distance within ``PRECISION`` at every rank); ``verify``
raises ``VerificationError`` when they disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorafid.audit import spectrum as sp
from lorafid.audit.matrices import RANK_GRID, MatrixResult
from lorafid.audit.report import Report
from lorafid.errors import VerificationError
from lorafid.sharing.records import PRECISION, settings_hash


@dataclass(frozen=True)
class Comparison:
    """A re-run against a published result: the largest differences and where they are."""

    matrices: int
    ranks_compared: int
    max_energy_diff: float
    max_cosine_diff: float
    worst: str  # "matrix @ rank r"
    problems: tuple[str, ...]  # disagreements beyond the bar, or in what was audited

    @property
    def agrees(self) -> bool:
        return not self.problems


def compare(published: Report, recomputed: Report, tolerance: float = PRECISION) -> Comparison:
    """Check a re-run against a published result at every rank (every grid rank without spectra).

    Also checks that both read the same commits and audited the same matrices.
    Example: identical reports -> Comparison(agrees=True, max_energy_diff=0.0, ...).
    """
    problems: list[str] = []
    sides = (("base", published.base, recomputed.base), ("fine-tune", published.finetune, recomputed.finetune))
    for side, was, now in sides:
        if was.resolved_sha != now.resolved_sha:
            problems.append(f"the {side} was read at commit {now.resolved_sha}, the result is of {was.resolved_sha}")
    if settings_hash(published) != settings_hash(recomputed):
        problems.append("the settings differ (include/exclude/embeddings or numerics)")
    ours = {m.name: m for m in recomputed.matrices}
    names = [m.name for m in published.matrices]
    missing = [n for n in names if n not in ours]
    extra = sorted(set(ours) - set(names))
    if missing or extra:
        problems.append(f"matrices differ: {len(missing)} missing from the re-run, {len(extra)} not in the result")
    worst, max_energy, max_cosine, compared = "", 0.0, 0.0, 0
    for m in published.matrices:
        if m.name not in ours:
            continue
        ranks, a, b = _curves(m, ours[m.name])
        compared += len(ranks)
        energy_diff = np.abs(a - b)
        cosine_diff = np.abs(np.sqrt(np.clip(a, 0, 1)) - np.sqrt(np.clip(b, 0, 1)))
        i = int(np.argmax(np.maximum(energy_diff, cosine_diff)))
        if max(energy_diff[i], cosine_diff[i]) >= max(max_energy, max_cosine):
            worst = f"{m.name} @ rank {ranks[i]}"
        max_energy, max_cosine = max(max_energy, float(energy_diff.max())), max(max_cosine, float(cosine_diff.max()))
        if energy_diff.max() > tolerance or cosine_diff.max() > tolerance:
            problems.append(f"{m.name} at rank {ranks[i]}: energy retained {a[i]:.7f} published, {b[i]:.7f} recomputed")
    return Comparison(len(names), compared, max_energy, max_cosine, worst, tuple(problems))


def verify(published: Report, recomputed: Report, where: str, tolerance: float = PRECISION) -> Comparison:
    """``compare``, raising ``VerificationError`` (listing up to 5 problems) when they disagree."""
    result = compare(published, recomputed, tolerance)
    if not result.agrees:
        listed = "; ".join(result.problems[:5]) + (
            f"; and {len(result.problems) - 5} more" if len(result.problems) > 5 else ""
        )
        raise VerificationError(f"The re-run does not reproduce {where} within {tolerance:g}: {listed}.")
    return result


def _curves(a: MatrixResult, b: MatrixResult) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Energy retained by both at the ranks both can answer exactly: 1..k with spectra, else the grid."""
    k = min(a.full_rank, b.full_rank)
    if a.sigma_sq is not None and b.sigma_sq is not None and a.shape == b.shape:
        ranks = list(range(1, k + 1))
        return ranks, _full_curve(a), _full_curve(b)
    ranks = [r for r in RANK_GRID if r < k] + [k]
    return ranks, np.array([a.energy_retained(r) for r in ranks]), np.array([b.energy_retained(r) for r in ranks])


def _full_curve(m: MatrixResult) -> np.ndarray:
    curve = sp.cumulative_energy(m.spectrum()).astype(np.float64)
    curve[-1] = 1.0  # rank k keeps all of Δ by definition (energy_retained says so too)
    return curve


# -- small helpers --------------------------------------------------------------------------------
