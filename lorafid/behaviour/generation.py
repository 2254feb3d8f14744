"""Greedy continuations of many prompts by one whole model, in left-padded batches.

One ``generate`` call per batch instead of one per prompt: on a CPU each decoding step of a
single prompt is a matrix-vector product that waits on memory, and a batch of prompts shares
each weight read among them. Variants are not batched together: each has weights of its own,
so nothing would be shared between them.

Limits: a batch holds at most ``batch_tokens`` (prompt + continuation) token slots, which
bounds its key-value cache and activations; prompts are batched shortest first, so little of a
batch is padding. The continuations are those of greedy decoding one prompt at a time: left
padding is masked, and each row is cut after its first end-of-sequence token, where a lone
``generate`` stops (rows that end early are padded by ``generate``). Float rounding differs
with the batch's shape, so a next-token tie to the last bits could break the other way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

GENERATE_BATCH_TOKENS = 16_384  # token slots (prompts × (longest prompt + continuation)) per batch


def length_batches(
    lengths: Sequence[int], new_tokens: int, batch_tokens: int = GENERATE_BATCH_TOKENS
) -> list[list[int]]:
    """Indices of ``lengths`` grouped shortest first, each group's padded size
    (count × (longest + ``new_tokens``)) within ``batch_tokens``; a prompt too long for the
    budget on its own is a group of one."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        # Sorted ascending: this prompt is the longest of the group it joins.
        if current and (len(current) + 1) * (lengths[index] + new_tokens) > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def greedy_continuations(
    model: Any,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    *,
    pad_id: int | None,
    eos_id: int | None,
    device: torch.device,
    batch_tokens: int = GENERATE_BATCH_TOKENS,
) -> Iterator[dict[int, list[int]]]:
    """Yield, batch after batch, {prompt index: its greedy continuation's token ids}."""
    for batch in length_batches([len(p) for p in prompts], new_tokens, batch_tokens):
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id if pad_id is not None else 0, dtype=torch.long)  # masked
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            length = len(prompts[index])
            ids[row, width - length :] = torch.tensor(list(prompts[index]), dtype=torch.long)
            mask[row, width - length :] = 1
        with torch.no_grad():
            out = model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
        yield {index: _until_end(out[row, width:].tolist(), eos_id) for row, index in enumerate(batch)}


def _until_end(tokens: list[int], eos_id: int | None) -> list[int]:
    """The tokens up to and including the first end-of-sequence one (what follows is padding)."""
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    return tokens
