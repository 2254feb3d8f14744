"""The local candidates of a provider check, scored in passes over one opened pair.

The first pass scores a coarse grid (``refine.coarse_names``); each later pass only the unscored
neighbours of what the evidence still holds (``refine.still_needed``), until none is left: about
8 forwards instead of 15 by default, with the full grid's verdict. Passes pay only where reading
the weights again is cheap: both models kept in memory between passes, or local files read again
from the disk with only the Δ directions kept (no pass decomposes again). A pair from the Hub too
large to keep is scored in one pass over every candidate: reading a real model over the network
again for each pass costs far more than the forwards it saves.

Not here: what a candidate is (``evidence``), how one is scored (``logprob_probe``,
``text_probe``), the verdict (``evidence``, ``text_evidence``).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorafid.progress import Progress
from lorafid.providers.evidence import Verdict, candidate_names
from lorafid.providers.refine import coarse_names, still_needed

KEEP_READS_BYTES = 2 * 2**30  # both models' weights kept between passes up to this size
KEEP_DIRECTIONS_BYTES = 8 * 2**30  # the directions of every matrix up to the grid's largest rank


@dataclass
class Passes:
    """The local candidates scored over one check's observations, pass after pass (``refine``)."""

    per_item: list[dict[str, Any]] = field(default_factory=list)  # per observation scored: {candidate: numbers}
    scored: list[str] = field(default_factory=list)  # the candidates scored, in ``candidate_names`` order
    variants_run: int = 0  # forward-equivalents: variants whose blocks ran, over every pass
    bytes_read: int = 0  # weight bytes read, both models, over every pass
    directions_cached: int = 0  # matrices whose directions an earlier run kept (``direction_cache``)
    passes: int = 0
    error: str | None = None  # an interruption: the passes before it are kept

    def settings(self, every: Sequence[str]) -> dict[str, Any]:
        """What the report's settings say of the scoring."""
        return {
            "candidates_scored": list(self.scored),
            "candidates_not_scored": [n for n in every if n not in self.scored],
            "passes": self.passes,
            "forward_equivalents": self.variants_run,
            "weight_bytes_read": self.bytes_read,
            "matrices_from_direction_cache": self.directions_cached,
        }


def score_in_passes(
    open_stream: Callable[[], Any],
    grid: Sequence[int],
    quantized: Sequence[str],
    items: Sequence[Any],
    score: Callable[[Any, Sequence[Any], Sequence[str]], Iterator[dict[str, Any]]],
    verdict_of: Callable[[Sequence[dict[str, Any]]], tuple[Verdict, str]],
    step: Callable[[str, int, int, str], Progress],
    what: str,
    full: bool,
) -> Generator[Progress, None, Passes]:
    """Score the coarse grid over ``items``, then, pass after pass, the unscored neighbours of
    what the verdict on the candidates scored so far (``verdict_of``: it, and the nearer end
    of the path) holds: its closest and every candidate not ruled out, until none is left
    (``refine.still_needed``); with ``full``, every candidate in one pass. All passes share
    one opened pair. An interruption keeps the passes before it, and in the first pass the
    items it scored."""
    every = candidate_names(grid, quantized)
    passes = Passes()
    with open_stream() as stream:
        full = full or not passes_pay(stream, grid)
        todo = every if full else coarse_names(grid, quantized)
        stream.keep_reads = not full and stream.plan().size_bytes <= KEEP_READS_BYTES
        stream.keep_directions = not full
        stream.direction_rank = max(grid, default=None)
        while todo:
            first = passes.passes == 0
            targets = items if first else items[: len(passes.per_item)]
            part: list[dict[str, Any]] = []
            try:
                for by_name in score(stream, targets, todo):
                    part.append(by_name)
                    yield step("local", len(part), len(targets), what)
            except KeyboardInterrupt:
                passes.error = "interrupted while scoring the candidates"
                if first and not part:
                    raise
                if not first:
                    break
            passes.variants_run += stream.stats.variants_run
            passes.bytes_read += stream.stats.bytes_read
            passes.directions_cached += stream.stats.directions_cached
            passes.passes += 1
            done = set(passes.scored) | set(todo)
            passes.scored = [n for n in every if n in done]
            merged = part if first else [{**old, **new} for old, new in zip(passes.per_item, part, strict=True)]
            # In the grid's order, so that ties between candidates break as the full grid's do.
            passes.per_item = [{n: m[n] for n in every if n in m} for m in merged]
            if full or passes.error:
                break
            verdict, toward = verdict_of(passes.per_item)
            todo = still_needed(verdict.closest, verdict.consistent, passes.scored, grid, quantized, toward)
    return passes


def passes_pay(stream: Any, grid: Sequence[int]) -> bool:
    """Whether a refined grid (``score_in_passes``) costs less than one pass over every candidate:
    both models' weights fit to be kept between passes (read once in all), or both are local files
    (read again per pass from the disk) and the directions kept between passes fit
    ``KEEP_DIRECTIONS_BYTES``. Never reads a model from the Hub twice."""
    if stream.plan().size_bytes <= KEEP_READS_BYTES:
        return True
    local = all(source.info.kind == "local" for source in stream.sources)
    return local and stream.direction_bytes(max(grid, default=0)) <= KEEP_DIRECTIONS_BYTES
