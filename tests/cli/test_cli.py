"""The CLI as a user runs it: output files, formats, exit codes, one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save

from lorafid.audit import engine as audit_module
from lorafid.audit.engine import Audit, AuditConfig
from lorafid.audit.report import Report
from lorafid.cli.commands import main
from lorafid.cli.output import count_noun
from lorafid.errors import LorafidError
from tests.audit.test_spectrum import reference_metrics
from tests.hub_server import HubServer
from tests.models import model_pair, shard_files, write_dir


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "lorafid_home"
    monkeypatch.setenv("LORAFID_HOME", str(home))
    return home


@pytest.fixture
def pair_dirs(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    base, finetune = model_pair()
    return (
        write_dir(shard_files(base, 2), tmp_path / "base"),
        write_dir(shard_files(finetune, 3, offset=1), tmp_path / "finetune"),
        base,
        finetune,
    )


def test_audit_writes_report_and_summary(pair_dirs: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base_dir, finetune_dir, base, finetune = pair_dirs
    out = tmp_path / "report.json"
    assert main(["audit", str(base_dir), str(finetune_dir), "--rank", "8", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Rank 8 keeps ")
    assert "mlp.down_proj" in printed and "rank for 90%" in printed
    report = Report.from_json(out.read_text())
    assert report.rank == 8 and report.status == "complete"
    assert (tmp_path / "report.spectra.safetensors").exists()
    name = "model.layers.1.mlp.up_proj.weight"
    got = json.loads(out.read_text())["matrices"]
    entry = next(m for m in got if m["name"] == name)
    want = reference_metrics(base[name], finetune[name], 8)
    assert entry["at_rank"]["cosine_distance"] == pytest.approx(want["cosine_distance"], abs=1e-5)


def test_compare_py_format_is_the_post_layout(pair_dirs: tuple, tmp_path: Path) -> None:
    base_dir, finetune_dir, base, finetune = pair_dirs
    out = tmp_path / "results.json"
    args = ["audit", str(base_dir), str(finetune_dir), "--rank", "4", "--format", "compare-py", "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    results = json.loads(out.read_text())
    # The post's script covers 2-D tensors, not embeddings, not lm_head.
    assert sorted(results) == sorted(n for n in base if base[n].ndim == 2 and "embed" not in n and "lm_head" not in n)
    for name, entry in results.items():
        assert set(entry) == {"loss", "mean_diff_value", "diff_rank"}
        assert set(entry["loss"]) == {"mse", "cosine_distance"}
        assert isinstance(entry["loss"]["mse"], float) and isinstance(entry["diff_rank"], int)
        want = reference_metrics(base[name], finetune[name], 4)
        assert entry["loss"]["cosine_distance"] == pytest.approx(want["cosine_distance"], abs=1e-5)
        assert entry["loss"]["mse"] == pytest.approx(want["mse"], rel=1e-4)
        delta = finetune[name].double() - base[name].double()
        assert entry["mean_diff_value"] == pytest.approx(float(delta.abs().mean()), rel=1e-6)
        assert entry["diff_rank"] == min(base[name].shape)


def test_rerank_rederives_from_the_sidecar(pair_dirs: tuple, tmp_path: Path) -> None:
    base_dir, finetune_dir, base, finetune = pair_dirs
    out, again = tmp_path / "r.json", tmp_path / "r7.json"
    assert main(["audit", str(base_dir), str(finetune_dir), "--rank", "4", "--out", str(out), "--quiet"]) == 0
    (base_dir / "model-00001-of-00002.safetensors").unlink()  # no weights are needed any more
    assert main(["rerank", str(out), "--rank", "7", "--out", str(again), "--quiet"]) == 0
    report = Report.from_json(again.read_text())
    assert report.rank == 7
    name = "model.layers.0.self_attn.q_proj.weight"
    entry = next(m for m in json.loads(again.read_text())["matrices"] if m["name"] == name)
    want = reference_metrics(base[name], finetune[name], 7)
    assert entry["at_rank"]["energy_retained"] == pytest.approx(want["energy_retained"], abs=1e-5)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command run in this process (``main`` with stdout and stderr captured, ``env`` set
    for the call): what a shell would see, without a new interpreter per case.
    ``test_a_real_process_prints_one_line_errors`` runs one case as a real process."""
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse's own errors and --help
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["lorafid", *args], code, out.getvalue(), err.getvalue())


def test_a_real_process_prints_one_line_errors(hub: HubServer) -> None:
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lorafid", "audit", "org/base", "org/missing"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert_one_line_error(result, "Repo org/base was not found", "--token or HF_TOKEN")


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no traceback
    assert lines[0].startswith("lorafid: error: ")
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def hub_env(hub: HubServer) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_errors_are_one_line_with_what_to_do(hub: HubServer, hub_env: dict[str, str], tmp_path: Path) -> None:
    base, finetune = model_pair()
    hub.add_repo("org/base", shard_files(base, 1))
    hub.add_repo("org/gated", shard_files(finetune, 1), gated=True)
    hub.add_repo("org/pickle", {"pytorch_model.bin": b"not loaded", "config.json": b"{}"})
    hub.add_repo("org/other", {"model.safetensors": save({"unrelated.weight": torch.zeros(2, 2)})})

    assert_one_line_error(run_cli("audit", "org/base", "org/missing", env=hub_env), "org/missing")
    gated = run_cli("audit", "org/base", "org/gated", env=hub_env)
    assert_one_line_error(gated, "org/gated", "licence", "token")
    assert_one_line_error(run_cli("audit", "org/base", "org/base@nope", env=hub_env), "nope")
    assert_one_line_error(run_cli("audit", "org/base", "org/pickle", env=hub_env), "never unpickles", "refs/pr/")
    assert not [r for r in hub.requests if r.path.endswith(".bin") and r.method == "GET"]
    assert_one_line_error(run_cli("audit", "org/base", "org/other", env=hub_env), "share no comparable")
    assert_one_line_error(run_cli("audit", "org/base", "../etc", env=hub_env))


def test_gated_repo_works_with_a_token_that_is_never_written(
    hub: HubServer, hub_env: dict[str, str], tmp_path: Path
) -> None:
    base, finetune = model_pair()
    hub.add_repo("org/base", shard_files(base, 1))
    hub.add_repo("org/gated", shard_files(finetune, 1), gated=True)
    out = tmp_path / "r.json"
    secret = "hf_secret_token_value_123"
    result = run_cli("audit", "org/base", "org/gated", "--token", secret, "--out", str(out), env=hub_env)
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    assert secret not in out.read_text()
    home = Path(os.environ["LORAFID_HOME"])
    for path in home.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes()


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run_cli("audit", "a/b").returncode == 2
    assert run_cli("audit", "a/b", "c/d", "--rank", "0").returncode == 2


def test_corrupt_local_file_is_a_clear_error(tmp_path: Path) -> None:
    good = write_dir(shard_files(model_pair()[0], 1), tmp_path / "good") / "model.safetensors"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    assert_one_line_error(run_cli("audit", str(good), str(bad)), "bad.safetensors")


def test_bad_include_pattern_is_one_usage_line_before_any_work(pair_dirs: tuple, isolated_home: Path) -> None:
    base_dir, finetune_dir, _, _ = pair_dirs
    result = run_cli("audit", str(base_dir), str(finetune_dir), "--include", "q_proj[")
    assert result.returncode == 2
    assert "not a valid regular expression" in result.stderr and "Traceback" not in result.stderr
    assert not (isolated_home / "store.sqlite3").exists()
    # The library says the same to callers that are not the CLI (the app, batch).
    with pytest.raises(LorafidError, match="not a valid regular expression"):
        Audit(str(base_dir), str(finetune_dir), AuditConfig(exclude="(")).plan()


def test_include_that_matches_nothing_names_the_filter_not_the_models(pair_dirs: tuple) -> None:
    base_dir, finetune_dir, _, _ = pair_dirs
    result = run_cli("audit", str(base_dir), str(finetune_dir), "--include", "no_such_module")
    assert_one_line_error(result, "'no_such_module'", "matched none of the")
    assert "share no comparable" not in result.stderr


def test_out_into_a_missing_folder_fails_before_the_audit(
    pair_dirs: tuple, tmp_path: Path, isolated_home: Path
) -> None:
    base_dir, finetune_dir, _, _ = pair_dirs
    out = tmp_path / "missing" / "report.json"
    assert_one_line_error(run_cli("audit", str(base_dir), str(finetune_dir), "--out", str(out)), "does not exist")
    assert not (isolated_home / "store.sqlite3").exists()  # nothing was opened, read or computed


def test_rerank_at_a_large_rank_keeps_columns_apart_and_files_share_a_mode(
    pair_dirs: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base_dir, finetune_dir, _, _ = pair_dirs
    out = tmp_path / "r.json"
    assert main(["audit", str(base_dir), str(finetune_dir), "--rank", "4", "--out", str(out), "--quiet"]) == 0
    assert (tmp_path / "r.spectra.safetensors").stat().st_mode == out.stat().st_mode
    assert main(["rerank", str(out), "--rank", "100000"]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("module"))
    assert header.split() == ["module", "matrices", "kept@100000", "cos.dist", "rank", "for", "90%"]
    assert "not audited: 1 embedding" in printed
    assert count_noun(2, "embedding") == "2 embeddings" and count_noun(1, "shape_mismatch") == "1 shape mismatch"


def test_rerank_of_an_incomplete_report_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text('{"schema": "lorafid.report/1"}')
    assert_one_line_error(run_cli("rerank", str(path), "--rank", "8"), "incomplete or damaged", "'base'")
    path.write_text("[1, 2]")
    assert_one_line_error(run_cli("rerank", str(path), "--rank", "8"), "Not a lorafid report")


def test_python_m_lorafid_from_the_folder_that_holds_a_clone(tmp_path: Path) -> None:
    """A clone named lorafid beside the cwd looks like a namespace package; the command still runs."""
    (tmp_path / "lorafid").symlink_to(Path(__file__).resolve().parents[2], target_is_directory=True)
    result = subprocess.run(
        [sys.executable, "-m", "lorafid", "--version"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("lorafid ")


def test_plan_closes_the_base_when_the_finetune_fails_to_open(
    pair_dirs: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_dir, _, _, _ = pair_dirs
    opened: list[Any] = []
    real_open = audit_module.open_source

    def recording_open(*args: Any, **kwargs: Any) -> Any:
        source = real_open(*args, **kwargs)
        closed = source.close
        source.closed = False

        def close() -> None:
            source.closed = True
            closed()

        source.close = close
        opened.append(source)
        return source

    monkeypatch.setattr(audit_module, "open_source", recording_open)
    job = Audit(str(base_dir), str(tmp_path / "no_such_dir"), AuditConfig())
    with pytest.raises(LorafidError, match="no such file or directory"):
        job.plan()
    assert len(opened) == 1 and opened[0].closed
    # The store the audit opened for itself is closed with it.
    job.close()
    with pytest.raises(sqlite3.ProgrammingError):
        job.store.list_audits()


def test_verbose_shows_retries_on_stderr(hub: HubServer, hub_env: dict[str, str], tmp_path: Path) -> None:
    base, finetune = model_pair()
    hub.add_repo("org/base", shard_files(base, 1))
    hub.add_repo("org/ft", shard_files(finetune, 1))
    with hub.inject(status_sequence=[503]):
        result = run_cli("--verbose", "audit", "org/base", "org/ft", "--quiet", env=hub_env)
    assert result.returncode == 0, result.stderr
    assert "lorafid: bytes " in result.stderr and "HTTP 503; retrying in" in result.stderr
    with hub.inject(status_sequence=[503]):
        quiet = run_cli("audit", "org/base", "org/ft", "--quiet", "--fresh", env=hub_env)
    assert quiet.returncode == 0 and "retrying" not in quiet.stderr
