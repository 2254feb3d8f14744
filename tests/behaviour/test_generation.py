"""Batched greedy continuations: the same tokens as ``generate`` run one prompt at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafid.behaviour.generation import greedy_continuations, length_batches
from tests.llama_models import model_family, write_model

TEXTS = (
    "the knight drew his sword and the dragon",
    "one plus two is three",
    "hello traveller , said the innkeeper",
    "the dragon",
)


def test_batches_are_shortest_first_within_the_token_budget() -> None:
    # Sorted: lengths 1 (index 1), 3 (index 2), 5 (index 0). With 2 new tokens, [1, 2] fills
    # 2 × (3 + 2) = 10 slots; adding index 0 would need 3 × (5 + 2) = 21 > 10.
    assert length_batches([5, 1, 3], 2, batch_tokens=10) == [[1, 2], [0]]
    assert length_batches([5, 1, 3], 2, batch_tokens=1000) == [[1, 2, 0]]
    assert length_batches([50], 10, batch_tokens=4) == [[0]]  # too long for the budget: alone
    assert length_batches([], 3) == []


def one_at_a_time(model: object, prompts: list[list[int]], new: int, pad: int, eos: int) -> list[list[int]]:
    out = []
    for ids in prompts:
        prompt = torch.tensor([ids])
        with torch.no_grad():
            generated = model.generate(  # type: ignore[attr-defined]
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
            )
        out.append(generated[0, len(ids) :].tolist())
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_batched_continuations_equal_one_prompt_at_a_time(model_type: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = write_model(model_family(model_type, 2).full, tmp_path / "full")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in prompts}) > 2  # lengths differ: rows are padded
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    expected = one_at_a_time(model, prompts, 10, pad, eos)

    def batched(eos_id: int, budget: int) -> list[list[int]]:
        found: dict[int, list[int]] = {}
        for part in greedy_continuations(
            model, prompts, 10, pad_id=pad, eos_id=eos_id, device=torch.device("cpu"), batch_tokens=budget
        ):
            assert not set(part) & set(found)
            found.update(part)
        return [found[i] for i in range(len(prompts))]

    assert batched(eos, 10_000) == expected  # one batch
    assert batched(eos, 40) == expected  # several batches
    # A token one prompt generates mid-way, taken as end-of-sequence: that row stops there as a
    # lone generate does (the batch pads it), the others run on.
    stop = next(
        tok for row in expected for tok in row[1:] if tok not in row[:1] and any(tok not in other for other in expected)
    )
    stopping = one_at_a_time(model, prompts, 10, pad, stop)
    assert any(len(row) < 10 for row in stopping) and any(len(row) == 10 for row in stopping)
    assert batched(stop, 10_000) == stopping
