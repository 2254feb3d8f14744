"""The text channel: sampled continuations of fixed prompts, no log-probabilities needed.

For endpoints that give only generated text (no ``logprobs``, ``echo`` or ``n``), the probe asks
for continuations and scores them locally, teacher-forced, under every candidate
(``lorafid.providers.text_evidence``). This module plans the requests within a budget, builds
them with every neutral sampler setting written out, and reads the answers.

Requests go to ``/completions`` (``prompt``, or a ``prompt`` array where the endpoint accepts
one, and ``n`` samples where it accepts that). The first request asks for both; an endpoint
that refuses them (or answers fewer choices) costs that one request and the rest go one
prompt, one sample at a time. An endpoint that refuses the non-OpenAI sampler fields
(``top_k``, ``min_p``, repetition penalties) is asked again with OpenAI's own fields only, and
the report records what was sent. A sampler the provider overrides anyway is detected from
the text itself, not trusted.

Not here: HTTP and retries (``openai_api``), tokenizers and scoring (``probe``, ``text_evidence``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorafid.errors import ChannelUnsupportedError, ProviderError
from lorafid.providers.openai_api import OpenAIClient
from lorafid.retry import RetryPolicy

TEXT = "completions-text"
"""The channel's name in reports and ``--channel``."""
GREEDY = "completions-greedy"
"""The same requests at temperature 0: each token should be the served model's argmax."""

# Sampling at temperature 1 with nothing cut or penalised: the text is a draw from the served
# model itself. Every neutral value is sent explicitly: llama.cpp's server, for one, applies
# repeat_penalty 1.1, top_k 40 and min_p 0.05 unless told otherwise.
OPENAI_SAMPLER: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
NEUTRAL_SAMPLER: dict[str, Any] = {
    **OPENAI_SAMPLER,
    "top_k": 0,  # off for vLLM and llama.cpp; llama-cpp-python's server refuses -1 (k must be >= 0)
    "min_p": 0.0,
    "repetition_penalty": 1.0,  # vLLM's name
    "repeat_penalty": 1.0,  # llama.cpp's name
    # A special token sampled mid-text (vLLM drops them from the text by default) would vanish
    # from what is scored, and the tokens around it would be scored out of their context.
    "skip_special_tokens": False,
}
GREEDY_SAMPLER: dict[str, Any] = {**NEUTRAL_SAMPLER, "temperature": 0.0}
MAX_TOKENS_CAP = 1024  # one continuation's length, at most
MAX_PACKED_PROMPTS = 8  # prompts in one request's array
MAX_SAMPLES = 4  # n per prompt
MIN_REQUESTS_TO_PACK = 2  # with one request, none is risked on finding out whether arrays and n work
# A pair of candidates with a KL gap δ nats per token differs per token by about δ with
# variance about 2δ (near-identical distributions), so N sampled tokens rule one out at 95%
# once δ > 1.96² · 2 / N.
RESOLUTION_CONSTANT = 2 * 1.96**2


@dataclass(frozen=True)
class TextPlan:
    """What the text channel will ask for, announced before the first request."""

    requests: int  # the text channel's share of the budget
    prompts_per_request: int  # asked on the first request; 1 after a refusal
    samples: int  # n asked on the first request
    max_tokens: int  # per continuation
    prompts_available: int

    @property
    def tokens_at_most(self) -> int:
        return self.requests * self.prompts_per_request * self.samples * self.max_tokens

    @property
    def tokens_at_least(self) -> int:
        """Without prompt arrays or ``n`` (one continuation per request), if none stops early."""
        return self.requests * self.max_tokens

    def resolution(self, tokens: int) -> float:
        """The smallest KL gap (nats per token) between two candidates that ``tokens`` resolve at 95%."""
        return RESOLUTION_CONSTANT / max(tokens, 1)

    def describe(self) -> str:
        return (
            f"Text channel: {self.requests} request(s) of up to {self.max_tokens} sampled tokens each "
            f"({self.tokens_at_least} tokens; up to {self.tokens_at_most} if the endpoint takes "
            f"{self.prompts_per_request} prompts × {self.samples} samples per request). That resolves KL gaps "
            "between candidates above about "
            f"{self.resolution(self.tokens_at_least):.2g} nats per token "
            f"({self.resolution(self.tokens_at_most):.2g} with arrays)."
        )


def plan_text(
    requests: int, prompts: int, *, max_tokens: int = MAX_TOKENS_CAP, samples: int = MAX_SAMPLES, greedy: bool = False
) -> TextPlan:
    """The text plan for ``requests`` requests over a prompt set of ``prompts`` texts.

    Example: 5 requests, 36 prompts -> 8 prompts × 4 samples asked on the first request;
    1 request -> one prompt, one sample (a refusal would cost the whole budget).
    """
    if requests < 1:
        raise ProviderError("The request budget leaves no request for the text channel; raise --max-requests.")
    if not 1 <= max_tokens <= MAX_TOKENS_CAP:
        raise ProviderError(f"--max-tokens must be between 1 and {MAX_TOKENS_CAP}.")
    if greedy:
        samples = 1  # every greedy sample of a prompt is the same text
    if requests < MIN_REQUESTS_TO_PACK:  # a refused array would cost the whole budget
        return TextPlan(requests, 1, 1, max_tokens, prompts)
    per_request = max(1, min(MAX_PACKED_PROMPTS, math.ceil(prompts / requests)))
    return TextPlan(requests, per_request, max(1, min(MAX_SAMPLES, samples)), max_tokens, prompts)


@dataclass(frozen=True)
class Continuation:
    """One sampled continuation as the provider returned it."""

    prompt_index: int
    text: str
    finish_reason: str | None  # "stop" (the model ended it), "length" (max_tokens), or None
    completion_tokens: int | None  # the provider's own count, where given for a lone continuation


def parse_continuations(payload: Mapping[str, Any], prompt_indexes: Sequence[int], samples: int) -> list[Continuation]:
    """The continuations of one ``/completions`` answer, by prompt.

    OpenAI's layout: ``choices[i]`` with ``index`` = prompt position × n + sample. Raises
    ``ChannelUnsupportedError`` for an answer without usable choices.
    """
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ChannelUnsupportedError("the answer has no choices")
    expected = len(prompt_indexes) * samples
    if len(choices) != expected and not (len(prompt_indexes) == 1 and 1 <= len(choices) <= samples):
        raise ChannelUnsupportedError(
            f"the answer has {len(choices)} choices for {len(prompt_indexes)} prompt(s) × {samples} sample(s)"
        )
    usage = payload.get("usage")
    lone_count = usage.get("completion_tokens") if isinstance(usage, dict) and len(choices) == 1 else None
    out = []
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            raise ChannelUnsupportedError("a choice is not an object")
        index = choice.get("index", position)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < max(expected, len(choices)):
            raise ChannelUnsupportedError(f"a choice has index {index!r}")
        text = choice.get("text")
        if not isinstance(text, str):
            raise ChannelUnsupportedError(f"choice {index} has no text (it has {type(text).__name__})")
        finish = choice.get("finish_reason")
        out.append(
            Continuation(
                prompt_indexes[min(index // samples, len(prompt_indexes) - 1)],
                text,
                finish if isinstance(finish, str) else None,
                lone_count if isinstance(lone_count, int) and not isinstance(lone_count, bool) else None,
            )
        )
    return out


@dataclass
class TextCollection:
    """What the text channel read, and how (recorded in the report)."""

    continuations: list[Continuation]
    sampler: dict[str, Any]
    packed: bool
    samples: int
    notes: list[str]
    error: str | None = None


def collect_text(
    client: OpenAIClient,
    model: str,
    texts: Sequence[str],
    plan: TextPlan,
    *,
    seed: int = 0,
    greedy: bool = False,
) -> TextCollection:
    """Spend the plan's requests on continuations; keeps what was read if the provider fails later.

    Raises ``ProviderError`` only when not a single continuation could be read.
    """
    sampler = dict(GREEDY_SAMPLER if greedy else NEUTRAL_SAMPLER)
    notes: list[str] = []
    got: list[Continuation] = []
    per_request, samples = plan.prompts_per_request, plan.samples
    next_prompt, sent = 0, 0
    accepted = openai_only = False  # has any request worked; were the extra sampler fields dropped
    error: str | None = None
    while sent < plan.requests and next_prompt < len(texts):
        indexes = list(range(next_prompt, min(len(texts), next_prompt + per_request)))
        body: dict[str, Any] = {
            "model": model,
            "prompt": [texts[i] for i in indexes] if len(indexes) > 1 else texts[indexes[0]],
            "max_tokens": plan.max_tokens,
            "seed": seed + sent,
            **sampler,
        }
        if samples > 1:
            body["n"] = samples
        try:
            # Until a request works, each finds out what the endpoint accepts: one try, no
            # retries, so a refusal costs one request of the budget, not five.
            payload = client.post("/completions", body, retry=None if accepted else RetryPolicy(max_tries=1))
            answers = parse_continuations(payload, indexes, samples)
        except (ChannelUnsupportedError, ProviderError) as e:
            sent += 1
            if not accepted and (len(indexes) > 1 or samples > 1):
                notes.append(f"prompt arrays or n refused ({e}); one prompt, one sample per request")
                per_request, samples = 1, 1
                continue
            if not accepted and not openai_only and isinstance(e, ChannelUnsupportedError):
                notes.append(f"the sampler fields beyond OpenAI's were refused ({e}); sent OpenAI's only")
                sampler, openai_only = {**OPENAI_SAMPLER, "temperature": sampler["temperature"]}, True
                continue
            if not got:
                raise ProviderError(f"The endpoint gave no continuation on the text channel ({e}).") from None
            error = str(e)
            break
        sent += 1
        got += answers
        next_prompt = indexes[-1] + 1
        if not accepted and len(answers) < len(indexes) * samples:
            notes.append(f"asked {len(indexes)} prompt(s) × {samples} sample(s), got {len(answers)} continuation(s)")
            per_request, samples = 1, 1
        accepted = True
    if not got:
        raise ProviderError("The budget allowed no continuation on the text channel; raise --max-requests.")
    return TextCollection(got, sampler, per_request > 1, samples, notes, error)
