"""The log-probability channels' side of a provider check: read the provider, align its tokens.

``collect`` sends each prompt through the best channel the endpoint offers (completions
``echo``, vLLM's ``prompt_logprobs``, chat ``top_logprobs``; detected on the first prompt and
recorded), under a request budget, packing prompts into arrays where that is allowed; the
answers are aligned to the fine-tune tokenizer's ids (``TokenMap``, ``align_prompt``,
``align_chat``), so a provider serving another tokenizer is caught, not scored.

Not here: HTTP (``openai_api``), the local candidates (``logprob_probe``), the statistics (``evidence``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from lorafid.errors import ChannelUnsupportedError, LimitExceededError, ProviderError, TokenMismatchError
from lorafid.providers.openai_api import (
    CHANNELS,
    CHAT,
    ECHO,
    PROMPT_LOGPROBS,
    OpenAIClient,
    Position,
    ProviderAnswer,
)

DEFAULT_TOP_K = 20  # vLLM's default --max-logprobs and OpenAI's chat limit
DEFAULT_NEW_TOKENS = 32  # chat channel: greedy continuation length scored locally


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


def raise_unless_usable(collection: Collection) -> None:
    """A probe that got no prompt at all has nothing to compare."""
    if not collection.observations:
        raise ProviderError(f"The provider answered no prompt ({collection.error or 'every request failed'}).")
