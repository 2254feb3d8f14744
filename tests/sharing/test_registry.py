"""The results registry against the loopback Hub: publish, batch, read back, refuse, degrade.

Every write goes through huggingface_hub's ``create_repo``/``create_commit`` (preupload, LFS
batch + PUT for the spectra, NDJSON commit) and every read through ``list_repo_tree`` and
``hf_hub_download``, as against the Hub. Xet is off: the loopback Hub speaks plain LFS.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from gradio_client import Client
from huggingface_hub import CommitOperationAdd, HfApi

from lorafid.audit.engine import Audit, AuditConfig
from lorafid.audit.report import Report
from lorafid.audit.store import Store
from lorafid.errors import RegistryError, ResultSchemaError, VerificationError
from lorafid.providers.evidence import CandidateResult, Verdict
from lorafid.providers.probe_report import ProbeReport
from lorafid.sharing.hub_dataset import Registry
from lorafid.sharing.policy import probe_refusal, publish_refusal
from lorafid.sharing.records import PRECISION, TABLE_RANKS, RegistryEntry, entry_for, result_files, result_path
from lorafid.sharing.table import TABLE_HEADERS, TABLE_TYPES, table_rows
from lorafid.sharing.verify import compare, verify
from lorafid.sharing.writer import RegistrySettings, RegistryWriter
from lorafid.web.config import AppConfig
from tests.hub_server import HubServer
from tests.models import model_pair, shard_files

BASE, TUNED, TUNED2, GATED, PRIVATE = "org/base", "org/tuned", "org/tuned-2", "org/gated", "org/private"
REGISTRY = "lorafid/results"
WRITER, READER = "server-write-token", "read-only-token"


@pytest.fixture
def hub(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """The loopback Hub with a public pair, a second public fine-tune, a gated and a private one."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    base, tuned = model_pair(layers=2, dtype=torch.bfloat16)
    hub.add_repo(BASE, shard_files(base, 2))
    hub.add_repo(TUNED, shard_files(tuned, 3, offset=1))
    hub.add_repo(TUNED2, shard_files({**base, **_shifted(base, 2)}, 1))
    hub.add_repo(GATED, shard_files(tuned, 1), gated=True)
    hub.add_repo(PRIVATE, shard_files(tuned, 1), private=True)
    hub.write_tokens = {WRITER}
    return hub


def _shifted(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Another fine-tune of the same base: a rank-2 change to every matrix."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in tensors.items():
        if t.ndim == 2 and "embed" not in name:
            rows, cols = t.shape
            delta = 0.02 * torch.randn(rows, 2, generator=g) @ torch.randn(2, cols, generator=g)
            out[name] = (t.float() + delta).to(t.dtype)
    return out


def run_audit(hub: HubServer, store: Store, finetune: str = TUNED, token: str | bool = False, **kw: object) -> Report:
    config = AuditConfig(rank=8, device="cpu", endpoint=hub.endpoint, store=store, token=token, **kw)  # type: ignore[arg-type]
    with Audit(BASE, finetune, config) as job:
        for _ in job.run():
            pass
        return job.report()


def registry(hub: HubServer, tmp_path: Path, token: str | bool = WRITER, name: str = "cache") -> Registry:
    return Registry(REGISTRY, token=token, endpoint=hub.endpoint, cache_dir=tmp_path / name)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "server-a")
    yield s
    s.close()


def reference_energy_at(report: Report, rank: int) -> float:
    """Energy-weighted share kept at ``rank``, straight from the spectra with numpy."""
    kept = total = 0.0
    for m in report.matrices:
        s = np.sort(np.asarray(m.sigma_sq, dtype=np.float64))[::-1]
        kept += float(s[:rank].sum())
        total += float(s.sum())
    return kept / total


# -- naming, publishability -------------------------------------------------------------------------


def test_result_is_named_by_both_commits_settings_and_version(hub: HubServer, store: Store) -> None:
    report = run_audit(hub, store)
    path = result_path(report)
    name = f"{report.base.resolved_sha}-{report.finetune.resolved_sha}-"
    assert path.startswith(f"results/{BASE}/{TUNED}/{name}") and path.endswith(f"-lorafid{report.tool_version}.json")
    assert result_path(report.with_rank(64)) == path  # the rank only picks where numbers are read
    excluded = run_audit(hub, store, exclude="down_proj")
    assert result_path(excluded) != path  # other settings, other numbers, other file


def test_only_audits_of_two_public_repos_are_published(hub: HubServer, store: Store) -> None:
    public = run_audit(hub, store)
    gated = run_audit(hub, store, GATED, token="visitor-token")
    private = run_audit(hub, store, PRIVATE, token="visitor-token")
    assert publish_refusal(public, endpoint=hub.endpoint) is None
    assert "org/gated is gated" in str(publish_refusal(gated, endpoint=hub.endpoint))
    assert "org/private is not public" in str(publish_refusal(private, endpoint=hub.endpoint))
    # The check sends no token, whatever token the audit used.
    checks = hub.requests_matching(path_contains="/api/models/org/gated/revision/")
    assert checks and not any(r.has_authorization for r in checks)
    # The app's record of visibility when audited is used as is, without a call.
    hub.clear_requests()
    assert "was not public when audited" in str(publish_refusal(public, visibility=(True, False)))
    assert publish_refusal(public, visibility=(True, True)) is None
    assert hub.requests == []
    partial = Report(
        public.base, public.finetune, public.settings, public.matrices[:2], pending=("x",), status="partial"
    )
    assert "only complete audits" in str(publish_refusal(partial, visibility=(True, True)))


# -- write, batch, read back -------------------------------------------------------------------------


def test_published_results_are_batched_in_one_commit_and_opened_by_another_server(
    hub: HubServer, store: Store, tmp_path: Path
) -> None:
    first, second = run_audit(hub, store), run_audit(hub, store, TUNED2)
    writer = RegistryWriter(registry(hub, tmp_path), tmp_path / "server-a" / "outbox", interval_s=3600)
    writer.submit(first)
    writer.submit(second)
    assert [e.finetune for e in writer.pending()] == [TUNED, TUNED2]
    assert hub.dataset_commits == []  # submitting only writes the outbox
    assert writer.flush() == 2
    assert len(hub.dataset_commits) == 1  # both results and their index row in one commit
    ((_, _, paths),) = hub.dataset_commits
    assert len(paths) == 5 and sum(p.startswith("index/") for p in paths) == 1
    assert writer.pending() == [] and writer.flush() == 0 and len(hub.dataset_commits) == 1
    # The spectra went through the LFS batch API and a PUT, as a binary file must on the Hub.
    assert len(hub.requests_matching(method="PUT", path_contains="/lfs-upload/")) == 2

    # A second server: empty store, empty cache, no token at all.
    hub.clear_requests()
    other = registry(hub, tmp_path, token=False, name="server-b-cache")
    assert sorted((e.base, e.finetune) for e in other.entries()) == [(BASE, TUNED), (BASE, TUNED2)]
    entry = other.find(BASE, TUNED)
    assert entry is not None and entry.finetune_sha == first.finetune.resolved_sha
    opened = other.open(entry)
    assert opened.base == first.base and opened.finetune == first.finetune and opened.settings == first.settings
    assert [m.name for m in opened.matrices] == [m.name for m in first.matrices]
    for got, want in zip(opened.matrices, first.matrices, strict=True):
        assert np.array_equal(got.sigma_sq, want.sigma_sq)  # float64 spectra, bit for bit
    at_37 = opened.with_rank(37).summary().overall.energy_retained  # off the grid: needs the spectra
    assert at_37 == pytest.approx(first.with_rank(37).summary().overall.energy_retained, abs=1e-12)
    # The table's figures, against numpy from the spectra.
    for rank in TABLE_RANKS:
        assert entry.energy_at[str(rank)] == pytest.approx(reference_energy_at(first, rank), abs=1e-9)
    assert entry.rank_for_90 == first.summary().rank_for_90
    assert hub.requests and not any(r.has_authorization for r in hub.requests)


def test_permalink_lookup_by_pinned_commits_and_branch(hub: HubServer, store: Store, tmp_path: Path) -> None:
    report = run_audit(hub, store)
    reg = registry(hub, tmp_path)
    writer = RegistryWriter(reg, tmp_path / "outbox")
    writer.submit(report)
    writer.flush()
    base_sha, tuned_sha = report.base.resolved_sha or "", report.finetune.resolved_sha or ""
    assert reg.find(BASE, TUNED, base_sha, tuned_sha) is not None
    assert reg.find(BASE, TUNED, base_sha[:12], tuned_sha[:7]) is not None
    assert reg.find(BASE, f"{TUNED}@{tuned_sha[:10]}") is not None
    assert reg.find(BASE, TUNED, base_sha, "0" * 40) is None  # another commit of the fine-tune
    assert reg.find(BASE, TUNED, None, "v2") is None  # a branch it was not audited at
    assert reg.find(TUNED, BASE) is None
    with pytest.raises(RegistryError, match="registry org/never-created was not found"):
        Registry("org/never-created", endpoint=hub.endpoint, cache_dir=tmp_path / "x").entries()
    entry = reg.entry(report.base.resolved_sha or "")  # a unique prefix of the name
    assert reg.entry(entry.path).name == entry.name
    with pytest.raises(RegistryError, match="No result"):
        reg.entry("f" * 20)


def test_writer_thread_commits_what_a_previous_run_left_at_once(hub: HubServer, store: Store, tmp_path: Path) -> None:
    reports = [run_audit(hub, store), run_audit(hub, store, TUNED2)]
    for report in reports:  # queued by a server that stopped before committing them
        RegistryWriter(registry(hub, tmp_path), tmp_path / "outbox").submit(report)
    writer = RegistryWriter(registry(hub, tmp_path), tmp_path / "outbox", interval_s=3600)  # the next start
    writer.start()
    try:
        for _ in range(200):
            if not writer.pending():
                break
            time.sleep(0.05)
    finally:
        writer.close()
    assert writer.pending() == [] and writer.state.published == 2
    assert len(hub.dataset_commits) == 1  # queued before the thread started: one commit for both


def test_a_result_already_published_is_not_committed_again(hub: HubServer, store: Store, tmp_path: Path) -> None:
    report = run_audit(hub, store)
    reg = registry(hub, tmp_path)
    RegistryWriter(reg, tmp_path / "a").submit(report)
    assert RegistryWriter(reg, tmp_path / "a").flush() == 1
    again = RegistryWriter(registry(hub, tmp_path, name="b-cache"), tmp_path / "b")
    again.submit(report)  # the same pair, commits and settings on another server
    assert again.flush() == 0 and again.pending() == []
    assert len(hub.dataset_commits) == 1


def test_large_result_files_go_through_lfs_and_read_back(hub: HubServer, store: Store, tmp_path: Path) -> None:
    hub.regular_max_bytes = 1000  # the report JSON is larger: the Hub would ask for LFS
    report = run_audit(hub, store)
    writer = RegistryWriter(registry(hub, tmp_path), tmp_path / "outbox")
    writer.submit(report)
    writer.flush()
    assert len(hub.requests_matching(method="PUT", path_contains="/lfs-upload/")) == 2  # report + spectra
    opened = registry(hub, tmp_path, token=False, name="reader").open(result_path(report).rsplit("/", 1)[1])
    assert opened.to_dict()["matrices"] == report.to_dict()["matrices"]


# -- degrade, never lose -----------------------------------------------------------------------------


def test_read_only_registry_keeps_results_until_a_writable_token(hub: HubServer, store: Store, tmp_path: Path) -> None:
    report = run_audit(hub, store)
    outbox = tmp_path / "outbox"
    writer = RegistryWriter(registry(hub, tmp_path, token=READER), outbox)
    writer.submit(report)
    with pytest.raises(RegistryError, match="Could not write to the registry lorafid/results"):
        writer.flush()
    assert "403" in str(writer.state.last_error) or "read-only" in str(writer.state.last_error)
    assert "kept on this server and will be retried" in writer.note()
    assert [e.name for e in writer.pending()] == [entry_for(report).name]  # nothing lost
    assert hub.dataset_commits == []
    fixed = RegistryWriter(registry(hub, tmp_path), outbox)  # e.g. the server restarted with a write token
    assert fixed.flush() == 1 and fixed.pending() == []
    assert registry(hub, tmp_path, token=False, name="reader").find(BASE, TUNED) is not None


def test_unreachable_registry_is_a_clear_error_and_keeps_the_outbox(
    store: Store, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.utils._http as hub_http

    waits: list[float] = []
    # The client's own backoff (about 24 s of real waiting) is recorded, not slept: the same
    # retries happen, the test does not wait them out.
    monkeypatch.setattr(hub_http.time, "sleep", waits.append)
    report = run_audit(hub, store)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket closes
    down = Registry(REGISTRY, token=WRITER, endpoint=closed, cache_dir=tmp_path / "cache")
    with pytest.raises(RegistryError, match="Could not read the registry lorafid/results"):
        down.entries()  # huggingface_hub retries the connection (its backoff recorded in waits), once
    with pytest.raises(RegistryError, match="is unreachable"):
        down.open(entry_for(report))  # then reads fail at once
    writer = RegistryWriter(down, tmp_path / "outbox")
    writer.submit(report)
    with pytest.raises(RegistryError, match="Could not write"):
        writer.flush()
    assert len(writer.pending()) == 1
    assert waits and sum(waits) >= 10  # the real client did back off; only the waiting was skipped


# -- integrity ---------------------------------------------------------------------------------------


def _publish_raw(hub: HubServer, files: dict[str, bytes]) -> None:
    api = HfApi(endpoint=hub.endpoint, token=WRITER)
    api.create_repo(REGISTRY, repo_type="dataset", exist_ok=True)
    ops = [CommitOperationAdd(p, c) for p, c in files.items()]
    api.create_commit(REGISTRY, ops, commit_message="raw", repo_type="dataset")


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ("lorafid.report/2", "upgrade lorafid to open it"),
        ("lorafid.report/0", "open it with lorafid 0.0.1, or re-run the audit"),
        ("other.tool/1", "is not a lorafid result"),
    ],
)
def test_results_of_another_schema_are_refused_clearly(
    hub: HubServer, store: Store, tmp_path: Path, schema: str, message: str
) -> None:
    report = run_audit(hub, store)
    files = result_files(report)
    path = result_path(report)
    data = json.loads(files[path])
    data["schema"], data["tool_version"] = schema, "0.0.1"
    files[path] = json.dumps(data).encode()
    files["index/0000-old.jsonl"] = (entry_for(report).to_json() + "\n").encode()
    _publish_raw(hub, files)
    reg = registry(hub, tmp_path, token=False)
    with pytest.raises(ResultSchemaError, match=message):
        reg.open(reg.find(BASE, TUNED) or "")


def test_index_rows_of_an_unknown_schema_are_counted_not_misread(hub: HubServer, store: Store, tmp_path: Path) -> None:
    report = run_audit(hub, store)
    row = json.loads(entry_for(report).to_json())
    future = {**row, "schema": "lorafid.registry/9", "energy_at": "a new layout"}
    _publish_raw(hub, {**result_files(report), "index/0000-mixed.jsonl": (json.dumps(future) + "\n").encode()})
    reg = registry(hub, tmp_path, token=False)
    assert reg.entries() == [] and reg.unreadable_rows == 1
    with pytest.raises(ResultSchemaError, match="Upgrade lorafid"):
        RegistryEntry.from_dict(future)


def test_spectra_that_do_not_fit_their_report_are_refused(hub: HubServer, store: Store, tmp_path: Path) -> None:
    report = run_audit(hub, store)
    files = result_files(report)
    short = report.with_spectra({m.name: np.asarray(m.sigma_sq)[:-1] for m in report.matrices})
    spectra_file = result_path(report).removesuffix(".json") + ".spectra.safetensors"
    files[spectra_file] = result_files(short)[spectra_file]
    files["index/0000.jsonl"] = (entry_for(report).to_json() + "\n").encode()
    _publish_raw(hub, files)
    with pytest.raises(RegistryError, match="do not match its report"):
        registry(hub, tmp_path, token=False).open(entry_for(report))


def test_compare_holds_a_rerun_to_the_precision_bar(hub: HubServer, store: Store) -> None:
    report = run_audit(hub, store)
    same = compare(report, report)
    assert same.agrees and same.max_energy_diff == 0.0
    assert same.ranks_compared == sum(min(m.shape) for m in report.matrices)  # every rank of every matrix
    name = report.matrices[0].name

    def nudged(share: float) -> Report:
        """Move ``share`` of the first matrix's energy from its first to its last singular value."""
        spectra = {m.name: np.array(m.sigma_sq, dtype=np.float64) for m in report.matrices}
        moved = share * report.matrices[0].energy
        spectra[name][0] -= moved
        spectra[name][-1] += moved
        return report.with_spectra(spectra)

    assert compare(report, nudged(0.1 * PRECISION)).agrees
    off = compare(report, nudged(10 * PRECISION))
    assert not off.agrees and name in off.problems[0] and off.max_energy_diff == pytest.approx(10 * PRECISION)
    with pytest.raises(VerificationError, match=f"does not reproduce here within 1e-05: {name}"):
        verify(report, nudged(10 * PRECISION), "here")
    other_commit = Report(
        report.base,
        report.finetune.__class__(**{**report.finetune.__dict__, "resolved_sha": "0" * 40}),
        report.settings,
        report.matrices,
    )
    assert any("fine-tune was read at commit" in p for p in compare(report, other_commit).problems)


# -- settings ----------------------------------------------------------------------------------------


def test_registry_settings_from_the_environment() -> None:
    assert RegistrySettings.from_env({}) is None
    settings = RegistrySettings.from_env({"LORAFID_REGISTRY": "org/results", "LORAFID_REGISTRY_TOKEN": "hf_secret"})
    assert settings is not None and settings.repo_id == "org/results" and settings.interval_s == 60.0
    assert "hf_secret" not in repr(settings)
    with pytest.raises(RegistryError, match="not a dataset repo ID"):
        RegistrySettings.from_env({"LORAFID_REGISTRY": "no-slash"})
    with pytest.raises(RegistryError, match="INTERVAL_S"):
        RegistrySettings.from_env({"LORAFID_REGISTRY": "org/r", "LORAFID_REGISTRY_INTERVAL_S": "soon"})


# -- the CLI: audit --publish, open, audit --verify ---------------------------------------------------


@pytest.fixture
def cli_env(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "publisher-home"))
    return hub


def test_cli_publishes_opens_and_verifies(
    cli_env: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorafid.cli.commands import main

    audit = ["audit", BASE, TUNED, "--rank", "8", "--device", "cpu", "--quiet"]
    assert main([*audit, "--publish", REGISTRY, "--token", WRITER]) == 0
    published = capsys.readouterr().out
    assert f"Published to {cli_env.endpoint}/datasets/{REGISTRY}: results/{BASE}/{TUNED}/" in published
    ref = published.split(f"lorafid open {REGISTRY} ")[1].split()[0]
    assert len(cli_env.dataset_commits) == 1
    assert all(r.headers.get("authorization") == f"Bearer {WRITER}" for r in cli_env.requests if r.method == "POST")

    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "reader-home"))  # another machine: nothing stored
    out = tmp_path / "opened.json"
    assert main(["open", REGISTRY]) == 0 and "1 result(s)" in capsys.readouterr().out
    assert main(["open", REGISTRY, ref, "--rank", "13", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("Rank 13 keeps ")  # any rank, from the published spectra
    opened = Report.from_json(out.read_text())
    assert opened.rank == 13 and opened.finetune.repo_id == TUNED and (tmp_path / "opened.spectra.safetensors").exists()

    assert main(["audit", BASE, TUNED, "--device", "cpu", "--quiet", "--verify", ref, "--registry", REGISTRY]) == 0
    assert "Verified: 8 matrices" in capsys.readouterr().out
    assert main(["audit", BASE, TUNED, "--device", "cpu", "--quiet", "--verify", str(out)]) == 0  # a local copy too
    capsys.readouterr()

    # A result whose spectra were altered after the fact does not verify, and says where.
    entry = Registry(REGISTRY, token=False, endpoint=cli_env.endpoint, cache_dir=tmp_path / "c").entry(ref)
    report = Registry(REGISTRY, token=False, endpoint=cli_env.endpoint, cache_dir=tmp_path / "c").open(entry)
    name = report.matrices[3].name
    spectra = {m.name: np.array(m.sigma_sq) for m in report.matrices}
    spectra[name][0] *= 0.99
    _publish_raw(cli_env, {entry.spectra_path: result_files(report.with_spectra(spectra))[entry.spectra_path]})
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "third-home"))
    assert main(["audit", BASE, TUNED, "--device", "cpu", "--quiet", "--verify", ref, "--registry", REGISTRY]) == 1
    error = capsys.readouterr().err
    assert "does not reproduce" in error and name in error and "Traceback" not in error
    assert main(["audit", BASE, TUNED2, "--device", "cpu", "--verify", ref, "--registry", REGISTRY]) == 1
    assert f"not of {TUNED2}" in capsys.readouterr().err


def test_cli_never_publishes_a_gated_audit(cli_env: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    from lorafid.cli.commands import main

    argv = ["audit", BASE, GATED, "--rank", "8", "--device", "cpu", "--quiet", "--token", WRITER]
    assert main([*argv, "--publish", REGISTRY]) == 1
    error = capsys.readouterr().err
    assert "Not published: org/gated is gated" in error and "kept in the local store" in error
    assert cli_env.dataset_commits == [] and not cli_env.requests_matching(path_contains="/api/repos/create")


# -- the dashboard: publish in the background, open from a second server, the results table ------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(client: Client, base: str, finetune: str, rank: int = 8, token: str = "") -> list[tuple]:
    """Every streamed update of one audit through the page's endpoint, the final one last."""
    job = client.submit(base, finetune, "", "", rank, "energy_retained", token, api_name="/run_audit")
    job.result(timeout=120)
    return job.outputs()


def plain(markdown: str) -> str:
    """Markdown of untrusted text as the reader sees it (backslash escapes removed)."""
    return re.sub(r"\\(.)", r"\1", markdown)


def progress_of(outputs: tuple | list) -> str:
    """The progress line among a handler's outputs (the only text that starts like one)."""
    starts = ("Done:", "Opened", "This pair has not been audited", "Could not open")
    return plain(next(str(v) for v in outputs if isinstance(v, str) and v.startswith(starts)))


@contextlib.contextmanager
def dashboard(config: AppConfig) -> Iterator[tuple[Client, Any]]:
    """A dashboard (with its ``Dashboard`` object, to reach its writer) served on a free port."""
    app = importlib.import_module("lorafid.web.app")
    board = app.Dashboard(config)
    demo = board.build()
    demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True, **app.launch_options()
    )
    try:
        yield Client(demo.local_url, verbose=False), board
    finally:
        demo.close()
        if board.publisher is not None:
            board.publisher.close(flush=False)


def final_progress(updates: list[tuple]) -> str:
    return progress_of(updates[-1])


@pytest.fixture
def app_env(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    importlib.import_module("lorafid.web.app")  # imported before the registry is configured
    monkeypatch.setenv("LORAFID_REGISTRY", REGISTRY)
    monkeypatch.setenv("LORAFID_REGISTRY_TOKEN", WRITER)
    monkeypatch.setenv("LORAFID_REGISTRY_INTERVAL_S", "3600")  # the test commits with flush()
    return hub


def config_for(hub: HubServer, home: Path) -> AppConfig:
    return AppConfig(endpoint=hub.endpoint, store_home=home, examples_dir=home / "no-examples", device="cpu")


def test_dashboard_publishes_public_audits_only_and_a_second_server_opens_them(
    app_env: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub, visitor = app_env, "visitor-token"
    with dashboard(config_for(hub, tmp_path / "server-a")) as (client, board):
        public = run(client, BASE, TUNED, rank=8, token=visitor)
        assert f"will be published to {REGISTRY}" in final_progress(public)
        link = next(v for v in public[-1] if isinstance(v, str) and v.startswith("http") and "finetune_revision=" in v)
        gated = run(client, BASE, GATED, rank=8, token=visitor)
        assert f"Not published: {GATED} was not public when audited" in final_progress(gated)
        board.publisher.flush()  # the writer's thread may have committed the first result already
        assert board.publisher.pending() == [] and len(hub.dataset_commits) == 1
        # Every registry request carried the server's own token; the visitor's never reached it.
        registry_requests = [
            r for r in hub.requests if any(p in r.path for p in ("datasets", "/api/repos/", "/lfs-upload/"))
        ]
        assert len([r for r in registry_requests if r.method in ("POST", "PUT")]) >= 4  # create, preupload, LFS, commit
        assert all(
            r.headers.get("authorization") == f"Bearer {WRITER}" for r in registry_requests if r.method == "POST"
        )
        assert not any(visitor in r.headers.get("authorization", "") for r in registry_requests)
    files = hub.dataset_files(REGISTRY)
    assert [p for p in files if p.startswith("results/")] == [
        p for p in files if p.startswith(f"results/{BASE}/{TUNED}/")
    ]  # the gated audit is not there
    assert not any(GATED in content.decode("latin-1") for content in files.values())

    # A second server: an empty store, no write token. The pinned link opens from the registry.
    monkeypatch.delenv("LORAFID_REGISTRY_TOKEN")
    with dashboard(config_for(hub, tmp_path / "server-b")) as (client, board):
        assert board.publisher is None
        query = "?" + link.split("?", 1)[1]
        opened = client.predict(query, 8, "energy_retained", api_name="/open_link")
        assert re.match(r"Opened from .*registry", progress_of(opened))
        assert any(str(v).startswith("**Rank 8 keeps") for v in opened)  # the summary card
        gallery = next(v for v in opened if isinstance(v, dict) and "samples" in v)
        assert any(TUNED in row[0] and "published" in row[0] for row in gallery["samples"])
        table = client.predict("All base models", api_name="/results_table")
        frame = table[0]
        assert len(frame["data"]) == 1 and TUNED in frame["data"][0][0]
        assert "1 published audit(s)." in table[2]
    assert Store(tmp_path / "server-b").list_audits() == []  # opened from the registry, not recomputed


def test_dashboard_with_a_read_only_registry_keeps_everything_here(
    app_env: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFID_REGISTRY_TOKEN", READER)
    with dashboard(config_for(app_env, tmp_path / "server")) as (client, board):
        updates = run(client, BASE, TUNED, rank=8)
        link = next(v for v in updates[-1] if isinstance(v, str) and v.startswith("http") and "finetune_revision=" in v)
        with pytest.raises(RegistryError):
            board.publisher.flush()
        note = board.publisher.note()
        assert "could not be written" in note and "1 result(s) are kept on this server" in note
        opened = client.predict("?" + link.split("?", 1)[1], 8, "mse", api_name="/open_link")
        assert re.match(r"Opened from .*store", progress_of(opened))  # the local store still serves it
        assert app_env.dataset_commits == []
    assert len(RegistryWriter(registry(app_env, tmp_path), tmp_path / "server" / "registry-outbox").pending()) == 1


def test_results_table_rows_filter_and_link(hub: HubServer, store: Store, tmp_path: Path) -> None:
    reg = registry(hub, tmp_path)
    writer = RegistryWriter(reg, tmp_path / "outbox")
    first, second = run_audit(hub, store), run_audit(hub, store, TUNED2)
    writer.submit(first)
    writer.submit(second)
    writer.flush()
    entries = reg.entries()
    rows = table_rows(entries, hub_url="https://hub.example", registry=reg)
    assert len(rows) == 2 and all(len(r) == len(TABLE_HEADERS) == len(TABLE_TYPES) for r in rows)
    row = next(r for r in rows if TUNED2 in r[0])
    sha = second.finetune.resolved_sha or ""
    assert row[0] == f"[{TUNED2}](https://hub.example/{TUNED2}/tree/{sha}) @{sha[:7]}"
    assert row[2:6] == [round(100 * reference_energy_at(second, r), 3) for r in TABLE_RANKS]
    assert row[6] == second.summary().rank_for_90
    assert f"finetune_revision={sha}" in row[-1] and "/blob/main/results/" in row[-1]
    assert table_rows(entries, hub_url="", registry=reg, base="org/other") == []


# -- provider checks ---------------------------------------------------------------------------------

SENTENCE = "The endpoint serves the fine-tune at rank 64 or above (closest: rank 64, lora-only)."


def probe_document(report: Report, finetune: str = TUNED, status: str = "complete") -> dict[str, Any]:
    """A provider check of the audited pair, as ``Probe.run`` writes it, from a real ``ProbeReport``."""
    candidates = {
        name: CandidateResult(name, d, (d * 0.8, d * 1.2), 0.9, 0.1, d, d > 0.01, rank, "lora-only" if rank else None)
        for name, d, rank in (("rank 64 (lora-only)", 0.002, 64), ("fine-tune", 0.004, None), ("base", 0.3, None))
    }
    verdict = Verdict(SENTENCE, "rank 64 (lora-only)", True, ("rank 64 (lora-only)", "fine-tune"), (32, None), 0.01)
    side = {"base": report.base, "finetune": report.finetune}
    probe = ProbeReport(
        status=status,
        endpoint_host="api.example.com",
        model="served/model",
        method="completions",
        channels_tried=[],
        base={"spec": BASE, "repo_id": BASE, "revision": None, "sha": side["base"].resolved_sha},
        finetune={"spec": finetune, "repo_id": finetune, "revision": None, "sha": side["finetune"].resolved_sha},
        prompt_set={"name": "default", "count": 3},
        settings={"ranks": [64]},
        requests={"announced": 3, "max": 3, "sent": 3},
        candidates=candidates,
        verdict=verdict,
        prompts=[],
        failed_prompts={},
    )
    return probe.to_dict()


def test_published_provider_check_shows_in_a_second_readers_table(hub: HubServer, store: Store, tmp_path: Path) -> None:
    audited = run_audit(hub, store)
    writer = RegistryWriter(registry(hub, tmp_path), tmp_path / "outbox", interval_s=3600)
    writer.submit(audited)
    document = probe_document(audited)
    # Whatever a document might carry besides, only the chosen fields are published.
    document |= {"api_key": "sk-secret-key", "endpoint": "https://api.example.com/v1/secret-path?key=sk-q"}
    path = writer.submit_probe(document)
    assert path.startswith(f"probes/{BASE}/{TUNED}/{audited.base.resolved_sha}-{audited.finetune.resolved_sha}-")
    assert writer.flush() == 2 and len(hub.dataset_commits) == 1  # the audit and the check, one commit
    assert writer.pending_probes() == [] and writer.flush() == 0

    other = registry(hub, tmp_path, token=False, name="server-b-cache")
    (published,) = other.probes()
    assert published["endpoint_host"] == "api.example.com" and published["model"] == "served/model"
    assert published["verdict"]["sentence"] == SENTENCE and published["verdict"]["matches"] is True
    assert published["distances"]["rank 64 (lora-only)"]["distance"] == pytest.approx(0.002)
    assert (published["base_sha"], published["finetune_sha"]) == (
        audited.base.resolved_sha,
        audited.finetune.resolved_sha,
    )
    raw = (other.cache_dir / path).read_text()
    for secret in ("sk-secret", "sk-q", "/v1", "secret-path", "https://"):
        assert secret not in raw

    rows = table_rows(other.entries(), hub_url="", registry=other, probes=other.probes())
    column = TABLE_HEADERS.index("Provider checks")
    assert len(TABLE_HEADERS) == len(TABLE_TYPES) and TABLE_TYPES[column] == "str"
    assert rows[0][column] == f"api.example.com · served/model: {SENTENCE}"
    assert rows[0][-1].startswith("[JSON]")
    # A newer check of the same provider and model replaces the older in the cell; another provider adds a line.
    newer = probe_document(audited) | {"endpoint_host": "other.example.org"}
    writer.submit_probe(newer)
    writer.flush()
    cell = table_rows(other.entries(), hub_url="", registry=other, probes=other.probes(refresh=True))[0][column]
    assert cell.splitlines() == [
        f"api.example.com · served/model: {SENTENCE}",
        f"other.example.org · served/model: {SENTENCE}",
    ]
    # A check of another pair (or other commits) is not shown in this row.
    elsewhere = other.probes()[0] | {"finetune_sha": "0" * 40}
    assert table_rows(other.entries(), hub_url="", registry=other, probes=[elsewhere])[0][column] == ""


def test_readers_at_once_download_each_file_once_and_all_get_it(hub: HubServer, store: Store, tmp_path: Path) -> None:
    """The dashboard reads the registry from several handlers at once (the results table, a
    permalink, another visitor). Each file not yet cached is downloaded once and every reader
    gets its bytes. Before, concurrent downloads of one path raced, and a reader could find the
    file gone between its download and its read (FileNotFoundError, seen in a CI run)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    audited = run_audit(hub, store)
    writer = RegistryWriter(registry(hub, tmp_path), tmp_path / "outbox", interval_s=3600)
    writer.submit(audited)
    path = writer.submit_probe(probe_document(audited))
    writer.flush()
    reader = registry(hub, tmp_path, token=False, name="reader-cache")
    hub.clear_requests()
    start = threading.Barrier(8)

    def read_at_once(_: int) -> list[dict[str, Any]]:
        start.wait()
        return reader.probes(refresh=True)

    with ThreadPoolExecutor(max_workers=8) as pool:
        seen = list(pool.map(read_at_once, range(8)))
    assert all(len(found) == 1 and found[0]["path"] == path for found in seen)
    file_name = path.rsplit("/", 1)[-1]
    downloads = [r for r in hub.requests_matching(method="GET", path_contains=file_name) if "/resolve/" in r.path]
    assert len(downloads) == 1, [r.path for r in downloads]


def test_provider_checks_of_gated_or_private_pairs_are_never_published(hub: HubServer, store: Store) -> None:
    public = run_audit(hub, store)
    gated = run_audit(hub, store, GATED, token="visitor-token")
    private = run_audit(hub, store, PRIVATE, token="visitor-token")
    assert probe_refusal(probe_document(public), endpoint=hub.endpoint) is None
    assert "org/gated is gated" in str(probe_refusal(probe_document(gated, GATED), endpoint=hub.endpoint))
    assert "org/private is not public" in str(probe_refusal(probe_document(private, PRIVATE), endpoint=hub.endpoint))
    checks = hub.requests_matching(path_contains="/api/models/org/gated/revision/")
    assert checks and not any(r.has_authorization for r in checks)  # the check sends no token
    partial = probe_document(public, status="partial")
    assert "only complete provider checks" in str(probe_refusal(partial, endpoint=hub.endpoint))
    unpinned = probe_document(public)
    unpinned["finetune"]["sha"] = None
    assert "not of two Hub repos pinned to commits" in str(probe_refusal(unpinned, endpoint=hub.endpoint))


def test_dashboard_publishes_provider_checks_of_public_pairs_into_the_results_table(
    app_env: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: Store
) -> None:
    hub = app_env
    public, gated = run_audit(hub, store), run_audit(hub, store, GATED, token="visitor-token")
    with dashboard(config_for(hub, tmp_path / "server-a")) as (client, board):
        run(client, BASE, TUNED, rank=8)
        said = board._publish_probe(probe_document(public))
        assert REGISTRY in said and "Not published" not in said  # queued, or committed already by the thread
        assert f"Not published: {GATED} is gated" in board._publish_probe(probe_document(gated, GATED))
        board.publisher.flush()
    assert not any(p.startswith(f"probes/{BASE}/{GATED}") for p in hub.dataset_files(REGISTRY))
    monkeypatch.delenv("LORAFID_REGISTRY_TOKEN")
    with dashboard(config_for(hub, tmp_path / "server-b")) as (client, board):
        frame = client.predict("All base models", api_name="/results_table")[0]
        assert frame["headers"] == list(TABLE_HEADERS)
        (row,) = frame["data"]
        assert row[TABLE_HEADERS.index("Provider checks")] == f"api.example.com · served/model: {SENTENCE}"


def test_a_text_channel_check_is_published_with_its_gaps(hub: HubServer, store: Store) -> None:
    """A check read from sampled text has log-likelihood gaps, not KL distances: it publishes them."""
    from lorafid.providers.text_evidence import TextCandidate
    from lorafid.sharing.probes import probe_summary

    audited = run_audit(hub, store)
    document = probe_document(audited)
    document["method"] = "completions-text"
    document["candidates"] = {
        name: asdict(TextCandidate(name, -1.2 - gap, gap, (gap * 0.5, gap * 1.5), 0.1, 0.5, gap > 0, rank, None))
        for name, gap, rank in (("rank-64", 0.0, 64), ("finetune", 0.02, None), ("base", 0.9, None))
    }
    summary = probe_summary(document)
    assert summary["method"] == "completions-text"
    assert summary["distances"]["base"] == {"distance": 0.9, "interval": [0.45, 0.9 * 1.5]}


# -- the public table of providers --------------------------------------------------------------------


def summary_of(host: str, model: str, created: str, sentence: str, **extra: Any) -> dict[str, Any]:
    """A published provider check as ``Registry.probes()`` returns it."""
    return {
        "endpoint_host": host,
        "model": model,
        "created": created,
        "method": "completions",
        "requests": 40,
        "base": BASE,
        "finetune": TUNED,
        "base_sha": "b" * 40,
        "finetune_sha": "f" * 40,
        "verdict": {"sentence": sentence, "matches": True},
        "path": f"probes/{BASE}/{TUNED}/x.json",
    } | extra


def test_provider_rows_are_the_latest_check_per_host_and_model() -> None:
    from lorafid.sharing.table import PROVIDER_HEADERS, PROVIDER_TYPES, PROVIDER_WIDTHS, provider_rows

    reg = SimpleNamespace(url="https://hub/datasets/lorafid/results")
    probes = [
        summary_of("b.example", "m", "2026-12-02T10:00:00", "newer"),
        summary_of("b.example", "m", "2026-12-01T10:00:00", "older"),
        summary_of("a.example", "m", "2026-12-01T09:00:00", "by text", method="completions-greedy", requests=0),
        summary_of("b.example", "other", "2026-12-01T08:00:00", "another model"),
    ]
    rows = provider_rows(probes, hub_url="https://hub", registry=reg)  # type: ignore[arg-type]
    assert len(PROVIDER_HEADERS) == len(PROVIDER_TYPES) == len(PROVIDER_WIDTHS) == len(rows[0])
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("a.example", "m", "by text"),
        ("b.example", "m", "newer"),  # the older check of the same host and model is replaced
        ("b.example", "other", "another model"),
    ]
    column = dict(zip(PROVIDER_HEADERS, rows[1], strict=True))
    assert (column["Channel"], column["Requests"], column["Checked"]) == ("logprobs", 40, "2026-12-02")
    assert rows[0][3] == "text (greedy)" and rows[0][4] is None  # a count not kept is not shown as 0
    assert column["Fine-tune on base"] == (
        f"[{TUNED}](https://hub/{TUNED}/tree/{'f' * 40}) @fffffff "
        f"on [{BASE}](https://hub/{BASE}/tree/{'b' * 40}) @bbbbbbb"
    )
    assert column["Links"].startswith(f"[JSON]({reg.url}/blob/main/probes/{BASE}/{TUNED}/x.json) · [audit](?base=")
    assert column["Links"].endswith("[provider](?provider=b.example)")
    only = provider_rows(probes, hub_url="https://hub", registry=reg, host="a.example")  # type: ignore[arg-type]
    assert [r[0] for r in only] == ["a.example"]


def test_dashboard_table_of_providers_sorts_filters_links_and_keeps_nothing_private(
    app_env: HubServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    store: Store,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import gradio as gr

    from lorafid.cli.commands import main
    from lorafid.sharing.table import PROVIDER_HEADERS

    hub = app_env
    audited = run_audit(hub, store)
    writer = RegistryWriter(registry(hub, tmp_path), tmp_path / "outbox", interval_s=3600)
    for host in ("api.example.com", "other.example.org"):
        document = probe_document(audited) | {"endpoint_host": host, "api_key": "sk-secret-key"}
        document["endpoint"] = f"https://{host}/v1/secret-path?key=sk-q"
        writer.submit_probe(document)
    writer.flush()
    monkeypatch.delenv("LORAFID_REGISTRY_TOKEN")
    with dashboard(config_for(hub, tmp_path / "reader")) as (client, board):
        frame, hosts, note, cards = client.predict("All providers", api_name="/providers_table")
        assert frame["headers"] == list(PROVIDER_HEADERS)
        assert [r[0] for r in frame["data"]] == ["api.example.com", "other.example.org"]
        assert hosts["value"] == "All providers" and "2 provider check(s)" in note
        assert cards.count('class="card"') == 2 and "api.example.com" in cards
        linked = client.predict("?provider=other.example.org", api_name="/providers_link")
        assert [r[0] for r in linked[0]["data"]] == ["other.example.org"] and linked[1]["value"] == "other.example.org"
        tab = board.providers_link("?provider=other.example.org")[board.tabs]
        assert tab.selected == "published-results"  # the link opens this tab
        assert board.providers_link("")[board.tabs] == gr.update()  # a plain page stays on its first tab
        unknown = client.predict("?provider=nobody.example", api_name="/providers_link")
        assert len(unknown[0]["data"]) == 2 and "No published check of nobody" in unknown[2]
        everything = str(frame) + cards
        for secret in ("sk-secret", "sk-q", "/v1", "secret-path", "https://api.example.com"):
            assert secret not in everything
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    capsys.readouterr()
    assert main(["open", "--providers", REGISTRY, "--host", "other.example.org"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("other.example.org · served/model  [logprobs, 3 requests, ")
    assert (
        out[1] == f"  {TUNED}@{audited.finetune.resolved_sha[:7]} vs {BASE}@{audited.base.resolved_sha[:7]}: {SENTENCE}"
    )
    assert out[-1].startswith("1 provider check(s) of other.example.org in ")
