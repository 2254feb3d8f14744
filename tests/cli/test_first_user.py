"""What a first-time user of the CLI met (issue 20): words that describe what was computed.

Each test runs the real ``lorafid`` entry point in-process on tiny local models.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

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


# -- item 17: a rank above full rank, an --out that is a file ---------------------------------------


def test_extract_refuses_a_rank_above_full_rank_before_reading_weights(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorafid.audit import engine

    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    base, tuned = pair
    reads: list[object] = []
    original = engine.read_tensor
    monkeypatch.setattr(engine, "read_tensor", lambda *a, **k: reads.append(a) or original(*a, **k))
    out = tmp_path / "adapter"
    argv = ["extract", str(base), str(tuned), "--out", str(out), "--device", "cpu", "--quiet"]
    assert main([*argv, "--rank", "1000000000"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--rank 1,000,000,000 is above the largest matrix's full rank (32)" in err and "--rank 32 or less" in err
    assert reads == [] and not out.exists()  # no weight read, no folder left behind
    assert main([*argv, "--rank", "33"]) == 1  # the bound is the full rank itself
    assert main([*argv, "--rank", "32"]) == 0 and (out / "adapter_model.safetensors").is_file()
    assert reads  # the same patch sees the weights an extraction reads


def test_extract_out_naming_a_file_is_one_line(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    base, tuned = pair
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    assert main(["extract", str(base), str(tuned), "--rank", "4", "--out", str(taken), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err == f"lorafid: error: --out {taken} is a file, not a folder: name a new folder for the adapter " + (
        "(or the folder of an interrupted extraction, to resume it).\n"
    )
    assert taken.read_text() == "mine"


def test_behave_runs_a_rank_above_full_rank_at_full_rank_with_a_note(
    llama: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "behaviour.json"
    argv = ["behave", str(llama["base"]), str(llama["full"]), "--ranks", "4,1000000000", "--max-tokens", "4"]
    argv += ["--continuation-tokens", "0", "--device", "cpu", "--quiet", "--out", str(out)]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the knight drew his sword\n", encoding="utf-8")
    assert main([*argv, "--prompts", str(prompts)]) == 0
    err = capsys.readouterr().err
    assert "note: rank 1,000,000,000 is above the largest matrix's full rank (48): run as rank 48" in err
    report = json.loads(out.read_text())
    assert report["settings"]["ranks"] == [4, 48] and "rank-48" in report["variants"]
    assert "rank-1000000000" not in report["variants"] and "full rank (48)" in report["ranks_note"]


# -- items 18 and 19: the registry listing; a bad option value ---------------------------------------


class _Listing:
    """A registry of two results whose names agree for 40 characters (a stand-in for the Hub dataset)."""

    url = "https://hub/datasets/org/results"
    unreadable_rows = 0

    def __init__(self, *_: object, **__: object) -> None:
        energy = {"64": 0.84, "128": 0.91, "256": 0.97, "512": 1.0}
        self._entries = [
            SimpleNamespace(
                name="a" * 40 + tail, finetune="org/t", base="org/b", created="2026-12-01", energy_at=energy
            )
            for tail in ("-first", "-second")
        ]

    def entries(self) -> list[SimpleNamespace]:
        return self._entries


def test_open_lists_unique_refs_and_ranks_in_numeric_order(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorafid.sharing import hub_dataset

    monkeypatch.setattr(hub_dataset, "Registry", _Listing)
    assert main(["open", "org/results"]) == 0
    first, second, total = capsys.readouterr().out.splitlines()
    assert first.split()[0] == "a" * 40 + "-f" and second.split()[0] == "a" * 40 + "-s"  # each names one result
    assert "kept at 64:84% 128:91% 256:97% 512:100%" in first
    assert total == "2 result(s) in https://hub/datasets/org/results"


def test_a_bad_option_value_is_one_line_naming_the_option(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base, tuned = pair
    with pytest.raises(SystemExit) as exited:
        main(["audit", str(base), str(tuned), "--include", "mlp\\.("])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lorafid audit: --include 'mlp\\.(' is not a valid regular expression (")
    assert err.count("\n") == 1 and "usage:" not in err
    with pytest.raises(SystemExit):
        main(["audit", str(base)])  # a missing argument keeps the usage: then it is what helps
    assert "usage:" in capsys.readouterr().err
    # A negative count was taken as 0 without a word.
    with pytest.raises(SystemExit) as exited:
        main(["behave", str(base), str(tuned), "--continuation-tokens", "-1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lorafid behave: --continuation-tokens must be 0 or more") and err.count("\n") == 1
