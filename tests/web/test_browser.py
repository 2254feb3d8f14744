"""The dashboard in a real browser: Debian's chromium driven by Playwright.

Skipped when /usr/bin/chromium or the playwright package is missing (browsers are never
downloaded). Set ``LORAFID_SCREENSHOT=assets/dashboard.png`` to also save a full-page
screenshot of the bundled MiniLM full fine-tune example, opened from the gallery.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lorafid.audit.store import Store
from lorafid.web.config import AppConfig
from lorafid.web.gallery import Catalog
from tests.hub_server import HubServer
from tests.models import model_pair, shard_files
from tests.web.test_app import serve

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = os.environ.get("LORAFID_SCREENSHOT")
SCREENSHOT_DIR = os.environ.get("LORAFID_SCREENSHOT_DIR")  # also keep the layout test's screenshots there
VIEWPORTS = {"desktop": (1400, 900), "phone": (390, 844)}

pytestmark = [
    pytest.mark.browser,
    # A developer without chromium skips; CI (which installs it in .ci/run) never does.
    pytest.mark.skipif(
        not CHROMIUM.exists() and not os.environ.get("CI"), reason="needs Debian's chromium at /usr/bin/chromium"
    ),
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),  # Gradio's stats vs pandas 3
]
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def page_url(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    base, tuned = model_pair(layers=2, dtype=torch.bfloat16)
    hub.add_repo("org/base", shard_files(base, 2))
    hub.add_repo("org/tuned", shard_files(tuned, 2, offset=1))
    config = AppConfig(endpoint=hub.endpoint, store_home=tmp_path / "home", examples_dir=tmp_path / "examples")
    with serve(config) as url:
        yield url


@pytest.fixture
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def wait_for_text(page: object, selector: str, text: str, timeout_ms: int = 30_000) -> None:
    page.wait_for_function(  # type: ignore[attr-defined]
        "([sel, text]) => (document.querySelector(sel)?.innerText || '').includes(text)",
        arg=[selector, text],
        timeout=timeout_ms,
    )


def test_run_move_rank_download_and_permalink(browser: object, page_url: str, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)  # type: ignore[attr-defined]
    page.set_default_timeout(30_000)
    page.goto(page_url)
    page.get_by_label("Base model").fill("org/base")
    page.get_by_label("Fine-tuned model").fill("org/tuned")
    page.get_by_role("button", name="Run audit").click()
    page.wait_for_selector("#heatmap .js-plotly-plot")
    wait_for_text(page, "#progress", "Done:")
    # The slider asked for 64; these matrices have at most rank 32, so it is bounded there.
    wait_for_text(page, "#summary", "Full rank (32) keeps everything")
    wait_for_text(page, "#rank", "Any rank (1 to 32)")
    assert page.locator("#rank input[type=range]").get_attribute("max") == "32"

    rank_box = page.locator("#rank input[type=number]")
    rank_box.fill("4")
    rank_box.press("Enter")
    wait_for_text(page, "#summary", "Rank 4 keeps")
    wait_for_text(page, "#heatmap", "at rank 4")

    with page.expect_download() as download:
        page.locator("#download").click()
    saved = tmp_path / "report.json"
    download.value.save_as(saved)
    report = json.loads(saved.read_text())
    assert report["schema"] == "lorafid.report/1"
    assert report["settings"]["rank"] == 4 and report["status"] == "complete"
    assert report["finetune"]["repo_id"] == "org/tuned"

    link = page.locator("#permalink textarea, #permalink input").first.input_value()
    assert "base=org%2Fbase" in link and "rank=4" in link and link.endswith("&metric=energy_retained")

    opened = browser.new_page(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
    opened.set_default_timeout(30_000)
    opened.goto(link)
    opened.wait_for_selector("#heatmap .js-plotly-plot")
    wait_for_text(opened, "#summary", "Rank 4 keeps")
    assert opened.get_by_label("Base model").input_value() == "org/base"
    assert opened.get_by_label("Fine-tuned model").input_value() == "org/tuned"
    assert opened.locator("#rank input[type=number]").input_value() == "4"

    # A rank typed above the slider's maximum reads as full rank: no "Error" from Gradio's own check.
    box = opened.locator("#rank input[type=number]")
    box.fill("64")
    box.press("Enter")
    wait_for_text(opened, "#summary", "Full rank (32) keeps everything")
    opened.wait_for_timeout(1000)  # an error toast would have come with the answer
    assert opened.locator(".toast-body").count() == 0, opened.locator(".toast-body").all_inner_texts()


def test_bundled_example_opens_from_the_gallery(browser: object, hub: HubServer, tmp_path: Path) -> None:
    config = AppConfig(endpoint=hub.endpoint, store_home=tmp_path / "home")  # the bundled examples
    example = Catalog(Store(tmp_path / "x")).open("example:minilm-full-finetune.json")
    with serve(config) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
        page.set_default_timeout(30_000)
        page.goto(url)
        page.get_by_text("MiniLM full fine-tune, float32").first.click()
        page.wait_for_selector("#heatmap .js-plotly-plot")
        wait_for_text(page, "#summary", example.summary().sentence())
        wait_for_text(page, "#heatmap", "intermediate.dense")
        wait_for_text(page, "#progress", "all-MiniLM-L6-v2")  # described beside the form, not in it
        assert page.get_by_label("Base model").input_value() == ""
        rank_box = page.locator("#rank input[type=number]")
        rank_box.fill("8")
        rank_box.press("Enter")
        wait_for_text(page, "#summary", example.with_rank(8).summary().sentence())
        if SCREENSHOT:
            rank_box.fill("64")
            rank_box.press("Enter")
            wait_for_text(page, "#summary", "Rank 64 keeps")
            page.wait_for_timeout(1000)  # let Plotly finish drawing
            page.screenshot(path=SCREENSHOT, full_page=True)


LAYOUT_JS = """() => {
  const width = window.innerWidth;
  const rect = (el) => el.getBoundingClientRect();
  const wordsWhole = (el) => { const text = el.firstChild || el;
    const words = [...(text.textContent || '').matchAll(/\\S+/g)];
    return text.nodeType === 3 && words.every((m) => { const r = document.createRange();
      r.setStart(text, m.index); r.setEnd(text, m.index + m[0].length);
      return new Set([...r.getClientRects()].map((b) => Math.round(b.top))).size === 1; }); };
  const cells = [...document.querySelectorAll('#gallery tbody tr:first-child td')];
  const numbers = [...document.querySelectorAll('#summary table td:last-child')];
  const legendBelow = (id) => { const plot = document.querySelector(id + ' .nsewdrag');
    const legend = document.querySelector(id + ' .legend'); return rect(legend).top >= rect(plot).bottom; };
  const ticks = [...document.querySelectorAll('#curves .xtick text')].map(rect).sort((a, b) => a.left - b.left);
  return {
    overflow: document.documentElement.scrollWidth - width,
    galleryCells: cells.length,
    galleryInside: cells.every((c) => rect(c).left >= 0 && rect(c).right <= width + 1 && rect(c).width > 40),
    galleryCut: cells.some((c) => c.innerText.trim().endsWith('...')),
    numbersWhole: numbers.length > 0 && numbers.every(wordsWhole),
    legendsBelow: legendBelow('#lines') && legendBelow('#curves'),
    ticksApart: ticks.length > 2 && ticks.every((t, i) => i === 0 || t.left >= ticks[i - 1].right),
    heatmapTop: rect(document.querySelector('#heatmap')).top,
  };
}"""


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_example_is_readable_on_desktop_and_phone(
    browser: object, hub: HubServer, tmp_path: Path, viewport: str
) -> None:
    """Issue 10's layout items at 1400x900 and 390x844: the gallery shows every column, numbers
    do not wrap, legends sit below their plots, rank ticks do not overlap, and opening a row
    brings the charts into view. Screenshots go to LORAFID_SCREENSHOT_DIR (else tmp_path)."""
    width, height = VIEWPORTS[viewport]
    shots = Path(SCREENSHOT_DIR) if SCREENSHOT_DIR else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    config = AppConfig(endpoint=hub.endpoint, store_home=tmp_path / "home")  # the bundled examples
    with serve(config) as url:
        page = browser.new_page(viewport={"width": width, "height": height})  # type: ignore[attr-defined]
        page.set_default_timeout(30_000)
        page.goto(url)
        page.wait_for_selector("#gallery tbody tr")
        page.wait_for_timeout(500)
        page.screenshot(path=str(shots / f"{viewport}-start.png"), full_page=True)
        page.get_by_text("MiniLM full fine-tune, float32").first.click()
        page.wait_for_selector("#curves .js-plotly-plot .legend")
        wait_for_text(page, "#summary", "Rank 64 keeps")
        page.wait_for_timeout(1000)  # let Plotly finish drawing, and the scroll settle
        layout = page.evaluate(LAYOUT_JS)
        page.screenshot(path=str(shots / f"{viewport}-opened.png"))
        page.screenshot(path=str(shots / f"{viewport}-full.png"), full_page=True)
    assert layout["overflow"] <= 1, layout  # nothing wider than the screen
    assert layout["galleryCells"] == 3 and layout["galleryInside"] and not layout["galleryCut"], layout
    assert layout["numbersWhole"], layout  # no number split across lines ("88.28 / %")
    assert layout["legendsBelow"] and layout["ticksApart"], layout
    assert -5 <= layout["heatmapTop"] <= height / 2, layout  # the charts came into view


# -- issue 20: results in view, Stop's gallery row, every tab on a phone ------------------------------


def start_audit(browser: object, url: str, timeout_ms: int = 30_000) -> object:
    """A 1400x900 page of ``url`` with org/base and org/tuned typed in and Run audit pressed."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    page.set_default_timeout(timeout_ms)
    page.goto(url)
    page.get_by_label("Base model").fill("org/base")
    page.get_by_label("Fine-tuned model").fill("org/tuned")
    page.get_by_role("button", name="Run audit").click()
    return page


IN_VIEW_JS = """(sel) => { const r = document.querySelector(sel).getBoundingClientRect();
  return {top: r.top, height: window.innerHeight, scrolled: window.scrollY}; }"""


def test_run_audit_and_a_permalink_bring_the_results_into_view(browser: object, page_url: str) -> None:
    """At 1400x900 the progress line and charts appeared ~1,200 px below the fold, under the open
    gallery; a permalink opened at the top. Both now show the results on the first screen."""
    page = start_audit(browser, page_url)
    wait_for_text(page, "#progress", "Done:")
    page.wait_for_selector("#heatmap .js-plotly-plot")  # type: ignore[attr-defined]
    page.wait_for_timeout(500)  # type: ignore[attr-defined]
    shown = page.evaluate(IN_VIEW_JS, "#progress")
    assert -5 <= shown["top"] < shown["height"] / 2, shown  # the progress line on the first screen
    assert page.locator("#gallery").is_hidden()  # the gallery folded away once the audit ran
    link = page.locator("#permalink textarea, #permalink input").first.input_value()

    opened = browser.new_page(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    opened.set_default_timeout(30_000)
    opened.goto(link)
    wait_for_text(opened, "#summary", "keeps")
    opened.wait_for_timeout(800)
    landed = opened.evaluate(IN_VIEW_JS, "#progress")
    assert landed["scrolled"] > 0 and -5 <= landed["top"] < landed["height"] / 2, landed
    bare = browser.new_page(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    bare.goto(page_url)
    bare.wait_for_selector("#gallery tbody tr")
    bare.wait_for_timeout(800)
    assert bare.evaluate("() => window.scrollY") == 0  # a plain visit stays at the top


def test_stop_leaves_a_gallery_row_that_reads_what_the_page_shows(
    browser: object, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    base, tuned = model_pair(layers=4, dtype=torch.bfloat16)
    hub.add_repo("org/base", shard_files(base, 2))
    hub.add_repo("org/tuned", shard_files(tuned, 2, offset=1))
    config = AppConfig(endpoint=hub.endpoint, store_home=tmp_path / "home", examples_dir=tmp_path / "examples")
    # ~7 s of reads: Stop lands mid-audit even on a loaded machine (an audit that ends first has nothing to stop)
    with serve(config) as url, hub.inject(slow_bytes_per_s=10_000):
        page = start_audit(browser, url, 60_000)
        wait_for_text(page, "#progress", "matrices ·", 60_000)
        page.get_by_role("button", name="Stop").click()
        wait_for_text(page, "#progress", "Stopped.")
        shown = page.locator("#summary strong").first.inner_text()
        page.locator("#gallery-box button").first.click()  # unfold the gallery
        wait_for_text(page, "#gallery tbody tr td:nth-child(3)", "keeps")  # its HTML cells render late
        row = page.locator("#gallery tbody tr").first.locator("td").nth(2).inner_text()
        # Frames the run sent before Stop once arrived after it: the page went back to counting
        # matrices (or read "Error") under a gallery row of the stopped audit.
        page.wait_for_timeout(1500)
        progress_after = page.locator("#progress").inner_text()
        summary_after = page.locator("#summary strong").first.inner_text()
    assert "keeps" in shown and row.strip() == shown.strip(), (row, shown)
    assert progress_after.startswith("Stopped.") and "Error" not in progress_after, progress_after
    assert summary_after == shown, (summary_after, shown)


def test_every_tab_is_a_labelled_button_on_a_phone(browser: object, page_url: str) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 844})  # type: ignore[attr-defined]
    page.set_default_timeout(30_000)
    page.goto(page_url)
    page.wait_for_selector("#tabs [role=tab]")
    page.wait_for_timeout(500)
    tabs = page.evaluate(
        """() => [...document.querySelectorAll('#tabs [role=tab]')].map((b) => { const r = b.getBoundingClientRect();
          return {text: b.innerText.trim(), left: r.left, right: r.right, visible: r.width > 0 && r.height > 0}; })"""
    )
    assert [t["text"] for t in tabs] == ["Weight audit", "Provider check", "Behaviour"], tabs
    assert all(t["visible"] and t["left"] >= 0 and t["right"] <= 390 for t in tabs), tabs
    assert page.locator("#tabs button:has-text('⋯')").count() == 0  # no menu hides a tab
    page.get_by_role("tab", name="Behaviour").click()
    page.get_by_role("button", name="Run behaviour check").wait_for()


@pytest.fixture
def results_url(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A dashboard reading a registry with two published audits and three provider checks."""
    import huggingface_hub

    from lorafid.sharing.writer import RegistryWriter
    from tests.sharing import test_registry as published

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    base, tuned = model_pair(layers=2, dtype=torch.bfloat16)
    hub.add_repo(published.BASE, shard_files(base, 2))
    hub.add_repo(published.TUNED, shard_files(tuned, 3, offset=1))
    hub.write_tokens = {published.WRITER}
    store = Store(tmp_path / "audits")
    audited = published.run_audit(hub, store)
    writer = RegistryWriter(published.registry(hub, tmp_path), tmp_path / "outbox", interval_s=3600)
    writer.submit(audited)
    for host, model in (("api.example.com", "meta-llama/Llama-3.1-8B-Instruct-with-a-long-name"), ("b.example", "m")):
        writer.submit_probe(published.probe_document(audited) | {"endpoint_host": host, "model": model})
    writer.flush()
    store.close()
    monkeypatch.setenv("LORAFID_REGISTRY", published.REGISTRY)
    config = AppConfig(endpoint=hub.endpoint, store_home=tmp_path / "home", examples_dir=tmp_path / "examples")
    with serve(config) as url:
        yield url


HEADERS_JS = """(selector) => [...document.querySelectorAll(selector)].flatMap((th) => {
  const walker = document.createTreeWalker(th, NodeFilter.SHOW_TEXT); const out = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    for (const m of n.textContent.matchAll(/\\S+/g)) { const r = document.createRange();
      r.setStart(n, m.index); r.setEnd(n, m.index + m[0].length);
      const rects = [...r.getClientRects()].filter((b) => b.width > 0);
      if (rects.length) out.push({word: m[0], lines: new Set(rects.map((b) => Math.round(b.top))).size}); } }
  return out; })"""


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_published_results_are_readable_on_desktop_and_phone(browser: object, results_url: str, viewport: str) -> None:
    """Issue 20, item 15 and the table of providers: headers break between words on a desktop;
    a phone gets one card per row (the tables hidden), nothing wider than the screen."""
    width, height = VIEWPORTS[viewport]
    page = browser.new_page(viewport={"width": width, "height": height})  # type: ignore[attr-defined]
    page.set_default_timeout(30_000)
    page.goto(results_url)
    page.get_by_role("tab", name="Published results").click()
    wait_for_text(page, "#providers-note", "2 provider check(s)")
    page.wait_for_timeout(800)
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1
    if viewport == "desktop":
        assert page.locator("#providers-table").is_visible() and page.locator("#providers-cards").is_hidden()
        words = page.evaluate(HEADERS_JS, "#results-table th, #providers-table th")
        assert {"Matrices", "Provider", "Requests"} <= {w["word"] for w in words}, words
        assert all(w["lines"] == 1 for w in words), [w for w in words if w["lines"] > 1]  # no "Matr / ices"
    else:
        assert page.locator("#providers-table").is_hidden() and page.locator("#results-table").is_hidden()
        cards = page.locator("#providers-cards .card")
        assert cards.count() == 2 and "Verdict" in cards.first.inner_text()
        boxes = [cards.nth(i).bounding_box() for i in range(2)]
        assert all(b and b["x"] >= 0 and b["x"] + b["width"] <= width + 1 for b in boxes), boxes
        assert page.locator("#results-cards .card").count() == 1


def test_a_provider_link_opens_its_rows_in_view(browser: object, results_url: str) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    page.set_default_timeout(30_000)
    page.goto(results_url + "?provider=b.example")
    wait_for_text(page, "#providers-note", "1 provider check(s)")
    page.wait_for_timeout(1000)
    assert page.get_by_role("tab", name="Published results").get_attribute("aria-selected") == "true"
    top = page.evaluate("() => document.querySelector('#providers').getBoundingClientRect().top")
    assert 0 <= top < 450, top  # the providers' table on the first screen, under the audits


def test_a_behaviour_link_on_a_phone_opens_on_its_result_with_its_json_and_readable_titles(
    browser: object, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 390 px a ?behaviour= link opened at the top, two screens above its result, with an empty
    JSON slot, and the chart's two titles ran into each other. Now: the status line on the first
    screen, the JSON to download and the permalink as after a run, the titles apart."""
    from gradio_client import Client

    from tests.llama_models import model_family, publish

    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    family = model_family("llama", 2)
    publish(hub, "org/base", family.base)
    publish(hub, "org/tuned", family.full)
    config = AppConfig(
        endpoint=hub.endpoint, store_home=tmp_path / "home", examples_dir=tmp_path / "none", device="cpu"
    )
    with serve(config) as url:
        final = Client(url, verbose=False).predict(
            "org/base", "org/tuned", "4,8", "both", False, api_name="/run_behaviour"
        )
        link = next(str(v) for v in final if "?behaviour=" in str(v))
        query = link[link.index("?behaviour=") :].rstrip(")")
        page = browser.new_page(viewport={"width": 390, "height": 844})  # type: ignore[attr-defined]
        page.set_default_timeout(60_000)
        page.goto(url + query)
        page.wait_for_selector("#behaviour-plot .js-plotly-plot")
        page.wait_for_timeout(1200)
        shown = page.evaluate(IN_VIEW_JS, "#behaviour-status")
        downloads = page.locator("a[href*='lorafid-behaviour-']").count()
        permalink = page.locator(f"a[href$='{query}']").count()
        titles = page.evaluate(
            """() => [...document.querySelectorAll('#behaviour-plot .annotation-text')].slice(0, 2).map((t) => {
              const r = t.getBoundingClientRect(); return {left: r.left, right: r.right}; })"""
        )
    assert shown["scrolled"] > 0 and -5 <= shown["top"] < shown["height"] / 2, shown
    assert downloads >= 1 and permalink >= 1, (downloads, permalink)
    assert len(titles) == 2 and titles[0]["right"] + 8 <= titles[1]["left"], titles


def test_a_probe_link_on_a_phone_opens_on_its_verdict_with_whole_words_in_its_table(
    browser: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 390 px a ?probe= link opened two screens above its verdict, and the candidates' table
    broke "nats/token" inside the word. Now: the status line on the first screen, the JSON and
    the permalink as after a run, every header word on one line."""
    from tests.web.test_first_user import probe

    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    key = Store(tmp_path / "home").put_document("probe", probe())
    # A private deployment (--allow-local) opens every stored check: visibility has tests of its own.
    config = AppConfig(store_home=tmp_path / "home", examples_dir=tmp_path / "none", device="cpu", allow_local=True)
    with serve(config) as url:
        page = browser.new_page(viewport={"width": 390, "height": 844})  # type: ignore[attr-defined]
        page.set_default_timeout(30_000)
        page.goto(f"{url}?probe={key}")
        wait_for_text(page, "#probe-status", "Stored provider check")
        page.wait_for_timeout(1200)
        shown = page.evaluate(IN_VIEW_JS, "#probe-status")
        downloads = page.locator("a[href*='lorafid-probe-']").count()
        permalink = page.locator(f"a[href$='?probe={key}']").count()
        words = page.evaluate(HEADERS_JS, "#probe-table th")
    assert shown["scrolled"] > 0 and -5 <= shown["top"] < shown["height"] / 2, shown
    assert downloads >= 1 and permalink >= 1, (downloads, permalink)
    assert "nats/token" in {w["word"] for w in words}, words
    assert all(w["lines"] == 1 for w in words), [w for w in words if w["lines"] > 1]
