"""What a first-time visitor of the dashboard met (issue 20): words after Stop, full rank, a failed
audit's view, links that open their tab, the provider link's endpoint, charts and tables.

Handlers run through gradio_client against ``build_app`` on 127.0.0.1 (as in test_app.py), or are
called on a ``Dashboard`` directly where only the returned components matter. Scrolling and the
phone's tabs are checked in a real browser in test_browser.py.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
from gradio_client.exceptions import AppError

from lorafid.web.config import AppConfig
from tests.web.test_app import BASE, PROGRESS, SUMMARY, Served, plain, run
from tests.web.test_app import served as _served  # noqa: F401  (the fixture, registered by import)

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
HEATMAP, GALLERY = 1, 6  # run_audit outputs: the view (ref is a state), progress, gallery


@pytest.fixture
def app(_served: Served) -> Served:  # noqa: F811 - the imported fixture, by name
    return _served


def bold_sentence(summary: str) -> str:
    """The summary card's first sentence, as the page shows it in bold."""
    match = re.match(r"\*\*(.+?)\*\*", plain(summary))
    assert match, summary
    return match.group(1)


# item 1 (the gallery row after Stop) needs a real Stop: test_browser.py.


# -- item 2: a rank above full rank, in the gallery and when opened ------------------------------------


def test_a_rank_above_full_rank_is_full_rank_in_the_gallery_and_opens_without_errors(
    app: Served, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    final = run(app.client(), rank=64)[-1]
    assert bold_sentence(final[SUMMARY]).startswith("Full rank (32) keeps everything")
    (row,) = final[GALLERY]["samples"]
    assert row[2].startswith("Full rank (32) keeps everything") and "Rank 64" not in row[2]
    visitor = app.client()
    visitor.predict("", 64, "energy_retained", api_name="/open_link")  # the page load lists the gallery
    opened = visitor.predict(0, 64, "energy_retained", api_name="/open_audit")
    assert opened[10]["value"] == opened[10]["maximum"] == 32  # the slider, at the largest k
    assert bold_sentence(opened[3]).startswith("Full rank (32) keeps everything")
    logged = capfd.readouterr().err + caplog.text
    assert "greater than maximum" not in logged and "Traceback" not in logged


# -- item 6: a failed audit does not leave the previous pair's view ------------------------------------


def test_a_failed_audit_clears_the_previous_pairs_summary_and_charts(app: Served) -> None:
    client = app.client()
    good = run(client, rank=8)[-1]
    assert good[SUMMARY] and good[HEATMAP]
    job = client.submit(BASE, "org/missing", "", "", 8, "energy_retained", "", api_name="/run_audit")
    with pytest.raises(AppError, match="org/missing"):
        job.result(timeout=60)
    last = job.outputs()[-1]
    assert plain(last[PROGRESS]).startswith("**Failed:**") and "org/missing" in plain(last[PROGRESS])
    assert last[SUMMARY] == "" and last[HEATMAP] is None  # no summary or chart of org/tuned under it
    with pytest.raises(AppError, match="Run an audit or open one first"):
        client.predict(8, api_name="/download")  # the failed pair's view holds no audit to download


# -- items 9, 11, 12, 14: links open their tab; the probe link's endpoint; charts; tables ---------------

BEHAVIOUR: dict[str, Any] = {
    "schema": "lorafid.behaviour/1",
    "status": "complete",
    "created": "2026-12-06T00:00:00+00:00",
    "base": {"spec": "org/base"},
    "finetune": {"spec": "org/tuned"},
    "settings": {"ranks": [8, 64], "prompts": 1, "prompt_set": "builtin-v1", "chat_template": False},
    "variants": {
        name: {
            "kind": kind,
            "rank": rank,
            "keep_extras": False,
            "kl_mean": kl,
            "kl_p95": kl * 2,
            "kl_max": kl * 3,
            "top1_agreement": top1,
            "loglik_delta": -kl / 7,
            "tokens": 12,
        }
        for name, kind, rank, kl, top1 in (
            ("base", "base", None, 4.6086, 0.117),
            ("rank-8", "served", 8, 0.07215251209154244, 0.927),
            ("rank-64", "served", 64, 3.6580456817669525e-8, 1.0),
        )
    },
    "extras_share": {},
    "prompts": [
        {
            "id": "p1",
            "text": "the knight drew his sword",
            "tokens": 12,
            "variants": {
                "base": {"kl_mean": 4.6086},
                "rank-8": {"kl_mean": 0.07215251209154244},
                "rank-64": {"kl_mean": 3.6580456817669525e-8},
            },
        }
    ],
    "continuations": None,
    "continuations_note": "",
    "stats": {},
}


def board(tmp_path: Path) -> Any:
    app = importlib.import_module("lorafid.web.app")
    dashboard = app.Dashboard(AppConfig(store_home=tmp_path / "home", examples_dir=tmp_path / "none"))
    dashboard.build()
    return dashboard


class PageRequest:
    """What a link handler reads of the Gradio request of a page opened at the server's root."""

    headers: dict[str, str] = {}  # noqa: RUF012  # read only
    client = None
    url = "http://127.0.0.1:7860/"


def test_a_behaviour_link_opens_the_behaviour_tab_with_rounded_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    dash = board(tmp_path)
    key = dash.store.put_document("behaviour", BEHAVIOUR)
    dash.catalog.share_all = True  # these sources name no commit; visibility has tests of its own
    shown = dash.open_behaviour_link(f"?behaviour={key}", PageRequest())
    assert shown[dash.behave_link] == f"[Permalink](http://127.0.0.1:7860/?behaviour={key})"
    assert json.loads(Path(shown[dash.behave_file]).read_text())["variants"] == BEHAVIOUR["variants"]
    tabs = shown[dash.tabs]
    assert isinstance(tabs, gr.Tabs) and tabs.selected == "behaviour"
    assert (shown[dash.behave_base], shown[dash.behave_finetune]) == ("org/base", "org/tuned")
    assert shown[dash.behave_ranks] == "8,64"  # Run behaviour check repeats the ranks it ran
    table = shown[dash.behave_table]
    kl = dict(zip(table["variant"], table["KL mean"], strict=True))
    assert kl == {"base": 4.61, "rank-8": 0.0722, "rank-64": 3.66e-8}  # three significant figures
    assert list(table["variant"]) == ["base", "rank-8", "rank-64"]  # rank order, not the stored keys' text order
    rows = shown[dash.behave_rows]
    assert [rows[n][0] for n in ("base", "rank-8", "rank-64")] == [4.61, 0.0722, 3.66e-8]
    # A page with no link stays on the tab it opens on.
    assert dash.tabs not in dash.open_behaviour_link("", None)


def test_behaviour_chart_has_a_log_kl_axis_ticks_at_the_ranks_run_and_titles(tmp_path: Path) -> None:
    from lorafid.web.tabs.behaviour import behaviour_figure

    figure = behaviour_figure(BEHAVIOUR, {8: 0.8, 64: 0.99})
    assert figure.layout.yaxis.type == "log"  # 0.07 and 4e-8 are decades apart, not both flat at 0
    assert list(figure.layout.xaxis.tickvals) == [8, 64] and list(figure.layout.xaxis.ticktext) == ["8", "64"]
    titles = [a.text for a in figure.layout.annotations]
    assert titles[:2] == ["KL per token (nats)<br>fine-tune ‖ served", "top-1 agreement<br>and energy kept"]
    kl = next(t for t in figure.data if t.name == "KL, lora-only")
    assert list(kl.y) == [0.07215251209154244, 3.6580456817669525e-8]
    assert figure.layout.legend.y < 0  # under the axes' titles, not over them
    base = next(t for t in figure.data if t.name == "KL, base: 4.61")  # in the legend, not a label on the plot
    assert list(base.x) == [8, 64] and base.line.dash == "dash" and len(titles) == 2


def probe(method: str = "completions") -> dict[str, Any]:
    """A stored provider check: ranks 16 to 512, the fine-tune and an 8-bit copy, the base."""
    text = method != "completions"
    key = "gap" if text else "distance"

    def candidate(name: str, value: float, rank: int | None) -> dict[str, Any]:
        return {
            "name": name,
            key: value,
            "interval": [value * 0.8, value * 1.2],
            "rank": rank,
            "serving": "lora-only" if rank else None,
            "ruled_out": value > 0.01,
            "top1_agreement": 0.987654321,
            "argmax_agreement": 0.9,
            "fit_z": 0.123,
            "chosen_logprob_error": 0.01,
            "distance_to_finetune": value,
            "mean_logprob": -2.5,
        }

    values = {"rank-16": (0.0123456, 16), "rank-512": (1.5e-7, 512), "finetune": (1.2e-7, None)}
    values |= {"finetune-8bit": (1.3e-7, None), "base": (4.6, None)}
    return {
        "schema": "lorafid.probe/1",
        "status": "complete",
        "endpoint_host": "127.0.0.1",
        "model": "served",
        "method": method,
        "channels_tried": [],
        "prompt_set": {"name": "builtin", "count": 1},
        "requests": {"sent": 1},
        "failed_prompts": {},
        "settings": {"ranks": [16, 512], "channel": "auto", "max_requests": 40},
        "base": {"spec": "org/base"},
        "finetune": {"spec": "org/tuned"},
        "candidates": {n: candidate(n, v, r) for n, (v, r) in values.items()},
        "verdict": {
            "sentence": "Closest to the fine-tune.",
            "closest": "finetune",
            "matches": True,
            "consistent": ["finetune"],
            "rank_range": None,
            "tolerance": 1e-4,
        },
        "prompts": [{"index": 0, "text": "x", "tokens": 3, "distance": {"rank-16": 0.0123456789}, "finish": "length"}],
    }


def test_a_probe_link_leaves_the_endpoint_empty_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    dash = board(tmp_path)
    key = dash.store.put_document("probe", probe())
    dash.catalog.share_all = True  # these sources name no commit; visibility has tests of its own
    shown = dash.open_probe_link(f"?probe={key}", PageRequest())
    assert shown[dash.probe_link] == f"[Permalink](http://127.0.0.1:7860/?probe={key})"
    assert shown[dash.tabs].selected == "provider-check"
    assert shown[dash.probe_endpoint] == ""  # never https://127.0.0.1, a URL that was never checked
    assert "Only the host was kept" in plain(shown[dash.probe_status])
    assert shown[dash.probe_model] == "served" and shown[dash.probe_ranks] == "16,512"
    table = shown[dash.probe_table]
    assert dict(zip(table["candidate"], table["KL nats/token"], strict=True))["rank-16"] == 0.0123
    assert set(table["top-1 agreement"]) == {0.988}
    assert shown[dash.probe_rows]["rank-16"][0] == 0.0123  # per prompt too


def test_probe_chart_has_a_log_axis_and_names_the_unranked_in_the_legend() -> None:
    from lorafid.web.plots import probe_distances

    figure = probe_distances(probe())
    assert figure.layout.yaxis.type == "log"
    assert list(figure.layout.xaxis.tickvals) == [16, 512]
    assert not figure.layout.annotations  # no label sits on a rank tick ("finetune-8bit" on "512")
    names = [t.name for t in figure.data]
    assert "finetune-8bit: 1.3e-07" in names and "base: 4.6" in names
    gaps = probe_distances(probe("completions-text"))  # a gap of 0 is drawn at the floor, not dropped
    assert gaps.layout.yaxis.type == "log" and min(min(t.y) for t in gaps.data) > 0


def test_a_gallery_row_the_page_no_longer_lists_is_said_so(app: Served) -> None:
    stale = app.client().predict(3, 8, "energy_retained", api_name="/open_audit")  # this page lists no row 3
    assert "no longer listed" in stale[9]


# -- item 15 and the table of providers on a phone: one card per row -----------------------------------


def test_phone_cards_escape_text_and_keep_only_the_tables_own_links() -> None:
    from lorafid.web.text import cards_html

    rows = [
        [
            "evil<script>",
            "[x](javascript:alert(1)) <b>bold</b>\nsecond line",
            "[org/t](https://hub/org/t) · [open](?a=1&b=2)",
            None,
        ]
    ]
    html = cards_html(["Provider", "Model", "Links", "Requests"], ["str", "markdown", "markdown", "number"], rows)
    assert html.startswith('<div class="card"><div class="card-title">evil&lt;script&gt;</div>')
    assert '<a href="javascript' not in html and "&lt;b&gt;bold&lt;/b&gt;<br>second line" in html
    assert '<a href="https://hub/org/t" target="_blank" rel="noopener">org/t</a>' in html
    assert '<a href="?a=1&amp;b=2">open</a>' in html  # this page's own link opens here
    assert "Requests" not in html  # an empty cell is left out


# -- issue 19: the page's words come from the error's fields, not from its message ----------------------


def test_in_app_words_read_the_errors_fields_not_its_message() -> None:
    import pickle

    from lorafid.errors import GatedRepoError, InvalidSourceError, RepoNotFoundError
    from lorafid.web.wording import in_app_words

    # Messages that share no wording with the CLI's: only the fields can produce these sentences.
    gated = GatedRepoError("(any words)", repo="org/x", page="https://hub/org/x")
    said = in_app_words(gated, typed=False, oauth=True, allow_local=False)
    assert isinstance(said, GatedRepoError) and said.repo == "org/x"
    assert str(said) == (
        "org/x is a gated repo: accept the licence at https://hub/org/x (signed in to the Hub), then paste a token "
        "that can read it in the token field, or press Sign in with Hugging Face."
    )
    assert "token you pasted" in str(in_app_words(gated, typed=True, oauth=False, allow_local=False))
    missing = RepoNotFoundError("(any words)", repo="org/m", endpoint="https://hub")
    assert str(in_app_words(missing, typed=True, oauth=False, allow_local=True)) == (
        "Repo org/m was not found on https://hub. Check the spelling (org/name); if it is private, the token you "
        "pasted cannot read it."
    )
    refused = RepoNotFoundError("(any words)", repo="org/m", endpoint="https://hub", token_rejected=True)
    assert "Paste a valid token" in str(in_app_words(refused, typed=True, oauth=False, allow_local=True))
    local = InvalidSourceError("'./x' is a local path (any advice)", problem="'./x' is a local path.")
    assert str(in_app_words(local, typed=False, oauth=False, allow_local=False)) == (
        "'./x' is a local path. Enter a Hub repo ID like org/name; a revision goes in its own field."
    )
    assert in_app_words(local, typed=False, oauth=False, allow_local=True) is local  # a private deployment: as is
    plain_error = RepoNotFoundError("Repo org/m (--token or HF_TOKEN)")  # no fields: never rewritten from its text
    assert in_app_words(plain_error, typed=False, oauth=False, allow_local=False) is plain_error
    copy = pickle.loads(pickle.dumps(refused))  # a batch worker's error keeps its fields
    assert (copy.repo, copy.endpoint, copy.token_rejected, str(copy)) == ("org/m", "https://hub", True, "(any words)")


def test_the_hubs_errors_carry_their_fields(app: Served) -> None:
    from lorafid.errors import GatedRepoError, InvalidSourceError, RepoNotFoundError
    from lorafid.weights.source import open_source, parse_source_spec

    endpoint = app.hub.endpoint
    with pytest.raises(RepoNotFoundError) as missing:
        open_source("org/missing", endpoint=endpoint, token=False)
    assert (missing.value.repo, missing.value.endpoint, missing.value.token_rejected) == (
        "org/missing",
        endpoint,
        False,
    )
    with pytest.raises(GatedRepoError) as gated:
        open_source("org/gated-tuned", endpoint=endpoint, token=False)
    assert gated.value.repo == "org/gated-tuned" and gated.value.page == f"{endpoint}/org/gated-tuned"
    with pytest.raises(InvalidSourceError) as local:
        parse_source_spec("./checkpoint", allow_local=False)
    assert local.value.problem == "'./checkpoint' is a local path; this deployment reads Hub repos only."
    assert str(local.value).startswith(local.value.problem + " Expected a Hub repo ID")  # the CLI's words unchanged


@pytest.mark.parametrize("kind", ["behaviour", "probe"])
def test_a_damaged_stored_check_opens_as_one_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A stored document that its typed ``from_dict`` refuses (a field missing) is said in one
    line on its tab, the same for both checks: the one boundary for stored documents."""
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    dash = board(tmp_path)
    dash.catalog.share_all = True
    document = dict(BEHAVIOUR if kind == "behaviour" else probe())
    del document["prompts"]
    key = dash.store.put_document(kind, document)
    opened = dash.open_behaviour_link if kind == "behaviour" else dash.open_probe_link
    status = dash.behave_status if kind == "behaviour" else dash.probe_status
    shown = opened(f"?{kind}={key}", None)
    assert "is incomplete or damaged (missing field 'prompts')" in plain(shown[status])
    assert dash.tabs not in shown
