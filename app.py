"""lorafid dashboard: how much of a fine-tune survives as a rank-r LoRA, in the browser.

Run ``python app.py`` (http://127.0.0.1:7860, or GRADIO_SERVER_NAME / GRADIO_SERVER_PORT);
the same file is the Hugging Face Space. Widgets and wiring only: the audit is
``lorafid.audit``, the charts ``lorafid.plots``, the gallery, links and words
``lorafid.dashboard``. Library errors become ``gr.Error`` in one place: ``user_errors``.

Public by default: local paths are refused unless started with ``--allow-local`` (or
``LORAFID_ALLOW_LOCAL=1``), audits never fall back to the server's own Hub login, and the
browser keeps no run history (it would hold the token). Other switches: ``LORAFID_CONCURRENCY``,
``LORAFID_MAX_QUEUE``, ``LORAFID_MAX_MODEL_GB``, ``LORAFID_HOME``; "Sign in with Hugging
Face" appears only where OAuth is configured (``OAUTH_CLIENT_ID``, set by ``hf_oauth``).

ZeroGPU: on such a Space only the per-matrix spectrum is decorated with ``@spaces.GPU``
(``dashboard.zero_gpu_compute``, passed as ``AuditConfig.compute``): it gets CPU tensors and
returns plain numbers, and the streaming of weights stays outside it.
"""

import argparse
import functools
import html
import inspect
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl

import gradio as gr

from lorafid import plots
from lorafid.audit import Audit, AuditConfig
from lorafid.dashboard import (
    DEFAULT_RANK,
    MAX_RANK,
    AppConfig,
    Catalog,
    ProgressMeter,
    ReportCache,
    Throttle,
    download_dir,
    page_url,
    parse_link,
    permalink,
    summary_markdown,
    write_report_json,
    zero_gpu_compute,
)
from lorafid.errors import LorafidError
from lorafid.report import PROVIDER_RANKS, Report
from lorafid.store import Store

INTRO = """# lorafid
**How much of a fine-tuned model survives when it is served as a rank-r LoRA** extracted from
its difference to the base (truncated SVD of W_finetune − W_base)? Paste two Hub repos, press
**Run audit**, watch the layers fill in, move the rank: every rank is exact, from one spectrum
per matrix. Weights are read by HTTP ranges, never downloaded whole.
"""
FIGURE_INTERVAL_S = 0.5  # rebuild the charts at most twice a second while an audit streams
TEXT_INTERVAL_S = 0.1


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one boundary where library errors become messages for the user."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except LorafidError as e:
                raise gr.Error(_message(e), print_exception=False) from e

        return stream

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LorafidError as e:
            raise gr.Error(_message(e), print_exception=False) from e

    return call


def _message(error: LorafidError) -> str:
    """The error's sentence; Gradio renders it as HTML, so user-typed text is escaped."""
    return html.escape(str(error), quote=False)


class Dashboard:
    """The Blocks app of one deployment; handlers return {component: value} dicts."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.store = Store(config.store_home)
        self.compute = zero_gpu_compute()  # None off ZeroGPU: the audit picks its own device
        self.catalog = Catalog(self.store, config.examples_dir)
        self.reports = ReportCache(self.catalog)
        self.downloads = download_dir()

    # -- layout --------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="lorafid: LoRA extraction fidelity", analytics_enabled=False) as demo:
            # One tab per check, each built by its own method; further checks add a tab here.
            with gr.Tabs():  # noqa: SIM117 - the tabs hold more than one check as they are added
                with gr.Tab("Weight audit", id="weight-audit"):
                    self._weight_audit_tab()
            self._wire(demo)
        demo.queue(default_concurrency_limit=self.config.concurrency, max_size=self.config.max_queue)
        return demo

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
                self.rank = gr.Slider(1, MAX_RANK, value=DEFAULT_RANK, step=1, label="Rank", elem_id="rank")
                self.provider_rank = gr.Radio(
                    [str(r) for r in PROVIDER_RANKS], label="Typical provider ranks", value=str(DEFAULT_RANK)
                )
                self.metric = gr.Dropdown(
                    [(m.label, m.key) for m in plots.METRICS.values()], value="energy_retained", label="Metric"
                )
                with gr.Row():
                    self.run_button = gr.Button("Run audit", variant="primary")
                    self.stop_button = gr.Button("Stop", variant="stop")
        with gr.Accordion("Audits: examples and past runs (click one to open it)", open=True):
            entries = self.catalog.entries()
            self.gallery = gr.Dataset(
                components=["textbox", "textbox", "textbox"],
                headers=["Audit", "Status", "Summary"],
                samples=_samples(entries),
                type="index",
                layout="table",
                label="Audits",
            )
            self.refs = gr.State([e.ref for e in entries])
        self.progress = gr.Markdown("", elem_id="progress")
        self.summary = gr.Markdown("", elem_id="summary")
        self.heatmap = gr.Plot(label="Layer × module", elem_id="heatmap")
        with gr.Row():
            self.lines = gr.Plot(label="By layer", elem_id="lines")
            self.curves = gr.Plot(label="Loss versus rank", elem_id="curves")
        with gr.Row():
            self.download = gr.DownloadButton("Download JSON", value=None, elem_id="download", scale=1)
            self.link = gr.Textbox(label="Permalink", buttons=["copy"], interactive=False, scale=4, elem_id="permalink")
        self.ref = gr.State("")  # "store:<key>" / "example:<file>": the report lives in self.reports
        self.query = gr.Textbox(visible=False)

    def _wire(self, demo: gr.Blocks) -> None:
        view = [self.ref, self.heatmap, self.lines, self.curves, self.summary, self.download, self.link]
        inputs = [self.base, self.finetune, self.base_revision, self.finetune_revision]
        run = self.run_button.click(
            self.run_audit,
            [*inputs, self.rank, self.metric, self.token],
            [*view, self.progress, self.gallery, self.refs],
            api_name="run_audit",
            show_progress="hidden",
        )
        run.then(self.rerender, [self.ref, self.rank, self.metric], view, api_visibility="private")
        self.stop_button.click(
            self.stopped, [self.ref, self.rank, self.metric], [*view, self.progress], cancels=[run], api_name="stop"
        )
        gr.on(
            [self.rank.change, self.metric.change],
            self.rerender,
            [self.ref, self.rank, self.metric],
            view,
            api_name="rerank",
            trigger_mode="always_last",
            show_progress="hidden",
        )
        self.provider_rank.input(int, self.provider_rank, self.rank, api_visibility="private")
        self.rank.change(_provider_choice, self.rank, self.provider_rank, api_visibility="private")
        self.gallery.click(
            self.open_entry,
            [self.gallery, self.refs, self.rank, self.metric],
            [*view, *inputs, self.progress],
            api_name="open_audit",
        )
        demo.load(
            self.open_link,
            [self.query, self.rank, self.metric],
            [*view, *inputs, self.rank, self.metric, self.progress, self.gallery, self.refs],
            js="(query, rank, metric) => [window.location.search, rank, metric]",
            api_name="open_link",
        )

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
            raise gr.Error("Enter both a base model and a fine-tuned model (Hub repo IDs like org/name).")
        config = AuditConfig(
            rank=int(rank),
            device=self.config.device,
            base_revision=base_revision.strip() or None,
            finetune_revision=finetune_revision.strip() or None,
            token=self._token(token, oauth_token),
            endpoint=self.config.endpoint,
            allow_local=self.config.allow_local,
            max_model_bytes=self.config.max_model_bytes,
            store=self.store,
            compute=self.compute,
        )
        yield {self.progress: "Reading both models' headers…"}
        job = Audit(base.strip(), finetune.strip(), config)
        try:
            with job:
                plan = job.plan()
                ref = f"store:{job.key}"
                yield {
                    **self._view(ref, job.report(), metric, request, with_file=False),
                    self.progress: f"{len(plan.matrices)} matrices to audit ({plan.size_bytes / 1e6:,.0f} MB to read)…",
                }
                meter, figures, text = ProgressMeter(), Throttle(FIGURE_INTERVAL_S), Throttle(TEXT_INTERVAL_S)
                line = ""
                for step in job.run():
                    line = meter.line(step)
                    if figures.ready():
                        yield {**self._view(ref, job.report(), metric, request, with_file=False), self.progress: line}
                    elif text.ready():
                        yield {self.progress: line}
                report = job.report()
        except LorafidError as e:
            yield self._failed(job, e, metric, request)
            raise
        yield {
            **self._view(ref, report, metric, request),
            self.progress: f"Done: {line if report.matrices else 'nothing to audit'}.",
            **self._gallery(),
        }

    def _failed(self, job: Audit, error: LorafidError, metric: str, request: gr.Request) -> dict[Any, Any]:
        """The last frame of a failed audit: the error in the progress line (the pop-up fades),
        and, when matrices were finished before it, their charts (they are kept in the store)."""
        if not job.key:  # failed while planning: nothing of this pair to show
            return {self.progress: f"**Failed:** {_message(error)}"}
        report = job.report()
        done = len(report.matrices)
        total = done + len(report.pending)
        return {
            **self._view(f"store:{job.key}", report, metric, request),
            self.progress: f"**Stopped by an error after {done} of {total} matrices** (kept: run the audit again "
            f"to resume): {_message(error)}",
            **self._gallery(),
        }

    @user_errors
    def rerender(self, ref: str, rank: float, metric: str, request: gr.Request) -> dict[Any, Any]:
        """Re-derive every chart at another rank or metric: no weights, no recompute."""
        if not ref:
            return {}
        return self._view(ref, self.reports.get(ref).with_rank(int(rank)), metric, request)

    @user_errors
    def stopped(self, ref: str, rank: float, metric: str, request: gr.Request) -> dict[Any, Any]:
        """After Stop: show everything the store kept (the run's last frame may lag behind)."""
        key = ref.removeprefix("store:") if ref.startswith("store:") else ""
        report = self.store.load_report(key) if key else None
        if report is None:
            return {self.progress: "Stopped."}
        done = len(report.matrices)
        return {
            **self._view(ref, report.with_rank(int(rank)), metric, request),
            self.progress: f"Stopped: {done}/{done + len(report.pending)} matrices kept; Run audit again to resume.",
        }

    @user_errors
    def open_entry(self, index: int, refs: list[str], rank: float, metric: str, request: gr.Request) -> dict[Any, Any]:
        """Open an audit from the gallery."""
        if index is None or not 0 <= index < len(refs):
            return {}
        report = self.catalog.open(refs[index])
        return {
            **self._view(refs[index], report.with_rank(int(rank)), metric, request),
            **self._prefill(report),
            self.progress: f"Opened {refs[index].partition(':')[0]} audit ({report.status}).",
        }

    @user_errors
    def open_link(self, query: str, rank: float, metric: str, request: gr.Request) -> dict[Any, Any]:
        """On page load: pre-fill from ``?base=…&finetune=…&rank=…`` and show the stored result."""
        params = dict(_parse_query(query)) or dict(request.query_params or {})
        link = parse_link(params, plots.METRICS)
        out: dict[Any, Any] = self._gallery()
        if not (link.base and link.finetune):
            return out
        rank, metric = link.rank or int(rank), link.metric or metric
        out |= {
            self.base: link.base,
            self.finetune: link.finetune,
            self.base_revision: link.base_revision,
            self.finetune_revision: link.finetune_revision,
            self.rank: rank,
            self.metric: metric,
        }
        found = self.catalog.find(link.base, link.finetune, link.base_revision, link.finetune_revision)
        if found is None:
            return out | {self.progress: "This pair has not been audited here yet: press **Run audit**."}
        ref, report = found
        opened = "Opened from the store." if ref.startswith("store:") else "Opened the bundled example."
        return out | self._view(ref, report.with_rank(rank), metric, request) | {self.progress: opened}

    # -- helpers -------------------------------------------------------------------------

    def _view(
        self, ref: str, report: Report, metric: str, request: gr.Request, *, with_file: bool = True
    ) -> dict[Any, Any]:
        """Every chart, the summary, the link (and the JSON file) of ``report`` at its rank."""
        self.reports.put(ref, report)
        heat, lines, curves = plots.figures(report, metric)
        url = page_url(dict(request.headers or {}), "http://127.0.0.1:7860/") if request else ""
        base, finetune = report.base, report.finetune
        view: dict[Any, Any] = {
            self.ref: ref,
            self.heatmap: heat,
            self.lines: lines,
            self.curves: curves,
            self.summary: summary_markdown(report),
            self.link: permalink(
                url, base.spec, finetune.spec, report.rank, base.requested_revision, finetune.requested_revision
            ),
        }
        if with_file:
            view[self.download] = str(write_report_json(report, self.downloads))
        return view

    def _prefill(self, report: Report) -> dict[Any, Any]:
        return {
            self.base: report.base.spec,
            self.finetune: report.finetune.spec,
            self.base_revision: report.base.requested_revision or "",
            self.finetune_revision: report.finetune.requested_revision or "",
        }

    def _gallery(self) -> dict[Any, Any]:
        entries = self.catalog.entries()
        return {self.gallery: gr.Dataset(samples=_samples(entries)), self.refs: [e.ref for e in entries]}

    def _token(self, typed: str, oauth_token: gr.OAuthToken | None) -> str | bool | None:
        """The user's token; else their sign-in; else none at all on a public deployment."""
        if typed.strip():
            return typed.strip()
        if oauth_token is not None:
            return oauth_token.token
        if self.config.server_token or self.config.allow_local:
            return None  # huggingface_hub's own lookup (HF_TOKEN, stored login), as in the CLI
        # False tells huggingface_hub to send no token: a public Space must not lend its own login.
        return False


def _provider_choice(rank: float) -> str | None:
    """Keep the quick picks in step with the slider: highlight a typical rank, else none."""
    return str(int(rank)) if int(rank) in PROVIDER_RANKS else None


def _samples(entries: list[Any]) -> list[list[str]]:
    return [[e.label, e.status, e.sentence] for e in entries]


def _parse_query(query: str) -> list[tuple[str, str]]:
    return parse_qsl((query or "").lstrip("?"))


def build_app(config: AppConfig | None = None) -> gr.Blocks:
    """The dashboard for one deployment (settings from the environment by default)."""
    return Dashboard(config or AppConfig.from_env()).build()


def launch_options() -> dict[str, Any]:
    """``launch()`` settings every deployment shares (Gradio 6: theme/css go here too)."""
    return {"run_history": False, "footer_links": ["api", "gradio", "settings"], "theme": gr.themes.Soft()}


try:
    demo = build_app()  # module level: a Space imports this file and serves ``demo``
except LorafidError as e:  # a bad server setting: one line that says which, not a traceback
    raise SystemExit(f"lorafid: {e}") from None

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Serve the lorafid dashboard.")
    parser.add_argument("--allow-local", action="store_true", help="also audit local paths (private servers only)")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1 or GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860 or GRADIO_SERVER_PORT)")
    args = parser.parse_args()
    if args.allow_local:
        demo = build_app(AppConfig.from_env(allow_local=True))
    demo.launch(server_name=args.host, server_port=args.port, **launch_options())
