"""Distances between a provider and local candidates, their intervals, and the verdict.

Pure numbers (NumPy): ``lorafid.providers.probe`` reads the provider and runs the candidates, then hands
per-prompt sums here. The distance at one token is the KL divergence from the provider's
distribution to the candidate's, both coarse-grained to the tokens the provider listed plus
"everything else" (``coarse_kl``): ``Σ_{s∈S} p_s log(p_s/q_s) + p_rest log(p_rest/q_rest)``.
Coarse-graining never increases a KL divergence, so this is a lower bound of the full KL that
uses every number the provider gave. Worked example: S = {a}, p_a = 0.5 (p_rest = 0.5), q_a =
0.25 (q_rest = 0.75): 0.5·ln 2 + 0.5·ln(2/3) = 0.1438 nats. Also per token: top-1 agreement and
|Δ log p| of the provider's own token. Intervals are percentile bootstraps over prompts (a fixed
seed: the same evidence gives the same report). The verdict (``summarise``) rules a candidate
out only when a paired bootstrap puts it further than the closest one by more than the noise
tolerance, names the grid ranks around every rank it could not rule out, and says "matches
none of these" when the closest candidate is further from the provider than its own
neighbours are from it.

Candidates are named ``finetune``, ``finetune-8bit``, ``rank-R`` (a multi-LoRA server's
weights: base + Δ_R, the rest the base's), ``rank-R+extras`` (the rest the fine-tune's) and
``base``.

Not here: HTTP, tokenizers, forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorafid.errors import ProviderError

BOOTSTRAP_RESAMPLES = 2000
MIN_PROMPTS_FOR_VERDICT = 5  # fewer scored prompts: no bootstrap is meaningful, no verdict
# KL below this is float noise of a serving stack, whatever the candidates: a bfloat16 forward of
# the test suite's tiny Llama differs from its float32 forward by 8.4e-5 nats per token (mean over
# 8 prompts, 1.4e-4 at most). Larger models drift more; the tolerance also grows with the 8-bit
# reference's own distance from the fine-tune, which grows with them.
NOISE_FLOOR_NATS = 1e-4
FINETUNE, FINETUNE_8BIT, BASE = "finetune", "finetune-8bit", "base"


def quantized_name(scheme: str) -> str:
    """The candidate name of the fine-tune quantized with ``scheme``: "int8" keeps its old name."""
    return FINETUNE_8BIT if scheme == "int8" else f"finetune-{scheme}"


def is_original(name: str) -> bool:
    """The fine-tune or a quantized copy of it: never an extraction."""
    return name == FINETUNE or name.startswith("finetune-")


BASE_QUANTIZED = "base:"  # "base:fp8" in --candidates: every rank's extraction served on an fp8 base


def candidate_names(ranks: Sequence[int], quantized: Sequence[str] = ()) -> list[str]:
    """Every candidate, nearest the fine-tune first: finetune, 8-bit, other quantizations,
    ranks high→low (both modes, then served on each quantized base: "rank-64@fp8"), base."""
    originals = [q for q in quantized if not q.startswith(BASE_QUANTIZED) and q != "int8"]
    bases = [q.removeprefix(BASE_QUANTIZED) for q in quantized if q.startswith(BASE_QUANTIZED)]
    names = [FINETUNE, FINETUNE_8BIT, *(quantized_name(q) for q in originals)]
    for r in sorted(set(ranks), reverse=True):
        names += [f"rank-{r}", f"rank-{r}+extras", *(f"rank-{r}@{q}" for q in bases)]
    return [*names, BASE]


def parse_candidate(name: str) -> tuple[int | None, bool]:
    """(rank, keep_extras) of a candidate name: "rank-64+extras" -> (64, True); "base" -> (None, False)."""
    if not name.startswith("rank-"):
        return None, False
    rest = name[5:].partition("@")[0]  # "rank-64@fp8": the extraction on an fp8 base
    keep = rest.endswith("+extras")
    return int(rest.removesuffix("+extras")), keep


def coarse_kl(p_alt: np.ndarray, q_alt: np.ndarray) -> np.ndarray:
    """KL(P‖Q) per row over the partition {each listed token} ∪ {the rest}, in nats.

    ``p_alt``, ``q_alt``: (T, K) log-probabilities of the listed tokens (NaN = not listed, left
    to the rest). Example: p = [[ln .5]], q = [[ln .25]] -> [0.1438] (worked in the module docstring).
    """
    listed = ~(np.isnan(p_alt) | np.isnan(q_alt))
    p = np.where(listed, np.exp(np.where(listed, p_alt, 0.0)), 0.0)
    q = np.where(listed, np.exp(np.where(listed, q_alt, 0.0)), 0.0)
    # Rounded log-probabilities can sum a hair above 1: renormalise so P stays a distribution.
    total = np.maximum(p.sum(axis=1, keepdims=True), 1.0)
    p = p / total
    p_rest = np.clip(1.0 - p.sum(axis=1), 0.0, None)
    q_rest = np.clip(1.0 - q.sum(axis=1), 1e-30, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, 1e-300))), 0.0).sum(axis=1)
        rest = np.where(p_rest > 0, p_rest * (np.log(np.maximum(p_rest, 1e-300)) - np.log(q_rest)), 0.0)
    return np.maximum(terms + rest, 0.0)


@dataclass(frozen=True)
class PromptScore:
    """One prompt: per candidate, the summed distance over its scored tokens, and the counts."""

    prompt_index: int
    tokens: int
    kl_sum: dict[str, float]
    top1_matches: dict[str, int]
    chosen_abs_error_sum: dict[str, float]


@dataclass(frozen=True)
class CandidateResult:
    """One candidate against the provider, over every scored prompt."""

    name: str
    distance: float  # mean coarse KL(provider ‖ candidate) per scored token, nats
    interval: tuple[float, float]  # 95% bootstrap interval over prompts
    top1_agreement: float
    chosen_logprob_error: float  # mean |log p_provider − log p_candidate| of the provider's own tokens
    distance_to_finetune: float  # this candidate from the fine-tune, locally, on the same tokens and partition
    ruled_out: bool  # further than the closest candidate by more than noise, by a paired bootstrap
    rank: int | None
    serving: str | None  # "lora-only" or "keep-extras" for rank candidates


@dataclass(frozen=True)
class Verdict:
    sentence: str
    closest: str
    matches: bool  # the closest candidate is within the match tolerance
    consistent: tuple[str, ...]  # candidates not ruled out
    rank_range: tuple[int | None, int | None] | None  # (exclusive lower grid rank, exclusive upper), None = open
    tolerance: float


def grid_within(ranks: Sequence[int], full_rank: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the ranks to run, the ranks left out): a rank at or above the model's full rank serves
    every matrix whole, so with the fine-tune's extras it IS the fine-tune (already a candidate)
    and with the base's it equals every other such rank: none is run. When no rank is below the
    full rank, the grid is the full rank alone.

    Example: ranks (16, 32, 64, 128), full rank 48 -> ((16, 32), (64, 128)).
    """
    grid = tuple(sorted(set(ranks)))
    if full_rank is None:
        return grid, ()
    below = tuple(r for r in grid if r < full_rank)
    beyond = tuple(r for r in grid if r >= full_rank)
    return (below or (full_rank,)), beyond


def grid_notes(closest: str, grid: Sequence[int], beyond: Sequence[int], full_rank: int | None) -> str:
    """Sentences for the verdict about the grid itself: the ranks left out as the fine-tune, and,
    when the closest candidate is a rank at the grid's edge, ranks beyond it worth checking.

    Example: closest "rank-16", grid (16, 32, ...) -> " The closest candidate is the lowest rank
    checked (16): a lower rank may fit better; check below it, e.g. --ranks 4,8,16."
    """
    notes = ""
    if beyond and full_rank is not None:
        listed = ", ".join(map(str, beyond))
        notes += (
            f" Ranks {listed} are at or above the model's full rank ({full_rank}): they serve the fine-tune's own "
            "weights (with its embeddings and norms, the fine-tune itself) and were not run as separate candidates."
        )
    rank, _ = parse_candidate(closest)
    if rank is None or not grid:
        return notes
    ordered = sorted(set(grid))
    if rank == ordered[0] and rank > 1:
        lower = sorted({max(1, rank // 4), max(1, rank // 2)} - {rank})
        suggestion = ",".join(map(str, [*lower, rank]))
        notes += (
            f" The closest candidate is the lowest rank checked ({rank}): a lower rank may fit better; "
            f"check below it, e.g. --ranks {suggestion}."
        )
    elif rank == ordered[-1] and (full_rank is None or rank < full_rank):
        higher = sorted({r if full_rank is None else min(r, full_rank) for r in (2 * rank, 4 * rank)} - {rank})
        suggestion = ",".join(map(str, [rank, *higher]))
        notes += (
            f" The closest candidate is the highest rank checked ({rank}): a higher rank may fit better; "
            f"check above it, e.g. --ranks {suggestion}."
        )
    return notes


def bootstrap_indices(prompts: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, prompts) indices drawn with replacement; a fixed seed keeps reports reproducible."""
    return np.random.default_rng(seed).integers(0, prompts, size=(resamples, prompts))


def summarise(
    scores: Sequence[PromptScore], local: dict[str, dict[str, float]], ranks: Sequence[int]
) -> tuple[dict[str, CandidateResult], Verdict]:
    """Distances with intervals for every candidate, and the verdict.

    ``local[a][b]`` is the summed coarse KL from candidate a to candidate b over all scored
    tokens (the provider's partition): how far apart the candidates themselves are.
    """
    names = list(scores[0].kl_sum) if scores else []
    tokens = np.array([s.tokens for s in scores], dtype=np.float64)
    total_tokens = float(tokens.sum())
    if not names or total_tokens == 0:
        # No position had alternatives to compare (every listed token unknown, or nothing scored).
        raise ProviderError(
            "No scored token had alternatives the fine-tune's tokenizer knows: there is nothing to compare. "
            "Ask for more alternatives (--top-logprobs), or use the text channel (--channel completions-text)."
        )
    kl = {n: np.array([s.kl_sum[n] for s in scores]) for n in names}
    idx = bootstrap_indices(len(scores))
    boot_tokens = tokens[idx].sum(axis=1)
    mean = {n: float(kl[n].sum() / total_tokens) for n in names}
    closest = min(names, key=lambda n: mean[n])
    tolerance = max(NOISE_FLOOR_NATS, local[FINETUNE][FINETUNE_8BIT] / total_tokens)
    results: dict[str, CandidateResult] = {}
    for n in names:
        boot = kl[n][idx].sum(axis=1) / boot_tokens
        diff = (kl[n][idx].sum(axis=1) - kl[closest][idx].sum(axis=1)) / boot_tokens
        ruled_out = (
            n != closest and len(scores) >= MIN_PROMPTS_FOR_VERDICT and float(np.quantile(diff, 0.025)) > tolerance
        )
        rank, keep = parse_candidate(n)
        results[n] = CandidateResult(
            name=n,
            distance=mean[n],
            interval=(float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))),
            top1_agreement=sum(s.top1_matches[n] for s in scores) / total_tokens,
            chosen_logprob_error=sum(s.chosen_abs_error_sum[n] for s in scores) / total_tokens,
            distance_to_finetune=local[n][FINETUNE] / total_tokens if n != FINETUNE else 0.0,
            ruled_out=ruled_out,
            rank=rank,
            serving=None if rank is None else ("keep-extras" if keep else "lora-only"),
        )
    return results, _verdict(results, closest, local, total_tokens, tolerance, ranks, len(scores))


def neighbours(name: str, ranks: Sequence[int]) -> list[str]:
    """Candidates next to ``name`` on the path fine-tune → high ranks → low ranks → base, in its
    serving mode: the verdict's "matches" reach is the furthest of them from ``name``."""
    grid = sorted(set(ranks), reverse=True)
    rank, keep = parse_candidate(name)
    suffix = "+extras" if keep else ""
    if is_original(name):
        return [FINETUNE_8BIT if name == FINETUNE else FINETUNE, f"rank-{grid[0]}", f"rank-{grid[0]}+extras"]
    if name == BASE:
        return [f"rank-{grid[-1]}", f"rank-{grid[-1]}+extras"]
    if rank is None:
        raise ValueError(f"unknown candidate {name!r}")
    i = grid.index(rank)
    higher = f"rank-{grid[i - 1]}{suffix}" if i > 0 else FINETUNE
    lower = f"rank-{grid[i + 1]}{suffix}" if i + 1 < len(grid) else BASE
    return [higher, lower]


def _verdict(
    results: dict[str, CandidateResult],
    closest: str,
    local: dict[str, dict[str, float]],
    total_tokens: float,
    tolerance: float,
    ranks: Sequence[int],
    prompts: int,
) -> Verdict:
    best = results[closest]
    # A neighbour not scored (an interrupted refinement) cannot set the reach: the scored ones do.
    reach = max((local[closest][n] / total_tokens for n in neighbours(closest, ranks) if n in local), default=0.0)
    matches = best.distance <= max(tolerance, reach)
    consistent = tuple(n for n, r in results.items() if not r.ruled_out)
    quant = results[FINETUNE_8BIT]
    quant_note = (
        f" The fine-tune rounded to 8 bits is {quant.distance:.3g} nats from the provider "
        f"({quant.distance_to_finetune:.3g} from the fine-tune itself)."
    )
    range_ = _rank_range(consistent, ranks)
    if prompts < MIN_PROMPTS_FOR_VERDICT:
        sentence = f"Too few prompts scored ({prompts}) for a verdict; closest: {closest} at {best.distance:.3g} nats."
        return Verdict(sentence + quant_note, closest, matches, consistent, range_, tolerance)
    if not matches:
        sentence = (
            "Matches none of these (another model, quantization or sampling settings): the closest, "
            f"{closest}, is {best.distance:.3g} nats per token from the provider, further than its neighbours are "
            f"from it ({reach:.3g})."
        )
        return Verdict(sentence + quant_note, closest, False, consistent, range_, tolerance)
    rank_candidates = [n for n in consistent if parse_candidate(n)[0] is not None]
    if is_original(closest) and not rank_candidates:
        if closest != FINETUNE and FINETUNE not in consistent:
            how = "rounded to 8 bits" if closest == FINETUNE_8BIT else closest.removeprefix("finetune-")
            sentence = f"Serves the original weights, quantized (closest to them {how}): not an extraction."
        else:
            sentence = "Serves the original weights."
            if FINETUNE_8BIT in consistent:
                sentence += " (8-bit rounding of them cannot be told apart on these prompts.)"
    elif closest == BASE and not rank_candidates:
        sentence = "Serves the base model, not the fine-tune."
    else:
        sentence = _extraction_sentence(closest, consistent, range_)
    return Verdict(sentence + quant_note, closest, True, consistent, range_, tolerance)


def _rank_range(consistent: Sequence[str], ranks: Sequence[int]) -> tuple[int | None, int | None] | None:
    """Grid ranks strictly around every rank not ruled out: (32, 128) for {64}; None ends are open."""
    grid = sorted(set(ranks))
    held = sorted({r for r in (parse_candidate(n)[0] for n in consistent) if r is not None})
    if not held:
        return None
    below = [r for r in grid if r < held[0]]
    above = [r for r in grid if r > held[-1]]
    lower = below[-1] if below else None
    upper = above[0] if above and not any(is_original(n) for n in consistent) else None
    return lower, upper


def _extraction_sentence(closest: str, consistent: Sequence[str], range_: tuple[int | None, int | None] | None) -> str:
    lower, upper = range_ or (None, None)
    span = (
        f"between {lower} and {upper}"
        if lower is not None and upper is not None
        else f"above {lower}"
        if lower is not None
        else f"below {upper}"
        if upper is not None
        else "any rank on the grid"
    )
    modes = {parse_candidate(n)[1] for n in consistent if parse_candidate(n)[0] is not None}
    mode = (
        "; serving mode undetermined"
        if len(modes) == 2
        else "; served with the fine-tune's embeddings and norms (keep-extras)"
        if modes == {True}
        else "; served as a multi-LoRA server does, with the base's embeddings and norms"
    )
    rank, _ = parse_candidate(closest)
    if rank is None:
        return f"Closest to {closest}, but a rank-r extraction ({span}) cannot be ruled out on these prompts{mode}."
    return f"Closest to a rank-{rank} extraction ({span}){mode}."
