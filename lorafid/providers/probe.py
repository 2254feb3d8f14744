"""Does an API serve the original fine-tune, a rank-r extraction of it, or something else?

The provider's log-probabilities on fixed texts are compared with those of local candidates
computed from the public weights by the behaviour engine (``lorafid.behaviour.forward``): the fine-tune,
the served model at each candidate rank in both serving modes (``rank-64``: a multi-LoRA
server's, embeddings / ``lm_head`` / norms at the base's values; ``rank-64+extras``: those
at the fine-tune's values), the base, and the fine-tune rounded to 8 bits (``finetune-8bit``, a
quantization reference: rounding alone must not pass for an extraction).

Steps: ``Probe.plan`` resolves both repos to commits, loads the fine-tune's tokenizer and
counts requests and tokens (announced before anything is sent); ``collect`` reads the provider
(``lorafid.providers.openai_api``: the best channel the server offers, detected on the first prompt and
recorded) and checks that its tokens are the fine-tune tokenizer's; ``score_candidates`` runs
the local candidates over the same token sequences; ``score_prompt`` and ``local_distances``
reduce both to per-prompt sums, which ``lorafid.providers.evidence`` turns into distances, bootstrap
intervals and a verdict no stronger than they are. ``ProbeReport`` is the ``lorafid.probe/1``
JSON: no API key, and of the endpoint only its host.

Not here: HTTP (``openai_api``), SSRF rules (``netguard``), the forward pass (``forward``), the
statistics (``evidence``).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch

from lorafid import __version__
from lorafid.errors import ChannelUnsupportedError, LimitExceededError, LorafidError, ProviderError, TokenMismatchError
from lorafid.providers.evidence import (
    BASE,
    BASE_QUANTIZED,
    BOOTSTRAP_RESAMPLES,
    FINETUNE,
    MIN_PROMPTS_FOR_VERDICT,
    NOISE_FLOOR_NATS,
    CandidateResult,
    PromptScore,
    Verdict,
    candidate_names,
    coarse_kl,
    is_original,
    parse_candidate,
    quantized_name,
    summarise,
)
from lorafid.providers.netguard import NetPolicy
from lorafid.providers.openai_api import (
    CHANNELS,
    CHAT,
    ECHO,
    PROMPT_LOGPROBS,
    OpenAIClient,
    Position,
    ProviderAnswer,
    RateLimiter,
    RequestBudget,
)
from lorafid.providers.quantize import SCHEMES, scheme
from lorafid.providers.text_channel import (
    GREEDY,
    MAX_SAMPLES,
    MAX_TOKENS_CAP,
    TEXT,
    TextPlan,
    collect_text,
    plan_text,
)
from lorafid.providers.text_evidence import TextCandidate, fit_z, judge_greedy, judge_text
from lorafid.providers.text_probe import concatenated, observe, score_text
from lorafid.retry import RetryPolicy

SCHEMA = "lorafid.probe/1"
DEFAULT_RANKS: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
DEFAULT_TOP_K = 20  # vLLM's default --max-logprobs and OpenAI's chat limit
DEFAULT_NEW_TOKENS = 32  # chat channel: greedy continuation length scored locally
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


# -- reading the provider ----------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """One prompt as the provider scored it, aligned to the fine-tune tokenizer's ids.

    ``ids`` is the whole sequence the local models read (prompt, or chat context plus the
    provider's continuation); ``scored`` are the indexes in ``ids`` of the tokens the
    provider gave distributions for, with ``positions`` the provider's numbers for them.
    """

    prompt_index: int
    ids: tuple[int, ...]
    scored: tuple[int, ...]
    positions: tuple[Position, ...]
    alternative_ids: tuple[tuple[int | None, ...], ...]  # ids of each position's alternatives


@dataclass
class Collection:
    """What ``collect`` got: the channel, per-prompt observations, what failed (partial runs)."""

    channel: str | None = None
    channels_tried: list[dict[str, str]] = field(default_factory=list)
    observations: dict[int, Observation] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    error: str | None = None  # why the run stopped early, if it did
    unsent: list[int] = field(default_factory=list)  # prompts a request budget left unread (not failures)

    @property
    def complete(self) -> bool:
        return self.error is None and not self.failed


class TokenMap:
    """The fine-tune tokenizer's id for a provider's token text, and each id's accepted texts.

    Providers write tokens as text: the decoded piece (vLLM, OpenAI), sometimes the raw vocab
    entry ("Ġhello", "▁hello"), or ``token_id:N``. A text that several ids share maps to None.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.eos_id: int | None = tokenizer.eos_token_id
        size = len(tokenizer)
        raw = tokenizer.convert_ids_to_tokens(list(range(size)))
        decoded = tokenizer.batch_decode([[i] for i in range(size)])
        self.forms: list[set[str]] = []
        by_text: dict[str, set[int]] = {}
        for i in range(size):
            r = raw[i] if isinstance(raw[i], str) else ""
            forms = {decoded[i], r, r.replace("▁", " ").replace("Ġ", " ").replace("Ċ", "\n")} - {""}
            self.forms.append(forms)
        # Decoded pieces first: a raw form only counts where no decoded piece claims the text.
        for i in range(size):
            by_text.setdefault(decoded[i], set()).add(i)
        decoded_texts = set(by_text)
        for i, forms in enumerate(self.forms):
            for text in forms - decoded_texts:
                by_text.setdefault(text, set()).add(i)
        self._ids = {text: next(iter(ids)) if len(ids) == 1 else None for text, ids in by_text.items()}

    def id_of(self, token: str, token_id: int | None) -> int | None:
        if token_id is not None:
            return token_id if 0 <= token_id < len(self.forms) else None
        return self._ids.get(token)

    def encode_plain(self, text: str) -> list[int]:
        """``text``'s ids without special tokens (a continuation, not a prompt)."""
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def accepts(self, token: str, token_id: int | None, expected: int) -> bool:
        """Whether the provider's token at a position is the tokenizer's ``expected`` id."""
        if token_id is not None:
            return token_id == expected
        # A piece that is part of a multi-byte character decodes to U+FFFD on both sides; llama.cpp's
        # server writes such pieces, and any piece longer than 32 bytes, as "" (its text is lost, not wrong).
        return token in self.forms[expected] or "\ufffd" in token or token == ""


def alternative_ids(position: Position, tokens: TokenMap) -> tuple[int | None, ...]:
    """The ids of a position's alternatives; None for a text with no id, or an id listed twice."""
    seen: set[int] = set()
    out: list[int | None] = []
    for alternative in position.top:
        token_id = tokens.id_of(alternative.token, alternative.token_id)
        out.append(token_id if token_id is not None and token_id not in seen else None)
        if token_id is not None:
            seen.add(token_id)
    return tuple(out)


def align_prompt(index: int, answer: ProviderAnswer, ids: Sequence[int], tokens: TokenMap) -> Observation:
    """The provider's scored prompt, checked token by token against ``ids``.

    Three shapes are read as what they are: an echo that starts after the BOS token although
    the provider evaluated with it (llama.cpp: ``usage.prompt_tokens`` counts it), where the
    candidates are scored with the BOS too; a provider that added no BOS at all (its first
    token has no log-probability either way), scored without it; and the generated token an
    echo with ``max_tokens: 1`` appends, which is dropped. Any other difference is a
    ``TokenMismatchError``.
    """
    positions = answer.positions
    offset = 0  # the index in ids of positions[0]
    if (
        positions
        and len(ids) > 1
        and not tokens.accepts(positions[0].token, positions[0].token_id, ids[0])
        and tokens.accepts(positions[0].token, positions[0].token_id, ids[1])
    ):
        if answer.prompt_tokens == len(ids):
            offset = 1  # the BOS was evaluated, only not echoed
        else:
            ids = ids[1:]  # the provider added no BOS; every other token must still be the same
    positions = positions[: len(ids) - offset]  # the generated token after the prompt, if any
    if len(positions) != len(ids) - offset:
        raise TokenMismatchError(
            f"Prompt {index}: the provider has {len(positions)} tokens where the fine-tune's tokenizer has "
            f"{len(ids)}; the endpoint does not serve this tokenizer (a different model or a changed vocabulary)."
        )
    for t, (position, expected) in enumerate(zip(positions, ids[offset:], strict=True)):
        if not tokens.accepts(position.token, position.token_id, expected):
            raise TokenMismatchError(
                f"Prompt {index}, token {t + offset}: the provider has {position.token!r} where the fine-tune's "
                f"tokenizer has {sorted(tokens.forms[expected])[0]!r}; the endpoint does not serve this tokenizer."
            )
    scored = tuple(t for t, p in enumerate(positions) if p.logprob is not None and p.top)
    return Observation(
        index,
        tuple(ids),
        tuple(t + offset for t in scored),
        tuple(positions[t] for t in scored),
        tuple(alternative_ids(positions[t], tokens) for t in scored),
    )


def align_chat(index: int, answer: ProviderAnswer, context: Sequence[int], tokens: TokenMap) -> Observation:
    """The provider's greedy continuation after the chat ``context`` ids, mapped to ids.

    Token texts that name no single id (a piece of a multi-byte character shows as U+FFFD;
    an end-of-sequence token as "") are recovered from the continuation's text, tokenized
    again, when that gives as many tokens, agrees with every token that did map, and each
    recovered id could be shown as the text the provider showed.
    """
    continuation = [tokens.id_of(p.token, p.token_id) for p in answer.positions]
    if continuation and continuation[-1] is None and answer.positions[-1].token == "":
        continuation[-1] = tokens.eos_id  # a stop token its server decodes to nothing
    if None in continuation:
        again: list[int | None] = [*tokens.encode_plain(answer.text)]
        if continuation[-1] == tokens.eos_id and len(again) == len(continuation) - 1:
            again.append(tokens.eos_id)
        if len(again) == len(continuation) and all(
            a == b if a is not None else b is not None and (p.token == "" or tokens.accepts(p.token, None, b))
            for a, b, p in zip(continuation, again, answer.positions, strict=True)
        ):
            continuation = again
    missing = next((j for j, token_id in enumerate(continuation) if token_id is None), None)
    if missing is not None:
        raise TokenMismatchError(
            f"Prompt {index}, generated token {missing}: {answer.positions[missing].token!r} is not one token of "
            "the fine-tune's tokenizer; the endpoint does not serve this tokenizer."
        )
    ids = (*context, *(int(i) for i in continuation if i is not None))
    scored = tuple(len(context) + j for j, p in enumerate(answer.positions) if p.top)
    kept = tuple(p for p in answer.positions if p.top)
    return Observation(index, ids, scored, kept, tuple(alternative_ids(p, tokens) for p in kept))


def collect(
    client: OpenAIClient,
    model: str,
    texts: Sequence[str],
    encode: Callable[[str], list[int]],
    chat_context: Callable[[str], list[int]] | None,
    tokens: TokenMap,
    *,
    top_k: int = DEFAULT_TOP_K,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    concurrency: int = 4,
    channels: Sequence[str] = CHANNELS,
    on_answer: Callable[[int], None] | None = None,
    pack: int = 1,
    budgeted: bool = False,
) -> Collection:
    """Read every text from the provider; the channel is the first that works on text 0.

    Never raises for a failure after the channel is known: the collection keeps what was
    read and says what stopped it (``error``), so a partial probe is still a probe.
    ``TokenMismatchError`` on the first prompt does raise.

    ``pack`` > 1: on ``echo`` and ``prompt_logprobs`` the other prompts go ``pack`` to a request
    (a ``prompt`` array), back to one per request if the endpoint refuses the first array.
    ``budgeted``: the request budget is the user's own cap, so prompts it leaves unread are
    ``unsent``, not a failure that makes the probe partial.
    """
    result = Collection()

    def read(index: int, channel: str) -> Observation:
        answer = client.read(channel, model, texts[index], top_k=top_k, max_new_tokens=max_new_tokens)
        if channel == CHAT:
            if chat_context is None:
                raise ChannelUnsupportedError("the fine-tune's tokenizer has no chat template to score chat answers")
            return align_chat(index, answer, chat_context(texts[index]), tokens)
        return align_prompt(index, answer, encode(texts[index]), tokens)

    if not texts:
        return result
    for channel in channels:
        try:
            result.observations[0] = read(0, channel)
        except ChannelUnsupportedError as e:
            result.channels_tried.append({"channel": channel, "outcome": f"refused: {e}"})
            continue
        result.channels_tried.append({"channel": channel, "outcome": "used"})
        result.channel = channel
        break
    else:
        tried = "; ".join(f"{t['channel']}: {t['outcome']}" for t in result.channels_tried)
        result.error = f"The endpoint offers no way to read log-probabilities of a text ({tried})."
        return result  # the caller falls back to the text channel, or raises
    if on_answer:
        on_answer(0)
    lock, stop = threading.Lock(), threading.Event()
    channel = result.channel

    def spent(index: int, e: LimitExceededError) -> None:
        stop.set()
        if budgeted:
            result.unsent.append(index)
        else:
            result.failed[index] = str(e)
            result.error = str(e)

    def one(index: int) -> None:
        if stop.is_set():
            if budgeted:
                with lock:
                    result.unsent.append(index)
            return
        try:
            observation = read(index, channel)
        except (ProviderError, LimitExceededError, TokenMismatchError) as e:
            # A token mismatch past the first prompt (where the tokenizer was checked) spoils
            # that prompt only: the others already read are kept.
            with lock:
                if isinstance(e, LimitExceededError):
                    spent(index, e)
                else:
                    result.failed[index] = str(e)
            return
        with lock:
            result.observations[index] = observation
        if on_answer:
            on_answer(index)

    rest = list(range(1, len(texts)))
    if pack > 1 and channel in (ECHO, PROMPT_LOGPROBS) and len(rest) > 1:
        rest = _read_packed(client, model, texts, encode, tokens, channel, rest, pack, top_k, result, on_answer, spent)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        try:
            list(pool.map(one, rest))
        except TokenMismatchError:
            stop.set()
            raise
        except KeyboardInterrupt:
            stop.set()
            result.error = "interrupted"
    return result


def _read_packed(
    client: OpenAIClient,
    model: str,
    texts: Sequence[str],
    encode: Callable[[str], list[int]],
    tokens: TokenMap,
    channel: str,
    indexes: list[int],
    pack: int,
    top_k: int,
    result: Collection,
    on_answer: Callable[[int], None] | None,
    spent: Callable[[int, LimitExceededError], None],
) -> list[int]:
    """Read ``indexes`` ``pack`` prompts to a request; returns those left to read one at a time
    (all of them when the endpoint refuses the first array, which is recorded)."""
    for start in range(0, len(indexes), pack):
        group = indexes[start : start + pack]
        try:
            answers = client.read_many(channel, model, [texts[i] for i in group], top_k=top_k)
        except ChannelUnsupportedError as e:
            if start == 0:
                result.channels_tried.append({"channel": channel, "outcome": f"prompt arrays refused: {e}"})
                return indexes
            for i in group:
                result.failed[i] = str(e)
            continue
        except LimitExceededError as e:
            for i in indexes[start:]:
                spent(i, e)
            return []
        for i, answer in zip(group, answers, strict=True):
            try:
                result.observations[i] = align_prompt(i, answer, encode(texts[i]), tokens)
            except TokenMismatchError as e:
                result.failed[i] = str(e)
                continue
            if on_answer:
                on_answer(i)
    return []


# -- local candidates --------------------------------------------------------------------------


@dataclass(frozen=True)
class Gathered:
    """One candidate's numbers at one prompt's scored tokens (everything the distances need).

    ``alt_logprobs[t, j]`` is the candidate's log-probability of the provider's j-th
    alternative at scored token t (NaN where that alternative has no id), ``chosen[t]`` of the
    provider's own token, ``argmax[t]`` the candidate's most likely token.
    """

    alt_logprobs: np.ndarray
    chosen: np.ndarray
    argmax: np.ndarray


def gather(observation: Observation, logprobs: torch.Tensor) -> Gathered:
    """Pick a candidate's numbers from its (len(ids), vocab) next-token log-probabilities.

    Row t of ``logprobs`` predicts token t + 1, so scored token t reads row t − 1.
    """
    rows = logprobs.index_select(0, torch.tensor([t - 1 for t in observation.scored], dtype=torch.long))
    width = max((len(a) for a in observation.alternative_ids), default=0)
    listed = [[i for i in ids] + [None] * (width - len(ids)) for ids in observation.alternative_ids]
    index = torch.tensor([[i if i is not None else 0 for i in row] for row in listed], dtype=torch.long)
    alt = rows.gather(1, index.reshape(len(listed), width)).double().numpy()
    alt[np.array([[i is None for i in row] for row in listed], dtype=bool).reshape(alt.shape)] = np.nan
    own = torch.tensor([observation.ids[t] for t in observation.scored], dtype=torch.long)
    chosen = rows.gather(1, own[:, None])[:, 0].double().numpy()
    return Gathered(alt, chosen, rows.argmax(dim=1).numpy())


def candidate_variants(ranks: Sequence[int], quantized: Sequence[str] = ()) -> list[Any]:
    """The behaviour engine's variants for ``candidate_names(ranks, quantized)``."""
    from lorafid.behaviour.forward import Variant  # transformers only when a probe runs

    hooks = {quantized_name(q): scheme(q) for q in ("int8", *quantized) if not q.startswith(BASE_QUANTIZED)}
    variants = []
    for name in candidate_names(ranks, quantized):
        rank, keep = parse_candidate(name)
        if name == FINETUNE:
            variants.append(Variant(name=name, kind="finetune"))
        elif name in hooks:
            variants.append(Variant(name=name, kind="finetune", weight_hook=hooks[name]))
        elif name == BASE:
            variants.append(Variant(name=name, kind="base"))
        elif "@" in name:  # the extraction served on a quantized base
            base_scheme = scheme(name.partition("@")[2])
            variants.append(Variant(name=name, kind="served", rank=rank, base_hook=base_scheme))
        else:
            variants.append(Variant(name=name, kind="served", rank=rank, keep_extras=keep))
    return variants


def score_candidates(
    base: str,
    finetune: str,
    observations: Sequence[Observation],
    ranks: Sequence[int],
    config: Any = None,
    quantized: Sequence[str] = (),
) -> Iterator[tuple[Observation, dict[str, Gathered]]]:
    """Run every candidate over the observed token sequences, one prompt at a time."""
    from lorafid.behaviour.forward import stream_logprobs

    token_ids = [list(o.ids) for o in observations]
    variants = candidate_variants(ranks, quantized)
    for text_index, by_name in stream_logprobs(base, finetune, token_ids, variants, config):
        observation = observations[text_index]
        yield observation, {name: gather(observation, lp) for name, lp in by_name.items()}


# -- distances, intervals, verdict -------------------------------------------------------------


def provider_matrix(observation: Observation, width: int) -> np.ndarray:
    """(T, width) provider log-probabilities of each position's alternatives; NaN where the
    alternative has no id in the fine-tune's vocabulary (it joins "the rest") or is absent."""
    out = np.full((len(observation.positions), width), np.nan)
    for t, (position, ids) in enumerate(zip(observation.positions, observation.alternative_ids, strict=True)):
        for j, (alternative, token_id) in enumerate(zip(position.top, ids, strict=True)):
            if token_id is not None:
                out[t, j] = alternative.logprob
    return out


def score_prompt(observation: Observation, gathered: dict[str, Gathered]) -> PromptScore:
    """Every candidate's summed distance to the provider over one prompt's scored tokens."""
    width = max((len(ids) for ids in observation.alternative_ids), default=0)
    p_alt = provider_matrix(observation, width)
    # The provider's most likely token at each position (its alternatives are its top k).
    provider_top1 = [
        ids[max(range(len(p.top)), key=lambda j: p.top[j].logprob)] if p.top else None
        for p, ids in zip(observation.positions, observation.alternative_ids, strict=True)
    ]
    provider_chosen = np.array([p.logprob for p in observation.positions], dtype=np.float64)
    kl, top1, chosen = {}, {}, {}
    for name, g in gathered.items():
        kl[name] = float(coarse_kl(p_alt, g.alt_logprobs).sum())
        top1[name] = sum(1 for a, b in zip(provider_top1, g.argmax, strict=True) if a is not None and a == int(b))
        chosen[name] = float(np.abs(provider_chosen - g.chosen).sum())
    return PromptScore(observation.prompt_index, len(observation.positions), kl, top1, chosen)


def local_distances(
    observations: Sequence[Observation], gathered: Sequence[dict[str, Gathered]]
) -> dict[str, dict[str, float]]:
    """Summed coarse KL from every candidate to every other, on the provider's partition.

    Alternatives without an id are left out exactly as in the comparison with the provider,
    so both describe the same coarse-grained distributions.
    """
    names = list(gathered[0]) if gathered else []
    out = {a: dict.fromkeys(names, 0.0) for a in names}
    for observation, by_name in zip(observations, gathered, strict=True):
        width = max((len(ids) for ids in observation.alternative_ids), default=0)
        unlisted = np.isnan(provider_matrix(observation, width))
        for a in names:
            pa = np.where(unlisted, np.nan, by_name[a].alt_logprobs)
            for b in names:
                if a != b:
                    out[a][b] += float(coarse_kl(pa, by_name[b].alt_logprobs).sum())
    return out


# -- the report --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeReport:
    """The versioned result (``lorafid.probe/1``): no key, no endpoint path or query."""

    status: str  # "complete" or "partial"
    endpoint_host: str
    model: str
    method: str | None  # the channel used
    channels_tried: list[dict[str, str]]
    base: dict[str, str | None]
    finetune: dict[str, str | None]
    prompt_set: dict[str, Any]
    settings: dict[str, Any]
    requests: dict[str, int]
    candidates: dict[str, CandidateResult] | dict[str, TextCandidate]
    verdict: Verdict | None
    prompts: list[dict[str, Any]]
    failed_prompts: dict[int, str]
    error: str | None = None
    # The text channel: the sampler sent, what the endpoint accepted, and the evidence's totals.
    text: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": SCHEMA, "tool_version": __version__}
        out.update(asdict(self))
        out["candidates"] = {n: _rounded(asdict(c)) for n, c in self.candidates.items()}
        if self.text is None:
            del out["text"]
        out["verdict"] = asdict(self.verdict) if self.verdict else None
        out["failed_prompts"] = {str(k): v for k, v in self.failed_prompts.items()}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def table(self) -> str:
        """The candidates as a terminal table, closest first."""
        text = [c for c in self.candidates.values() if isinstance(c, TextCandidate)]
        if text:
            return _text_table(text)
        lines = [f"{'candidate':<26}{'KL nats/token':>14}{'95% interval':>24}{'top-1':>8}{'|Δlogp|':>9}"]
        logprob = [c for c in self.candidates.values() if isinstance(c, CandidateResult)]
        for c in sorted(logprob, key=lambda c: c.distance):
            interval = f"[{c.interval[0]:.3g}, {c.interval[1]:.3g}]"
            mark = "" if not c.ruled_out else "  ruled out"
            lines.append(
                f"{c.name:<26}{c.distance:>14.4g}{interval:>24}{c.top1_agreement:>8.1%}{c.chosen_logprob_error:>9.3g}{mark}"
            )
        return "\n".join(lines)


def _text_table(candidates: Sequence[TextCandidate]) -> str:
    lines = [f"{'candidate':<26}{'log p/token':>12}{'gap':>11}{'95% interval':>24}{'fit z':>8}{'argmax':>8}"]
    for c in sorted(candidates, key=lambda c: c.gap):
        interval = f"[{c.interval[0]:.3g}, {c.interval[1]:.3g}]"
        mark = "  ruled out" if c.ruled_out else ""
        lines.append(
            f"{c.name:<26}{c.mean_logprob:>12.4f}{c.gap:>11.3g}{interval:>24}{c.fit_z:>8.1f}{c.argmax_agreement:>8.1%}{mark}"
        )
    return "\n".join(lines)


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    """Floats (and pairs of them, the intervals) to 8 decimals; distances and intervals alike."""

    def one(v: Any) -> Any:
        if isinstance(v, float) and math.isfinite(v):
            return round(v, 8)
        if isinstance(v, tuple | list) and all(isinstance(x, float) for x in v):
            return [one(x) for x in v]
        return v

    return {k: one(v) for k, v in values.items()}


def prompt_rows(scores: Iterable[PromptScore], texts: Sequence[str]) -> list[dict[str, Any]]:
    """Per-prompt evidence: the text's start, tokens scored, each candidate's mean distance."""
    return [
        {
            "index": s.prompt_index,
            "text": texts[s.prompt_index][:120],
            "tokens": s.tokens,
            "distance": {n: round(v / max(s.tokens, 1), 8) for n, v in s.kl_sum.items()},
        }
        for s in scores
    ]


def raise_unless_usable(collection: Collection) -> None:
    """A probe that got no prompt at all has nothing to compare."""
    if not collection.observations:
        raise ProviderError(f"The provider answered no prompt ({collection.error or 'every request failed'}).")


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
    # Wraps each block's compute of the local forward (a ZeroGPU Space's @spaces.GPU function).
    compute: Callable[[Callable[[], None]], None] | None = field(default=None, compare=False, repr=False)
    transport: Any = field(default=None, compare=False, repr=False)  # replaces HTTP (tests)


class Probe:
    """One probe of an endpoint against a base / fine-tune pair: ``plan()``, then ``run()``.

    Example::

        probe = Probe("org/base", "org/finetune", texts, {"name": "builtin", "version": "1"},
                      ProbeConfig("https://api.example.com/v1", "org/finetune", api_key=key))
        print(probe.plan().describe())     # before any request
        report = probe.run()
        print(report.verdict.sentence)
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
        self._tokenizer: Any = None
        self._plan: ProbePlan | None = None

    def plan(self) -> ProbePlan:
        """Resolve both repos, check them against the config and header limits (``check_models``),
        load the fine-tune's tokenizer, count requests and tokens: nothing is sent to the provider."""
        if self._plan is None:
            from lorafid.behaviour.forward import check_models
            from lorafid.behaviour.tokenizer import load_tokenizer

            c = self.config
            self._sources = (self._resolve(self.base), self._resolve(self.finetune))
            check_models(self.base, self.finetune, self._forward_config())  # limits, before the tokenizer
            self._tokenizer = load_tokenizer(
                self.finetune,
                revision=self._sources[1].resolved_sha,
                token=c.hub_token,
                endpoint=c.hub_endpoint,
                allow_local=c.allow_local,
            )
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

    def run(self, on_progress: Callable[[str, int, int], None] | None = None) -> ProbeReport:
        """Send the planned requests, score the candidates, compare; a partial run keeps its prompts.

        ``on_progress(stage, done, total)`` with stage "provider" or "local".
        """
        plan = self.plan()
        c = self.config
        tokens = TokenMap(self._tokenizer)
        answered = [0]
        texts = self._logprob_texts()

        def provider_step(_: int) -> None:
            answered[0] += 1
            if on_progress:
                on_progress("provider", answered[0], len(texts))

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
                collection = collect(
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
                    on_answer=provider_step,
                    pack=PACKED_PROMPTS if self._packs() else 1,
                    budgeted=c.max_requests is not None,
                )
                if collection.channel is None and plan.text is None:
                    raise ProviderError(collection.error or "The endpoint offers no way to read log-probabilities.")
            if collection.channel is None:
                assert plan.text is not None
                if c.max_requests is None:
                    budget.max_requests = budget.used + plan.text.requests  # the refusals plus the text's share
                text_plan = replace(plan.text, requests=min(plan.text.requests, budget.max_requests - budget.used))
                if text_plan.requests < 1:
                    raise ProviderError(f"{collection.error} The request budget is spent; raise --max-requests.")
                if on_progress:
                    on_progress("provider", 0, text_plan.requests)
                read = collect_text(client, c.model, self.texts, text_plan, seed=c.seed, greedy=c.channel == GREEDY)
                return self._text_report(plan, text_plan, read, collection, budget, tokens, on_progress)
        raise_unless_usable(collection)
        observations = [collection.observations[i] for i in sorted(collection.observations)]
        scores: list[PromptScore] = []
        gathered: list[dict[str, Gathered]] = []
        error = collection.error
        try:
            for observation, by_name in score_candidates(
                self.base, self.finetune, observations, c.ranks, self._forward_config(), c.quantized
            ):
                gathered.append(by_name)
                scores.append(score_prompt(observation, by_name))
                if on_progress:
                    on_progress("local", len(scores), len(observations))
        except KeyboardInterrupt:
            error = "interrupted while scoring the candidates"
            if not scores:
                raise
        scored = [o for o in observations if any(s.prompt_index == o.prompt_index for s in scores)]
        candidates, verdict = summarise(scores, local_distances(scored, gathered), c.ranks)
        complete = collection.complete and error is None and len(scores) == len(texts) - len(collection.unsent)
        return ProbeReport(
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

    def _common_settings(self) -> dict[str, Any]:
        c = self.config
        return {
            "ranks": list(c.ranks),
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
        on_progress: Callable[[str, int, int], None] | None,
    ) -> ProbeReport:
        """Score the provider's continuations under every candidate and judge them."""
        c = self.config
        max_length = self._context
        observations, empty = observe(
            read.continuations, self.texts, self._encode, tokens.encode_plain, tokens.eos_id, max_length
        )
        if not observations:
            raise ProviderError("Every continuation the provider sent was empty; nothing to score.")
        per_continuation: list[dict[str, Any]] = []
        error = read.error
        variants = candidate_variants(c.ranks, c.quantized)
        try:
            for _, by_name in score_text(self.base, self.finetune, observations, variants, self._forward_config()):
                per_continuation.append(by_name)
                if on_progress:
                    on_progress("local", len(per_continuation), len(observations))
        except KeyboardInterrupt:
            error = "interrupted while scoring the candidates"
            if not per_continuation:
                raise
        scored = observations[: len(per_continuation)]
        family = [n for n in candidate_names(c.ranks, c.quantized) if is_original(n)]
        # The provider's own token count (a lone continuation's usage) tells whether re-tokenizing
        # its text gave back the tokens it sampled; servers differ on counting the final EOS.
        aligned = [
            o.provider_tokens is None
            or o.provider_tokens == o.tokens
            or (o.finish_reason == "stop" and o.provider_tokens == o.tokens - 1)
            for o in scored
        ]
        judge = judge_greedy if c.channel == GREEDY else judge_text
        candidates, verdict, evidence = judge(
            concatenated(per_continuation), [o.tokens for o in scored], original_family=family, aligned=aligned
        )
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

    def _resolve(self, spec: str) -> Any:
        from lorafid.behaviour.forward import read_config_json
        from lorafid.weights.source import open_source

        with open_source(
            spec, token=self.config.hub_token, endpoint=self.config.hub_endpoint, allow_local=self.config.allow_local
        ) as source:
            if spec == self.finetune:
                # The context length bounds a scored sequence (prompt and sampled continuation).
                config = read_config_json(source) or {}
                length = config.get("max_position_embeddings")
                self._context = length if isinstance(length, int) and not isinstance(length, bool) else None
            return source.info

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

    def _forward_config(self) -> Any:
        from lorafid.behaviour.forward import ForwardConfig

        assert self._sources is not None
        return ForwardConfig(
            device=self.config.device,
            token=self.config.hub_token,
            endpoint=self.config.hub_endpoint,
            base_revision=self._sources[0].resolved_sha,
            finetune_revision=self._sources[1].resolved_sha,
            allow_local=self.config.allow_local,
            max_model_bytes=self.config.max_model_bytes,
            max_tensor_bytes=self.config.max_tensor_bytes,
            max_tensors=self.config.max_tensors,
            deadline=self.config.deadline,
            compute=self.config.compute,
        )
