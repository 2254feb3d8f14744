"""Which candidate wrote this text? Likelihood ratios, a goodness-of-fit check, and the verdict.

Pure numbers (NumPy). For tokens x drawn from the served model P at temperature 1, the mean of
log Q(x) over the text is highest for Q = P in expectation, and the difference of two
candidates' means, mean(log Q₁(x) − log Q₂(x)), estimates KL(P‖Q₂) − KL(P‖Q₁) without bias.
So the candidate with the highest mean log-likelihood (the *closest*) is the best
explanation; another candidate is *ruled out* when the lower end of the 95% interval of its
gap to the closest is above zero. Intervals are a block bootstrap (blocks of 32 consecutive
tokens within a continuation, a fixed seed), since neighbouring tokens are not independent.

Two checks keep the verdict honest, both from the closest candidate W's own distributions at
every visited position (entropy H_t and second moment of log W):

- *fit*: if W were served with the requested sampler, Σ(log W(x_t) + H_t) has mean 0 and
  variance Σ Var_t (a martingale: the z-score is about standard normal). z far below 0: the
  text is less likely under W than W's own samples are: **matches none of these**.
  z far above 0: the text is more likely than sampling at temperature 1 gives;
- *tail*: the count of tokens W gives less than 5% probability, against its expectation
  under W. Too few of them, or z far above 0, is what a lower temperature, ``top_k``,
  ``top_p``, ``min_p`` or penalties do: **the provider changed the sampling settings**, and no
  candidate is named.

Worked example of the gap: at one position P = (0.5, 0.5), Q₁ = P, Q₂ = (0.25, 0.75); drawing
x from P, E[log Q₁(x) − log Q₂(x)] = 0.5·ln 2 + 0.5·ln(2/3) = 0.1438 = KL(P‖Q₂) − KL(P‖Q₁).

Not here: HTTP, tokenizers, forward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lorafid.providers.evidence import BASE, FINETUNE, Verdict, parse_candidate

BLOCK_TOKENS = 32
BOOTSTRAP_RESAMPLES = 2000
FIT_Z = 4.0  # |z| beyond this is not sampling noise (two-sided p ≈ 6e-5)
TAIL_PROBABILITY = 0.05  # a "low-probability token" for the tail check
MIN_TOKENS_FOR_VERDICT = 64


@dataclass(frozen=True)
class TokenScores:
    """One candidate at every scored token of the provider's text, concatenated over continuations.

    ``logprob[t]`` = log Q(x_t); ``entropy[t]`` = H(Q(·|h_t)); ``second[t]`` = E_Q[(log Q)²]
    at that position; ``tail[t]`` = the mass Q puts on tokens it gives less than 5%;
    ``argmax_hit[t]``: x_t is Q's most likely token.
    """

    logprob: np.ndarray
    entropy: np.ndarray
    second: np.ndarray
    tail: np.ndarray
    argmax_hit: np.ndarray

    @staticmethod
    def concatenate(parts: Sequence[TokenScores]) -> TokenScores:
        return TokenScores(*(np.concatenate([getattr(p, f) for p in parts]) for f in TokenScores.__dataclass_fields__))


@dataclass(frozen=True)
class TextCandidate:
    """One candidate against the provider's text."""

    name: str
    mean_logprob: float  # nats per token
    gap: float  # mean log W(x) − log Q(x): KL(P‖Q) − KL(P‖W), estimated; 0 for the closest
    interval: tuple[float, float]  # 95% block-bootstrap interval of the gap
    fit_z: float  # the goodness-of-fit z-score of the text under this candidate
    argmax_agreement: float  # share of tokens that are this candidate's most likely token
    ruled_out: bool
    rank: int | None
    serving: str | None


@dataclass(frozen=True)
class TextEvidence:
    """Everything the verdict rests on, for the report."""

    tokens: int
    continuations: int
    resolution: float  # nats per token: the KL gap these tokens resolve at 95% (≈ 7.7 / tokens)
    tail_observed: int
    tail_expected: float
    tail_z: float
    finding: str  # "served", "ambiguous", "matches-none", "sampler-changed", "too-little-text"
    fit_z: float  # the closest candidate's fit over the aligned continuations (0 when none)
    fit_tokens: int  # tokens of the continuations the fit and tail checks read


def block_ids(segments: Sequence[int], block: int = BLOCK_TOKENS) -> np.ndarray:
    """The block of every token: consecutive runs of ``block`` tokens, never across two continuations."""
    out, next_id = [], 0
    for length in segments:
        count = max(1, -(-length // block))
        out.append(next_id + np.arange(length) // block)
        next_id += count
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def bootstrap_gap(
    diff: np.ndarray, blocks: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of the mean of ``diff`` under a block bootstrap."""
    count = int(blocks.max()) + 1 if blocks.size else 0
    if count == 0:
        return (float("nan"), float("nan"))
    sums = np.bincount(blocks, weights=diff, minlength=count)
    sizes = np.bincount(blocks, minlength=count).astype(np.float64)
    picks = np.random.default_rng(seed).integers(0, count, size=(resamples, count))
    means = sums[picks].sum(axis=1) / sizes[picks].sum(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def fit_z(scores: TokenScores) -> float:
    """Σ(log Q(x_t) + H_t) / sqrt(Σ Var_t): about N(0, 1) if Q wrote the text at temperature 1."""
    variance = float(np.clip(scores.second - scores.entropy**2, 0.0, None).sum())
    return float((scores.logprob + scores.entropy).sum() / max(np.sqrt(variance), 1e-12))


def judge_text(
    scores: dict[str, TokenScores],
    segments: Sequence[int],
    *,
    original_family: Sequence[str] = (FINETUNE,),
    aligned: Sequence[bool] | None = None,
) -> tuple[dict[str, TextCandidate], Verdict, TextEvidence]:
    """Every candidate's likelihood, gap to the closest with its interval, and the verdict.

    ``segments``: the token count of each continuation, in the order the scores concatenate
    them. ``original_family``: the fine-tune and its quantized copies (never an extraction).
    ``aligned``: per continuation, whether re-tokenizing its text gave as many tokens as the
    provider counted (None: not known, taken as aligned). A continuation the provider sampled
    in a non-canonical split scores lower under every candidate alike: it still counts for the
    gaps between candidates, but not for the fit and tail checks, which compare with the
    candidates' own samples.
    """
    names = list(scores)
    tokens = int(sum(segments))
    blocks = block_ids(segments)
    mean = {n: float(scores[n].logprob.mean()) if tokens else float("nan") for n in names}
    closest = max(names, key=lambda n: mean[n])
    best = scores[closest]
    results = _candidates(scores, closest, blocks, tokens, lambda c: c.logprob, with_fit=True)
    flags = list(aligned) if aligned is not None else [True] * len(segments)
    mask = np.repeat(np.asarray(flags, dtype=bool), np.asarray(segments, dtype=np.int64))
    fit = TokenScores(*(getattr(best, f)[mask] for f in TokenScores.__dataclass_fields__))
    checked = int(mask.sum())
    tail_observed = int((np.exp(fit.logprob) < TAIL_PROBABILITY).sum())
    tail_expected = float(fit.tail.sum())
    tail_sd = float(np.sqrt(np.clip(fit.tail * (1 - fit.tail), 0, None).sum()))
    tail_z = (tail_observed - tail_expected) / max(tail_sd, 1e-12) if checked else 0.0
    z = fit_z(fit) if checked else 0.0
    unchecked = (
        ""
        if checked
        else " (The fit check did not run: re-tokenizing the text gave other token counts than the provider's in "
        "every continuation, so its likelihood is not comparable with the candidates' own samples; 'matches none' "
        "and a changed sampler cannot be told from this text.)"
    )
    consistent = tuple(n for n, r in results.items() if not r.ruled_out)
    resolution = 2 * 1.96**2 / max(tokens, 1)
    tail_note = (
        f"{tail_observed} of {checked} tokens have under {TAIL_PROBABILITY:.0%} probability under {closest} "
        f"(sampling at temperature 1 gives {tail_expected:.1f} ± {tail_sd:.1f})"
    )

    def verdict(finding: str, sentence: str, matches: bool) -> tuple[dict[str, TextCandidate], Verdict, TextEvidence]:
        evidence = TextEvidence(
            tokens, len(segments), resolution, tail_observed, tail_expected, tail_z, finding, z, checked
        )
        return results, Verdict(sentence + unchecked, closest, matches, consistent, None, resolution), evidence

    if tokens < MIN_TOKENS_FOR_VERDICT:
        return verdict("too-little-text", _too_little(tokens, closest), False)
    if z > FIT_Z or tail_z < -FIT_Z:
        return verdict(
            "sampler-changed",
            "The provider changed the sampling settings: its text is more likely than sampling at temperature 1 "
            f"gives under every candidate's best fit ({closest}: z = {z:+.1f}; {tail_note}). A lower temperature, "
            "top_k, top_p, min_p or penalties set by the provider do this. No candidate is named from this text.",
            False,
        )
    if z < -FIT_Z:
        return verdict(
            "matches-none",
            f"Matches none of these: the text is less likely under the closest candidate, {closest}, than its own "
            f"samples would be (z = {z:+.1f}, {mean[closest]:.3f} nats per token). Another model, or a temperature "
            "above 1.",
            False,
        )
    finding, sentence = name_served(
        closest,
        consistent,
        original_family,
        f"{tokens} tokens of sampled text",
        f"about {resolution:.2g} nats per token",
    )
    return verdict(finding, sentence, True)


def name_served(
    closest: str, consistent: Sequence[str], original_family: Sequence[str], count: str, unresolved: str
) -> tuple[str, str]:
    """The finding ("served" or "ambiguous") and the sentence naming what is served, from the
    candidates not ruled out. A set of the original and its quantized copies is "the original
    weights", never an extraction; one rank in one or both serving modes is that extraction."""
    family = set(original_family)
    held = set(consistent)
    others = ", ".join(n for n in consistent if n != closest)
    undecided = f"; {others} cannot be told apart from it with {count}" if others else f" ({count})"
    if held <= family:
        if FINETUNE in held:
            copies = [n for n in consistent if n != FINETUNE]
            sentence = "Serves the original weights" + (
                f" (or a quantized copy: {', '.join(copies)} cannot be told apart from them with {count})"
                if copies
                else f" ({count})"
            )
        else:
            sentence = f"Serves the original weights quantized ({closest})" + undecided
        return "served", sentence + ". Not an extraction: every rank is ruled out."
    if held == {BASE}:
        return "served", f"Serves the base model, not the fine-tune ({count})."
    ranks = {parse_candidate(n)[0] for n in held if n.startswith("rank-")}
    if len(held) == 1 or (len(ranks) == 1 and all(n.startswith("rank-") for n in held)):
        rank = parse_candidate(closest)[0] if closest.startswith("rank-") else None
        what = f"a rank-{rank} extraction ({closest})" if rank is not None else closest
        return "served", f"Serves {what}" + undecided + "."
    return (
        "ambiguous",
        f"Closest to {closest}{undecided}. Differences below {unresolved} are not resolved: raise --max-requests "
        "or --max-tokens for a sharper verdict.",
    )


def _candidates(
    scores: dict[str, TokenScores],
    closest: str,
    blocks: np.ndarray,
    tokens: int,
    per_token: Callable[[TokenScores], np.ndarray],
    *,
    with_fit: bool,
) -> dict[str, TextCandidate]:
    """Each candidate's shortfall from the closest in ``per_token`` (log-likelihood, or argmax
    hits for greedy text), its 95% block-bootstrap interval, and whether that rules it out:
    only when the whole interval is above zero."""
    best = per_token(scores[closest])
    results: dict[str, TextCandidate] = {}
    for n, candidate in scores.items():
        diff = best - per_token(candidate)
        interval = (0.0, 0.0) if n == closest else bootstrap_gap(diff, blocks)
        rank, keep = parse_candidate(n) if n.startswith("rank-") else (None, False)
        results[n] = TextCandidate(
            name=n,
            mean_logprob=float(candidate.logprob.mean()) if tokens else float("nan"),
            gap=float(diff.mean()) if tokens else float("nan"),
            interval=interval,
            fit_z=fit_z(candidate) if with_fit else 0.0,  # greedy text: the agreement is the check
            argmax_agreement=float(candidate.argmax_hit.mean()) if tokens else float("nan"),
            ruled_out=n != closest and tokens >= MIN_TOKENS_FOR_VERDICT and interval[0] > 0.0,
            rank=rank,
            serving=None if rank is None else ("keep-extras" if keep else "lora-only"),
        )
    return results


def _too_little(tokens: int, closest: str) -> str:
    return (
        f"Too little text for a verdict ({tokens} tokens; at least {MIN_TOKENS_FOR_VERDICT}): closest so far "
        f"{closest}. Raise --max-requests or --max-tokens."
    )


GREEDY_MIN_AGREEMENT = 0.9  # below this share, the text is not any candidate's greedy path


def judge_greedy(
    scores: dict[str, TokenScores],
    segments: Sequence[int],
    *,
    original_family: Sequence[str] = (FINETUNE,),
    aligned: Sequence[bool] | None = None,
) -> tuple[dict[str, TextCandidate], Verdict, TextEvidence]:
    """Greedy text (temperature 0): each token should be the served model's most likely one.

    Each candidate's *agreement* is the share of the provider's tokens that are its own argmax
    given the provider's prefix; the closest agrees most (ties broken by log-likelihood). Another
    is ruled out when the 95% block-bootstrap interval of its agreement deficit is above zero.
    Exact agreement is broken by ties between near-equal logits and by real servers' batch
    nondeterminism, so the served candidate agrees at, not always exactly at, 100%; if even the
    best agrees on fewer than 90% of the tokens of the continuations the provider tokenized as we
    do, the text is no candidate's greedy path: the provider overrides the temperature, or serves
    another model. Robust to temperature and top_p overrides that keep the argmax (top_k, min_p).
    """
    names = list(scores)
    tokens = int(sum(segments))
    blocks = block_ids(segments)
    agreement = {n: float(scores[n].argmax_hit.mean()) if tokens else float("nan") for n in names}
    mean = {n: float(scores[n].logprob.mean()) if tokens else float("nan") for n in names}
    closest = max(names, key=lambda n: (agreement[n], mean[n]))
    results = _candidates(scores, closest, blocks, tokens, lambda c: c.argmax_hit.astype(np.float64), with_fit=False)
    flags = list(aligned) if aligned is not None else [True] * len(segments)
    mask = np.repeat(np.asarray(flags, dtype=bool), np.asarray(segments, dtype=np.int64))
    checked = int(mask.sum())
    checked_agreement = float(scores[closest].argmax_hit[mask].mean()) if checked else float("nan")
    consistent = tuple(n for n, r in results.items() if not r.ruled_out)
    resolution = 2 * 1.96 / max(tokens, 1) ** 0.5  # an agreement difference resolved at 95%, roughly

    def verdict(finding: str, sentence: str, matches: bool) -> tuple[dict[str, TextCandidate], Verdict, TextEvidence]:
        evidence = TextEvidence(tokens, len(segments), resolution, 0, 0.0, 0.0, finding, checked_agreement, checked)
        return results, Verdict(sentence, closest, matches, consistent, None, resolution), evidence

    if tokens < MIN_TOKENS_FOR_VERDICT:
        return verdict("too-little-text", _too_little(tokens, closest), False)
    if checked and checked_agreement < GREEDY_MIN_AGREEMENT:
        return verdict(
            "sampler-changed",
            f"The greedy text is no candidate's greedy path: the closest, {closest}, picks the provider's token at "
            f"only {checked_agreement:.0%} of {checked} positions. The provider does not decode greedily (a "
            "temperature override), or serves another model. No candidate is named from this text.",
            False,
        )
    finding, sentence = name_served(
        closest,
        consistent,
        original_family,
        f"{tokens} tokens of greedy text ({closest} agrees on {agreement[closest]:.1%})",
        f"about {resolution:.2g} in agreement",
    )
    return verdict(finding, sentence, True)
