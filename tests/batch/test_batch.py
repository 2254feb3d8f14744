"""Catalogue audits on a local Ray instance against the loopback Hub.

One Ray instance serves the whole module (starting one costs ~7 s on 2 cores). Reports of
the batch are compared with the CLI's, key for key, with only timings and the creation time
left out; losses in the table are checked against a float64 SVD of the models' tensors.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lorafid.audit import spectrum as sp
from lorafid.audit.engine import Audit, AuditConfig
from lorafid.audit.report import load_spectra
from lorafid.audit.store import Store
from lorafid.batch.catalogue import CataloguePair, load_catalogue, parse_csv, parse_yaml
from lorafid.batch.cluster import check_reachable, connect, import_ray
from lorafid.batch.driver import Batch, BatchOptions, BatchProgress, _Driver, _keep, run_batch
from lorafid.cli.commands import main
from lorafid.errors import CatalogueError, LorafidError, MissingExtraError, RayClusterError
from tests.hub_server import HubServer
from tests.models import model_pair, shard_files, write_dir

RANK = 8

# -- catalogues (no Ray) -------------------------------------------------------------------


def test_a_cluster_address_nobody_answers_at_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(import_ray(), "is_initialized", lambda: False)  # connect() must try
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}")
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", "auto"):
        with pytest.raises(RayClusterError, match=f"^Nothing answers at 127.0.0.1:{port} .*use --ray local.$"):
            connect(address)
    check_reachable("auto")  # left to Ray: RAY_ADDRESS or the cluster `ray start` runs here


def test_a_report_from_another_node_is_copied_into_the_driver_store(tmp_path: Path) -> None:
    """On a cluster a task writes to its node's store; the driver files the returned report in its own."""
    base, finetune = model_pair(layers=1)
    base_dir = write_dir(shard_files(base, 1), tmp_path / "base")
    finetune_dir = write_dir(shard_files(finetune, 1), tmp_path / "finetune")
    with Audit(str(base_dir), str(finetune_dir), AuditConfig(rank=RANK, store=Store(tmp_path / "node"))) as job:
        for _ in job.run():
            pass
        report, key = job.report(), job.key
    driver_store = Store(tmp_path / "driver")
    _keep(driver_store, key, report)
    copied = driver_store.load_report(key)
    assert copied is not None and copied.status == "complete"
    assert copied.matrices == report.matrices and copied.vectors == report.vectors
    assert all(np.array_equal(a.sigma_sq, b.sigma_sq) for a, b in zip(copied.matrices, report.matrices, strict=True))
    assert driver_store.find(str(base_dir), str(finetune_dir)) == key  # what the next batch run skips by


def test_options_are_checked() -> None:
    with pytest.raises(LorafidError, match="split must be at least 1; max_concurrent must be at least 1"):
        BatchOptions(split=0, max_concurrent=0)


def test_csv_and_yaml_catalogues_read_the_same_pairs(tmp_path: Path) -> None:
    csv_text = (
        "label,base,finetune,base_revision,finetune_revision,rank,split\n"
        "first,org/base,org/a,,,16 64,\n"
        "\n"
        "# a comment row,,,,,,\n"
        ",org/base@v1,org/b,,v2,8,4\n"
    )
    yaml_text = (
        "pairs:\n"
        "  - {label: first, base: org/base, finetune: org/a, ranks: [16, 64]}\n"
        "  - {base: org/base@v1, finetune: org/b, finetune_revision: v2, rank: 8, split: 4}\n"
    )
    want = [
        CataloguePair("org/base", "org/a", ranks=(16, 64), label="first"),
        CataloguePair("org/base@v1", "org/b", finetune_revision="v2", ranks=(8,), split=4),
    ]
    assert parse_csv(csv_text) == want
    assert parse_yaml(yaml_text) == want
    (tmp_path / "c.yml").write_text(yaml_text)
    assert load_catalogue(tmp_path / "c.yml") == want
    assert want[1].name == "org/b" and want[0].name == "first"


def test_catalogue_errors_name_every_bad_row(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="header row needs columns finetune"):
        parse_csv("base,fine_tune\norg/a,org/b\n")
    bad = "base,finetune,rank,split,colour\norg/a,org/b,0,,\norg/a,,8,,\norg/a,org/c,x,two,\norg/a,org/d,,,red\n"
    with pytest.raises(CatalogueError) as caught:
        parse_csv(bad, where="cat.csv")
    message = str(caught.value)
    for needle in (
        "row 2: '0' in the rank is not a positive whole number",
        "row 3: finetune is missing",
        "row 4: 'x' in the rank",
        "row 5: unknown field(s) colour",
    ):
        assert needle in message
    with pytest.raises(CatalogueError, match="item 2: same pair as item 1"):
        parse_yaml("- {base: a/b, finetune: c/d, rank: 8}\n- {base: a/b, finetune: c/d, rank: 16}\n")
    with pytest.raises(CatalogueError, match="not valid YAML"):
        parse_yaml("- {base: [")
    with pytest.raises(CatalogueError, match=r"must end in \.csv"):
        (tmp_path / "c.txt").write_text("x")
        load_catalogue(tmp_path / "c.txt")


# -- Ray -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One local Ray for the module: 2 CPUs, no dashboard, a small object store, quiet workers.

    Workers get an empty HF_HOME and HF_TOKEN, so no login of this machine reaches the test Hub.
    """
    ray = import_ray()
    worker_hf_home = tmp_path_factory.mktemp("worker_hf_home")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HOME": str(worker_hf_home), "HF_TOKEN": "", "HF_HUB_DISABLE_TELEMETRY": "1"}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def strip_volatile(report_json: str) -> dict[str, Any]:
    document = json.loads(report_json)
    del document["timings"], document["created"]
    return document


def cli_report(
    hub: HubServer, base: str, finetune: str, rank: int, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """``lorafid audit`` in this process, with a store of its own (it computes everything)."""
    monkeypatch.setenv("LORAFID_HOME", str(directory / "home"))
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    directory.mkdir(exist_ok=True)
    out = directory / f"{finetune.replace('/', '_')}-{rank}.json"
    assert main(["audit", base, finetune, "--rank", str(rank), "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    return out


def reference_loss(base: dict[str, torch.Tensor], finetune: dict[str, torch.Tensor], rank: int) -> float:
    """Energy-weighted share of Δ lost at ``rank`` over the 2-D blocks, from a float64 SVD."""
    lost = total = 0.0
    for name, tensor in base.items():
        if tensor.ndim != 2 or "embed" in name:
            continue
        sigma_sq = torch.linalg.svdvals(finetune[name].double() - tensor.double()).square()
        lost += float(sigma_sq[rank:].sum())
        total += float(sigma_sq.sum())
    return lost / total


def tensor_reads(hub: HubServer) -> list[str]:
    """CDN range requests for tensor bytes (header probes start at byte 0)."""
    return [r.range for r in hub.requests if r.origin == "cdn" and r.range and not r.range.startswith("bytes=0-")]


def test_batch_equals_the_cli_records_failures_and_skips_finished_pairs(
    ray_local: Any, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {name: model_pair(layers=2, seed=seed) for seed, name in enumerate(("a", "b", "c"))}
    base = models["a"][0]
    hub.add_repo("org/base", shard_files(base, 2))
    for name, (_, finetune) in models.items():
        # fine-tunes of one base: its tensors, another seed's deltas
        tuned = {
            n: (base[n].float() + finetune[n].float() - models[name][0][n].float()).to(base[n].dtype) for n in base
        }
        models[name] = (base, tuned)
        hub.add_repo(f"org/ft-{name}", shard_files(tuned, 3, offset=1))
    hub.add_repo("org/corrupt", {"model.safetensors": (10**9).to_bytes(8, "little") + b"{}"})
    hub.add_repo("org/gated", shard_files(models["a"][1], 1), gated=True)
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text(
        "base,finetune,rank,label\n"
        "org/base,org/ft-a,4 8,first\n"
        "org/base,org/missing,,\n"
        "org/base,org/ft-b,,\n"
        "org/base,org/corrupt,,\n"
        "org/base,org/ft-c,16,\n"
        "org/base,org/gated,,\n"
    )
    pairs = load_catalogue(catalogue)
    home, out = tmp_path / "home", tmp_path / "out"
    options = BatchOptions(rank=RANK, endpoint=hub.endpoint, store_home=home, progress=False)

    result = run_batch(pairs, options, out=out)

    statuses = [o.status for o in result.outcomes]
    assert statuses == ["complete", "failed", "complete", "failed", "complete", "failed"]
    errors = [o.error or "" for o in result.failed]
    assert "org/missing was not found" in errors[0]
    assert "model.safetensors" in errors[1] and "org/corrupt" in errors[1]
    assert "gated" in errors[2] and "token" in errors[2]
    # Each report equals the CLI's, and so do its spectra.
    for outcome in (o for o in result.outcomes if o.status == "complete"):
        pair = outcome.pair
        assert outcome.report_file is not None and not outcome.from_store
        batch_file = out / outcome.report_file
        cli_file = cli_report(hub, pair.base, pair.finetune, (pair.ranks or (RANK,))[0], tmp_path / "cli", monkeypatch)
        assert strip_volatile(batch_file.read_text()) == strip_volatile(cli_file.read_text())
        batch_spectra = load_spectra(batch_file.with_name(batch_file.stem + ".spectra.safetensors"))
        cli_spectra = load_spectra(cli_file.with_name(cli_file.stem + ".spectra.safetensors"))
        assert batch_spectra.keys() == cli_spectra.keys()
        assert all(np.array_equal(batch_spectra[k], cli_spectra[k]) for k in cli_spectra)

    # The table: one row per pair and rank, worst loss first, failures last in catalogue order.
    table = json.loads((out / "table.json").read_text())
    rows = table["rows"]
    assert table["schema"] == "lorafid.batch/2"
    assert [(r["label"], r["rank"]) for r in rows if r["status"] == "failed"] == [
        ("org/missing", RANK),
        ("org/corrupt", RANK),
        ("org/gated", RANK),
    ]
    done = [r for r in rows if r["status"] == "complete"]
    assert sorted((r["label"], r["rank"]) for r in done) == [
        ("first", 4),
        ("first", 8),
        ("org/ft-b", 8),
        ("org/ft-c", 16),
    ]
    assert [r["loss"] for r in done] == sorted((r["loss"] for r in done), reverse=True)
    for row in done:
        name = row["finetune"].removeprefix("org/ft-")
        assert row["loss"] == pytest.approx(reference_loss(*models[name], row["rank"]), abs=1e-6)
        assert row["gallery_ref"].startswith("store:") and (out / row["report_file"]).is_file()
    csv_rows = (out / "table.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(rows) and csv_rows[1].startswith(rows[0]["label"] + ",")
    # The store (the dashboard's gallery) holds the three complete pairs.
    stored = {a.key: a.status for a in Store(home).list_audits()}
    assert {r["gallery_ref"].removeprefix("store:") for r in done} <= {k for k, s in stored.items() if s == "complete"}

    # Run again: finished pairs come from the store after one metadata request per repo (their
    # commits now); failed ones are retried.
    hub.clear_requests()
    again = run_batch(pairs, options, out=out)
    assert [o.status for o in again.outcomes] == statuses
    assert [o.from_store for o in again.outcomes] == [True, False, True, False, True, False]
    finished_repos = ("org/ft-a", "org/ft-b", "org/ft-c")
    for repo in finished_repos:
        assert [r.path for r in hub.requests if repo in r.path] == [f"/api/models/{repo}"]
    assert tensor_reads(hub) == []  # the failed pairs fail again while planning
    again_rows = json.loads((out / "table.json").read_text())["rows"]
    assert [r["nodes"] for r in again_rows if r["status"] == "complete"] == ["store"] * len(done)
    assert [{**r, "nodes": ""} for r in again_rows] == [{**r, "nodes": ""} for r in rows]


def test_token_reaches_tasks_through_their_environment_only(
    ray_local: Any, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "hf_batch_secret_token_456"
    hub.valid_tokens = {secret}
    base, finetune = model_pair(layers=1)
    hub.add_repo("org/base", shard_files(base, 1))
    hub.add_repo("org/gated", shard_files(finetune, 1), gated=True)
    pairs = [CataloguePair("org/base", "org/gated")]
    home, out = tmp_path / "home", tmp_path / "out"
    options = BatchOptions(rank=RANK, endpoint=hub.endpoint, store_home=home, token=secret, progress=False)

    result = run_batch(pairs, options, out=out)

    assert [o.status for o in result.outcomes] == ["complete"], result.outcomes[0].error
    assert any(r.has_authorization for r in hub.requests_matching(origin="hub", path_contains="org/gated"))
    assert not any(r.has_authorization for r in hub.requests_matching(origin="cdn"))
    # What Ray receives as the task's arguments holds no token, nor its options: tasks ask the
    # driver's holder actor for it.
    driver = _Driver(ray_local, pairs, options, Store(home), None, {}, token=secret)
    assert secret.encode() not in pickle.dumps(driver._task(0))
    assert "runtime_env" not in driver.task_options and secret not in repr(driver.task_options)
    assert [type(actor).__name__ for actor in driver.secret] == ["ActorHandle"]
    assert ray_local.get(driver.secret[0].get.remote()) == secret and secret not in repr(driver.secret)
    driver.close()
    assert secret not in repr(options)
    for path in [*out.rglob("*"), *home.rglob("*")]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


class KillOnce:
    """The audit's math, except that the first task to reach matrix ``after + 1`` kills its worker.

    ``os._exit`` ends the worker process at once, as the OOM killer or a lost node would:
    no exception reaches Ray, which sees a dead worker and retries the task.
    """

    def __init__(self, marker: Path, after: int) -> None:
        self.marker, self.after, self.calls = marker, after, 0

    def __call__(self, kernel: Any, base: torch.Tensor, finetune: torch.Tensor) -> sp.DeltaSpectrum:
        self.calls += 1
        if self.calls > self.after and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return kernel(base, finetune)


def test_a_killed_worker_is_retried_and_resumes_from_the_stored_matrices(
    ray_local: Any, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, finetune = model_pair(layers=4, seed=3)
    hub.add_repo("org/base", shard_files(base, 2))
    hub.add_repo("org/ft", shard_files(finetune, 3, offset=1))
    marker, home = tmp_path / "killed", tmp_path / "home"
    kept = 6  # of 16 matrices, stored before the worker dies
    options = BatchOptions(
        rank=RANK,
        endpoint=hub.endpoint,
        store_home=home,
        max_retries=1,
        compute=KillOnce(marker, after=kept),
        progress=False,
    )

    result = run_batch([CataloguePair("org/base", "org/ft")], options, out=tmp_path / "out")

    assert marker.exists(), "the worker was not killed"
    outcome = result.outcomes[0]
    assert outcome.status == "complete", outcome.error
    reads = len(tensor_reads(hub))
    cli_file = cli_report(hub, "org/base", "org/ft", RANK, tmp_path / "cli", monkeypatch)
    assert strip_volatile((tmp_path / "out" / str(outcome.report_file)).read_text()) == strip_volatile(
        cli_file.read_text()
    )
    # A run from scratch reads 16 matrices + 4 norms, one range per side each: 40 reads. The
    # retry reads only the 10 missing matrices; beyond those, only what the dead worker had in
    # flight is read twice: the matrix it died on, the 2 queued for it and the 1 being fetched.
    clean = 2 * (16 + 4)
    assert clean + 2 <= reads <= clean + 2 * 4, reads
    assert reads < clean + 2 * (4 + kept)  # what a retry from scratch would at least cost

    # A worker lost more often than Ray retries: that pair fails with a clear line, the other completes.
    for i in (1, 2):
        small_base, small_finetune = model_pair(layers=1, seed=10 + i)
        hub.add_repo(f"org/base-{i}", shard_files(small_base, 1))
        hub.add_repo(f"org/ft-{i}", shard_files(small_finetune, 1))
    pairs = [CataloguePair(f"org/base-{i}", f"org/ft-{i}") for i in (1, 2)]
    lost = run_batch(pairs, replace(options, max_retries=0, compute=KillOnce(tmp_path / "killed-2", after=0)))
    assert sorted(o.status for o in lost.outcomes) == ["complete", "failed"]
    assert lost.failed[0].error == (
        "the worker running this pair was lost once (WorkerCrashedError); see `ray logs` on its node"
    )


def test_split_pair_through_the_cli_equals_the_unsplit_audit(
    ray_local: Any, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    base, finetune = model_pair(layers=4, seed=5)
    hub.add_repo("org/base", shard_files(base, 2))
    hub.add_repo("org/ft", shard_files(finetune, 3, offset=1))
    catalogue = tmp_path / "catalogue.yaml"
    catalogue.write_text(
        "- {base: org/base, finetune: org/ft, split: 2, label: split}\n- {base: org/base, finetune: org/nope}\n"
    )
    home, out = tmp_path / "home", tmp_path / "out"
    monkeypatch.setenv("LORAFID_HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)

    code = main(["batch", str(catalogue), "--out", str(out), "--rank", str(RANK)])

    captured = capsys.readouterr()
    assert code == 1  # one pair failed; the other completed
    error_lines = [line for line in captured.err.splitlines() if line.startswith("lorafid: error:")]
    assert error_lines == [
        f"lorafid: error: 1 of 2 pairs failed (org/nope); their errors are in {out / 'table.csv'}. "
        "Run the same command again to retry them."
    ]
    assert "split" in captured.out and "org/nope: Repo org/nope was not found" in captured.out
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert rows[0]["label"] == "split" and rows[0]["status"] == "complete"
    # The chunks ran as tasks of their own: layers 0-1 and 2-3, 8 matrices each, in the parts store.
    parts = Store(home / "parts")
    chunk_keys = [a.key for a in parts.list_audits()]
    assert sorted(len(parts.matrices(k)) for k in chunk_keys) == [8, 8]
    assert {m.layer for k in chunk_keys for m in parts.matrices(k).values()} == {0, 1, 2, 3}
    # The merged report is the unsplit one.
    cli_file = cli_report(hub, "org/base", "org/ft", RANK, tmp_path / "cli", monkeypatch)
    assert strip_volatile((out / rows[0]["report_file"]).read_text()) == strip_volatile(cli_file.read_text())


def test_without_ray_audit_works_and_batch_says_what_to_install(tmp_path: Path) -> None:
    base, finetune = model_pair(layers=1)
    base_dir = write_dir(shard_files(base, 1), tmp_path / "base")
    finetune_dir = write_dir(shard_files(finetune, 1), tmp_path / "finetune")
    catalogue = tmp_path / "c.csv"
    catalogue.write_text(f"base,finetune\n{base_dir},{finetune_dir}\n")
    script = (
        "import sys; sys.modules['ray'] = None\n"  # an import of ray now raises ImportError
        "import lorafid, lorafid.cli.commands, lorafid.batch.driver\n"
        f"assert lorafid.cli.commands.main(['audit', {str(base_dir)!r}, {str(finetune_dir)!r}, '--quiet']) == 0\n"
        f"sys.exit(lorafid.cli.commands.main(['batch', {str(catalogue)!r}, '--quiet']))\n"
    )
    env = {**os.environ, "LORAFID_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "lorafid: error: lorafid batch runs on Ray, which is not installed: pip install lorafid[batch]"
    ]


def test_missing_ray_is_a_missing_extra_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingExtraError, match=r"pip install lorafid\[batch\]"):
        import_ray()


class Recorder:
    """The audit's math, recording when each task computed (one file per task instance)."""

    def __init__(self, directory: Path, pause_s: float = 0.05) -> None:
        self.directory = directory
        self.pause_s = pause_s  # 0.05: long enough that two tasks running together overlap for sure

    def __call__(self, kernel: Any, base: torch.Tensor, finetune: torch.Tensor) -> sp.DeltaSpectrum:
        started = time.time()
        result = kernel(base, finetune)
        time.sleep(self.pause_s)
        with (self.directory / f"{os.getpid()}-{id(self)}.log").open("a") as f:
            f.write(f"{started} {time.time()}\n")
        return result


def test_concurrency_cap_runs_one_pair_at_a_time_and_ctrl_c_leaves_pairs_pending(
    ray_local: Any, hub: HubServer, tmp_path: Path
) -> None:
    for name, seed in (("a", 1), ("b", 2)):
        base, finetune = model_pair(layers=2, seed=seed)
        hub.add_repo(f"org/base-{name}", shard_files(base, 1))
        hub.add_repo(f"org/ft-{name}", shard_files(finetune, 1))
    pairs = [CataloguePair("org/base-a", "org/ft-a"), CataloguePair("org/base-b", "org/ft-b")]
    log = tmp_path / "log"
    log.mkdir()
    options = BatchOptions(
        rank=RANK, endpoint=hub.endpoint, store_home=tmp_path / "home", max_concurrent=1, compute=Recorder(log)
    )
    job = Batch(pairs, replace(options, progress=True))
    seen: list[BatchProgress] = list(job.run())
    result = job.report()

    assert [o.status for o in result.outcomes] == ["complete", "complete"]
    spans = []
    for path in log.iterdir():
        times = [float(t) for line in path.read_text().split("\n") if line for t in line.split()]
        spans.append((min(times), max(times)))
    spans.sort()
    assert len(spans) == 2 and spans[0][1] <= spans[1][0], spans  # one pair after the other
    # One bar over pairs and bytes: the last step has every pair and every byte of both pairs.
    assert (seen[-1].done, seen[-1].total, seen[-1].failed) == (2, 2, 0)
    planned = sum(
        2 * t.numel() * t.element_size()
        for s in (1, 2)
        for n, t in model_pair(layers=2, seed=s)[0].items()
        if "embed" not in n
    )
    assert seen[-1].bytes_done == seen[-1].bytes_total == planned

    # Ctrl-C while the first task runs (the caller stops the job): it is cancelled, both pairs stay
    # pending, the table says so. The stop comes at the driver's second look (after one 0.5 s poll);
    # each matrix now takes 0.5 s, so the first pair (8 matrices) cannot have finished by then.
    out = tmp_path / "out"
    slow = replace(options, fresh=True, progress=False, compute=Recorder(log, pause_s=0.5))
    job = Batch(pairs, slow, out=out)
    steps = job.run()
    next(steps), next(steps)
    steps.close()
    stopped = job.report()
    assert stopped.interrupted and [o.status for o in stopped.outcomes] == ["pending", "pending"]
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert [(r["status"], r["error"]) for r in rows] == [("pending", "not run: the batch was interrupted")] * 2


def test_tasks_ask_for_a_gpu_when_the_cluster_has_one(
    ray_local: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pairs = [CataloguePair("org/base", "org/ft")]
    store = Store(tmp_path)
    assert _Driver(ray_local, pairs, BatchOptions(), store, None, {}).task_options["num_gpus"] == 0
    monkeypatch.setattr(ray_local, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    assert _Driver(ray_local, pairs, BatchOptions(), store, None, {}).task_options["num_gpus"] == 1
    chosen = BatchOptions(gpus_per_task=0, cpus_per_task=4)
    assert _Driver(ray_local, pairs, chosen, store, None, {}).task_options == {
        "num_cpus": 4,
        "num_gpus": 0,
        "max_retries": 3,
    }


def test_stored_results_are_keyed_by_the_hub_endpoint_and_the_commits_read(
    ray_local: Any, hub: HubServer, tmp_path: Path
) -> None:
    """Two Hubs serve other weights under the same repo IDs; a branch moves; one pair is unchanged."""
    pair = [CataloguePair("org/base", "org/ft")]
    weights = {seed: model_pair(layers=1, seed=seed) for seed in (31, 32, 33, 34, 35)}
    options = BatchOptions(rank=RANK, store_home=tmp_path / "home", progress=False)

    def audit(server: HubServer) -> tuple[bool, float, int]:
        """(taken from the store, loss, tensor range reads) of one batch run against ``server``."""
        server.clear_requests()
        outcome = run_batch(pair, replace(options, endpoint=server.endpoint)).outcomes[0]
        assert outcome.status == "complete" and outcome.report is not None, outcome.error
        loss = 1.0 - outcome.report.summary().overall.energy_retained
        metadata = [r.path for r in server.requests if r.origin == "hub" and r.path.startswith("/api/models/")]
        assert sorted(set(metadata)) == ["/api/models/org/base", "/api/models/org/ft"]
        return outcome.from_store, loss, len(tensor_reads(server))

    def reference(seed: int) -> float:
        return reference_loss(*weights[seed], RANK)

    with HubServer() as other:
        for server, seed in ((hub, 31), (other, 32)):
            server.add_repo("org/base", shard_files(weights[seed][0], 1))
            server.add_repo("org/ft", shard_files(weights[seed][1], 1))

        reused, loss, reads = audit(hub)
        assert not reused and reads > 0 and loss == pytest.approx(reference(31), abs=1e-6)
        reused, loss, reads = audit(hub)  # unchanged: one metadata call per repo, no weights
        assert reused and reads == 0 and loss == pytest.approx(reference(31), abs=1e-6)
        with hub.inject(api_status_sequence=[503, 429]):  # a busy Hub: asked again, still taken from the store
            reused, loss, reads = audit(hub)
        assert reused and reads == 0 and loss == pytest.approx(reference(31), abs=1e-6)
        reused, loss, reads = audit(other)  # same repo IDs, another Hub, other weights
        assert not reused and reads > 0 and loss == pytest.approx(reference(32), abs=1e-6)
        assert audit(hub)[0] and audit(other)[0]  # each Hub's result is kept apart

        # The fine-tune's branch moves: audited afresh, at the new commit.
        hub.add_repo("org/ft", shard_files(weights[33][1], 1))
        hub.add_repo("org/base", shard_files(weights[33][0], 1))
        reused, loss, reads = audit(hub)
        assert not reused and reads > 0 and loss == pytest.approx(reference(33), abs=1e-6)

        # Two Hubs serving other bytes under the very same commit SHAs: the audit's own key (commits
        # and file layout) cannot tell them apart, the endpoint does; each is recomputed from scratch.
        for server, seed in ((hub, 34), (other, 35)):
            server.add_repo("org/base", shard_files(weights[seed][0], 1), sha="b" * 40)
            server.add_repo("org/ft", shard_files(weights[seed][1], 1), sha="f" * 40)
        for server, seed in ((hub, 34), (other, 35), (hub, 34)):
            reused, loss, reads = audit(server)
            assert not reused and reads > 0 and loss == pytest.approx(reference(seed), abs=1e-6), server.endpoint
        assert audit(hub)[0]


def test_losing_the_progress_board_only_stops_the_byte_counts(ray_local: Any, tmp_path: Path) -> None:
    """The board is an actor: its node may die. The driver then goes on without byte counts."""
    seen: list[BatchProgress] = []
    pairs = [CataloguePair("org/base", "org/ft")]
    driver = _Driver(ray_local, pairs, BatchOptions(), Store(tmp_path), None, {})
    driver.board = driver._start_board()
    assert ray_local.get(driver.board.snapshot.remote()) == {}
    ray_local.kill(driver.board)
    for _ in range(20):  # the first call asks the dead board, a later one finds the answer failed
        seen.append(driver._progress())
        if driver.board is None:
            break
        time.sleep(0.1)
    assert driver.board is None
    assert (seen[-1].done, seen[-1].total, seen[-1].failed, seen[-1].bytes_done) == (0, 1, 0, 0)
    driver.close()  # nothing left to stop: no error either
