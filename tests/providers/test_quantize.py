"""Quantized candidates: each scheme against a hand computation of what its server does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafid.errors import LorafidError
from lorafid.providers.quantize import SCHEMES, fp8_channel, fp8_tensor, int4_groups, int8_rows, scheme

BLOCK = "model.layers.0.mlp.up_proj.weight"


def test_only_the_decoder_blocks_matrices_are_quantized() -> None:
    w = torch.randn(4, 64)
    for name, hook in SCHEMES.items():
        assert torch.equal(hook("model.embed_tokens.weight", w), w), name
        assert torch.equal(hook("lm_head.weight", w), w), name
        assert torch.equal(hook("model.layers.0.input_layernorm.weight", w[0]), w[0]), name
        assert not torch.equal(hook(BLOCK, w), w), name


def test_int8_rows_worked_example() -> None:
    rounded = int8_rows(BLOCK, torch.tensor([[0.5, -1.0, 0.26]]))
    assert rounded[0, 2].item() == pytest.approx(round(0.26 * 127) / 127, abs=1e-7)


def test_int4_groups_worked_example_and_a_short_last_group() -> None:
    # the group (0, 1, 2.9, 3): scale 3/15 = 0.2, zero point 0; 1 -> 5 -> 1.0; 2.9 -> 14.49… -> 14 -> 2.8
    w = torch.tensor([[0.0, 1.0, 2.9, 3.0]])
    out = int4_groups(BLOCK, w, group=4)
    assert out[0].tolist() == pytest.approx([0.0, 1.0, 2.8, 3.0], abs=1e-6)
    wide = torch.randn(3, 300, generator=torch.Generator().manual_seed(0))
    out = int4_groups(BLOCK, wide)
    for start in (0, 128, 256):  # groups of 128 and a last one of 44, each with 16 levels at most
        group = out[:, start : start + 128]
        assert all(len(torch.unique(row)) <= 16 for row in group)
        low, high = wide[:, start : start + 128].amin(1), wide[:, start : start + 128].amax(1)
        assert torch.all((group - wide[:, start : start + 128]).abs() <= ((high - low) / 30 + 1e-6)[:, None])


def test_fp8_scales_per_tensor_and_per_row() -> None:
    # e4m3 near 448 has a step of 32: 300 rounds to 288, 310 to 320; per tensor both rows share amax 448
    w = torch.tensor([[448.0, 300.0], [1.0, 0.5]])
    assert fp8_tensor(BLOCK, w).tolist() == [[448.0, 288.0], [1.0, 0.5]]
    row = fp8_channel(BLOCK, torch.tensor([[1.0, 0.67]]))  # scale 1/448: 0.67·448 = 300.2 -> 288
    assert row[0, 1].item() == pytest.approx(288 / 448, abs=1e-7)
    assert torch.equal(fp8_channel(BLOCK, torch.zeros(2, 3)), torch.zeros(2, 3))


def test_gguf_q8_0_is_llama_cpps_block_format() -> None:
    # Q8_0: blocks of 32 along a row, d = amax / 127 stored as float16, q = round(x / d)
    x = torch.linspace(-1.0, 0.5, 64).reshape(2, 32)
    out = SCHEMES["q8_0"](BLOCK, x).numpy()
    for block in range(2):
        values = x[block].numpy().astype(np.float64)
        d = float(np.float16(np.abs(values).max() / 127))
        expected = np.round(values / d) * d
        assert np.allclose(out[block], expected, atol=1e-6)
    for name, step in (("q5_0", 16), ("q4_0", 8)):  # fewer levels, larger error, same block layout
        error = np.abs(SCHEMES[name](BLOCK, x).numpy() - x.numpy()).max()
        assert 0 < error <= 1.0 / step + 1e-3


def test_a_width_that_is_not_whole_gguf_blocks_is_a_clear_error() -> None:
    with pytest.raises(LorafidError, match="not a whole number of GGUF blocks of 32"):
        SCHEMES["q4_0"](BLOCK, torch.randn(2, 40))


def test_an_unknown_scheme_names_the_known_ones() -> None:
    with pytest.raises(LorafidError, match="Unknown quantization 'q3_k'; choose from int8, fp8"):
        scheme("q3_k")
