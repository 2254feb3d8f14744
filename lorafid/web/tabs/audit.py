"""The weight audit tab: two repos in, per-matrix fidelity charts out, at any rank.

Layout (form, gallery, charts, download, permalink) and its handlers: running and streaming
an audit, Stop, re-ranking, downloads, opening a gallery entry or a permalink, and the
page's words for errors. Events are wired by ``Dashboard._wire`` (``lorafid.web.app``); the
adapter section inside this tab is ``tabs.adapter``. No metric is computed here: charts come
from ``lorafid.web.plots``, numbers from the report.
"""

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from huggingface_hub import constants as hf_constants

from lorafid.audit.engine import Audit, AuditConfig
from lorafid.audit.report import PROVIDER_RANKS, Report, SourceRecord
from lorafid.audit.store import Store
from lorafid.compute import ComputeHook
from lorafid.errors import LorafidError
from lorafid.names import is_commit_sha
from lorafid.web import plots
from lorafid.web.config import DEFAULT_RANK, MAX_RANK, AppConfig, audit_config, check_token
from lorafid.web.downloads import write_report_json
from lorafid.web.gallery import Catalog, GalleryEntry, ReportCache
from lorafid.web.limits import TOO_MANY_LINKS, VisitorRate, VisitorSlots, release_memory, visitor_id, visitor_of
from lorafid.web.links import example_link, page_url, parse_link, parse_query, report_link, resolve_commit
from lorafid.web.pacing import ProgressMeter, Throttle
from lorafid.web.stopping import RunSignal, StopSignals
from lorafid.web.tabs.common import MAX_INPUT_CHARS, MAX_MESSAGE_CHARS, TEXT_INTERVAL_S, user_errors
from lorafid.web.text import code_span, html_text, md_text, summary_markdown
from lorafid.web.wording import in_app_words

INTRO = """# lorafid
**How much of a fine-tuned model survives when it is served as a rank-r LoRA** extracted from
its difference to the base (truncated SVD of W_finetune − W_base)? Paste two Hub repos, press
**Run audit**, watch the layers fill in, move the rank: every rank is exact, from one spectrum
per matrix. Weights are read by HTTP ranges, never downloaded whole.
"""
FIGURE_INTERVAL_S = 0.5  # rebuild the charts at most twice a second while an audit streams
STOPPED_MESSAGE = (
    "**Stopped.** The matrices finished so far are kept (counted in the table below) and the audit is in "
    "the gallery as partial: press **Run audit** with the same models to resume from there."
)
README_SECTION = "what-the-numbers-mean"  # the README's table of metrics, linked from "How to read this"


def how_to_read(space_id: str | None = None) -> str:
    """The short guide beside the charts; links to the README's table (on the Space when known)."""
    readme = (
        f"[the README's table](https://huggingface.co/spaces/{space_id}#{README_SECTION})"
        if space_id and re.fullmatch(r"[\w.-]+/[\w.-]+", space_id)
        else "the README's table (section *What the numbers mean*)"
    )
    return f"""
A LoRA of rank r can carry only the best rank-r part of the change Δ = W_fine-tune − W_base of each
weight matrix. The numbers say how much of Δ that part holds; every definition is in {readme}.

- **Energy retained** (share of ‖Δ‖² kept): 100% is everything. Above 99% the served model is very
  close to the fine-tune; a full fine-tune often keeps 60–90% at rank 64, a LoRA fine-tune of rank
  r keeps ~100% at rank r.
- **Cosine distance** (the post's metric) = 1 − √(energy retained): 0 is identical, 0.05 means about
  90% of the energy kept. **‖Δ − Δr‖/‖Δ‖** is the share of Δ's norm lost.
- **Error relative to the weight**: how far the served weight is from the fine-tune's, relative to
  the weight itself; 1e-3 is small, 1e-1 large. **MSE** is the post's mean squared error.
- **Storage rounding**: weights stored in bf16 or fp16 carry rounding in Δ that no rank recovers.
  The table estimates it from each weight's rounding step, so a measured loss close to it (even a
  little below: it is an estimate) is rounding, not missing rank. The dotted line on the right
  chart draws it.
- **1-D tensors, embeddings, lm_head**: a multi-LoRA server keeps the base's, so their change is
  lost whatever the rank.

Colours in the grid span the values present at this rank (the bar above it states the range),
brighter is better; blank cells are pending or unchanged.
"""


def _progress_message(error: LorafidError) -> str:
    """The error's sentence for the progress line (Markdown): links and tags stay characters."""
    return md_text(str(error), MAX_MESSAGE_CHARS)


class AuditTab:
    """The weight audit tab of the Dashboard.

    Uses the Dashboard's ``config``, ``store``, ``catalog``, ``reports``, ``downloads``,
    ``visitors``, ``behind_proxy``, ``compute`` and ``_token``, ``AdapterTab._adapter_section``
    and ``ResultsTab._publish``; its widgets (``base``, ``finetune``, ``rank``, …) are read by
    the adapter section, the behaviour tab and ``_wire``.
    """

    config: AppConfig
    store: Store
    catalog: Catalog
    reports: ReportCache
    downloads: Path
    visitors: VisitorSlots
    stops: StopSignals  # Stop's requests to the running audits, by page session
    link_rate: VisitorRate  # permalinks opened per visitor (each asks the Hub)
    behind_proxy: bool
    compute: ComputeHook | None
    _token: Callable[[str, gr.OAuthToken | None], str | bool | None]  # the Dashboard's
    _adapter_section: Callable[[], None]  # AdapterTab's
    _publish: Callable[[str, Report], str]  # ResultsTab's

    def _weight_audit_tab(self) -> None:
        """The weight audit: two repos in, per-matrix fidelity charts out (wired in ``_wire``)."""
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=3):
                self.base = gr.Textbox(label="Base model", placeholder="org/base-model")
                self.finetune = gr.Textbox(label="Fine-tuned model", placeholder="org/fine-tuned-model")
                with gr.Row():
                    self.base_revision = gr.Textbox(label="Base revision", placeholder="main (optional)")
                    self.finetune_revision = gr.Textbox(label="Fine-tuned revision", placeholder="main (optional)")
                self.token = gr.Textbox(
                    label="Hugging Face token (optional: gated or private repos)",
                    type="password",
                    placeholder="hf_… used for this audit only, never stored",
                )
                if self.config.oauth:
                    gr.LoginButton()
            with gr.Column(scale=2):
                # The typical ranks are the main control; the slider reaches any other rank, up to
                # the audited model's largest k once one is open (1-4096 made 8-512 a 12% sliver).
                self.provider_rank = gr.Radio(
                    [str(r) for r in PROVIDER_RANKS],
                    label="LoRA rank (typical provider ranks)",
                    value=str(DEFAULT_RANK),
                    elem_id="provider-rank",
                )
                self.rank = gr.Slider(
                    1, MAX_RANK, value=DEFAULT_RANK, step=1, label=_rank_label(MAX_RANK), elem_id="rank"
                )
                self.metric = gr.Dropdown(
                    [(m.label, m.key) for m in plots.METRICS.values()], value="energy_retained", label="Metric"
                )
                with gr.Row():
                    self.run_button = gr.Button("Run audit", variant="primary")
                    self.stop_button = gr.Button("Stop", variant="stop")
        with gr.Accordion(
            "Audits: examples and past runs (click one to open it)", open=True, elem_id="gallery-box"
        ) as self.gallery_box:
            entries = self.catalog.entries()
            # HTML cells: Gradio's text cells cut everything after 60 characters with "...".
            self.gallery = gr.Dataset(
                components=["html", "html", "html"],
                headers=["Base → fine-tune", "Status", "Summary"],
                samples=_samples(entries),
                type="index",
                layout="table",
                label="Audits",
                elem_id="gallery",
            )
            self.refs = gr.State([e.ref for e in entries])
        self.progress = gr.Markdown("", elem_id="progress")
        self.summary = gr.Markdown("", elem_id="summary")
        with gr.Accordion("How to read this", open=False, elem_id="how-to-read"):
            gr.Markdown(how_to_read(os.environ.get("SPACE_ID")))
        # No panel labels: each figure's title names it, and a label sat under Plotly's toolbar.
        self.heatmap = gr.Plot(show_label=False, elem_id="heatmap")
        with gr.Row():
            self.lines = gr.Plot(show_label=False, elem_id="lines", min_width=320)
            self.curves = gr.Plot(show_label=False, elem_id="curves", min_width=320)
        with gr.Row():
            # The file is written only when asked for, for this request alone (write_report_json);
            # the hidden DownloadButton then hands it to the browser.
            self.download = gr.Button("Download JSON", elem_id="download", scale=1)
            self.download_file = gr.DownloadButton(visible="hidden", elem_id="download-file")
            self.link = gr.Textbox(label="Permalink", buttons=["copy"], interactive=False, scale=4, elem_id="permalink")
        self.ref = gr.State("")  # "store:<key>" / "example:<file>": the report lives in self.reports
        self.query = gr.Textbox(visible=False)
        self._adapter_section()

    # -- handlers ------------------------------------------------------------------------

    @user_errors
    def run_audit(
        self,
        base: str,
        finetune: str,
        base_revision: str,
        finetune_revision: str,
        rank: float,
        metric: str,
        token: str,
        oauth_token: gr.OAuthToken | None,
        request: gr.Request,
    ) -> Iterator[dict[Any, Any]]:
        """Stream an audit: the charts fill in matrix by matrix, at most twice a second."""
        if not base.strip() or not finetune.strip():
            raise LorafidError("Enter both a base model and a fine-tuned model (Hub repo IDs like org/name).")
        for label, text in (("base model", base), ("fine-tuned model", finetune)):
            if len(text.strip()) > MAX_INPUT_CHARS:
                raise LorafidError(
                    f"The {label} field holds {len(text):,} characters; a Hub repo ID is at most 96 (org/name)."
                )
        for label, text in (("base revision", base_revision), ("fine-tuned revision", finetune_revision)):
            if len(text.strip()) > MAX_INPUT_CHARS:
                raise LorafidError(
                    f"The {label} field holds {len(text):,} characters; give a branch, tag or commit SHA."
                )
        access = self._token(token, oauth_token)
        config = audit_config(
            self.config,
            rank=int(rank),
            base_revision=base_revision,
            finetune_revision=finetune_revision,
            token=access,
            store=self.store,
            compute=self.compute,
        )
        visitor = visitor_id(
            dict(request.headers or {}), request.client.host if request.client else None, self.behind_proxy
        )
        with self.visitors.hold(visitor, "run this one"), self.stops.running(request.session_hash or "") as stop:
            try:
                yield from self._stream(
                    base.strip(),
                    finetune.strip(),
                    config,
                    metric,
                    request,
                    stop,
                    anonymous=access is False,
                    typed=bool(token.strip()),
                )
            finally:
                release_memory()  # a stopped or finished audit's pages go back to the OS

    def _stream(
        self,
        base: str,
        finetune: str,
        config: AuditConfig,
        metric: str,
        request: gr.Request,
        stop: RunSignal,
        *,
        anonymous: bool,
        typed: bool = False,
    ) -> Iterator[dict[Any, Any]]:
        """The audit's frames: planned grid, live charts (paced by their cost), final charts.
        Stop (``stop.requested``) is seen between two matrices: the job is closed (it keeps what
        it computed) and the last frame says so."""
        # The gallery folds away: the results appear right under the form, not 1,200 px below.
        yield {self.progress: "Reading both models' headers…", self.gallery_box: gr.Accordion(open=False)}
        job = Audit(base, finetune, config)
        deadline = time.monotonic() + self.config.max_audit_minutes * 60 if self.config.max_audit_minutes else None
        timed_out = stopped = False
        try:
            with job:
                plan = job.plan()
                ref = f"store:{job.key}"
                self.catalog.record_visibility(job.key, job.report(), anonymous=anonymous)
                largest = max((min(p.shape) for p in plan.matrices if len(p.shape) == 2), default=MAX_RANK)
                yield {
                    **self._view(ref, job.report(), metric, request),
                    **self._rank_controls(largest, config.rank),
                    self.progress: f"{len(plan.matrices)} matrices to audit ({plan.size_bytes / 1e6:,.0f} MB to read)…",
                }
                meter, figures, text = ProgressMeter(), Throttle(FIGURE_INTERVAL_S), Throttle(TEXT_INTERVAL_S)
                line = ""
                steps = job.run()  # a generator: closing it keeps what it computed
                # Stop and the time limit are looked at before each matrix is asked for, so a Stop
                # pressed while a frame was on its way costs no further matrix.
                while not (stopped := stop.requested.is_set()):
                    step = next(steps, None)
                    if step is None:
                        break
                    line = meter.line(step)
                    shown = f"{meter.bar(step)}\n\n{line}"
                    if deadline is not None and time.monotonic() > deadline:
                        timed_out = True
                        break
                    if figures.ready():
                        started = time.perf_counter()
                        frame = self._view(ref, job.report(), metric, request)
                        figures.spent(time.perf_counter() - started)
                        yield {**frame, self.progress: shown}
                    elif text.ready():
                        yield {self.progress: shown}
                steps.close()  # type: ignore[attr-defined]  # keeps every matrix computed so far
                report = job.report()
        except LorafidError as e:
            said = self._in_app_words(e, typed=typed)
            yield self._failed(job, said, metric, request)
            raise said from e
        if stopped and report.pending:
            message = STOPPED_MESSAGE
        elif timed_out:
            done = len(report.matrices)
            message = (
                f"**Stopped after {self.config.max_audit_minutes:g} minutes**, this server's limit per audit: "
                f"{done} of {done + len(report.pending)} matrices kept. Press Run audit again to continue from there."
            )
        else:
            message = f"Done: {line if report.matrices else 'nothing to audit'}." + self._publish(job.key, report)
        yield {**self._view(ref, report, metric, request), self.progress: message, **self._gallery()}

    def _failed(self, job: Audit, error: LorafidError, metric: str, request: gr.Request) -> dict[Any, Any]:
        """The last frame of a failed audit: the error in the progress line (the pop-up fades),
        and, when matrices were finished before it, their charts (they are kept in the store)."""
        if not job.key:  # failed while planning: nothing of this pair to show, nor of the last one
            return {**self._cleared(), self.progress: f"**Failed:** {_progress_message(error)}"}
        report = job.report()
        done = len(report.matrices)
        total = done + len(report.pending)
        return {
            **self._view(f"store:{job.key}", report, metric, request),
            self.progress: f"**Stopped by an error after {done} of {total} matrices** (kept: run the audit again "
            f"to resume): {_progress_message(error)}",
            **self._gallery(),
        }

    @user_errors
    def rerender(self, ref: str, rank: float, metric: str, request: gr.Request) -> dict[Any, Any]:
        """Re-derive every chart at another rank or metric: no weights, no recompute."""
        if not ref:  # a fresh page: nothing opened yet (an empty dict would read as one value)
            return {self.ref: ref}
        return self._view(ref, self.reports.get(ref).with_rank(int(rank)), metric, request)

    @user_errors
    def download_json(self, ref: str, rank: float) -> str:
        """The report at this rank as a JSON file of its own, written now, for this request only."""
        if not ref:
            raise LorafidError("Run an audit or open one first; then download its JSON.")
        return str(write_report_json(self.reports.get(ref).with_rank(int(rank)), self.downloads))

    @user_errors
    def stopped(self, ref: str, rank: float, metric: str, request: gr.Request) -> dict[Any, Any]:
        """Stop: ask this page's running audit to end. Once it has (its own last frame said so),
        nothing more to show; else (still queued, or a step that outlasts the wait: it is then
        cancelled) show everything the store kept."""
        if self.stops.request_stop(request.session_hash or ""):
            return {self.progress: gr.skip()}
        release_memory()  # the stopped audit's buffers and headers go back to the OS
        key = ref.removeprefix("store:") if ref.startswith("store:") else ""
        report = self.store.load_report(key) if key else None
        if report is None:
            return {self.progress: "Stopped."}
        # Gradio cancels the run without closing its generator, so the frame the run saved last
        # (at its start) still describes no matrix: save it again from what the store holds, or
        # the gallery row would read "keeps 100%" for a partial audit the page shows at 79%.
        self.store.save_report(key, report)
        # One count, the table's: a matrix in flight at Stop may still land in the store after
        # this line is written, so the line names no number of its own.
        return {
            **self._view(ref, report.with_rank(int(rank)), metric, request),
            self.progress: STOPPED_MESSAGE if report.pending else "Nothing to stop: this audit had already finished.",
            **self._gallery(),
        }

    @user_errors
    def open_entry(self, index: int, refs: list[str], rank: float, metric: str, request: gr.Request) -> dict[Any, Any]:
        """Open an audit from the gallery."""
        if index is None or not 0 <= index < len(refs):  # a row of a gallery older than this page's list
            return {self.progress: "That row is no longer listed; reload the page to see the gallery as it is now."}
        ref = refs[index]
        report = self.catalog.open(ref)  # at its own rank: the one its gallery row describes
        return {
            **self._view(ref, report, metric, request),
            **self._prefill(report),
            **self._rank_controls(_largest_k(report), report.rank),
            self.progress: self._opened(ref, report),
        }

    @user_errors
    def open_link(
        self, query: str, rank: float, metric: str, oauth_token: gr.OAuthToken | None, request: gr.Request
    ) -> dict[Any, Any]:
        """On page load: pre-fill from ``?base=…&finetune=…&rank=…`` and show the stored result.

        The app's links pin both commits; a link with a branch (or none) is resolved to the
        commit it points at now, and the page says which commit it shows. A stored audit of a
        gated or private repo opens only for a visitor whose own sign-in can read it.
        """
        params = dict(parse_query(query)) or dict(request.query_params or {})
        link = parse_link(params, plots.METRICS)
        out: dict[Any, Any] = self._gallery()
        wanted, metric = link.rank or int(rank), link.metric or metric
        if link.example:
            ref = f"example:{link.example}"
            try:
                report = self.catalog.open(ref)
            except LorafidError:
                return out | {self.progress: "This link names a bundled example this server does not have."}
            return out | self._opened_at(ref, report, wanted, metric, request)
        if not (link.base and link.finetune):
            return out
        out |= {
            self.base: link.base,
            self.finetune: link.finetune,
            self.base_revision: link.base_revision,
            self.finetune_revision: link.finetune_revision,
            self.metric: metric,
            **self._rank_controls(MAX_RANK, wanted, picks=False),  # the slider's bounds until an audit is open
        }
        if not self.link_rate.allow(visitor_of(request, self.behind_proxy)):
            return out | {self.progress: TOO_MANY_LINKS}
        # Their sign-in; on a public server nothing else, even where it runs audits with its own login
        # (LORAFID_USE_SERVER_TOKEN): that login would show anyone an audit of a private repo.
        token = check_token(oauth_token.token if oauth_token else None, private=self.config.allow_local)
        revisions = (link.base_revision, link.finetune_revision)
        found = self.catalog.find_example(link.base, link.finetune, *revisions)
        note = ""
        if found is None and all(map(is_commit_sha, revisions)):
            found = self.catalog.find_pinned(link.base, link.finetune, *revisions)
        elif found is None and _hub_like(link.base) and _hub_like(link.finetune):
            try:
                shas = [
                    resolve_commit(repo, rev, token, self.config.endpoint)
                    for repo, rev in zip((link.base, link.finetune), revisions, strict=True)
                ]
            except LorafidError as e:
                return out | {self.progress: f"Could not open this link: {_progress_message(e)}"}
            found = self.catalog.find_pinned(link.base, link.finetune, *shas)
            note = (
                f" The link names {md_text(revisions[1] or 'the default branch', 60)} of the fine-tune and "
                f"{md_text(revisions[0] or 'the default branch', 60)} of the base; shown: the commits they point "
                f"at now, fine-tune {shas[1][:12]}, base {shas[0][:12]}."
            )
        if found is None and self.config.allow_local:
            found = self.catalog.find(link.base, link.finetune, *revisions)  # local paths, as typed
        if found is None or not self.catalog.visible(found[0], found[1], token):
            # The same words whether the audit is missing or private: they reveal nothing.
            return out | {
                self.progress: "This pair has not been audited here yet, or its audit is of a gated or private repo: "
                "press **Run audit** (with a token that can read both repos for gated or private ones)."
                + md_text(self.catalog.registry_note(), MAX_MESSAGE_CHARS)
            }
        ref, report = found
        return out | self._opened_at(ref, report, wanted, metric, request, note)

    def _opened_at(
        self, ref: str, report: Report, rank: int, metric: str, request: gr.Request, note: str = ""
    ) -> dict[Any, Any]:
        """A linked audit, shown at the link's rank, bounded by its largest k (the slider's range)."""
        largest = _largest_k(report)
        shown = min(rank, largest)
        if shown < rank:
            note += (
                f" The link asks for rank {rank:,}, beyond these matrices' largest rank ({largest:,}): shown at "
                f"{largest:,}, where a LoRA keeps every matrix's whole change."
            )
        return {
            **self._view(ref, report.with_rank(shown), metric, request),
            **self._prefill(report),
            **self._rank_controls(largest, shown, picks=False),  # the picks follow (quick_picks)
            self.metric: metric,
            self.progress: self._opened(ref, report) + note,
        }

    def _opened(self, ref: str, report: Report) -> str:
        """What was opened, in words; for a bundled example, what its two models are (they are
        described, not Hub repos, so the form is left for the visitor's own pair)."""
        kind = ref.partition(":")[0]
        if kind == "example":
            return (
                f"Opened a bundled example ({report.status}): base {code_span(report.base.spec)}, fine-tune "
                f"{code_span(report.finetune.spec)}. These models are local files, not Hub repos, so the form "
                "stays empty for your own pair."
            )
        where = {"store": "from the store", "registry": "from the public results registry"}.get(kind, "")
        status = "partial: press **Run audit** to resume it" if report.status != "complete" else report.status
        return f"Opened {where} ({status})."

    # -- helpers -------------------------------------------------------------------------

    def _cleared(self) -> dict[Any, Any]:
        """An empty view: no summary, charts or link of an audit the page no longer shows."""
        return {
            self.ref: "",
            self.heatmap: None,
            self.lines: None,
            self.curves: None,
            self.summary: "",
            self.link: "",
        }

    def _view(self, ref: str, report: Report, metric: str, request: gr.Request) -> dict[Any, Any]:
        """Every chart, the summary and the pinned link of ``report`` at its rank (no file: the
        JSON is written only when downloaded)."""
        self.reports.put(ref, report)
        heat, lines, curves = plots.figures(report, metric)
        url = page_url(dict(request.headers or {}), "http://127.0.0.1:7860/") if request else ""
        return {
            self.ref: ref,
            self.heatmap: heat,
            self.lines: lines,
            self.curves: curves,
            self.summary: summary_markdown(report) + self._hub_links(report),
            self.link: example_link(url, ref.partition(":")[2], report.rank, metric)
            if ref.startswith("example:")
            else report_link(url, report, metric),
        }

    def _prefill(self, report: Report) -> dict[Any, Any]:
        """The form, as the audit was asked for: Hub repo IDs (revisions in their own fields); a
        local path only where this server reads them; nothing for a described example's side."""

        def field(record: SourceRecord) -> str:
            if record.kind == "hub":
                return record.repo_id or record.spec
            return record.spec if self.config.allow_local and record.path else ""

        return {
            self.base: field(report.base),
            self.finetune: field(report.finetune),
            self.base_revision: report.base.requested_revision or "",
            self.finetune_revision: report.finetune.requested_revision or "",
        }

    def _rank_controls(self, largest: int, rank: float, *, picks: bool = True) -> dict[Any, Any]:
        """The slider bounded by the audit's largest k (and the quick picks that fit under it)."""
        top = max(1, int(largest))
        value = min(max(1, int(rank)), top)
        controls: dict[Any, Any] = {self.rank: gr.Slider(maximum=top, value=value, label=_rank_label(top))}
        if picks:
            controls[self.provider_rank] = _quick_picks(top, value)
        return controls

    def quick_picks(self, ref: str, rank: float) -> Any:
        """After a permalink opened: the typical ranks that fit under the opened audit's largest k."""
        return _quick_picks(_largest_k(self.reports.get(ref)) if ref else MAX_RANK, rank)

    def _hub_links(self, report: Report) -> str:
        """Both Hub repos, linked to their pages at the audited commits (IDs and SHAs are validated
        by the source: only letters, digits, ``-_./``)."""
        hub = (self.config.endpoint or hf_constants.ENDPOINT).rstrip("/")
        links = [
            f"{label} [{r.repo_id}]({hub}/{r.repo_id}/tree/{r.resolved_sha})"
            for label, r in (("base", report.base), ("fine-tune", report.finetune))
            if r.kind == "hub"
            and r.repo_id
            and r.resolved_sha
            and _hub_like(r.repo_id)
            and is_commit_sha(r.resolved_sha)
        ]
        return "\n\nOn the Hub: " + " · ".join(links) if links else ""

    def _in_app_words(self, error: LorafidError, *, typed: bool) -> LorafidError:
        """The error in this page's words (``lorafid.web.wording``): its token field, its Sign in
        button where it has one, Hub repos only where local paths are refused."""
        return in_app_words(error, typed=typed, oauth=self.config.oauth, allow_local=self.config.allow_local)

    def _gallery(self) -> dict[Any, Any]:
        entries = self.catalog.entries()
        return {self.gallery: gr.Dataset(samples=_samples(entries)), self.refs: [e.ref for e in entries]}


def provider_choice(rank: float) -> str | None:
    """Keep the quick picks in step with the slider: highlight a typical rank, else none."""
    return str(int(rank)) if int(rank) in PROVIDER_RANKS else None


def _samples(entries: list[GalleryEntry]) -> list[list[str]]:
    """Gallery rows as HTML cells (every piece escaped): the two sides labelled, in the form's
    order; the status, with how to resume a partial audit; the whole sentence."""

    def pair(e: GalleryEntry) -> str:
        if not (e.base or e.finetune):
            return html_text(e.label)
        example = "<i>example</i><br>" if e.ref.startswith("example:") else ""
        published = "<br><i>published</i>" if e.ref.startswith("registry:") else ""
        return f"{example}<b>base</b> {html_text(e.base)}<br><b>fine-tune</b> {html_text(e.finetune)}{published}"

    def status(e: GalleryEntry) -> str:
        if e.status == "partial":
            return "partial: open it, then <b>Run audit</b> resumes it"
        return html_text(e.status)

    return [[pair(e), status(e), html_text(e.sentence)] for e in entries]


def _quick_picks(largest: int, rank: float) -> Any:
    """The typical provider ranks up to ``largest``, the one equal to ``rank`` selected."""
    return gr.Radio(choices=[str(r) for r in PROVIDER_RANKS if r <= largest], value=provider_choice(rank))


def _rank_label(largest: int) -> str:
    return f"Any rank (1 to {largest:,})"


def _largest_k(report: Report) -> int:
    """The largest rank any of the report's matrices has (min of its shape); a bound for the slider."""
    return max((min(m.shape) for m in report.matrices), default=MAX_RANK)


def _hub_like(spec: str) -> bool:
    """A Hub repo ID (org/name), as opposed to a local path on a private deployment."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
