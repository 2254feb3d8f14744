"""What a first-time visitor meets in the dashboard: the form, the gallery, the rank controls,
the progress line, links and the words of errors (issue 10, items 1-9).

Handlers are called through gradio_client against ``lorafid.web.app.build_app`` on 127.0.0.1 (as in
test_app.py), or directly where no browser state is involved. Layout at phone width is
checked in test_browser.py.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from lorafid.audit.engine import AuditProgress
from lorafid.audit.store import Store
from lorafid.audit.summary import percent
from lorafid.web.config import AppConfig
from lorafid.web.gallery import Catalog
from lorafid.web.links import example_link, parse_link, permalink
from lorafid.web.pacing import ProgressMeter
from lorafid.web.text import html_text
from tests.hub_server import HubServer
from tests.web.test_app import BASE, GATED, LINK, PROGRESS, SUMMARY, Served, plain, run, serve
from tests.web.test_app import served as _served  # noqa: F401  (the fixture, registered by import)

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
README = Path(__file__).parents[2] / "README.md"
# open_audit outputs: the view (0-4), base, fine-tune, their revisions, progress, rank slider, quick picks
O_SUMMARY, O_LINK, O_BASE, O_FINETUNE, O_PROGRESS, O_RANK, O_PICKS = 3, 4, 5, 6, 9, 10, 11
L_RANK, L_METRIC, L_PROGRESS = 9, 10, 11  # open_link outputs


@pytest.fixture
def examples_app(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The dashboard with the bundled MiniLM examples (the default examples folder)."""
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    with serve(AppConfig(endpoint=hub.endpoint, store_home=tmp_path / "home", device="cpu")) as url:
        yield url


@pytest.fixture
def app(_served: Served) -> Served:  # noqa: F811 - the imported fixture, by name
    """The dashboard over the loopback Hub's org/base, org/tuned and gated copy (test_app.served)."""
    return _served


def bundled() -> Catalog:
    return Catalog(Store(Path("/nonexistent-lorafid-store")))


# -- item 1: fields hold repo IDs only; an example's link names the example ------------------


def test_opening_an_example_leaves_the_form_for_repo_ids(examples_app: str) -> None:
    client = Client(examples_app, verbose=False)
    opened = client.predict(0, 64, "energy_retained", api_name="/open_audit")
    assert (opened[O_BASE], opened[O_FINETUNE]) == ("", "")  # descriptions are not repo IDs
    assert "sentence-transformers/all-MiniLM-L6-v2 (PyPI" in plain(opened[O_PROGRESS])  # said where it is read
    link = opened[O_LINK]
    assert "example=minilm-full-finetune.json" in link and "PyPI" not in link and "base=" not in link
    again = Client(examples_app, verbose=False).predict("?" + link.split("?", 1)[1], 8, "mse", api_name="/open_link")
    assert again[SUMMARY] == opened[O_SUMMARY]
    assert again[L_METRIC] == "energy_retained" and again[L_RANK]["value"] == 64
    assert "Opened a bundled example" in plain(again[L_PROGRESS])


def test_example_links_parse_and_refuse_other_names() -> None:
    url = example_link("http://h/?x=1", "minilm-lora-r8.json", 8, "mse")
    assert url == "http://h/?example=minilm-lora-r8.json&rank=8&metric=mse"
    params = dict(p.split("=") for p in url.split("?")[1].split("&"))
    assert parse_link(params, {"mse": None}).example == "minilm-lora-r8.json"
    for bad in ("../secret.json", "a/b.json", "x.txt", "", ".json"):
        assert parse_link({"example": bad}, {}).example == ""


# -- item 2: the gallery row's rank, one order, whole sentences, 100% -------------------------


def test_gallery_rows_name_both_sides_in_the_forms_order_and_whole_sentences(examples_app: str) -> None:
    samples = Client(examples_app, verbose=False).predict("", 8, "energy_retained", api_name="/open_link")[-1]
    rows = samples["samples"]
    catalog = bundled()
    for row, entry in zip(rows, catalog.entries(), strict=True):
        pair, _, sentence = row
        assert pair.index("<b>base</b>") < pair.index("<b>fine-tune</b>")
        assert html_text(entry.base) in pair and html_text(entry.finetune) in pair
        assert sentence == html_text(entry.sentence) and not sentence.endswith("...")
    assert not any("100.000000%" in row[2] for row in rows)
    lora = next(row for row in rows if "merged, float32" in row[0])
    assert lora[2].startswith("Rank 8 keeps 100% of")


def test_a_gallery_row_opens_at_the_rank_it_describes(examples_app: str) -> None:
    catalog = bundled()
    client = Client(examples_app, verbose=False)
    for index, entry in enumerate(catalog.entries()):
        report = catalog.open(entry.ref)
        opened = client.predict(index, 64, "energy_retained", api_name="/open_audit")
        assert entry.sentence.startswith(f"Rank {report.rank} keeps")
        assert opened[O_RANK]["value"] == report.rank
        assert plain(opened[O_SUMMARY]).startswith(f"**{entry.sentence}**")


@pytest.mark.parametrize(
    ("share", "text"), [(1 - 4e-9, "100%"), (0.99999, "99.999%"), (0.9995, "99.95%"), (1e-9, "0%"), (0.5, "50%")]
)
def test_percent_shows_at_most_three_decimals(share: float, text: str) -> None:
    assert percent(share) == text


# -- items 7 and 9.12: the rank slider is bounded by the audit's largest k --------------------


def test_slider_and_quick_picks_are_bounded_by_the_largest_k(examples_app: str) -> None:
    client = Client(examples_app, verbose=False)
    opened = client.predict(0, 64, "energy_retained", api_name="/open_audit")
    largest = max(min(m.shape) for m in bundled().open("example:minilm-full-finetune.json").matrices)
    assert largest == 384
    assert opened[O_RANK]["maximum"] == largest and opened[O_RANK]["label"] == "Any rank (1 to 384)"
    assert opened[O_PICKS]["choices"] == [[str(r), str(r)] for r in (8, 16, 32, 64, 128, 256)]  # 512 > k
    with pytest.raises(AppError, match="greater than maximum"):
        client.predict(1000, "energy_retained", api_name="/rerank")  # beyond k: the bound is enforced


def test_a_link_rank_above_the_range_opens_at_the_largest_k_without_errors(examples_app: str) -> None:
    client = Client(examples_app, verbose=False)
    opened = client.predict("?example=minilm-full-finetune.json&rank=100000", 64, "mse", api_name="/open_link")
    assert opened[L_RANK]["value"] == opened[L_RANK]["maximum"] == 384
    assert "rank 100,000, beyond these matrices' largest rank (384): shown at 384" in plain(opened[L_PROGRESS])
    assert plain(opened[SUMMARY]).startswith("**Full rank (384) keeps everything")
    after = client.predict(384, "mse", api_name="/rerank")  # what the slider sends next: accepted
    assert plain(after[SUMMARY]).startswith("**Full rank (384) keeps everything")
    unknown = client.predict("?base=org%2Fa&finetune=org%2Fb&rank=100000", 64, "mse", api_name="/open_link")
    assert unknown[L_RANK]["value"] == 4096  # no audit yet: the slider's own range


# -- item 4: the metric travels with the link ------------------------------------------------


def test_permalink_carries_the_metric() -> None:
    url = permalink("http://h/", "org/a", "org/b", 16, metric="cosine_distance")
    assert url.endswith("&rank=16&metric=cosine_distance")
    assert parse_link({"metric": "cosine_distance"}, {"cosine_distance": None}).metric == "cosine_distance"


def test_run_and_rerank_links_name_the_metric_shown(app: Served) -> None:
    client = app.client()
    assert run(client, rank=8)[-1][LINK].endswith("&metric=energy_retained")
    assert client.predict(4, "mse", api_name="/rerank")[4].endswith("&metric=mse")


# -- item 5: bytes done of total, rate and ETA, with a bar --------------------------------------


def test_progress_line_has_bytes_rate_and_eta() -> None:
    meter = ProgressMeter()
    step = AuditProgress.of(2, 8, 100_000_000, 400_000_000, 10.0, None)
    assert meter.line(step) == "2/8 matrices · 100 of 400 MB · 10 MB/s · about 30 s left · 10.0 s"
    slow = AuditProgress.of(1, 8, 1_000_000, 400_000_000, 10.0, None)
    assert "about 1 h 06 min left" in ProgressMeter().line(slow)  # 399 MB at 0.1 MB/s
    small, big = (
        AuditProgress.of(1, 8, 2_000, 40_000, 1.0, None),
        AuditProgress.of(1, 8, 12 * 10**8, 140 * 10**9, 1.0, None),
    )
    assert " · 2 of 40 kB · " in ProgressMeter().line(small)  # not "0 of 0 MB" for a small model
    assert " · 1.2 of 140.0 GB · " in ProgressMeter().line(big)
    done = AuditProgress.of(8, 8, 400_000_000, 400_000_000, 40.0, None)
    assert "left" not in ProgressMeter().line(done)
    assert (
        ProgressMeter.bar(step) == '<progress value="100000000" max="400000000" aria-label="audit progress"></progress>'
    )


def test_running_audit_streams_a_progress_bar(app: Served) -> None:
    updates = run(app.client(), rank=8)
    running = [u[PROGRESS] for u in updates if "<progress" in str(u[PROGRESS])]
    assert running and re.search(r"\d/8 matrices · [\d,.]+ of [\d,.]+ (kB|MB|GB) · ", running[-1])


# -- item 6: errors in the app's words --------------------------------------------------------

CLI_WORDS = ("--token", "HF_TOKEN", "hf auth login")


def audit_error(client: Client, finetune: str, token: str = "", base: str = BASE) -> str:
    job = client.submit(base, finetune, "", "", 8, "energy_retained", token, api_name="/run_audit")
    with pytest.raises(AppError) as raised:
        job.result(timeout=120)
    message = str(raised.value)
    assert not any(word in message for word in CLI_WORDS), message
    assert plain(job.outputs()[-1][PROGRESS]).endswith(html_unescape(message))  # the same words stay
    return message


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


def test_gated_repo_without_and_with_a_token(app: Served) -> None:
    app.hub.valid_tokens = {"hf_good"}
    none = audit_error(app.client(), GATED)
    assert "paste a token that can read it in the token field." in none
    assert "Sign in" not in none  # no sign-in button on this deployment
    wrong = audit_error(app.client(), GATED, token="hf_bad")
    assert "The Hub rejected the token" in wrong and "Paste a valid token" in wrong
    assert wrong != none


def test_missing_or_private_repo_with_and_without_a_token(app: Served) -> None:
    without = audit_error(app.client(), "org/missing")
    assert "if it is private, paste a token that can read it in the token field." in without
    with_token = audit_error(app.client(), "org/missing", token="hf_any")
    assert "if it is private, the token you pasted cannot read it." in with_token


def test_local_path_refusal_offers_only_repo_ids(app: Served, tmp_path: Path) -> None:
    message = audit_error(app.client(), str(tmp_path), base=str(tmp_path))
    assert "reads Hub repos only" in message
    assert "local path (" not in message and "./checkpoint" not in message and "org/name" in message


def test_sign_in_is_mentioned_only_where_the_button_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path))
    app = importlib.import_module("lorafid.web.app")
    from lorafid.errors import GatedRepoError

    error = GatedRepoError(
        "org/x is a gated repo: accept the licence at https://hub/org/x (signed in to the Hub), then pass a token "
        "with --token or HF_TOKEN, or sign in (hf auth login, or the app's Sign in button).",
        repo="org/x",
        page="https://hub/org/x",
    )
    words = {}
    for oauth in (False, True):
        board = app.Dashboard(AppConfig(store_home=tmp_path, examples_dir=tmp_path, oauth=oauth))
        words[oauth] = str(board._in_app_words(error, typed=False))
    assert "Sign in" not in words[False] and "press Sign in with Hugging Face" in words[True]
    assert words[False].startswith("org/x is a gated repo: accept the licence at https://hub/org/x")


# -- items 8 and 9: how to read it; Hub links ------------------------------------------------------


def test_how_to_read_links_the_readme_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path))
    app = importlib.import_module("lorafid.web.app")
    from lorafid.web.tabs.audit import how_to_read

    assert "## What the numbers mean" in README.read_text()
    assert "https://huggingface.co/spaces/me/lorafid#what-the-numbers-mean" in how_to_read("me/lorafid")
    assert "](" not in how_to_read(None) and "What the numbers mean" in how_to_read(None)
    assert "](" not in how_to_read("evil)[x](y")  # a strange SPACE_ID makes no link
    config = app.build_app(AppConfig(store_home=tmp_path, examples_dir=tmp_path)).config
    labels = [c["props"].get("label") for c in config["components"]]
    assert "How to read this" in labels


def test_summary_explains_rounding_as_a_loss_and_links_both_repos(app: Served) -> None:
    final = run(app.client(), rank=8)[-1]
    summary = final[SUMMARY]
    assert "best possible if the rest were storage rounding" not in summary
    assert "storage rounding in Δ, estimated (no rank recovers it)" in summary
    hub = app.hub.endpoint.rstrip("/")
    assert re.search(rf"base \[org/base\]\({re.escape(hub)}/org/base/tree/[0-9a-f]{{40}}\)", summary)
    assert re.search(rf"fine-tune \[org/tuned\]\({re.escape(hub)}/org/tuned/tree/[0-9a-f]{{40}}\)", summary)
