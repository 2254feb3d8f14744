"""Which candidates a provider check scores: a coarse grid first, then only around what the evidence holds.

Every candidate costs one streamed forward (its blocks over every prompt), so the check scores a
coarse first pass (``coarse_names``): the fine-tune and its 8-bit reference (the verdict's
tolerance is their distance), the base, and the grid's middle rank in every serving mode. Then, pass
after pass (``still_needed``), the unscored neighbours of the closest candidate along its path,
then the rest of its ``neighbourhood`` and that of every candidate not ruled out, until none is
left: the closest's neighbours are scored (its "matches" reach reads them), and every candidate
that could widen the verdict's rank interval is scored, as are the ranks that bound it. The
candidates never scored lie beyond a ruled-out neighbour of everything the verdict holds; that
they are further still assumes the distance grows along the grid away from the closest, which
is what the full grid (``--full-grid``) would check. A pass re-reads both models unless the
check keeps them (small pairs): the walk trades passes for forwards.

Example, ranks 16…512 with one quantized copy (16 candidates): the first pass scores finetune,
finetune-8bit, rank-64, rank-64+extras, base (5); for a provider serving rank 32 (nearer the
base than the fine-tune), then rank-32 (rank-64's neighbour toward the base), rank-16 (rank-32's
other one), rank-32+extras (its other serving mode): 8 in all, and no more if those are ruled
out. On a plane where distances grow away from the served candidate, the 16 default candidates
cost 8 forwards on average, 10 at most.

Pure names: no forward, no numbers. Not here: the passes themselves (``probe``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lorafid.providers.evidence import (
    BASE,
    BASE_QUANTIZED,
    FINETUNE,
    FINETUNE_8BIT,
    candidate_names,
    is_original,
    neighbours,
    parse_candidate,
)


def serving_modes(quantized: Sequence[str]) -> list[str]:
    """The suffixes of a rank's candidates: "" (multi-LoRA), "+extras", "@fp8" per quantized base."""
    bases = [q.removeprefix(BASE_QUANTIZED) for q in quantized if q.startswith(BASE_QUANTIZED)]
    return ["", "+extras", *(f"@{q}" for q in bases)]


def coarse_names(ranks: Sequence[int], quantized: Sequence[str] = ()) -> list[str]:
    """The first pass: the two ends of the path (the fine-tune with its 8-bit reference, the base)
    and the grid's middle rank in every serving mode (in ``candidate_names`` order). The serving
    mode moves the distance more than a grid step of rank does, so the first pass settles it, and
    the walk then stays in one mode; the nearer end tells it which way to go first.

    Example: ranks (4, 8, 16, 32) -> finetune, finetune-8bit, rank-8, rank-8+extras, base.
    """
    grid = sorted(set(ranks), reverse=True)
    middle = grid[len(grid) // 2]
    picked = {FINETUNE, FINETUNE_8BIT, BASE, *(f"rank-{middle}{mode}" for mode in serving_modes(quantized))}
    return [n for n in candidate_names(ranks, quantized) if n in picked]


def neighbourhood(name: str, ranks: Sequence[int], quantized: Sequence[str] = ()) -> list[str]:
    """The candidates next to ``name``: the verdict's own neighbours (``evidence.neighbours``: along
    the path fine-tune → high ranks → low ranks → base, in its serving mode), its rank in every
    other serving mode, and for the original the other originals (its quantized copies).

    Example: "rank-16" on ranks (4, 8, 16, 32) -> rank-32, rank-8, rank-16+extras.
    """
    every = candidate_names(ranks, quantized)
    near = set(neighbours(name, ranks))
    rank, _ = parse_candidate(name)
    if rank is not None:
        near |= {f"rank-{rank}{mode}" for mode in serving_modes(quantized)}
    elif is_original(name):
        top = max(ranks)
        near |= {n for n in every if is_original(n) or parse_candidate(n)[0] == top}
    elif name == BASE:
        low = min(ranks)
        near |= {n for n in every if parse_candidate(n)[0] == low}
    near.discard(name)
    return [n for n in every if n in near]


def still_needed(
    closest: str,
    held: Iterable[str],
    scored: Iterable[str],
    ranks: Sequence[int],
    quantized: Sequence[str] = (),
    toward: str | None = None,
) -> list[str]:
    """The next pass, in ``candidate_names`` order; empty: the scored set answers the verdict.

    While the closest candidate has an unscored neighbour on its path (``evidence.neighbours``),
    only those: the search walks along the grid in the closest's serving mode, without scoring
    the other modes of every rank it passes; where both of a rank's neighbours are unscored, only
    the one ``toward`` the nearer end of the path (``FINETUNE``: the higher rank, ``BASE``: the
    lower), the other one later if the closest stays. Then the unscored ``neighbourhood`` of the
    closest and of every candidate in ``held`` (those not ruled out): the other serving modes at
    their ranks, the original's quantized copies, and the ranks that bound the verdict's interval.
    """
    done = set(scored)
    every = candidate_names(ranks, quantized)
    walk = [n for n in neighbours(closest, ranks) if n not in done]
    if len(walk) == 2 and parse_candidate(closest)[0] is not None and toward in (FINETUNE, BASE):
        walk = walk[:1] if toward == FINETUNE else walk[1:]  # neighbours(): [higher, lower]
    wanted = set(walk) or {n for name in {closest, *held} for n in neighbourhood(name, ranks, quantized)} - done
    return [n for n in every if n in wanted]


def scoring_note(scored: Iterable[str], ranks: Sequence[int], quantized: Sequence[str] = ()) -> str:
    """A sentence for the verdict naming the candidates never scored; "" when every one was."""
    every = candidate_names(ranks, quantized)
    done = set(scored)
    left = [n for n in every if n not in done]
    if not left:
        return ""
    return (
        f" Scored {len(every) - len(left)} of {len(every)} candidates (a coarse grid, then the neighbours of "
        f"every candidate not ruled out); not scored, as further along the grid than a ruled-out neighbour: "
        f"{', '.join(left)} (--full-grid scores them)."
    )
