"""Summary and rank-change time on a 70B-shaped report, an earlier commit against the working tree.

    python -m bench.summary_speed --rev 8d86b7b

builds one report of 80 layers × 7 modules at Llama-70B shapes (560 matrices, k = 1024 or
8192) from synthetic spectra, once with the earlier commit's ``lorafid/report.py`` (read with
``git show``, loaded as its own module) and once with the working tree's, then times, on
each, what the dashboard does when the rank slider moves: ``with_rank(r)`` and
``summary()`` (the summary card), for the same sequence of ranks. Both run alternately in
one process, so a busy neighbour slows both alike; the script checks that both give the
same summary. ``--figures`` also times ``plots.figures`` (the charts), on the working tree's
report only.

Spectra are synthetic (a power-law decay with a flat tail, seeded per matrix): the time
depends on k and the number of matrices, not on the values.
"""

from __future__ import annotations

import argparse
import time
from types import ModuleType
from typing import Any

import numpy as np

from bench.before_after import load_revision
from bench.synth import PRESETS
from lorafid.audit import report as current

RANKS = (64, 8, 512, 100, 16, 4096, 37, 256)  # a slider dragged around, grid and off-grid ranks


def synthetic_spectrum(k: int, seed: int) -> np.ndarray:
    """σ² descending: i**-1.2 decay plus a flat tail at 1e-4 of the top, jittered."""
    rng = np.random.default_rng(seed)
    values = np.arange(1, k + 1, dtype=np.float64) ** -1.2 + 1e-4 * rng.random(k)
    return np.sort(values)[::-1].copy()


def build_report(module: ModuleType, layers: int) -> Any:
    """A complete report of ``layers`` × 7 Llama-70B matrices, built with ``module``'s classes."""
    from lorafid.audit import spectrum as sp

    matrices = []
    seed = 0
    for layer in range(layers):
        for name, shape in PRESETS["llama70b"].modules.items():
            seed += 1
            sigma_sq = synthetic_spectrum(min(shape), seed)
            spectrum = sp.DeltaSpectrum(
                shape=shape,
                sigma_sq=sigma_sq,
                energy=float(sigma_sq.sum()),
                finetune_norm_sq=float(sigma_sq.sum()) * 1e4,
                base_norm_sq=float(sigma_sq.sum()) * 1e4,
                mean_abs_delta=1e-4,
                noise_energy=float(sigma_sq.sum()) * 1e-3,
            )
            matrices.append(
                module.MatrixResult.from_spectrum(
                    name=f"model.layers.{layer}.{name}.weight",
                    layer=layer,
                    module=name,
                    dtype="BF16",
                    spectrum=spectrum,
                )
            )
    source = module.SourceRecord("org/base", "hub", "org/base", None, "0" * 40, None, ("model.safetensors",))
    return module.Report(
        base=source,
        finetune=source,
        settings=module.AuditSettings(rank=64, device="cpu"),
        matrices=tuple(matrices),
    )


def slider_moves(report: Any) -> tuple[list[float], list[float], list[Any]]:
    """Seconds per rank: (with_rank + summary, summary alone), and the summaries."""
    moves, summaries_s, summaries = [], [], []
    for rank in RANKS:
        started = time.perf_counter()
        moved = report.with_rank(rank)
        summary = moved.summary()
        moves.append(time.perf_counter() - started)
        started = time.perf_counter()
        moved.summary()
        summaries_s.append(time.perf_counter() - started)
        summaries.append(summary)
    return moves, summaries_s, summaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the earlier commit (or tag, branch)")
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--figures", action="store_true", help="also time plots.figures on the current report")
    args = parser.parse_args()
    before_module = load_revision(args.rev, "lorafid/report.py")
    reports = {"before": build_report(before_module, args.layers), "after": build_report(current, args.layers)}
    print(f"{len(reports['after'].matrices)} matrices ({args.layers} layers × 7, Llama-70B shapes), ranks {RANKS}")
    results = {}
    for label in ("before", "after", "before", "after"):  # alternate: both see the same neighbours
        results.setdefault(label, []).append(slider_moves(reports[label]))
    for label, runs in results.items():
        moves = [min(r[0][i] for r in runs) for i in range(len(RANKS))]
        summaries = [min(r[1][i] for r in runs) for i in range(len(RANKS))]
        print(
            f"  {label:<7} rank change (with_rank + summary): median {np.median(moves):.3f} s, "
            f"max {max(moves):.3f} s · summary() alone: median {np.median(summaries):.3f} s"
        )
    before_moves = np.median([min(r[0][i] for r in results["before"]) for i in range(len(RANKS))])
    after_moves = np.median([min(r[0][i] for r in results["after"]) for i in range(len(RANKS))])
    print(f"  speed-up of a rank change (median/median): {before_moves / after_moves:.0f}x")
    for old, new in zip(results["before"][0][2], results["after"][0][2], strict=True):
        assert old.rank_for_90 == new.rank_for_90, (old.rank_for_90, new.rank_for_90)
        assert abs(old.overall.energy_retained - new.overall.energy_retained) < 1e-12
    print("  same rank-for-90% and overall retention at every rank: yes")
    if args.figures:
        from lorafid.web import plots

        times = []
        for rank in RANKS:
            moved = reports["after"].with_rank(rank)
            started = time.perf_counter()
            plots.figures(moved, "energy_retained")
            times.append(time.perf_counter() - started)
        print(f"  after: plots.figures per rank: median {np.median(times):.3f} s, max {max(times):.3f} s")


if __name__ == "__main__":
    main()
