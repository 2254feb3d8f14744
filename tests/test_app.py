"""The dashboard through gradio_client, against audits served by the loopback Hub.

Each test launches ``app.build_app`` on 127.0.0.1 (a free port) with its own store under a
tmp ``LORAFID_HOME`` and the loopback Hub as endpoint, then calls the endpoints the page
uses (``api_name``s: run_audit, rerank, open_link, open_audit, stop).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

from lorafid.audit import Audit, AuditConfig
from lorafid.dashboard import AppConfig, page_url, parse_link, permalink
from lorafid.errors import FetchError, LorafidError
from lorafid.report import save_spectra, spectra_path
from lorafid.store import Store
from tests.hub_server import HubServer
from tests.models import model_pair, shard_files, write_dir

BASE, TUNED, GATED = "org/base", "org/tuned", "org/gated-tuned"
# Gradio's own queue statistics use a pandas API that pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
SUMMARY, DOWNLOAD, LINK, PROGRESS, GALLERY = 3, 4, 5, 6, 7  # run_audit outputs (states are not returned)


@dataclass
class Served:
    url: str
    hub: HubServer
    home: Path
    app: ModuleType

    def client(self) -> Client:
        return Client(self.url, verbose=False)


def add_models(hub: HubServer, layers: int = 2) -> None:
    """A base/fine-tune pair, sharded differently, and a gated copy of the fine-tune."""
    base, tuned = model_pair(layers=layers, dtype=torch.bfloat16)
    hub.add_repo(BASE, shard_files(base, 2))
    hub.add_repo(TUNED, shard_files(tuned, 3, offset=1))
    hub.add_repo(GATED, shard_files(tuned, 1), gated=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(config: AppConfig) -> Iterator[str]:
    """Launch the dashboard in this process; yields its URL."""
    app = importlib.import_module("app")
    demo = app.build_app(config)
    demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True, **app.launch_options()
    )
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture
def served(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    home = tmp_path / "home"
    monkeypatch.setenv("LORAFID_HOME", str(home))  # also for the module-level demo of app.py
    add_models(hub)
    config = AppConfig(endpoint=hub.endpoint, store_home=home, examples_dir=tmp_path / "examples", device="cpu")
    with serve(config) as url:
        yield Served(url, hub, home, importlib.import_module("app"))


def run(client: Client, base: str = BASE, finetune: str = TUNED, rank: int = 8, token: str = "") -> list[tuple]:
    """Every streamed update of one audit, the final one last."""
    job = client.submit(base, finetune, "", "", rank, "energy_retained", token, api_name="/run_audit")
    job.result(timeout=120)
    return job.outputs()


def store_rows(home: Path) -> int:
    with sqlite3.connect(home / "store.sqlite3") as db:
        return int(db.execute("SELECT COUNT(*) FROM matrices").fetchone()[0])


def read_json(download: object) -> dict:
    path = download["value"] if isinstance(download, dict) and "value" in download else download
    return json.loads(Path(str(path)).read_text())


def test_audit_streams_and_completes(served: Served) -> None:
    updates = run(served.client(), rank=8)
    final = updates[-1]
    assert len(updates) >= 3  # headers, the planned grid, ... the final charts
    assert final[SUMMARY].startswith("**Rank 8 keeps")
    assert "Done: 8/8 matrices" in final[PROGRESS]
    report = read_json(final[DOWNLOAD])
    assert report["schema"] == "lorafid.report/1"
    assert report["status"] == "complete" and report["settings"]["rank"] == 8
    assert {m["at_rank"]["rank"] for m in report["matrices"]} == {8}
    assert report["base"]["repo_id"] == BASE and len(report["base"]["resolved_sha"]) == 40
    assert final[LINK].endswith("?base=org%2Fbase&finetune=org%2Ftuned&rank=8")
    heatmap = json.loads(final[0]["plot"])
    assert heatmap["data"][0]["type"] == "heatmap"
    assert final[GALLERY]["samples"][0][:2] == [f"{TUNED} vs {BASE}", "complete"]


def test_rank_change_rederives_without_fetching(served: Served) -> None:
    client = served.client()
    before = read_json(run(client, rank=8)[-1][DOWNLOAD])
    rows = store_rows(served.home)
    served.hub.clear_requests()
    after = client.predict(2, "cosine_distance", api_name="/rerank")
    assert served.hub.requests == []  # no header, no byte range: nothing fetched
    assert store_rows(served.home) == rows
    assert after[3].startswith("**Rank 2 keeps")
    again = read_json(after[4])
    assert again["settings"]["rank"] == 2
    first = next(m for m in again["matrices"])
    assert first["at_rank"]["energy_retained"] < before["matrices"][0]["at_rank"]["energy_retained"]
    assert again["summary"]["overall"]["energy_retained"] < before["summary"]["overall"]["energy_retained"]
    heatmap = json.loads(after[0]["plot"])
    assert "cosine distance at rank 2" in heatmap["layout"]["title"]["text"]


def test_permalink_opens_the_stored_audit_without_recompute(served: Served) -> None:
    run(served.client(), rank=8)
    served.hub.clear_requests()
    opened = served.client().predict("?base=org%2Fbase&finetune=org%2Ftuned&rank=16", 64, "mse", api_name="/open_link")
    assert served.hub.requests == []
    summary, link, base, finetune, rank, metric = opened[3], opened[5], opened[6], opened[7], opened[10], opened[11]
    assert (base, finetune, rank, metric) == (BASE, TUNED, 16, "mse")
    assert summary.startswith("**Rank 16 keeps")
    assert link.endswith("rank=16")
    assert "Opened from the store" in opened[12]


def test_permalink_of_an_unaudited_pair_prefills_only(served: Served) -> None:
    opened = served.client().predict("?base=org%2Fother&finetune=org%2Ftuned&rank=32", 64, "mse", api_name="/open_link")
    assert (opened[6], opened[7], opened[10]) == ("org/other", TUNED, 32)
    assert opened[0] == opened[3] == {"__type__": "update"}  # charts and summary left as they are
    assert "Run audit" in opened[12]
    assert served.hub.requests == []


def test_gallery_opens_an_audit(served: Served) -> None:
    client = served.client()
    run(client, rank=8)
    opened = client.predict(0, 4, "energy_retained", api_name="/open_audit")
    assert opened[3].startswith("**Rank 4 keeps")
    assert (opened[6], opened[7]) == (BASE, TUNED)


def test_bundled_example_is_listed_and_opens(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    base, tuned = model_pair(layers=1, dtype=torch.float16, seed=3)
    base_dir = write_dir(shard_files(base, 1), tmp_path / "m" / "base")
    tuned_dir = write_dir(shard_files(tuned, 1), tmp_path / "m" / "tuned")
    with Audit(str(base_dir), str(tuned_dir), AuditConfig(rank=8, store=Store(tmp_path / "scratch"))) as job:
        for _ in job.run():
            pass
        report = job.report()
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "toy.json").write_text(report.to_json())
    save_spectra(report, spectra_path(examples / "toy.json"))
    (examples / "notes.json").write_text('{"not": "a report"}')  # ignored, not an error
    config = AppConfig(endpoint=hub.endpoint, store_home=tmp_path / "home", examples_dir=examples)
    with serve(config) as url:
        opened = Client(url, verbose=False).predict("", 8, "energy_retained", api_name="/open_link")
        samples = opened[-1]["samples"]  # the gallery, refreshed on load
        assert samples[0][0] == f"example: {tuned_dir} vs {base_dir}"
        shown = Client(url, verbose=False).predict(0, 5, "energy_retained", api_name="/open_audit")
        assert shown[3].startswith("**Rank 5 keeps")  # off the stored grid: the sidecar's spectra are used
        assert shown[4] is not None


def test_missing_repo_is_a_clear_error(served: Served) -> None:
    job = served.client().submit("org/missing", TUNED, "", "", 8, "energy_retained", "", api_name="/run_audit")
    with pytest.raises(AppError, match=r"Repo org/missing was not found"):
        job.result(timeout=120)
    # The pop-up fades; the progress line keeps the error (not a stale "Reading headers...").
    assert job.outputs()[-1][PROGRESS].startswith("**Failed:** Repo org/missing was not found")


def test_audit_failing_midway_shows_what_it_kept(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    compute = Audit._compute
    calls = 0

    def fail_at_the_fifth_matrix(self: Audit, pair: Any, base: Any, finetune: Any) -> Any:
        nonlocal calls
        if len(pair.shape) == 2:
            calls += 1
            if calls == 5:
                raise FetchError("The CDN kept answering 503 (test).")
        return compute(self, pair, base, finetune)

    monkeypatch.setattr(Audit, "_compute", fail_at_the_fifth_matrix)
    job = served.client().submit(BASE, TUNED, "", "", 8, "energy_retained", "", api_name="/run_audit")
    with pytest.raises(AppError, match=r"The CDN kept answering 503"):
        job.result(timeout=120)
    last = job.outputs()[-1]
    assert last[PROGRESS].startswith("**Stopped by an error after 4 of 8 matrices** (kept: run the audit again")
    assert last[SUMMARY].startswith("**Rank 8 keeps")  # the charts of the 4 finished matrices
    assert store_rows(served.home) == 4
    monkeypatch.setattr(Audit, "_compute", compute)
    assert "Done: 8/8 matrices" in run(served.client())[-1][PROGRESS]  # resumes: the other 4


def test_gated_repo_says_what_to_do(served: Served) -> None:
    with pytest.raises(AppError, match=r"org/gated-tuned is a gated repo: accept the licence"):
        run(served.client(), finetune=GATED)


def test_token_reaches_the_hub_only(served: Served) -> None:
    secret = "hf_user_token_for_test"
    final = run(served.client(), finetune=GATED, token=secret)[-1]
    assert served.hub.requests_matching(origin="hub", path_contains=GATED)[0].has_authorization
    assert not any(r.has_authorization for r in served.hub.requests_matching(origin="cdn"))
    text = json.dumps(read_json(final[DOWNLOAD])) + final[LINK] + final[SUMMARY]
    assert secret not in text
    assert secret not in (served.home / "store.sqlite3").read_bytes().decode("latin-1")


def test_public_app_never_lends_the_server_login(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_server_owner_token")
    run(served.client())
    assert served.hub.requests and not any(r.has_authorization for r in served.hub.requests)
    with pytest.raises(AppError, match="gated repo"):
        run(served.client(), finetune=GATED)


def test_local_paths_are_refused_unless_allowed(hub: HubServer, tmp_path: Path) -> None:
    base, tuned = model_pair(layers=1)
    base_dir = write_dir(shard_files(base, 1), tmp_path / "base")
    tuned_dir = write_dir(shard_files(tuned, 1), tmp_path / "tuned")
    public = AppConfig(endpoint=hub.endpoint, store_home=tmp_path / "home", examples_dir=tmp_path)
    with serve(public) as url, pytest.raises(AppError, match="reads Hub repos only"):
        run(Client(url, verbose=False), base=str(base_dir), finetune=str(tuned_dir))
    private = AppConfig(allow_local=True, store_home=tmp_path / "home", examples_dir=tmp_path)
    with serve(private) as url:
        final = run(Client(url, verbose=False), base=str(base_dir), finetune=str(tuned_dir), rank=4)[-1]
        assert final[SUMMARY].startswith("**Rank 4 keeps")


def test_stop_keeps_what_was_computed(served: Served) -> None:
    client = served.client()
    with served.hub.inject(slow_bytes_per_s=20_000):  # ~0.2 s per tensor: the audit takes seconds
        job = client.submit(BASE, TUNED, "", "", 8, "energy_retained", "", api_name="/run_audit")
        deadline = time.monotonic() + 60
        while not any("matrices ·" in str(o[PROGRESS]) for o in job.outputs()) and time.monotonic() < deadline:
            time.sleep(0.05)
        job.cancel()
    stopped = client.predict(8, "energy_retained", api_name="/stop")
    assert stopped[-1].startswith("Stopped: ")
    kept = read_json(stopped[4])
    assert kept["status"] == "partial" and kept["pending"]
    assert kept["matrices"]


def test_second_run_reads_results_from_the_store(served: Served) -> None:
    run(served.client(), rank=8)
    rows = store_rows(served.home)
    final = run(served.client(), rank=8)[-1]
    assert "resumed from the store" in final[PROGRESS]
    assert store_rows(served.home) == rows


def test_permalink_with_another_revision_is_not_the_stored_audit(served: Served) -> None:
    run(served.client(), rank=8)
    query = "?base=org%2Fbase&finetune=org%2Ftuned&rank=8&finetune_revision=v2"
    opened = served.client().predict(query, 64, "mse", api_name="/open_link")
    assert opened[9] == "v2"
    assert "Run audit" in opened[12]


def test_links_and_settings() -> None:
    url = permalink("http://h:1/?old=1", "org/a", "org/b c", 16, None, "v2")
    assert url == "http://h:1/?base=org%2Fa&finetune=org%2Fb+c&rank=16&finetune_revision=v2"
    link = parse_link({"base": " org/a ", "finetune": "org/b", "rank": "x", "metric": "eval()"}, {"mse": None})
    assert (link.base, link.rank, link.metric) == ("org/a", None, None)
    assert parse_link({"rank": "32", "metric": "mse"}, {"mse": None}).rank == 32
    env = {"LORAFID_MAX_MODEL_GB": "40", "LORAFID_CONCURRENCY": "2", "LORAFID_MAX_QUEUE": "4", "OAUTH_CLIENT_ID": "x"}
    config = AppConfig.from_env(env)
    assert (config.max_model_bytes, config.concurrency, config.max_queue) == (40 * 10**9, 2, 4)
    assert config.oauth and not config.allow_local
    assert AppConfig.from_env({"LORAFID_ALLOW_LOCAL": "1"}).allow_local
    assert AppConfig.from_env({}, allow_local=True).allow_local
    for name, bad in (("LORAFID_CONCURRENCY", "two"), ("LORAFID_MAX_QUEUE", "0"), ("LORAFID_MAX_MODEL_GB", "-1")):
        with pytest.raises(LorafidError, match=rf"{name}='{bad}' is not a positive .*; unset it or set e.g."):
            AppConfig.from_env({name: bad})
    assert page_url({"x-forwarded-host": "me-lorafid.hf.space", "x-forwarded-proto": "https"}, "http://x/") == (
        "https://me-lorafid.hf.space/"
    )


def test_no_sign_in_button_without_oauth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Off Spaces a LoginButton makes Gradio call the Hub's whoami at build time: never render it there."""
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path))
    monkeypatch.delenv("OAUTH_CLIENT_ID", raising=False)
    app = importlib.import_module("app")
    assert not app.build_app(AppConfig.from_env()).expects_oauth


def test_zero_gpu_decorates_only_the_spectrum(monkeypatch: pytest.MonkeyPatch) -> None:
    """On ZeroGPU, @spaces.GPU wraps the per-matrix math: CPU tensors in, plain numbers out."""
    import sys
    import types

    import torch

    from lorafid.dashboard import zero_gpu_compute
    from lorafid.spectrum import DeltaSpectrum

    assert zero_gpu_compute({}) is None  # off ZeroGPU the audit chooses its device itself
    decorated: list[tuple[str, int]] = []
    fake = types.ModuleType("spaces")

    def gpu(duration: int) -> object:
        def wrap(function: object) -> object:
            decorated.append((function.__name__, duration))  # type: ignore[attr-defined]
            return function

        return wrap

    fake.GPU = gpu  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "spaces", fake)
    compute = zero_gpu_compute({"SPACES_ZERO_GPU": "true"})
    assert compute is not None and decorated == [("spectrum_on_gpu", 120)]
    result = compute(torch.zeros(4, 4), torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])))
    assert isinstance(result, DeltaSpectrum) and result.energy == pytest.approx(30.0)


def test_one_users_failing_audit_never_affects_another(hub: HubServer, tmp_path: Path) -> None:
    """Two users at once: a corrupt repo fails for one, the other's audit completes unchanged."""
    add_models(hub)
    hub.add_repo("org/corrupt", {"model.safetensors": (10**6).to_bytes(8, "little") + b"{}"})
    home = tmp_path / "home"
    config = AppConfig(
        endpoint=hub.endpoint, store_home=home, examples_dir=tmp_path / "ex", device="cpu", concurrency=2
    )
    with serve(config) as url:
        failing = Client(url, verbose=False).submit(
            BASE, "org/corrupt", "", "", 8, "energy_retained", "", api_name="/run_audit"
        )
        good = Client(url, verbose=False).submit(BASE, TUNED, "", "", 8, "energy_retained", "", api_name="/run_audit")
        with pytest.raises(AppError, match="org/corrupt"):
            failing.result(timeout=120)
        good.result(timeout=120)
        final = good.outputs()[-1]
    assert "Done: 8/8 matrices" in final[PROGRESS]
    report = read_json(final[DOWNLOAD])
    expected = Audit(BASE, TUNED, AuditConfig(rank=8, device="cpu", endpoint=hub.endpoint, store=Store(tmp_path / "x")))
    with expected as job:
        for _ in job.run():
            pass
        reference = job.report()
    assert [m["energy"] for m in report["matrices"]] == [m.energy for m in reference.matrices]
    assert [a.finetune_spec for a in Store(home).list_audits()] == [TUNED]  # nothing stored for the failure


def test_bad_server_setting_stops_the_app_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "LORAFID_HOME": str(tmp_path), "LORAFID_MAX_QUEUE": "many"}
    done = subprocess.run(
        [sys.executable, "app.py"], cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "lorafid: LORAFID_MAX_QUEUE='many' is not a positive int; unset it or set e.g. LORAFID_MAX_QUEUE=2."
    )
