"""Does an API serve the original fine-tune, a rank-r extraction of it, or something else?

The provider's log-probabilities on fixed texts are compared with those of local candidates
computed from the public weights by the behaviour engine (``lorafid.behaviour.forward``): the fine-tune,
the served model at each candidate rank in both serving modes (``rank-64``: a multi-LoRA
server's, embeddings / ``lm_head`` / norms at the base's values; ``rank-64+extras``: those
at the fine-tune's values), the base, and the fine-tune rounded to 8 bits (``finetune-8bit``, a
quantization reference: rounding alone must not pass for an extraction).

Steps: ``Probe.plan`` resolves both repos to commits, loads the fine-tune's tokenizer and
counts requests and tokens (announced before anything is sent); ``Probe.run`` yields progress
(``lorafid.progress``) while ``logprob_channel.collect`` reads the provider (the best channel the
server offers, detected on the first prompt and recorded, its tokens checked against the
fine-tune tokenizer's) and ``logprob_probe`` runs the local candidates over the same token
sequences and reduces both sides to per-prompt sums, which ``evidence`` turns into distances,
bootstrap intervals and a verdict no stronger than they are; where the provider gives no
log-probabilities, the sampled text goes through ``text_channel``, ``text_probe`` and
``text_evidence`` instead. ``Probe.report`` returns the ``ProbeReport`` (``probe_report``): no
API key, and of the endpoint only its host.

This module only orchestrates: the plan, the budget, the choice of channel, the report.
Not here: HTTP (``openai_api``), SSRF rules (``netguard``), the forward pass (``forward``), the
statistics (``evidence``, ``text_evidence``).
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from lorafid.compute import ComputeHook
from lorafid.errors import LimitExceededError, LorafidError, ProviderError
from lorafid.progress import Progress, in_background
from lorafid.providers.evidence import (
    BASE,
    BASE_QUANTIZED,
    BOOTSTRAP_RESAMPLES,
    FINETUNE,
    MIN_PROMPTS_FOR_VERDICT,
    NOISE_FLOOR_NATS,
    Verdict,
    candidate_names,
    grid_notes,
    grid_within,
    is_original,
    summarise,
)
from lorafid.providers.logprob_channel import (
    DEFAULT_NEW_TOKENS,
    DEFAULT_TOP_K,
    Collection,
    TokenMap,
    collect,
    raise_unless_usable,
)
from lorafid.providers.logprob_probe import (
    Gathered,
    candidate_variants,
    local_distances,
    score_candidates,
    score_prompt,
)
from lorafid.providers.netguard import NetPolicy
from lorafid.providers.openai_api import (
    CHANNELS,
    ECHO,
    PROMPT_LOGPROBS,
    OpenAIClient,
    RateLimiter,
    RequestBudget,
)
from lorafid.providers.passes import score_in_passes
from lorafid.providers.probe_report import ProbeReport, prompt_rows
from lorafid.providers.quantize import SCHEMES
from lorafid.providers.refine import scoring_note
from lorafid.providers.text_channel import (
    GREEDY,
    MAX_SAMPLES,
    MAX_TOKENS_CAP,
    TEXT,
    TextPlan,
    collect_text,
    plan_text,
)
from lorafid.providers.text_evidence import fit_z, judge_greedy, judge_text
from lorafid.providers.text_probe import concatenated, observe, score_text
from lorafid.retry import RetryPolicy

if TYPE_CHECKING:
    from lorafid.behaviour.direction_cache import DirectionCache

DEFAULT_RANKS: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
DEFAULT_QUANTIZED: tuple[str, ...] = ("int4-g128",)  # besides the 8-bit reference, always a candidate
DEFAULT_TEXT_REQUESTS = 5  # the text channel's budget when --max-requests is not given
PACKED_PROMPTS = 8  # prompts per echo / prompt_logprobs request under a request budget
ALL_CHANNELS: tuple[str, ...] = (*CHANNELS, TEXT, GREEDY)
PACKABLE: tuple[str, ...] = (ECHO, PROMPT_LOGPROBS)
# -- plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbePlan:
    """What the probe will send, announced before the first request."""

    prompts: int
    prompt_tokens: int  # by the fine-tune's tokenizer
    max_new_tokens: int  # per request on the chat channel (completions channels generate ≤ 1)
    requests: int  # one per prompt, plus a try per fallback channel on the first prompt
    max_requests: int  # with retries: a hard cap the client enforces
    text: TextPlan | None = None  # the text channel's plan, where it may be used
    text_only: bool = False  # --channel completions-text: no log-probability channel is tried
    note: str = ""  # what the budget leaves out, said before anything is sent

    def describe(self) -> str:
        if self.text_only and self.text is not None:
            return f"{self.text.describe()} Never more than {self.max_requests} requests.{self.note}"
        generated = self.prompts * self.max_new_tokens
        fallback = f" If the endpoint gives no log-probabilities: {self.text.describe()}" if self.text else ""
        return (
            f"The probe sends {self.prompts} prompts ({self.prompt_tokens} tokens): {self.prompts} requests, "
            f"{self.requests} if the first channels are refused, never more than {self.max_requests} with retries; "
            f"at most {generated} tokens generated if only chat is offered.{fallback}{self.note}"
        )


def plan_probe(
    token_counts: Sequence[int], *, max_new_tokens: int, max_retries: int, channels: int = len(CHANNELS)
) -> ProbePlan:
    """The plan for prompts of these token counts; ``max_retries`` is the total retry allowance.

    Example: token counts (5, 7, 9), 3 channels, 4 retries -> 3 requests, 5 if the first two
    channels are refused on the first prompt, never more than 9.
    """
    n = len(token_counts)
    requests = n + channels - 1
    return ProbePlan(n, int(sum(token_counts)), max_new_tokens, requests, requests + max_retries)


# -- prompts -----------------------------------------------------------------------------------

MAX_PROMPTS = 200  # a probe is a few dozen requests; more is a benchmark, not a check


def probe_prompts(path: Path | None) -> tuple[list[str], dict[str, Any]]:
    """The texts to send and the record of which set they are (name, version).

    ``None``: the behaviour check's built-in set, versioned by ``behaviour.PROMPT_SET``. A
    file (``behaviour.read_prompts``: one text per line, or JSON Lines with ``text``) is
    versioned by the first 12 hex digits of its SHA-256, so a report names exactly what was sent.
    """
    from lorafid.behaviour.prompts import PROMPT_SET, builtin_prompts, read_prompts

    if path is None:
        return [p.text for p in builtin_prompts()], {"name": "builtin", "version": PROMPT_SET}
    prompts = read_prompts(path)
    if len(prompts) > MAX_PROMPTS:
        raise LimitExceededError(f"{path} holds {len(prompts)} texts; a probe sends at most {MAX_PROMPTS}.")
    try:
        version = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except OSError as e:
        raise LorafidError(f"Cannot read the prompt file {path}: {e.strerror}.") from e
    return [p.text for p in prompts], {"name": path.name, "version": version}


# -- the whole probe ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of one probe. The API key is used for this run only: never stored or shown."""

    endpoint: str  # the OpenAI-compatible base URL, e.g. https://api.example.com/v1
    model: str  # the model name the endpoint knows
    api_key: str | None = field(default=None, repr=False)
    ranks: tuple[int, ...] = DEFAULT_RANKS
    top_k: int = DEFAULT_TOP_K  # alternatives asked per token
    max_new_tokens: int = DEFAULT_NEW_TOKENS  # chat channel only
    concurrency: int = 4  # requests in flight at once
    rate_per_s: float | None = None  # request starts per second; None: no pacing beyond concurrency
    max_retries: int = 8  # retries allowed over the whole probe (429, 5xx, dropped connections)
    channels: tuple[str, ...] = CHANNELS  # the ways to read log-probabilities, tried in this order
    # The text channel: used when no log-probability channel works, or alone (channel=TEXT).
    channel: str | None = None  # one of ALL_CHANNELS to force it; None: logprob channels, then text
    max_requests: int | None = None  # a hard budget for the whole probe, retries included
    max_tokens: int = MAX_TOKENS_CAP  # per sampled continuation (text channel)
    samples: int = MAX_SAMPLES  # n per prompt asked of the text channel
    quantized: tuple[str, ...] = DEFAULT_QUANTIZED  # quantized copies of the fine-tune as candidates
    full_grid: bool = False  # score every candidate in one pass, not a coarse grid refined around the evidence
    seed: int = 0  # sent to the provider with each text request (many do not honour it)
    policy: NetPolicy = field(default_factory=NetPolicy.open, compare=False)
    retry: RetryPolicy = field(default_factory=RetryPolicy, compare=False)
    hub_token: str | bool | None = field(default=None, repr=False)  # for the two repos
    hub_endpoint: str | None = None
    allow_local: bool = True
    device: str = "auto"
    max_model_bytes: int | None = None  # refuse pairs whose weights (both models) exceed this
    max_tensor_bytes: int | None = None  # a server's limits, checked from the headers in plan()
    max_tensors: int | None = None
    deadline: float | None = None  # time.monotonic() after which the local forward stops
    # Where the local forward's blocks run (``lorafid.compute``; a ZeroGPU Space's hook).
    compute: ComputeHook | None = field(default=None, compare=False, repr=False)
    # Directions of Δ kept between runs (``ForwardConfig.direction_cache``); None: decompose every run.
    direction_cache: DirectionCache | None = field(default=None, compare=False, repr=False)
    transport: Any = field(default=None, compare=False, repr=False)  # replaces HTTP (tests)


class Probe:
    """One probe of an endpoint against a base / fine-tune pair: ``plan()``, then ``run()``.

    Example::

        probe = Probe("org/base", "org/finetune", texts, {"name": "builtin", "version": "1"},
                      ProbeConfig("https://api.example.com/v1", "org/finetune", api_key=key))
        print(probe.plan().describe())     # before any request
        for step in probe.run():           # Progress: "provider", then "local"
            print(step.stage, step.done, step.total)
        print(probe.report().verdict.sentence)
    """

    def __init__(
        self, base: str, finetune: str, texts: Sequence[str], prompt_set: dict[str, Any], config: ProbeConfig
    ) -> None:
        if not texts:
            raise LorafidError("The prompt set is empty; give at least one text.")
        if any(r < 1 for r in config.ranks) or not config.ranks:
            raise LorafidError("Candidate ranks must be positive integers, e.g. --ranks 16,64,256.")
        if config.channel is not None and config.channel not in ALL_CHANNELS:
            raise LorafidError(f"Unknown channel {config.channel!r}; choose from {', '.join(ALL_CHANNELS)}.")
        unknown = [q for q in config.quantized if q.removeprefix(BASE_QUANTIZED) not in SCHEMES]
        if unknown:
            raise LorafidError(f"Unknown quantization(s) {', '.join(unknown)}; choose from {', '.join(SCHEMES)}.")
        if config.max_requests is not None and config.max_requests < 1:
            raise LorafidError("--max-requests must be at least 1.")
        config.policy.check_url(config.endpoint)
        self.base, self.finetune, self.texts, self.prompt_set, self.config = (
            base,
            finetune,
            list(texts),
            prompt_set,
            config,
        )
        self._sources: tuple[Any, Any] | None = None
        self._context: int | None = None  # the fine-tune's max_position_embeddings
        self._full_rank: int | None = None  # the fine-tune's full rank, from its config.json
        self._tokenizer: Any = None
        self._plan: ProbePlan | None = None
        self._report: ProbeReport | None = None

    def plan(self) -> ProbePlan:
        """Resolve both repos, check them against the config and header limits (as the forward's
        ``LayerStream.plan``), load the fine-tune's tokenizer, count requests and tokens: nothing is
        sent to the provider."""
        if self._plan is None:
            from lorafid.behaviour.forward import LayerStream
            from lorafid.behaviour.tokenizer import load_tokenizer

            c = self.config
            # Both models opened once for all the plan needs, before any request: every check a
            # forward makes (limits, architecture, names, vocabularies), the resolved commits the
            # forward then pins, the fine-tune's config and its tokenizer (at that commit).
            with LayerStream(self.base, self.finetune, self._forward_config()) as stream:
                stream.plan()
                base_source, finetune_source = stream.sources
                self._sources = (base_source.info, finetune_source.info)
                self._read_config(finetune_source)
                self._tokenizer = load_tokenizer(self.finetune, source=finetune_source)
            channels = self._logprob_channels()
            every = [len(self._encode(t)) for t in self.texts]  # prompt tokens, by the fine-tune's tokenizer
            if not channels:
                requests = c.max_requests or DEFAULT_TEXT_REQUESTS
                alone = plan_text(
                    requests,
                    len(self.texts),
                    max_tokens=self._text_tokens(every),
                    samples=c.samples,
                    greedy=c.channel == GREEDY,
                )
                self._plan = ProbePlan(0, int(sum(every)), c.max_tokens, requests, requests, text=alone, text_only=True)
                return self._plan
            texts = self._logprob_texts()  # a prefix of self.texts
            plan = plan_probe(
                every[: len(texts)], max_new_tokens=c.max_new_tokens, max_retries=c.max_retries, channels=len(channels)
            )
            text_requests = (c.max_requests - len(channels)) if c.max_requests is not None else DEFAULT_TEXT_REQUESTS
            text: TextPlan | None = None
            if c.channel is None and text_requests >= 1:
                text = plan_text(text_requests, len(self.texts), max_tokens=self._text_tokens(every), samples=c.samples)
            if c.max_requests is not None:
                plan = replace(plan, requests=min(plan.requests, c.max_requests), max_requests=c.max_requests)
                if c.channel in (None, *PACKABLE) and len(texts) > 1 and self._packs():
                    extra = (
                        f" Under the budget of {c.max_requests}, echo and prompt_logprobs take {PACKED_PROMPTS} "
                        f"prompts per request where the endpoint accepts prompt arrays (up to {len(texts)} prompts); "
                        "prompts the budget does not reach are not sent."
                    )
                    plan = replace(plan, note=plan.note + extra)
            elif text is not None:
                # The text channel runs only after every log-probability channel was refused.
                plan = replace(plan, max_requests=max(plan.max_requests, len(channels) + text.requests))
            note = plan.note
            if c.channel is None and text is None:
                note += (
                    f" If the endpoint gives no log-probabilities, the budget leaves no request for sampled text: "
                    f"give --max-requests {len(channels) + 2} or more, or --channel {TEXT}."
                )
            self._plan = replace(plan, text=text, note=note)
        return self._plan

    def _text_tokens(self, prompt_tokens: Sequence[int]) -> int:
        """--max-tokens, within the fine-tune's context after the longest prompt (a server refuses more)."""
        wanted = min(self.config.max_tokens, MAX_TOKENS_CAP)
        if self._context is None:
            return wanted
        room = self._context - max(prompt_tokens, default=0)
        if room < 1:
            raise LorafidError(
                f"A prompt fills the fine-tune's context of {self._context} tokens; give shorter prompts (--prompts)."
            )
        return min(wanted, room)

    def _logprob_channels(self) -> tuple[str, ...]:
        """The log-probability channels to try, in order: none when the text channel is forced."""
        if self.config.channel in (TEXT, GREEDY):
            return ()
        if self.config.channel is not None:
            return (self.config.channel,)
        return tuple(self.config.channels)

    def _logprob_texts(self) -> list[str]:
        """The prompts a log-probability channel reads: one request each, so a budget takes the first ones."""
        limit = self.config.max_requests
        # Under a budget the first prompt finds the channel, then prompts go PACKED_PROMPTS to a
        # request where the endpoint takes prompt arrays; what the budget cannot reach is unsent.
        if limit is None:
            return self.texts
        return self.texts[: 1 + max(0, limit - 1) * PACKED_PROMPTS] if self._packs() else self.texts[:limit]

    def _packs(self) -> bool:
        """Whether to ask for prompt arrays: only under a budget that, if the endpoint refuses the
        first array (llama.cpp's server does), still leaves one request per prompt for a verdict."""
        limit = self.config.max_requests
        return limit is not None and limit >= 1 + 1 + (MIN_PROMPTS_FOR_VERDICT - 1)

    def run(self) -> Iterator[Progress]:
        """Send the planned requests, score the candidates, compare, step by step (``lorafid.progress``):
        stage "provider" (answers received), then "local" (prompts or continuations scored).
        ``report()`` returns the result; a run interrupted while scoring keeps its scored prompts.
        """
        self._report = None
        started = time.perf_counter()
        plan = self.plan()
        c = self.config
        tokens = TokenMap(self._tokenizer)
        texts = self._logprob_texts()

        def step(stage: str, done: int, total: int, what: str) -> Progress:
            return Progress(stage, done, total, time.perf_counter() - started, f"{done}/{total} {what}")

        def read_logprobs(client: OpenAIClient, emit: Callable[[Progress], None]) -> Collection:
            answered = itertools.count(1)  # answers arrive on the request threads
            return collect(
                client,
                c.model,
                texts,
                self._encode,
                self._chat_context(),
                tokens,
                top_k=c.top_k,
                max_new_tokens=c.max_new_tokens,
                concurrency=c.concurrency,
                channels=self._logprob_channels(),
                on_answer=lambda _: emit(step("provider", next(answered), len(texts), "prompts answered")),
                pack=PACKED_PROMPTS if self._packs() else 1,
                budgeted=c.max_requests is not None,
            )

        # The log-probability channels' own cap; a fallback to text extends it by the text's share.
        budget = RequestBudget(plan.max_requests if plan.text_only or c.max_requests else plan.requests + c.max_retries)
        client = OpenAIClient(
            c.endpoint,
            c.api_key,
            budget=budget,
            policy=c.policy,
            rate=RateLimiter(c.rate_per_s),
            retry=c.retry,
            transport=c.transport,
        )
        with client:
            collection = Collection()
            if not plan.text_only:
                collection = yield from in_background(lambda emit: read_logprobs(client, emit))
                if collection.channel is None and plan.text is None:
                    raise ProviderError(collection.error or "The endpoint offers no way to read log-probabilities.")
            if collection.channel is None:
                assert plan.text is not None
                if c.max_requests is None:
                    budget.max_requests = budget.used + plan.text.requests  # the refusals plus the text's share
                text_plan = replace(plan.text, requests=min(plan.text.requests, budget.max_requests - budget.used))
                if text_plan.requests < 1:
                    raise ProviderError(f"{collection.error} The request budget is spent; raise --max-requests.")
                yield step("provider", 0, text_plan.requests, "requests for sampled text")
                read = collect_text(client, c.model, self.texts, text_plan, seed=c.seed, greedy=c.channel == GREEDY)
                self._report = yield from self._text_report(plan, text_plan, read, collection, budget, tokens, step)
                return
        raise_unless_usable(collection)
        observations = [collection.observations[i] for i in sorted(collection.observations)]
        grid = self._grid()[0]

        def judged(gathered: Sequence[dict[str, Gathered]]) -> Any:
            scored = observations[: len(gathered)]
            scores = [score_prompt(o, g) for o, g in zip(scored, gathered, strict=True)]
            return scores, summarise(scores, local_distances(scored, gathered), grid)

        def score(stream: Any, items: Sequence[Any], names: Sequence[str]) -> Iterator[dict[str, Any]]:
            for _, by_name in score_candidates(
                self.base, self.finetune, items, grid, quantized=c.quantized, names=names, stream=stream
            ):
                yield by_name

        def verdict_of(gathered: Sequence[dict[str, Gathered]]) -> tuple[Verdict, str]:
            _, (candidates, verdict) = judged(gathered)
            return verdict, min((FINETUNE, BASE), key=lambda n: candidates[n].distance)

        passes = yield from score_in_passes(
            *self._scoring(), observations, score, verdict_of, step, "prompts scored", full=c.full_grid
        )
        error = collection.error or passes.error
        scores, (candidates, verdict) = judged(passes.per_item)
        verdict = self._with_grid_notes(verdict, passes.scored)
        complete = collection.complete and error is None and len(scores) == len(texts) - len(collection.unsent)
        self._report = ProbeReport(
            status="complete" if complete else "partial",
            endpoint_host=urlsplit(c.endpoint).hostname or "",
            model=c.model,
            method=collection.channel,
            channels_tried=collection.channels_tried,
            base=self._described(0),
            finetune=self._described(1),
            prompt_set={**self.prompt_set, "count": len(texts)},
            settings={
                **self._common_settings(),
                **passes.settings(self._every()),
                "top_k": c.top_k,
                "max_new_tokens": c.max_new_tokens,
                "distance": "coarse KL(provider || candidate) on the provider's listed tokens + rest, nats per token",
                "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": 0, "level": 0.95},
                "noise_floor_nats": NOISE_FLOOR_NATS,
            },
            requests={
                "announced": plan.requests,
                "max": plan.max_requests,
                "sent": budget.used,
                "prompts_unsent": len(collection.unsent),
            },
            candidates=candidates,
            verdict=verdict,
            prompts=prompt_rows(scores, self.texts),
            failed_prompts=dict(collection.failed),
            error=error,
        )

    def report(self) -> ProbeReport:
        """The finished check's report.

        Raises:
            LorafidError: ``run()`` has not run to its end.
        """
        if self._report is None:
            raise LorafidError("The provider check has not finished: iterate Probe.run() to its end first.")
        return self._report

    def _grid(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(the candidate ranks run, the asked ranks left out: at or above the full rank)."""
        return grid_within(self.config.ranks, self._full_rank)

    def _every(self) -> list[str]:
        """Every candidate of the grid: what ``--full-grid`` scores."""
        return candidate_names(self._grid()[0], self.config.quantized)

    def candidates(self) -> list[str]:
        """Every local candidate this check may score, nearest the fine-tune first: after the plan
        has read the models, without the ranks at or above the model's full rank (the fine-tune)."""
        self.plan()
        return self._every()

    def _with_grid_notes(self, verdict: Verdict, scored: Iterable[str]) -> Verdict:
        grid, beyond = self._grid()
        notes = grid_notes(verdict.closest, grid, beyond, self._full_rank)
        notes += scoring_note(scored, grid, self.config.quantized)
        return replace(verdict, sentence=verdict.sentence + notes) if notes else verdict

    def _common_settings(self) -> dict[str, Any]:
        c = self.config
        grid, _ = self._grid()
        return {
            "ranks": list(c.ranks),
            "ranks_run": list(grid),  # those below the model's full rank (the others are the fine-tune)
            "full_rank": self._full_rank,
            "quantized": list(c.quantized),
            "channel": c.channel or "auto",
            "max_requests": c.max_requests,
            "concurrency": c.concurrency,
            "rate_per_s": c.rate_per_s,
            "max_retries": c.max_retries,
        }

    def _text_report(
        self,
        plan: ProbePlan,
        text_plan: TextPlan,
        read: Any,
        collection: Collection,
        budget: RequestBudget,
        tokens: TokenMap,
        step: Callable[[str, int, int, str], Progress],
    ) -> Generator[Progress, None, ProbeReport]:
        """Score the provider's continuations under every candidate and judge them."""
        c = self.config
        max_length = self._context
        observations, empty = observe(
            read.continuations, self.texts, self._encode, tokens.encode_plain, tokens.eos_id, max_length
        )
        if not observations:
            raise ProviderError("Every continuation the provider sent was empty; nothing to score.")
        grid = self._grid()[0]
        family = [n for n in self._every() if is_original(n)]
        judge = judge_greedy if c.channel == GREEDY else judge_text

        def judged(per_continuation: Sequence[dict[str, Any]]) -> Any:
            scored = observations[: len(per_continuation)]
            # The provider's own token count (a lone continuation's usage) tells whether re-tokenizing
            # its text gave back the tokens it sampled; servers differ on counting the final EOS.
            aligned = [
                o.provider_tokens is None
                or o.provider_tokens == o.tokens
                or (o.finish_reason == "stop" and o.provider_tokens == o.tokens - 1)
                for o in scored
            ]
            tokens = [o.tokens for o in scored]
            return (
                scored,
                aligned,
                judge(concatenated(per_continuation), tokens, original_family=family, aligned=aligned),
            )

        def score(stream: Any, items: Sequence[Any], names: Sequence[str]) -> Iterator[dict[str, Any]]:
            variants = candidate_variants(grid, c.quantized, names)
            for _, by_name in score_text(self.base, self.finetune, items, variants, None, stream=stream):
                yield by_name

        def verdict_of(per_continuation: Sequence[dict[str, Any]]) -> tuple[Verdict, str]:
            _, _, (candidates, verdict, _) = judged(per_continuation)
            return verdict, min((FINETUNE, BASE), key=lambda n: candidates[n].gap)

        # Every candidate, always: sampled text resolves about 2·1.96²/tokens nats per token (0.01
        # at 800 tokens), so most candidates stay consistent and a refined grid would score nearly
        # all of them, in more passes; the table then names every candidate, the quantized ones too.
        passes = yield from score_in_passes(
            *self._scoring(), observations, score, verdict_of, step, "continuations scored", full=True
        )
        error = read.error or passes.error
        per_continuation = passes.per_item
        scored, aligned, (candidates, verdict, evidence) = judged(per_continuation)
        verdict = self._with_grid_notes(verdict, passes.scored)
        method = GREEDY if c.channel == GREEDY else TEXT
        tried = [*collection.channels_tried, {"channel": method, "outcome": "used"}]
        return ProbeReport(
            status="complete" if error is None else "partial",
            endpoint_host=urlsplit(c.endpoint).hostname or "",
            model=c.model,
            method=method,
            channels_tried=tried,
            base=self._described(0),
            finetune=self._described(1),
            prompt_set={**self.prompt_set, "count": len(self.texts)},
            settings={
                **self._common_settings(),
                **passes.settings(self._every()),
                "max_tokens": text_plan.max_tokens,
                "samples": text_plan.samples,
                "distance": "mean log-likelihood gap to the closest candidate (KL(P||Q) - KL(P||closest)), "
                "nats per token of sampled text",
                "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": 0, "level": 0.95, "block_tokens": 32},
            },
            requests={"announced": plan.requests, "max": plan.max_requests, "sent": budget.used},
            candidates=candidates,
            verdict=verdict,
            prompts=[
                {
                    "index": o.prompt_index,
                    "text": self.texts[o.prompt_index][:120],
                    "tokens": o.tokens,
                    "finish": o.finish_reason,
                    "provider_tokens": o.provider_tokens,
                    # how this continuation alone fits the closest candidate (about N(0, 1) if it wrote it)
                    "fit_z": round(fit_z(part[verdict.closest]), 2),
                    "mean_logprob": round(float(part[verdict.closest].logprob.mean()), 4),
                }
                for o, part in zip(scored, per_continuation, strict=True)
            ],
            failed_prompts={},
            error=error,
            text={
                "sampler": read.sampler,
                "packed": read.packed,
                "samples": read.samples,
                "notes": read.notes,
                "continuations": len(read.continuations),
                "empty": empty,
                "tokens": evidence.tokens,
                "resolution_nats": evidence.resolution,
                "tail": {
                    "observed": evidence.tail_observed,
                    "expected": evidence.tail_expected,
                    "z": evidence.tail_z,
                },
                "finding": evidence.finding,
                "fit": {"z": evidence.fit_z, "tokens": evidence.fit_tokens, "aligned_continuations": sum(aligned)},
            },
        )

    def _read_config(self, source: Any) -> None:
        """The fine-tune's context length (it bounds a scored sequence: prompt and sampled
        continuation) and full rank (ranks at or above it are the fine-tune), from its config.json."""
        from lorafid.behaviour.architecture import full_rank_of, read_config_json

        config = read_config_json(source) or {}
        length = config.get("max_position_embeddings")
        self._context = length if isinstance(length, int) and not isinstance(length, bool) else None
        self._full_rank = full_rank_of(config)

    def _described(self, which: int) -> dict[str, str | None]:
        assert self._sources is not None
        info = self._sources[which]
        return {
            "spec": info.spec,
            "repo_id": info.repo_id,
            "revision": info.requested_revision,
            "sha": info.resolved_sha,
        }

    def _encode(self, text: str) -> list[int]:
        from lorafid.behaviour.tokenizer import encode_text

        return encode_text(self._tokenizer, text)  # a Rust panic in the tokenizer: a clear error

    def _chat_context(self) -> Callable[[str], list[int]] | None:
        from lorafid.behaviour.tokenizer import ChatEncoder

        if not getattr(self._tokenizer, "chat_template", None):
            return None
        return ChatEncoder(self._tokenizer, self.texts)  # rendered once, under time and size limits

    def _scoring(self) -> tuple[Callable[[], Any], tuple[int, ...], tuple[str, ...]]:
        """What ``passes.score_in_passes`` needs of this check: its pair, opened; its grid; its
        quantized candidates."""
        return self._open_stream, self._grid()[0], tuple(self.config.quantized)

    def _open_stream(self) -> Any:
        """Both models opened for the layer-streamed forward (``LayerStream``), as this check runs it."""
        from lorafid.behaviour.forward import LayerStream  # transformers only when a check runs

        base, finetune = self.base, self.finetune
        if self._sources is not None:
            # Pinned to the commits the plan resolved (``_forward_config``): a Hub repo is then named
            # without the spec's own @revision, which would conflict with the pinned one.
            base, finetune = (
                info.repo_id if info.kind == "hub" and info.repo_id else spec
                for spec, info in zip((base, finetune), self._sources, strict=True)
            )
        return LayerStream(base, finetune, self._forward_config())

    def _forward_config(self) -> Any:
        """The forward's settings; once the plan has resolved both commits, pinned to them."""
        from lorafid.behaviour.forward import ForwardConfig

        pinned = self._sources
        return ForwardConfig(
            device=self.config.device,
            token=self.config.hub_token,
            endpoint=self.config.hub_endpoint,
            base_revision=pinned[0].resolved_sha if pinned else None,
            finetune_revision=pinned[1].resolved_sha if pinned else None,
            allow_local=self.config.allow_local,
            max_model_bytes=self.config.max_model_bytes,
            max_tensor_bytes=self.config.max_tensor_bytes,
            max_tensors=self.config.max_tensors,
            deadline=self.config.deadline,
            compute=self.config.compute,
            direction_cache=self.config.direction_cache,
        )
