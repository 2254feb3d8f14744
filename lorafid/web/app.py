"""lorafid dashboard: how much of a fine-tune survives as a rank-r LoRA, in the browser.

Run ``python app.py`` (http://127.0.0.1:7860, or GRADIO_SERVER_NAME / GRADIO_SERVER_PORT);
that file is the Hugging Face Space's entry point and builds the app with ``build_app``
here (nothing is built at import). This module composes the page: the ``Dashboard`` with
the state its tabs share, ``build`` and the weight audit's wiring; each tab's layout and
handlers are a mixin in ``lorafid.web.tabs`` (``audit``, ``adapter``, ``provider``,
``behaviour``, ``results``). Widgets and wiring only: the audit is ``lorafid.audit.engine``,
the charts ``lorafid.web.plots``, the settings ``lorafid.web.config``, the gallery, links
and words ``lorafid.web.gallery``, ``links`` and ``text``. Library errors become
``gr.Error`` in one place: ``lorafid.web.tabs.common.user_errors``.

Public by default: local paths are refused unless started with ``--allow-local`` (or
``LORAFID_ALLOW_LOCAL=1``), audits never fall back to the server's own Hub login, and the
browser keeps no run history (it would hold the token). Other switches: ``LORAFID_CONCURRENCY``,
``LORAFID_MAX_QUEUE``, ``LORAFID_MAX_MODEL_GB``, ``LORAFID_HOME``; "Sign in with Hugging
Face" appears only where OAuth is configured (``OAUTH_CLIENT_ID``, set by ``hf_oauth``).
The Provider check tab (``lorafid.providers.probe``) calls only https endpoints on public addresses and
reads only public repos unless ``LORAFID_PROBE_ANY_ENDPOINT=1`` (a private deployment); each
visitor may make it send ``LORAFID_PROBE_REQUESTS_PER_HOUR`` requests an hour (default 300), all
visitors together ``LORAFID_PROBE_SERVER_REQUESTS_PER_HOUR`` (default 3,000). The app takes no
uploads (``lorafid.web.uploads``).

ZeroGPU: on such a Space one function is decorated with ``@spaces.GPU``, the compute hook
(``lorafid.compute.zero_gpu_hook``), and every check gets it as its ``compute``: a matrix's
spectrum (audits), its factors and fit (the adapter audit), one variant's block (behaviour and
provider checks) run in it, CPU tensors in and plain numbers or CPU tensors out; the streaming of
weights stays outside it.
"""

import os
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from lorafid.audit.store import Store
from lorafid.compute import zero_gpu_hook
from lorafid.errors import LorafidError
from lorafid.providers.netguard import ProbeServerSettings
from lorafid.web.config import AppConfig
from lorafid.web.downloads import download_dir
from lorafid.web.gallery import Catalog, ReportCache
from lorafid.web.limits import VisitorRate, VisitorSlots
from lorafid.web.stopping import StopSignals
from lorafid.web.tabs.adapter import AdapterTab
from lorafid.web.tabs.audit import AuditTab, provider_choice
from lorafid.web.tabs.behaviour import BehaviourTab
from lorafid.web.tabs.provider import ProviderTab
from lorafid.web.tabs.results import ResultsTab
from lorafid.web.uploads import RefuseUploads

# A rank typed above the slider's maximum (the audit's largest full rank) is sent as that maximum:
# Gradio refuses a value above a slider's maximum before any handler runs ("Error" on the page,
# a traceback in the log), and the words for it ("Full rank (32) keeps everything") are ours.
CLAMP_RANK_JS = (
    "(...args) => { const max = Number(document.querySelector('#rank input[type=range]')?.max); "
    "return args.map((v, i) => i === RANK && Number.isFinite(max) && v > max ? max : v); }"
)
SCROLL_TO_RESULTS_JS = "() => document.querySelector('#heatmap')?.scrollIntoView({block: 'start'})"
SCROLL_TO_PROGRESS_JS = "() => document.querySelector('#progress')?.scrollIntoView({block: 'start'})"
# A permalink that opened a result scrolls to it; a bare page stays at the top.
SCROLL_IF_OPENED_JS = (
    "() => { if (document.querySelector('#summary')?.innerText.trim()) "
    "document.querySelector('#progress')?.scrollIntoView({block: 'start'}); }"
)
CSS = """
#gallery td { white-space: normal; }
#summary table { width: 100%; }
#summary td { word-break: normal; overflow-wrap: normal; hyphens: none; }  /* "88.28%" never splits */
#progress progress { width: 100%; height: 0.8em; accent-color: var(--color-accent); }
/* Published results and the checks' tables: headers and cells break between words, never inside one ("Matr/ices"). */
:is(#results-table, #providers-table, #probe-table, #behaviour-table) :is(th, td, th *, td *) {
  word-break: normal !important; overflow-wrap: normal !important; hyphens: none;
}
.phone-cards { display: none; }
.phone-cards .card { padding: 0.5em 0; border-bottom: 1px solid var(--border-color-primary); }
.phone-cards .card { overflow-wrap: anywhere; }  /* a 60-character model name wraps inside 390 px */
.phone-cards .card-title { font-weight: 600; }
@media (max-width: 640px) {
  /* A phone gets one card per audit instead of a table wider than the screen. */
  #gallery thead { display: none; }
  #gallery table, #gallery tbody, #gallery tr, #gallery td { display: block; width: 100%; max-width: none !important; }
  #gallery tr { padding: 0.4em 0; border-bottom: 1px solid var(--border-color-primary); }
  #gallery td { padding: 0.15em 0.6em; }
  /* Published results: one card per row; a table of 8 to 12 columns does not fit 390 px. */
  #results-table, #providers-table { display: none !important; }
  .phone-cards { display: block; }
}
"""


class Dashboard(AuditTab, AdapterTab, BehaviourTab, ProviderTab, ResultsTab):
    """The Blocks app of one deployment; handlers return {component: value} dicts.

    Each tab's layout and handlers are a mixin from ``lorafid.web.tabs``; here are the state
    they share (``__init__``), the page (``build``), the weight audit's events (``_wire``) and
    the visitor's token (``_token``, for the weight audit and the adapter section).
    """

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.store = Store(config.store_home)
        self.compute = zero_gpu_hook()  # None off ZeroGPU: every check picks its own device
        self.registry, self.publisher = self._registry()
        self.catalog = Catalog(
            self.store,
            config.examples_dir,
            share_all=config.allow_local,
            endpoint=config.endpoint,
            registry=self.registry,
        )
        self.reports = ReportCache(self.catalog)
        self.downloads = download_dir()
        self.visitors = VisitorSlots(config.max_audits_per_visitor)
        self.stops = StopSignals()  # Stop asks the page's running audit to end and send its last frame
        self.behind_proxy = bool(os.environ.get("SPACE_ID"))  # a Space: its proxy appends x-forwarded-for
        self.probe_settings = ProbeServerSettings.from_env(os.environ)
        self.probe_budget = self.probe_settings.budget()  # per visitor, and for the whole server
        self.link_rate = VisitorRate()  # permalinks opened per visitor a minute (each asks the Hub)

    def build(self) -> gr.Blocks:
        # delete_cache: Gradio's served copies of downloads go after 15 minutes (checked every 5).
        with gr.Blocks(
            title="lorafid: LoRA extraction fidelity", analytics_enabled=False, delete_cache=(300, 900)
        ) as demo:
            # One tab per check, each built by its own method; further checks add a tab here.
            # "wrap": on a phone every tab stays a visible, labelled button (a menu hid three behind "⋯").
            with gr.Tabs(overflow_behavior="wrap", elem_id="tabs") as self.tabs:
                with gr.Tab("Weight audit", id="weight-audit"):
                    self._weight_audit_tab()
                with gr.Tab("Provider check", id="provider-check"):
                    self._provider_check_tab(demo)
                with gr.Tab("Behaviour", id="behaviour"):
                    self._behaviour_tab(demo)
                if self.registry is not None:
                    with gr.Tab("Published results", id="published-results"):
                        self._results_tab(demo)
            self._wire(demo)
        demo.queue(default_concurrency_limit=self.config.concurrency, max_size=self.config.max_queue)
        return demo

    def _wire(self, demo: gr.Blocks) -> None:
        view = [self.ref, self.heatmap, self.lines, self.curves, self.summary, self.link]
        inputs = [self.base, self.finetune, self.base_revision, self.finetune_revision]
        # Audits have their own concurrency group and limit; every other event is cheap (no
        # weights read) and skips the queue, so a full audit queue never blocks a page load,
        # a permalink, the rank slider or the gallery.
        rank_controls = [self.rank, self.provider_rank]
        run = self.run_button.click(
            self.run_audit,
            [*inputs, self.rank, self.metric, self.token],
            [*view, self.progress, self.gallery, self.refs, *rank_controls, self.gallery_box],
            api_name="run_audit",
            show_progress="hidden",
            concurrency_id="audit",
            concurrency_limit=self.config.concurrency,
        )
        self.run_button.click(None, js=SCROLL_TO_PROGRESS_JS, api_visibility="private", queue=False)
        run.then(self.rerender, [self.ref, self.rank, self.metric], view, api_visibility="private", queue=False)
        # Stop asks the run to end, which sends its own last frame after the ones before it; only a
        # run that did not end in time (a slow step) or still queued is cancelled from outside.
        self.stop_button.click(
            self.stopped,
            [self.ref, self.rank, self.metric],
            [*view, self.progress, self.gallery, self.refs],
            api_name="stop",
            queue=False,
        ).then(None, cancels=[run], api_visibility="private", queue=False)
        self.download.click(
            self.download_json, [self.ref, self.rank], self.download_file, api_name="download", queue=False
        ).then(
            None, js="() => document.querySelector('#download-file')?.click()", api_visibility="private", queue=False
        )
        gr.on(
            [self.rank.change, self.metric.change],
            self.rerender,
            [self.ref, self.rank, self.metric],
            view,
            js=CLAMP_RANK_JS.replace("RANK", "1"),
            api_name="rerank",
            trigger_mode="always_last",
            show_progress="hidden",
            queue=False,
        )
        self.provider_rank.input(int, self.provider_rank, self.rank, api_visibility="private", queue=False)
        self.rank.change(
            provider_choice,
            self.rank,
            self.provider_rank,
            js=CLAMP_RANK_JS.replace("RANK", "0"),
            api_visibility="private",
            queue=False,
        )
        self.gallery.click(
            self.open_entry,
            [self.gallery, self.refs, self.rank, self.metric],
            [*view, *inputs, self.progress, *rank_controls],
            api_name="open_audit",
            queue=False,
        ).then(None, js=SCROLL_TO_RESULTS_JS, api_visibility="private", queue=False)
        demo.load(
            self.open_link,
            [self.query, self.rank, self.metric],
            [*view, *inputs, self.rank, self.metric, self.progress, self.gallery, self.refs],
            js="(query, rank, metric) => [window.location.search, rank, metric]",
            api_name="open_link",
            queue=False,
        ).then(self.quick_picks, [self.ref, self.rank], self.provider_rank, api_visibility="private", queue=False).then(
            None, js=SCROLL_IF_OPENED_JS, api_visibility="private", queue=False
        )

    def _token(self, typed: str, oauth_token: gr.OAuthToken | None) -> str | bool | None:
        """The user's token; else their sign-in; else none at all on a public deployment."""
        if typed.strip():
            if not (typed.strip().isascii() and typed.strip().isprintable()):
                # HTTP headers are ASCII: such a token would end in an encoding traceback.
                raise LorafidError(
                    "That token has characters a Hugging Face token never has (hf_ and letters/digits); paste it again."
                )
            return typed.strip()
        if oauth_token is not None:
            return oauth_token.token
        if self.config.server_token or self.config.allow_local:
            return None  # huggingface_hub's own lookup (HF_TOKEN, stored login), as in the CLI
        # False tells huggingface_hub to send no token: a public Space must not lend its own login.
        return False


def build_app(config: AppConfig | None = None) -> gr.Blocks:
    """The dashboard for one deployment (settings from the environment by default)."""
    return Dashboard(config or AppConfig.from_env()).build()


def launch_options() -> dict[str, Any]:
    """``launch()`` settings every deployment shares (Gradio 6: theme/css go here too)."""
    return {
        "run_history": False,
        "footer_links": ["api", "gradio", "settings"],
        "theme": gr.themes.Soft(),
        "css": CSS,
        "max_file_size": "1kb",  # the app takes no files: anonymous uploads are refused, not stored
        "app_kwargs": {"middleware": [Middleware(RefuseUploads)]},  # ... and the upload route answers 403
    }
