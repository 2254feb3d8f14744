"""The dashboard through gradio_client, against audits served by the loopback Hub.

Each test launches ``lorafid.web.app.build_app`` on 127.0.0.1 (a free port) with its own store under a
tmp ``LORAFID_HOME`` and the loopback Hub as endpoint, then calls the endpoints the page
uses (``api_name``s: run_audit, rerank, open_link, open_audit, stop).
"""

from __future__ import annotations

import contextlib
import html
import importlib
import json
import os
import re
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

import httpx
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError
from safetensors.torch import save

from lorafid.audit.engine import Audit, AuditConfig
from lorafid.audit.report import save_spectra, spectra_path
from lorafid.audit.store import Store
from lorafid.errors import FetchError, LorafidError
from lorafid.web.config import AppConfig
from lorafid.web.links import page_url, parse_link, permalink
from lorafid.weights.safetensors_format import HEADER_PROBE_BYTES, header_cap
from tests.hub_server import HubServer
from tests.models import model_pair, shard_files, write_dir

BASE, TUNED, GATED = "org/base", "org/tuned", "org/gated-tuned"
# Gradio's own queue statistics use a pandas API that pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
SUMMARY, LINK, PROGRESS, GALLERY = 3, 4, 5, 6  # run_audit outputs (states are not returned)
# open_link outputs: the view (0-4), base, fine-tune, their revisions, rank, metric, progress, gallery
L_BASE, L_FINETUNE, L_BASE_REV, L_FINETUNE_REV, L_RANK, L_METRIC, L_PROGRESS = 5, 6, 7, 8, 9, 10, 11


@dataclass
class Served:
    url: str
    hub: HubServer
    home: Path
    audit_tab: ModuleType  # lorafid.web.tabs.audit, whose handlers a test may patch

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
    app = importlib.import_module("lorafid.web.app")
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
    monkeypatch.setenv("LORAFID_HOME", str(home))
    add_models(hub)
    config = AppConfig(endpoint=hub.endpoint, store_home=home, examples_dir=tmp_path / "examples", device="cpu")
    with serve(config) as url:
        yield Served(url, hub, home, importlib.import_module("lorafid.web.tabs.audit"))


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


def plain(markdown: str) -> str:
    """Markdown of untrusted text as the reader sees it (backslash escapes removed)."""
    return re.sub(r"\\(.)", r"\1", markdown)


def download(client: Client, rank: int = 8) -> dict:
    """The report this client's session shows, as the Download JSON button writes it."""
    return read_json(client.predict(rank, api_name="/download"))


def test_audit_streams_and_completes(served: Served) -> None:
    client = served.client()
    updates = run(client, rank=8)
    final = updates[-1]
    assert len(updates) >= 3  # headers, the planned grid, ... the final charts
    assert final[SUMMARY].startswith("**Rank 8 keeps")
    assert "Done: 8/8 matrices" in final[PROGRESS]
    report = download(client)
    assert report["schema"] == "lorafid.report/1"
    assert report["status"] == "complete" and report["settings"]["rank"] == 8
    assert {m["at_rank"]["rank"] for m in report["matrices"]} == {8}
    assert report["base"]["repo_id"] == BASE and len(report["base"]["resolved_sha"]) == 40
    shas = report["base"]["resolved_sha"], report["finetune"]["resolved_sha"]
    assert final[LINK].endswith(
        f"?base=org%2Fbase&finetune=org%2Ftuned&rank=8&base_revision={shas[0]}&finetune_revision={shas[1]}"
        "&metric=energy_retained"
    )
    heatmap = json.loads(final[0]["plot"])
    assert heatmap["data"][0]["type"] == "heatmap"
    # The gallery names both sides, labelled, in the form's order (base first).
    assert final[GALLERY]["samples"][0][:2] == [f"<b>base</b> {BASE}<br><b>fine-tune</b> {TUNED}", "complete"]


def test_rank_change_rederives_without_fetching(served: Served) -> None:
    client = served.client()
    run(client, rank=8)
    before = download(client, 8)
    rows = store_rows(served.home)
    served.hub.clear_requests()
    after = client.predict(2, "cosine_distance", api_name="/rerank")
    assert served.hub.requests == []  # no header, no byte range: nothing fetched
    assert store_rows(served.home) == rows
    assert after[3].startswith("**Rank 2 keeps")
    again = download(client, 2)
    assert again["settings"]["rank"] == 2
    first = next(m for m in again["matrices"])
    assert first["at_rank"]["energy_retained"] < before["matrices"][0]["at_rank"]["energy_retained"]
    assert again["summary"]["overall"]["energy_retained"] < before["summary"]["overall"]["energy_retained"]
    heatmap = json.loads(after[0]["plot"])
    assert "cosine distance at rank 2" in heatmap["layout"]["title"]["text"]


def test_permalink_opens_the_stored_audit_without_recompute(served: Served) -> None:
    link = run(served.client(), rank=8)[-1][LINK]
    served.hub.clear_requests()
    pinned = "?" + link.split("?", 1)[1].replace("rank=8", "rank=16").replace("=energy_retained", "=mse")
    opened = served.client().predict(pinned, 64, "energy_retained", api_name="/open_link")
    assert served.hub.requests == []  # a pinned link of a public pair: no call at all
    summary, shown, base, finetune = opened[3], opened[4], opened[L_BASE], opened[L_FINETUNE]
    rank, metric = opened[L_RANK]["value"], opened[L_METRIC]  # the slider, bounded by the audit's largest k
    assert (base, finetune, rank, metric) == (BASE, TUNED, 16, "mse")  # the link's metric, not the page's
    assert summary.startswith("**Rank 16 keeps")
    assert shown == link.replace("rank=8", "rank=16").replace("=energy_retained", "=mse")
    assert "Opened from the store" in opened[L_PROGRESS]
    # A link naming no commit is resolved with metadata calls only: never a weight byte.
    opened = served.client().predict("?base=org%2Fbase&finetune=org%2Ftuned&rank=16", 64, "mse", api_name="/open_link")
    assert opened[3].startswith("**Rank 16 keeps")
    assert not served.hub.requests_matching(origin="cdn")


def test_permalink_of_an_unaudited_pair_prefills_only(served: Served) -> None:
    opened = served.client().predict("?base=org%2Fother&finetune=org%2Ftuned&rank=32", 64, "mse", api_name="/open_link")
    assert (opened[L_BASE], opened[L_FINETUNE], opened[L_RANK]["value"]) == ("org/other", TUNED, 32)
    assert opened[0] == opened[3] == {"__type__": "update"}  # charts and summary left as they are
    assert "Could not open this link: Repo org/other was not found" in plain(opened[L_PROGRESS])


def test_gallery_opens_an_audit(served: Served) -> None:
    client = served.client()
    run(client, rank=8)
    opened = client.predict(0, 4, "energy_retained", api_name="/open_audit")
    assert opened[3].startswith("**Rank 8 keeps")  # the rank its gallery row describes, not the slider's 4
    assert (opened[L_BASE], opened[L_FINETUNE]) == (BASE, TUNED)


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
        assert samples[0][0] == f"<i>example</i><br><b>base</b> {base_dir}<br><b>fine-tune</b> {tuned_dir}"
        client = Client(url, verbose=False)
        assert client.predict(0, 5, "energy_retained", api_name="/open_audit")[3].startswith("**Rank 8 keeps")
        shown = client.predict(5, "energy_retained", api_name="/rerank")
        assert shown[3].startswith("**Rank 5 keeps")  # off the stored grid: the sidecar's spectra are used
        assert "rank=5" in shown[4]


def test_missing_repo_is_a_clear_error(served: Served) -> None:
    job = served.client().submit("org/missing", TUNED, "", "", 8, "energy_retained", "", api_name="/run_audit")
    with pytest.raises(AppError, match=r"Repo org/missing was not found"):
        job.result(timeout=120)
    # The pop-up fades; the progress line keeps the error (not a stale "Reading headers...").
    assert plain(job.outputs()[-1][PROGRESS]).startswith("**Failed:** Repo org/missing was not found")


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
    client = served.client()
    final = run(client, finetune=GATED, token=secret)[-1]
    assert served.hub.requests_matching(origin="hub", path_contains=GATED)[0].has_authorization
    assert not any(r.has_authorization for r in served.hub.requests_matching(origin="cdn"))
    text = json.dumps(download(client)) + final[LINK] + final[SUMMARY]
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
    summary, progress, gallery = stopped[3], stopped[5], stopped[6]
    assert progress.startswith("**Stopped.**") and "Run audit" in progress
    assert not any(ch.isdigit() for ch in progress)  # one count only: the table's "N of 8 (partial)"
    assert re.search(r"\| matrices \| \d of 8 \(partial\) \|", summary)
    (row,) = gallery["samples"]  # listed as partial, with how to resume
    assert row[1] == "partial: open it, then <b>Run audit</b> resumes it"
    kept = download(client)
    assert kept["status"] == "partial" and kept["pending"]
    assert kept["matrices"]


def test_stop_after_the_audit_finished_says_there_was_nothing_to_stop(served: Served) -> None:
    """It said "Stopped. ... in the gallery as partial" of a complete audit."""
    client = served.client()
    run(client, rank=8)
    stopped = client.predict(8, "energy_retained", api_name="/stop")
    assert stopped[5] == "Nothing to stop: this audit had already finished."
    assert not re.search(r"partial", stopped[3])  # the table counts every matrix


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
    assert opened[L_FINETUNE_REV] == "v2"
    assert "Revision 'v2' does not exist in org/tuned" in plain(opened[L_PROGRESS])


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
    # The checks' direction cache: under the store's home, 4 GB unless set, off at 0.
    cached = AppConfig(store_home=Path("/srv/lorafid")).direction_cache()
    assert cached is not None and cached.directory == Path("/srv/lorafid/directions") and cached.cap_bytes == 4 * 10**9
    assert AppConfig.from_env({"LORAFID_DIRECTION_CACHE_GB": "0"}).direction_cache() is None
    assert AppConfig.from_env({"LORAFID_DIRECTION_CACHE_GB": "0.5"}).direction_cache_gb == 0.5
    with pytest.raises(LorafidError, match=r"LORAFID_DIRECTION_CACHE_GB='lots' is not a size"):
        AppConfig.from_env({"LORAFID_DIRECTION_CACHE_GB": "lots"})
    assert page_url({"x-forwarded-host": "me-lorafid.hf.space", "x-forwarded-proto": "https"}, "http://x/") == (
        "https://me-lorafid.hf.space/"
    )


def test_no_sign_in_button_without_oauth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Off Spaces a LoginButton makes Gradio call the Hub's whoami at build time: never render it there."""
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path))
    monkeypatch.delenv("OAUTH_CLIENT_ID", raising=False)
    app = importlib.import_module("lorafid.web.app")
    assert not app.build_app(AppConfig.from_env()).expects_oauth


def test_zero_gpu_decorates_only_the_compute_hook(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On ZeroGPU, @spaces.GPU wraps the one compute hook (a kernel: CPU tensors in, plain numbers
    out), and the dashboard gives that hook to every check."""
    import sys
    import types

    import torch

    from lorafid.audit.engine import spectrum_kernel
    from lorafid.audit.spectrum import DeltaSpectrum
    from lorafid.compute import run_kernel, zero_gpu_hook

    assert zero_gpu_hook({}) is None  # off ZeroGPU every check chooses its device itself
    decorated: list[tuple[str, int]] = []
    fake = types.ModuleType("spaces")

    def gpu(duration: int) -> object:
        def wrap(function: object) -> object:
            decorated.append((function.__name__, duration))  # type: ignore[attr-defined]
            return function

        return wrap

    fake.GPU = gpu  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "spaces", fake)
    compute = zero_gpu_hook({"SPACES_ZERO_GPU": "true"})
    assert compute is run_kernel and decorated == [("run_kernel", 120)]
    result = compute(spectrum_kernel, torch.zeros(4, 4), torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])))
    assert isinstance(result, DeltaSpectrum) and result.energy == pytest.approx(30.0)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path))
    app = importlib.import_module("lorafid.web.app")
    dashboard = app.Dashboard(AppConfig(store_home=tmp_path, examples_dir=tmp_path, device="cpu"))
    assert dashboard.compute is run_kernel  # the decorated hook, handed to every tab's checks


def test_one_users_failing_audit_never_affects_another(hub: HubServer, tmp_path: Path) -> None:
    """Two users at once: a corrupt repo fails for one, the other's audit completes unchanged."""
    add_models(hub)
    hub.add_repo("org/corrupt", {"model.safetensors": (10**6).to_bytes(8, "little") + b"{}"})
    home = tmp_path / "home"
    config = AppConfig(
        endpoint=hub.endpoint,
        store_home=home,
        examples_dir=tmp_path / "ex",
        device="cpu",
        concurrency=2,
        max_audits_per_visitor=2,  # both users come from 127.0.0.1 here
    )
    with serve(config) as url:
        failing = Client(url, verbose=False).submit(
            BASE, "org/corrupt", "", "", 8, "energy_retained", "", api_name="/run_audit"
        )
        good_client = Client(url, verbose=False)
        good = good_client.submit(BASE, TUNED, "", "", 8, "energy_retained", "", api_name="/run_audit")
        with pytest.raises(AppError, match="org/corrupt"):
            failing.result(timeout=120)
        good.result(timeout=120)
        final = good.outputs()[-1]
        report = download(good_client)
    assert "Done: 8/8 matrices" in final[PROGRESS]
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
        [sys.executable, "app.py"], cwd=Path(__file__).parents[2], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "lorafid: LORAFID_MAX_QUEUE='many' is not a positive int; unset it or set e.g. LORAFID_MAX_QUEUE=2."
    )


# -- public-server trust: privacy, downloads, links, escaping, limits, truthful words ---------------


def gallery_labels(client: Client) -> list[str]:
    """The shared gallery as a fresh visitor's page load shows it."""
    return [row[0] for row in client.predict("", 8, "energy_retained", api_name="/open_link")[-1]["samples"]]


def test_an_audit_of_a_gated_repo_stays_with_those_who_can_read_it(served: Served) -> None:
    secret = "hf_reader_token"
    owner = served.client()
    link = run(owner, finetune=GATED, token=secret)[-1][LINK]
    assert f"finetune={GATED.replace('/', '%2F')}" in link and "finetune_revision=" in link
    home_store = Store(served.home)
    (stored,) = home_store.list_audits()
    assert home_store.visibility(stored.key) == (True, False)  # base public, fine-tune gated
    anonymous = served.client()
    assert not any(GATED in label for label in gallery_labels(anonymous))  # never in the shared gallery
    opened = anonymous.predict("?" + link.split("?", 1)[1], 8, "mse", api_name="/open_link")
    assert opened[3] == {"__type__": "update"}  # no summary, no charts: names, SHAs, spectra stay private
    assert "gated or private repo" in opened[L_PROGRESS]
    assert "Opened" not in opened[L_PROGRESS]
    with pytest.raises(AppError, match="Run an audit or open one first"):
        anonymous.predict(8, api_name="/download")  # nothing opened in this session: no JSON either
    # With their own token, a visitor gets it from the store: no matrix is computed again.
    rows = store_rows(served.home)
    final = run(served.client(), finetune=GATED, token=secret)[-1]
    assert "resumed from the store" in final[PROGRESS] and store_rows(served.home) == rows


def test_visibility_check_uses_the_visitors_own_token(served: Served) -> None:
    from lorafid.web.gallery import Catalog

    run(served.client(), finetune=GATED, token="hf_reader_token")
    catalog = Catalog(Store(served.home), served.home / "none", endpoint=served.hub.endpoint)
    (entry,) = Store(served.home).list_audits()
    report = catalog.open(f"store:{entry.key}")
    assert not catalog.visible(f"store:{entry.key}", report, False)
    assert catalog.visible(f"store:{entry.key}", report, "hf_reader_token")
    assert catalog.entries() == []  # the shared gallery lists only public pairs


def test_a_server_login_never_opens_a_private_audits_link_for_an_anonymous_visitor(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With LORAFID_USE_SERVER_TOKEN the server audits with its own login; the audit of a gated
    repo it ran for a visitor with a token must not open from a link for an anonymous one. Fails
    if the link's visibility check falls back to the server's login."""
    home = tmp_path / "home"
    monkeypatch.setenv("LORAFID_HOME", str(home))
    monkeypatch.setenv("HF_TOKEN", "hf_server_login")  # reads the gated repo
    add_models(hub)
    config = AppConfig(
        endpoint=hub.endpoint, store_home=home, examples_dir=tmp_path / "none", device="cpu", server_token=True
    )
    with serve(config) as url:
        client = Client(url, verbose=False)
        link = run(client, finetune=GATED, token="hf_reader_token")[-1][LINK]
        assert link
        anonymous = Client(url, verbose=False)  # another visitor, with no token
        opened = anonymous.predict("?" + link.split("?", 1)[1], 64, "energy_retained", api_name="/open_link")
    assert opened[3] == {"__type__": "update"}  # no summary shown
    assert "has not been audited here yet, or its audit is of a gated or private repo" in plain(opened[L_PROGRESS])


def test_downloads_are_written_per_request_atomically_and_swept(tmp_path: Path) -> None:
    """Two sessions downloading the same pair at the same rank never get each other's file."""
    import dataclasses
    import threading

    from lorafid.web.downloads import sweep_downloads, write_report_json

    reports = []
    for seed in (1, 2):
        base, tuned = model_pair(layers=1, dtype=torch.float32, seed=seed)
        dirs = [write_dir(shard_files(t, 1), tmp_path / f"m{seed}" / side) for side, t in (("b", base), ("t", tuned))]
        with Audit(str(dirs[0]), str(dirs[1]), AuditConfig(rank=4, store=Store(tmp_path / f"s{seed}"))) as job:
            for _ in job.run():
                pass
            # Same names and rank for both, different numbers: the old shared file name collided.
            reports.append(dataclasses.replace(job.report(), base=reports[0].base if reports else job.report().base))
    reports[1] = dataclasses.replace(reports[1], finetune=reports[0].finetune)
    folder = tmp_path / "downloads"
    folder.mkdir()
    wrong: list[str] = []

    def session(report: Any) -> None:
        expected = [m.energy for m in report.matrices]
        for _ in range(30):
            path = write_report_json(report, folder)
            if [m["energy"] for m in json.loads(path.read_text())["matrices"]] != expected:
                wrong.append(path.name)

    threads = [threading.Thread(target=session, args=(r,)) for r in reports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert not list(folder.glob("*/.*.partial"))  # written under a temporary name, renamed into place
    path = write_report_json(reports[0], folder)
    assert path.name.endswith("-rank4.json")
    old = time.time() - 3600
    for sub in folder.iterdir():
        os.utime(sub, (old, old))
    sweep_downloads(folder)
    assert list(folder.iterdir()) == []


def test_the_json_is_written_only_when_downloaded(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[int] = []
    original = served.audit_tab.write_report_json

    def counting(report: Any, directory: Path) -> Path:
        written.append(report.rank)
        return original(report, directory)

    monkeypatch.setattr(served.audit_tab, "write_report_json", counting)
    client = served.client()
    run(client, rank=8)
    for rank in (2, 3, 5):
        client.predict(rank, "energy_retained", api_name="/rerank")
    assert written == []
    assert download(client, 5)["settings"]["rank"] == 5
    assert written == [5]


def test_a_permalink_names_the_commits_it_shows(served: Served) -> None:
    first = run(served.client(), rank=8)[-1]
    old_link = first[LINK]
    # The fine-tune's main moves to a new commit (a different fine-tune), and someone audits it.
    _, moved = model_pair(layers=2, dtype=torch.bfloat16, seed=7)
    new_sha = served.hub.add_repo(TUNED, shard_files(moved, 1))
    unpinned = "?base=org%2Fbase&finetune=org%2Ftuned&rank=8"
    before = served.client().predict(unpinned, 8, "mse", api_name="/open_link")
    assert "not been audited here yet" in before[L_PROGRESS]  # main is no longer what was audited
    second = run(served.client(), rank=8)[-1]
    assert new_sha in second[LINK] and second[LINK] != old_link
    # The old link still opens the old commit's audit, the new one the new: each says what it is.
    old = served.client().predict("?" + old_link.split("?", 1)[1], 8, "mse", api_name="/open_link")
    new = served.client().predict(unpinned, 8, "mse", api_name="/open_link")
    assert old[3] == first[SUMMARY] and new[3] == second[SUMMARY] and old[3] != new[3]
    assert f"fine-tune {new_sha[:12]}" in plain(new[L_PROGRESS])
    labels = [label for label in gallery_labels(served.client()) if f"<b>fine-tune</b> {TUNED}" in label]
    assert len(labels) == 2 and len(set(labels)) == 2
    assert any(f"{TUNED} @ {new_sha[:7]}" in label for label in labels)


HOSTILE = [
    "model.layers.0.[Sign in again](https://evil.example/login).weight",
    "model.layers.0.<a href='https://evil.example'>x</a>.weight",
    "model.layers.0.a`b``c.weight",
]


def test_names_from_a_hostile_repo_render_as_text(served: Served) -> None:
    from markdown_it import MarkdownIt

    base = {name: torch.randn(4, 4) for name in HOSTILE}
    tuned = {name: t + 0.1 * torch.randn(4, 4) for name, t in base.items()}
    served.hub.add_repo("evil/base", shard_files(base, 1))
    served.hub.add_repo("evil/tuned", shard_files(tuned, 1))
    client = served.client()
    final = run(client, base="evil/base", finetune="evil/tuned", rank=2)[-1]
    rendered, hub_line = MarkdownIt("commonmark").enable("table").render(final[SUMMARY]).split("On the Hub:")
    assert "<a " not in rendered and "href" not in rendered.replace("&lt;a href", "")
    # The only links: both repo pages at the audited commits, built from validated IDs and SHAs.
    assert re.findall(r'href="[^"]*/(evil/\w+)/tree/[0-9a-f]{40}"', hub_line) == ["evil/base", "evil/tuned"]
    assert hub_line.count("<a ") == 2
    worst = download(client, 2)["summary"]["worst"][0][0]
    assert html.escape(worst, quote=False) in rendered  # the whole name, as characters
    heatmap = json.loads(final[0]["plot"])
    shown = json.dumps(heatmap["data"])
    assert "<a href" not in shown and "&lt;a href=" in shown
    from lorafid.web.text import code_span

    assert MarkdownIt("commonmark").render(code_span(HOSTILE[2])) == f"<p><code>{HOSTILE[2]}</code></p>\n"


def test_error_messages_are_escaped_and_cut(served: Served) -> None:
    names = {"model.layers.0.[click](https://evil.example).weight": torch.randn(2, 2)}
    served.hub.add_repo("evil/dup", {"a.safetensors": save(names), "b.safetensors": save(names)})
    with pytest.raises(AppError) as popup:
        run(served.client(), finetune="evil/dup")
    assert "appears in both" in str(popup.value)
    job = served.client().submit(BASE, "evil/dup", "", "", 8, "energy_retained", "", api_name="/run_audit")
    with pytest.raises(AppError):
        job.result(timeout=120)
    progress = job.outputs()[-1][PROGRESS]
    from markdown_it import MarkdownIt

    assert "<a " not in MarkdownIt("commonmark").render(progress)
    huge = "org/" + "x" * 1_000_000
    with pytest.raises(AppError) as popup:
        run(served.client(), finetune=huge)
    assert len(str(popup.value)) < 400 and "1,000,004 characters" in str(popup.value)


def test_bad_tokens_and_fresh_pages_get_words_not_tracebacks(served: Served) -> None:
    with pytest.raises(AppError, match="characters a Hugging Face token never has"):
        run(served.client(), finetune=GATED, token="hf_tökén")
    fresh = served.client()
    assert fresh.predict(32, "mse", api_name="/rerank") is not None  # nothing opened yet: no error


def test_uploads_are_refused(served: Served) -> None:
    import httpx

    answer = httpx.post(served.url + "gradio_api/upload", files={"files": ("big.bin", b"\0" * 100_000)}, timeout=30)
    assert answer.status_code >= 400
    assert "100000" not in answer.text or "size" in answer.text.lower()


def test_identical_models_are_reported_as_identical(served: Served) -> None:
    final = run(served.client(), base=BASE, finetune=BASE, rank=8)[-1]
    assert final[SUMMARY].startswith("**No weight matrix differs between the two models")
    assert "keeps" not in final[SUMMARY]
    heatmap = json.loads(final[0]["plot"])["data"][0]
    assert all(v is None for row in heatmap["z"] for v in row)  # blank, not green "100% kept"
    assert all("unchanged" in text for row in heatmap["text"] for text in row if "layer" in text)


def test_tensor_limits_refuse_clearly(hub: HubServer, tmp_path: Path) -> None:
    add_models(hub)
    config = AppConfig(
        endpoint=hub.endpoint, store_home=tmp_path / "h", examples_dir=tmp_path, device="cpu", max_tensor_bytes=1000
    )
    with serve(config) as url, pytest.raises(AppError, match=r"per-tensor limit of 0\.00 GB"):
        run(Client(url, verbose=False))
    config = AppConfig(endpoint=hub.endpoint, store_home=tmp_path / "h", examples_dir=tmp_path, max_tensors=5)
    with (
        serve(config) as url,
        pytest.raises(AppError, match=r"org/base lists 11 tensors, above this server's limit of 5"),
    ):
        run(Client(url, verbose=False))
    env = {"LORAFID_MAX_TENSOR_GB": "2", "LORAFID_MAX_TENSORS": "10", "LORAFID_MAX_AUDIT_MINUTES": "5"}
    parsed = AppConfig.from_env(env)
    assert (parsed.max_tensor_bytes, parsed.max_tensors, parsed.max_audit_minutes) == (2 * 10**9, 10, 5.0)
    assert AppConfig.from_env({}).max_tensor_bytes == 500_000_000  # a 70B MLP in bf16 is 0.47 GB


def safetensors_file(entries: dict[str, dict], data: bytes) -> bytes:
    """A safetensors file from header entries as written, whatever they claim: hostile ones too."""
    head = json.dumps(entries, separators=(",", ":")).encode()
    return len(head).to_bytes(8, "little") + head + data


def test_a_header_claiming_a_100_gb_tensor_is_refused_in_one_line(hub: HubServer, tmp_path: Path) -> None:
    add_models(hub)
    claim = {"dtype": "BF16", "shape": [500_000, 100_000], "data_offsets": [0, 100 * 10**9]}  # 100 GB
    hub.add_repo("org/huge", {"model.safetensors": safetensors_file({"model.layers.0.mlp.up_proj.weight": claim}, b"")})
    config = AppConfig(endpoint=hub.endpoint, store_home=tmp_path / "h", examples_dir=tmp_path, device="cpu")
    hub.clear_requests()
    with serve(config) as url, pytest.raises(AppError) as refused:
        run(Client(url, verbose=False), finetune="org/huge")
    message = str(refused.value)
    assert "\n" not in message and "Traceback" not in message
    assert re.match(r"repo org/huge@[0-9a-f]{12}: model\.safetensors: invalid safetensors header", message)
    assert "data_offsets [0, 100000000000] end past the data" in message and "re-upload it" in message
    assert all(r.bytes_sent < 100_000 for r in hub.requests)  # headers only: no weight read


def test_a_header_flood_is_refused_from_its_length_unfetched(hub: HubServer, tmp_path: Path) -> None:
    add_models(hub)  # org/base lists 11 tensors
    n = 40_000  # a valid header of n one-byte tensors: 2.6 MB; the count cap alone would parse all of it
    tiny = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}
    flood = safetensors_file(tiny, bytes(n))
    hub.add_repo("org/flood", {"model.safetensors": flood})
    assert 8 + header_cap(20) < len(flood)
    config = AppConfig(endpoint=hub.endpoint, store_home=tmp_path / "h", examples_dir=tmp_path, max_tensors=20)
    hub.clear_requests()
    with (
        serve(config) as url,
        pytest.raises(
            AppError,
            match=rf"org/flood@[0-9a-f]{{12}}: model\.safetensors announces a {len(flood) - 8 - n:,}-byte header, "
            rf"above this server's cap of {header_cap(20):,} bytes \(set by LORAFID_MAX_TENSORS",
        ),
    ):
        run(Client(url, verbose=False), finetune="org/flood")
    fetched = [r for r in hub.requests if r.range]
    assert fetched and max(r.bytes_sent for r in fetched) <= HEADER_PROBE_BYTES  # the body past the probe: never
    assert sum(r.bytes_sent for r in hub.requests) < len(flood) / 4


def test_an_audit_stops_at_the_time_limit_and_keeps_its_results(hub: HubServer, tmp_path: Path) -> None:
    add_models(hub)
    home = tmp_path / "h"
    config = AppConfig(
        endpoint=hub.endpoint, store_home=home, examples_dir=tmp_path, device="cpu", max_audit_minutes=0.5 / 60
    )
    with serve(config) as url, hub.inject(slow_bytes_per_s=20_000):  # ~0.2 s per tensor: 8 take > 0.5 s
        final = run(Client(url, verbose=False))[-1]
    assert "Stopped after 0.00833333 minutes" in final[PROGRESS] or "Stopped after" in final[PROGRESS]
    kept = store_rows(home)
    assert 0 < kept < 8 and f"{kept} of 8 matrices kept" in final[PROGRESS]


def test_figure_pace_follows_its_cost() -> None:
    from lorafid.web.pacing import Throttle

    now = [0.0]
    pace = Throttle(0.5, cost_factor=5.0, clock=lambda: now[0])
    assert pace.ready()
    pace.spent(2.0)  # a frame of 20,000 matrices took 2 s to build
    now[0] += 9.9
    assert not pace.ready()
    now[0] += 0.2
    assert pace.ready()


def test_cheap_events_never_wait_behind_audits(hub: HubServer, tmp_path: Path) -> None:
    add_models(hub)
    config = AppConfig(
        endpoint=hub.endpoint, store_home=tmp_path / "h", examples_dir=tmp_path, device="cpu", max_queue=1
    )
    with serve(config) as url, hub.inject(slow_bytes_per_s=4_000):  # the audit takes ~20 s
        args = (BASE, TUNED, "", "", 8, "energy_retained", "")
        running = Client(url, verbose=False).submit(*args, api_name="/run_audit")
        deadline = time.monotonic() + 60
        while not running.outputs() and time.monotonic() < deadline:
            time.sleep(0.05)
        waiting = Client(url, verbose=False).submit(*args, api_name="/run_audit")
        time.sleep(0.5)  # now one audit runs and one waits: the queue (max 1) is full
        with pytest.raises(QueueError, match="Queue is full"):
            Client(url, verbose=False).submit(*args, api_name="/run_audit").result(timeout=60)
        # Page loads, permalinks and the slider of other visitors, sent as the page sends events
        # that skip the queue (Gradio's JS client posts them to /run; the Python client always queues).
        cheap = (("open_link", ["?base=org%2Fx&finetune=org%2Fy", 8, "mse"]), ("rerank", ["", 16, "mse"]))
        for i in range(8):
            for name, data in cheap:  # the page sends state values too ("": nothing opened yet)
                body = {"data": data, "session_hash": f"visitor{i}"}
                answer = httpx.post(f"{url}gradio_api/run/{name}", json=body, timeout=30)
                assert answer.status_code == 200, answer.text
        assert not running.done()  # all of the above were answered while the audit ran
        running.cancel()
        waiting.cancel()


def test_one_visitor_runs_one_audit_at_a_time(hub: HubServer, tmp_path: Path) -> None:
    add_models(hub)
    config = AppConfig(
        endpoint=hub.endpoint, store_home=tmp_path / "h", examples_dir=tmp_path, device="cpu", concurrency=2
    )
    with serve(config) as url, hub.inject(slow_bytes_per_s=10_000):
        first = Client(url, verbose=False).submit(BASE, TUNED, "", "", 8, "energy_retained", "", api_name="/run_audit")
        deadline = time.monotonic() + 60
        while not any("matrices" in str(o[PROGRESS]) for o in first.outputs()) and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(AppError, match="You already have 1 audit"):
            run(Client(url, verbose=False), finetune=GATED, token="hf_x")
        first.cancel()
