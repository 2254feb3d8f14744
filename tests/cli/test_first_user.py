"""What a first-time user of the CLI met (issue 20): words that describe what was computed.

Each test runs the real ``lorafid`` entry point in-process on tiny local models.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lorafid.cli.commands import main
from tests.llama_models import model_family, write_model
from tests.models import model_pair, shard_files, write_dir


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base, tuned = model_pair(layers=2, dtype=torch.float32)
    root = tmp_path_factory.mktemp("pair")
    return write_dir(shard_files(base, 1), root / "base"), write_dir(shard_files(tuned, 1), root / "tuned")


def test_a_rank_above_full_rank_is_said_to_be_full_rank(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    base, tuned = pair
    assert main(["audit", str(base), str(tuned), "--rank", "1000000000", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    first, note = out.splitlines()[:2]
    assert first.startswith("Full rank (") and "keeps everything" in first
    assert "Rank 1000000000 keeps" not in out and "100%" not in first
    assert "rank 1,000,000,000 is above the largest matrix's full rank" in note
    assert main(["audit", str(base), str(tuned), "--rank", "4", "--device", "cpu"]) == 0
    below = capsys.readouterr().out
    assert below.startswith("Rank 4 keeps ") and "full rank" not in below.splitlines()[1]


def test_identical_models_print_unchanged_rows_and_no_worst_layers(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    base, _ = pair
    assert main(["audit", str(base), str(base), "--rank", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("No weight matrix differs")
    assert "100.0%" not in out and "keeps 100%" not in out
    assert "worst layers" not in out
    rows = [line for line in out.splitlines()[3:] if line.strip() and not line.startswith(("not audited", "1-D"))]
    assert rows and all("unchanged" in line for line in rows)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    family = model_family("llama", 2)
    root = tmp_path_factory.mktemp("llama")
    return {name: write_model(getattr(family, name), root / name) for name in ("base", "full")}


def test_behave_interrupted_while_generating_writes_partial(
    llama: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorafid.behaviour.check import BehaviourCheck

    original = BehaviourCheck.run

    def interrupted_at_generation(self: BehaviourCheck) -> Iterator[object]:
        for step in original(self):
            if step.stage == "generating":
                raise KeyboardInterrupt  # Ctrl-C while the continuations are being generated
            yield step

    monkeypatch.setattr(BehaviourCheck, "run", interrupted_at_generation)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the knight drew his sword\none plus two is three\n", encoding="utf-8")
    out = tmp_path / "behaviour.json"
    argv = ["behave", str(llama["base"]), str(llama["full"]), "--ranks", "4", "--prompts", str(prompts)]
    argv += ["--continuation-tokens", "3", "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(argv) == 130
    report = json.loads(out.read_text())
    assert report["status"] == "partial"
    assert report["continuations"] is None and "interrupted" in report["continuations_note"]
    assert len(report["prompts"]) == 2  # every prompt scored is kept
    capsys.readouterr()
