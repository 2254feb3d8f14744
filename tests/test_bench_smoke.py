"""The benchmark scripts on the tiny preset: numbers agree with the post's method; no timing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.synth import PRESETS, write_pair
from lorafid.audit.engine import AuditConfig, audit
from lorafid.audit.store import Store

RANK = 8


def post_cosine_distance(base: torch.Tensor, finetune: torch.Tensor, rank: int) -> float:
    """The seed post's method, reductions in float64: full SVD, rebuild Δ_r, 1 − cos(Δ, Δ_r)."""
    delta = finetune.double() - base.double()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    lossy = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return 1.0 - float((delta * lossy).sum() / (delta.norm() * lossy.norm()))


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize("low_rank", [False, True])
def test_tiny_preset_audit_matches_the_post(tmp_path: Path, low_rank: bool) -> None:
    base_dir, finetune_dir = write_pair(tmp_path / "pair", PRESETS["tiny"], 2, low_rank=low_rank)
    index = "model.safetensors.index.json"
    maps = [json.loads((d / index).read_text())["weight_map"] for d in (base_dir, finetune_dir)]
    assert maps[0].keys() == maps[1].keys() and maps[0] != maps[1]  # same tensors, shards not aligned
    report = audit(str(base_dir), str(finetune_dir), AuditConfig(rank=RANK, device="cpu", store=Store(tmp_path)))
    base, finetune = load_dir(base_dir), load_dir(finetune_dir)
    assert report.status == "complete" and report.matrices
    for matrix in report.matrices:
        expected = post_cosine_distance(base[matrix.name], finetune[matrix.name], RANK)
        assert matrix.metrics(RANK).cosine_distance == pytest.approx(expected, abs=1e-5), matrix.name


def test_layer_time_reports_every_module_and_the_projection(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import layer_time

    monkeypatch.setattr("sys.argv", ["layer_time", "--preset", "tiny", "--layers", "10"])
    layer_time.main()
    out = capsys.readouterr().out
    for module in PRESETS["tiny"].modules:
        assert module in out
    assert "10 layers:" in out


def test_timing_interleaves_rounds_and_takes_ratios_within_each() -> None:
    """Each round runs every method once, the order reversed every other round; ratios pair rounds."""
    from bench.timing import interleaved, ratios, spread

    calls: list[str] = []
    seconds, values = interleaved({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"] and values == {"a": 1, "b": 2}
    assert len(seconds["a"]) == len(seconds["b"]) == 3
    assert ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    assert spread([1.0, 3.0, 2.0], "x") == "2x [1, 3]"
