"""The text channel's local half: the provider's continuations as token ids, scored by every candidate.

Each continuation is tokenized after its prompt with the fine-tune's tokenizer (the ids the
provider sampled are not returned; re-tokenizing its text gives them back unless the sampler
produced a non-canonical split, which costs every candidate alike). A continuation the model
ended itself (``finish_reason: "stop"``) ends with the EOS token, which is scored too: the
model chose it. The layer-streamed forward (``lorafid.behaviour.forward.stream_logprobs``)
then gives every candidate's next-token distribution at every position, reduced here to the
numbers ``lorafid.providers.text_evidence`` needs.

Not here: HTTP (``text_channel``), the statistics (``text_evidence``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorafid.providers.text_channel import Continuation
from lorafid.providers.text_evidence import TAIL_PROBABILITY, TokenScores


@dataclass(frozen=True)
class TextObservation:
    """One continuation as ids: ``ids[start:]`` are the provider's tokens, ``ids[:start]`` its prompt."""

    prompt_index: int
    ids: tuple[int, ...]
    start: int
    finish_reason: str | None
    provider_tokens: int | None = None  # the provider's own count of the continuation's tokens, where given

    @property
    def tokens(self) -> int:
        return len(self.ids) - self.start


def observe(
    continuations: Sequence[Continuation],
    texts: Sequence[str],
    encode: Callable[[str], list[int]],
    encode_plain: Callable[[str], list[int]],
    eos_id: int | None,
    max_length: int | None = None,
) -> tuple[list[TextObservation], int]:
    """The continuations as observations, and how many were empty (nothing to score).

    ``max_length`` cuts a sequence to the model's context; a continuation is cut at its first
    U+FFFD (invalid UTF-8, or a character cut by ``max_tokens``) rather than scored as one.
    """
    out, empty = [], 0
    encoded: dict[int, list[int]] = {}  # a prompt's n samples share one encoding
    for c in continuations:
        if c.prompt_index not in encoded:
            encoded[c.prompt_index] = encode(texts[c.prompt_index])
        prompt = list(encoded[c.prompt_index])
        # A U+FFFD stands for bytes that were not valid UTF-8: the tokens there are lost, and
        # re-tokenizing the replacement character gives three other tokens. What follows it
        # cannot be aligned, so the text is cut there (its end, then, was not the model's choice).
        valid, cut, _ = c.text.partition("\ufffd")
        generated = encode_plain(valid) if valid else []
        if c.finish_reason == "stop" and eos_id is not None and not cut:
            generated.append(eos_id)
        ids = (prompt + generated)[:max_length] if max_length else prompt + generated
        if len(ids) <= len(prompt) or not prompt:
            empty += 1
            continue
        out.append(TextObservation(c.prompt_index, tuple(ids), len(prompt), c.finish_reason, c.completion_tokens))
    return out, empty


def token_scores(logprobs: torch.Tensor, observation: TextObservation) -> TokenScores:
    """One candidate's numbers at one continuation's tokens from its (len(ids), vocab) log-softmax.

    Row j predicts token j + 1, so the provider's token t reads row t − 1.
    """
    rows = logprobs[observation.start - 1 : len(observation.ids) - 1].to(torch.float64)
    chosen = torch.tensor(observation.ids[observation.start :], dtype=torch.long)
    p = rows.exp()
    finite = torch.where(p > 0, rows, torch.zeros_like(rows))  # 0 · (−inf) is 0, not NaN
    return TokenScores(
        logprob=rows.gather(1, chosen[:, None])[:, 0].numpy(),
        entropy=(-(p * finite).sum(dim=1)).numpy(),
        second=(p * finite.square()).sum(dim=1).numpy(),
        tail=(p * (p < TAIL_PROBABILITY)).sum(dim=1).numpy(),
        argmax_hit=(rows.argmax(dim=1) == chosen).numpy(),
    )


def score_text(
    base: str,
    finetune: str,
    observations: Sequence[TextObservation],
    variants: Sequence[Any],
    config: Any,
    *,
    stream: Any = None,
) -> Iterator[tuple[int, dict[str, TokenScores]]]:
    """(observation index, {candidate: its scores}) one continuation at a time, after the last layer;
    on an open ``LayerStream`` where given (passes of one check share it), else on a new one."""
    from lorafid.behaviour.forward import stream_logprobs

    token_ids = [list(o.ids) for o in observations]
    run = (
        stream.logprobs(token_ids, variants) if stream else stream_logprobs(base, finetune, token_ids, variants, config)
    )
    for index, by_name in run:
        yield index, {name: token_scores(lp, observations[index]) for name, lp in by_name.items()}


def concatenated(per_continuation: Sequence[dict[str, TokenScores]]) -> dict[str, TokenScores]:
    """Every candidate's scores over all continuations, in order."""
    names = list(per_continuation[0]) if per_continuation else []
    return {n: TokenScores.concatenate([p[n] for p in per_continuation]) for n in names}
