"""lorafid dashboard: how much of a fine-tune survives as a rank-r LoRA, in the browser.

Run ``python app.py`` (http://127.0.0.1:7860, or GRADIO_SERVER_NAME / GRADIO_SERVER_PORT);
the same file is the Hugging Face Space. Widgets and wiring only: the audit is
``lorafid.audit.engine``, the charts ``lorafid.web.plots``, the gallery, links and words
``lorafid.web.dashboard``. Library errors become ``gr.Error`` in one place: ``user_errors``.

Public by default: local paths are refused unless started with ``--allow-local`` (or
``LORAFID_ALLOW_LOCAL=1``), audits never fall back to the server's own Hub login, and the
browser keeps no run history (it would hold the token). Other switches: ``LORAFID_CONCURRENCY``,
``LORAFID_MAX_QUEUE``, ``LORAFID_MAX_MODEL_GB``, ``LORAFID_HOME``; "Sign in with Hugging
Face" appears only where OAuth is configured (``OAUTH_CLIENT_ID``, set by ``hf_oauth``).
The Provider check tab (``lorafid.providers.probe``) calls only https endpoints on public addresses and
reads only public repos unless ``LORAFID_PROBE_ANY_ENDPOINT=1`` (a private deployment); each
visitor may make it send ``LORAFID_PROBE_REQUESTS_PER_HOUR`` requests an hour (default 300).

ZeroGPU: on such a Space only the per-matrix spectrum is decorated with ``@spaces.GPU``
(``dashboard.zero_gpu_compute``, passed as ``AuditConfig.compute``): it gets CPU tensors and
returns plain numbers, and the streaming of weights stays outside it. The behaviour check's
per-block compute is decorated the same way (``forward.zero_gpu_block_compute``, passed as
``BehaviourConfig.block_compute``): one variant's block weights and the hidden states in, new
hidden states out, as CPU tensors.
"""

import argparse
import atexit
import functools
import inspect
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl

import gradio as gr
import pandas as pd
from huggingface_hub import constants as hf_constants

from lorafid.adapters.peft_adapter import audit_adapter, section_of
from lorafid.audit.engine import Audit, AuditConfig
from lorafid.audit.report import PROVIDER_RANKS, Report, SourceRecord
from lorafid.audit.store import Store
from lorafid.errors import GatedRepoError, LimitExceededError, LorafidError, RepoNotFoundError
from lorafid.names import is_commit_sha, parse_ranks
from lorafid.providers.netguard import ProbeServerSettings, VisitorBudget
from lorafid.sharing.registry import (
    TABLE_HEADERS,
    TABLE_TYPES,
    Registry,
    RegistrySettings,
    RegistryWriter,
    probe_refusal,
    publish_refusal,
    table_rows,
)
from lorafid.web import plots
from lorafid.web.config import DEFAULT_RANK, MAX_RANK, AppConfig
from lorafid.web.downloads import download_dir, write_report_json
from lorafid.web.gallery import Catalog, GalleryEntry, ReportCache
from lorafid.web.limits import VisitorSlots, release_memory, visitor_id
from lorafid.web.links import example_link, page_url, parse_link, report_link, resolve_commit
from lorafid.web.pacing import ProgressMeter, Throttle
from lorafid.web.text import code_span, html_text, md_text, summary_markdown
from lorafid.web.zerogpu import zero_gpu_compute

INTRO = """# lorafid
**How much of a fine-tuned model survives when it is served as a rank-r LoRA** extracted from
its difference to the base (truncated SVD of W_finetune − W_base)? Paste two Hub repos, press
**Run audit**, watch the layers fill in, move the rank: every rank is exact, from one spectrum
per matrix. Weights are read by HTTP ranges, never downloaded whole.
"""
PROBE_INTRO = """**Does an API serve this fine-tune, or a rank-r LoRA extracted from it?** The provider's
log-probabilities on a fixed prompt set are compared with those of the fine-tune, of its
extractions at each candidate rank, of the base, and of the fine-tune rounded to 8 bits, all
computed here from the public weights. The number of requests is shown before any is sent.
"""
BEHAVIOUR_INTRO = """**What does the served extraction do to the model's outputs?** The fine-tune, its base and the
extraction at each rank run side by side on a built-in set of 36 short prompts, one layer at a
time (weights are read once, by HTTP ranges); each is scored against the fine-tune: KL of the
next-token distributions, top-1 agreement, log-likelihood change, and greedy continuations.
"lora-only" is what a multi-LoRA server runs (embeddings, lm_head, norms at the base's values);
"keep-extras" keeps the fine-tune's. Llama, Mistral, Qwen2 and Qwen3 models.
"""
BEHAVIOUR_GENERATE_BYTES = 4 * 2**30  # side-by-side continuations only when the whole models fit in this
FIGURE_INTERVAL_S = 0.5  # rebuild the charts at most twice a second while an audit streams
TEXT_INTERVAL_S = 0.1
MAX_INPUT_CHARS = 200  # a Hub repo ID is at most 96 characters, a revision a branch name or SHA
MAX_MESSAGE_CHARS = 600  # an error message quoting user input is cut, never echoed whole
README_SECTION = "what-the-numbers-mean"  # the README's table of metrics, linked from "How to read this"
SCROLL_TO_RESULTS_JS = "() => document.querySelector('#heatmap')?.scrollIntoView({block: 'start'})"
CSS = """
#gallery td { white-space: normal; }
#summary table { width: 100%; }
#summary td { word-break: normal; overflow-wrap: normal; hyphens: none; }  /* "88.28%" never splits */
#progress progress { width: 100%; height: 0.8em; accent-color: var(--color-accent); }
@media (max-width: 640px) {
  /* A phone gets one card per audit instead of a table wider than the screen. */
  #gallery thead { display: none; }
  #gallery table, #gallery tbody, #gallery tr, #gallery td { display: block; width: 100%; max-width: none !important; }
  #gallery tr { padding: 0.4em 0; border-bottom: 1px solid var(--border-color-primary); }
  #gallery td { padding: 0.15em 0.6em; }
}
"""


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
    """The error's sentence for a pop-up: Gradio renders it as HTML, so it is escaped, and cut."""
    return html_text(str(error), MAX_MESSAGE_CHARS)


def _progress_message(error: LorafidError) -> str:
    """The error's sentence for the progress line (Markdown): links and tags stay characters."""
    return md_text(str(error), MAX_MESSAGE_CHARS)


class Dashboard:
    """The Blocks app of one deployment; handlers return {component: value} dicts."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.store = Store(config.store_home)
        self.compute = zero_gpu_compute()  # None off ZeroGPU: the audit picks its own device
        from lorafid.behaviour.forward import zero_gpu_block_compute  # torch only; transformers loads on first check

        self.block_compute = zero_gpu_block_compute()  # None off ZeroGPU: behaviour blocks run here
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
        self.behind_proxy = bool(os.environ.get("SPACE_ID"))  # a Space: its proxy appends x-forwarded-for
        self.probe_settings = ProbeServerSettings.from_env(os.environ)
        self.probe_budget = VisitorBudget(self.probe_settings.requests_per_hour)

    # -- layout --------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        # delete_cache: Gradio's served copies of downloads go after 15 minutes (checked every 5).
        with gr.Blocks(
            title="lorafid: LoRA extraction fidelity", analytics_enabled=False, delete_cache=(300, 900)
        ) as demo:
            # One tab per check, each built by its own method; further checks add a tab here.
            with gr.Tabs() as self.tabs:
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

    def _provider_check_tab(self, demo: gr.Blocks) -> None:
        """Provider check: does an OpenAI-compatible API serve the fine-tune, an extraction, or else?"""
        gr.Markdown(PROBE_INTRO)
        with gr.Row():
            with gr.Column():
                self.probe_endpoint = gr.Textbox(label="Endpoint", placeholder="https://api.example.com/v1")
                self.probe_model = gr.Textbox(label="Model name at the endpoint", placeholder="org/fine-tuned-model")
                self.probe_key = gr.Textbox(label="API key (used for this run only, never stored)", type="password")
            with gr.Column():
                self.probe_base = gr.Textbox(label="Base model", placeholder="org/base-model")
                self.probe_finetune = gr.Textbox(label="Fine-tuned model", placeholder="org/fine-tuned-model")
                self.probe_ranks = gr.Textbox(label="Candidate ranks", value="16,32,64,128,256,512")
        self.probe_button = gr.Button("Check provider", variant="primary")
        self.probe_status = gr.Markdown()
        self.probe_verdict = gr.Markdown()
        self.probe_plot = gr.Plot(label="Distance from the provider, by candidate")
        self.probe_table = gr.Dataframe(
            headers=["candidate", "KL nats/token", "95% interval", "top-1 agreement", "evidence"],
            label="Candidates, closest first",
            interactive=False,
            wrap=True,
        )
        self.probe_rows = gr.Dataframe(
            headers=["prompt", "text", "tokens"], label="Per prompt: KL per token to each candidate", interactive=False
        )
        with gr.Row():
            self.probe_file = gr.File(label="JSON (lorafid.probe/1)", interactive=False)
            self.probe_link = gr.Markdown()
        outputs = [self.probe_status, self.probe_verdict, self.probe_plot, self.probe_table, self.probe_rows]
        outputs += [self.probe_file, self.probe_link]
        inputs = [self.probe_endpoint, self.probe_model, self.probe_key, self.probe_base, self.probe_finetune]
        self.probe_button.click(
            self.run_probe,
            [*inputs, self.probe_ranks],
            outputs,
            api_name="run_probe",
            show_progress="minimal",
            concurrency_id="audit",  # the local candidates read and run weights like an audit
            concurrency_limit=self.config.concurrency,
        )
        probe_query = gr.Textbox(visible=False)
        linked = [self.probe_ranks, self.tabs]  # a link restores the ranks and opens this tab
        demo.load(
            self.open_probe_link,
            [probe_query],
            [*outputs, self.probe_endpoint, self.probe_model, self.probe_base, self.probe_finetune, *linked],
            js="(query) => [window.location.search]",
            api_visibility="private",
            queue=False,
        )

    @user_errors
    def run_probe(
        self, endpoint: str, model: str, api_key: str, base: str, finetune: str, ranks: str, request: gr.Request
    ) -> Iterator[dict[Any, Any]]:
        """Plan (announced before any request), check the visitor's budget, probe, store, show."""
        from lorafid.providers.probe import Probe, ProbeConfig, probe_prompts

        fields = {"endpoint": endpoint, "model name": model, "base model": base, "fine-tuned model": finetune}
        for label, value in fields.items():
            if not value.strip() or len(value) > MAX_INPUT_CHARS * 2:
                raise LorafidError(f"Give the {label} (at most {MAX_INPUT_CHARS * 2} characters).")
        rank_list = parse_ranks(ranks, max_count=12, max_rank=MAX_RANK * 64, what="candidate ranks")
        texts, prompt_set = probe_prompts(None)
        private = self.probe_settings.any_endpoint or self.config.allow_local
        config = ProbeConfig(
            endpoint=endpoint.strip(),
            model=model.strip(),
            api_key=api_key.strip() or None,
            ranks=rank_list,
            policy=self.probe_settings.policy(),
            hub_token=None if private or self.config.server_token else False,
            hub_endpoint=self.config.endpoint,
            allow_local=self.config.allow_local,
            device=self.config.device,
            max_model_bytes=self.config.max_model_bytes,
        )
        probe = Probe(base.strip(), finetune.strip(), texts, prompt_set, config)
        plan = probe.plan()
        visitor = visitor_id(request.headers, request.client.host if request.client else None, self.behind_proxy)
        self.probe_budget.take(visitor, plan.max_requests)
        yield {self.probe_status: md_text(plan.describe()), self.probe_verdict: "", self.probe_link: ""}
        report = probe.run()
        document = report.to_dict()
        key = self.store.put_document("probe", document)
        path = self.downloads / f"lorafid-probe-{key}.json"
        path.write_text(report.to_json() + "\n")
        status = f"Read by {report.method}; {report.requests['sent']} requests sent."
        if report.status != "complete":
            status += f" Partial: {len(report.failed_prompts)} prompts failed; the rest are shown."
        status += self._publish_probe(document)
        link = page_url(request.headers, str(request.url)) + f"?probe={key}"
        yield self._probe_view(document) | {
            self.probe_status: md_text(status),
            self.probe_file: str(path),
            self.probe_link: f"[Permalink]({link})",
        }

    def open_probe_link(self, query: str, request: gr.Request) -> dict[Any, Any]:
        """On page load: ``?probe=KEY`` shows a stored provider check (it holds no key, no URL path)."""
        key = _stored_key(query, "probe")
        if not key:
            return {self.probe_status: gr.update()}  # an empty dict reads as one value: "needed 11, returned 1"
        document = self.store.load_document("probe", key)
        if document is None:
            return {self.probe_status: "That provider check is not stored on this server."}
        path = self.downloads / f"lorafid-probe-{key}.json"
        path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        ranks = (document.get("settings") or {}).get("ranks") or []
        return self._probe_view(document) | {
            self.tabs: gr.Tabs(selected="provider-check"),  # a probe link opens on its own tab
            self.probe_file: str(path),
            self.probe_ranks: ",".join(str(int(r)) for r in ranks),
            self.probe_status: md_text(f"Stored provider check of {document.get('endpoint_host', '')}."),
            self.probe_endpoint: "https://" + str(document.get("endpoint_host", "")),
            self.probe_model: str(document.get("model", "")),
            self.probe_base: str((document.get("base") or {}).get("spec") or ""),
            self.probe_finetune: str((document.get("finetune") or {}).get("spec") or ""),
        }

    def _probe_view(self, document: dict[str, Any]) -> dict[Any, Any]:
        """Verdict, chart and both tables of a ``lorafid.probe/1`` document."""
        candidates = sorted((document.get("candidates") or {}).values(), key=lambda c: c["distance"])
        table = pd.DataFrame(
            [
                [
                    c["name"],
                    c["distance"],
                    f"{c['interval'][0]:.3g} to {c['interval'][1]:.3g}",
                    c["top1_agreement"],
                    "ruled out" if c["ruled_out"] else "held",
                ]
                for c in candidates
            ],
            columns=["candidate", "KL nats/token", "95% interval", "top-1 agreement", "evidence"],
        )
        names = [c["name"] for c in candidates]
        rows = pd.DataFrame(
            [[r["index"], r["text"], r["tokens"], *(r["distance"].get(n) for n in names)] for r in document["prompts"]],
            columns=["prompt", "text", "tokens", *names],
        )
        sentence = (document.get("verdict") or {}).get("sentence", "")
        return {
            self.probe_verdict: "**" + md_text(sentence) + "**",
            self.probe_plot: plots.probe_distances(document),
            self.probe_table: table,
            self.probe_rows: rows,
        }

    def _behaviour_tab(self, demo: gr.Blocks) -> None:
        """Behaviour: next-token KL and top-1 agreement of the served extraction against the fine-tune."""
        gr.Markdown(BEHAVIOUR_INTRO)
        with gr.Row():
            self.behave_base = gr.Textbox(label="Base model", placeholder="org/base-model")
            self.behave_finetune = gr.Textbox(label="Fine-tuned model", placeholder="org/fine-tuned-model")
        with gr.Row():
            self.behave_ranks = gr.Textbox(label="Ranks", value="16,64,256")
            self.behave_serving = gr.Radio(
                ["both", "lora-only", "keep-extras"], value="both", label="Embeddings, lm_head, norms, biases"
            )
            self.behave_chat = gr.Checkbox(label="Wrap prompts in the fine-tune's chat template", value=False)
        self.behave_button = gr.Button("Run behaviour check", variant="primary")
        self.behave_status = gr.Markdown()
        self.behave_plot = gr.Plot(label="KL and top-1 agreement by rank, beside the weight audit's energy kept")
        self.behave_table = gr.Dataframe(
            headers=["variant", "KL mean", "KL p95", "KL max", "top-1 agreement", "Δ log-likelihood", "tokens"],
            label="Each variant against the fine-tune",
            interactive=False,
        )
        self.behave_rows = gr.Dataframe(
            headers=["prompt", "text", "tokens"], label="Per prompt: mean KL per token", interactive=False, wrap=True
        )
        self.behave_continuations = gr.Dataframe(
            headers=["prompt", "fine-tune"], label="Greedy continuations, side by side", interactive=False, wrap=True
        )
        with gr.Row():
            self.behave_file = gr.File(label="JSON (lorafid.behaviour/1)", interactive=False)
            self.behave_link = gr.Markdown()
        outputs = [self.behave_status, self.behave_plot, self.behave_table, self.behave_rows]
        outputs += [self.behave_continuations, self.behave_file, self.behave_link]
        self.behave_button.click(
            self.run_behaviour,
            [self.behave_base, self.behave_finetune, self.behave_ranks, self.behave_serving, self.behave_chat],
            outputs,
            api_name="run_behaviour",
            show_progress="minimal",
            concurrency_id="audit",  # reads and runs weights like an audit
            concurrency_limit=self.config.concurrency,
        )
        # The same two repos as the weight audit, unless typed here.
        self.base.change(lambda v: v, self.base, self.behave_base, queue=False, api_visibility="private")
        self.finetune.change(lambda v: v, self.finetune, self.behave_finetune, queue=False, api_visibility="private")
        behave_query = gr.Textbox(visible=False)
        demo.load(
            self.open_behaviour_link,
            [behave_query],
            [*outputs, self.behave_base, self.behave_finetune],
            js="(query) => [window.location.search]",
            api_visibility="private",
            queue=False,
        )

    @user_errors
    def run_behaviour(
        self, base: str, finetune: str, ranks: str, serving: str, chat: bool, request: gr.Request
    ) -> Iterator[dict[Any, Any]]:
        """Stream the check (progress in the status line), then store it and show every view."""
        from lorafid.behaviour.check import BehaviourCheck, BehaviourConfig

        for label, value in (("base model", base), ("fine-tuned model", finetune)):
            if not value.strip() or len(value) > MAX_INPUT_CHARS:
                raise LorafidError(f"Give the {label} (at most {MAX_INPUT_CHARS} characters).")
        rank_list = parse_ranks(ranks, max_count=8, max_rank=MAX_RANK * 64)
        config = BehaviourConfig(
            ranks=rank_list,
            serving=serving if serving in ("both", "lora-only", "keep-extras") else "both",
            chat_template=bool(chat),
            continuation_tokens=16,
            max_generate_bytes=BEHAVIOUR_GENERATE_BYTES,
            device=self.config.device,
            block_compute=self.block_compute,
            token=None if self.config.allow_local or self.config.server_token else False,
            endpoint=self.config.endpoint,
            allow_local=self.config.allow_local,
            max_model_bytes=self.config.max_model_bytes,
        )
        check = BehaviourCheck(base.strip(), finetune.strip(), config)
        shown = 0.0
        for step in check.run():
            if time.monotonic() - shown > TEXT_INTERVAL_S or step.stage == "done":
                shown = time.monotonic()
                yield {self.behave_status: md_text(f"{step.stage}: {step.done}/{step.total}. {step.message}")}
        document = check.report()
        key = self.store.put_document("behaviour", document)
        path = self.downloads / f"lorafid-behaviour-{key}.json"
        path.write_text(json.dumps(document, indent=1) + "\n")
        link = page_url(request.headers, str(request.url)) + f"?behaviour={key}"
        yield self._behaviour_view(document) | {
            self.behave_file: str(path),
            self.behave_link: f"[Permalink]({link})",
        }

    def open_behaviour_link(self, query: str, request: gr.Request) -> dict[Any, Any]:
        """On page load: ``?behaviour=KEY`` shows a stored behaviour check."""
        key = _stored_key(query, "behaviour")
        if not key:
            return {self.behave_status: gr.update()}  # an empty dict reads as one value: "needed 9, returned 1"
        document = self.store.load_document("behaviour", key)
        if document is None:
            return {self.behave_status: "That behaviour check is not stored on this server."}
        return self._behaviour_view(document) | {
            self.behave_base: str((document.get("base") or {}).get("spec") or ""),
            self.behave_finetune: str((document.get("finetune") or {}).get("spec") or ""),
        }

    def _behaviour_view(self, document: dict[str, Any]) -> dict[Any, Any]:
        """Status line, chart and the three tables of a ``lorafid.behaviour/1`` document."""
        from lorafid.behaviour.check import describe

        variants = document.get("variants") or {}
        table = pd.DataFrame(
            [
                [name, v["kl_mean"], v["kl_p95"], v["kl_max"], v["top1_agreement"], v["loglik_delta"], v["tokens"]]
                for name, v in variants.items()
            ],
            columns=["variant", "KL mean", "KL p95", "KL max", "top-1 agreement", "Δ log-likelihood", "tokens"],
        )
        rows = pd.DataFrame(
            [
                [r["id"], r["text"], r["tokens"], *(r["variants"][n]["kl_mean"] for n in variants)]
                for r in document.get("prompts") or []
            ],
            columns=["prompt", "text", "tokens", *variants],
        )
        continuations = document.get("continuations") or []
        names = list(continuations[0]["variants"]) if continuations else []
        side = pd.DataFrame(
            [
                [
                    c["prompt"],
                    c["finetune"],
                    *(
                        f"{c['variants'][n]['text']} [departs at token {c['variants'][n]['first_divergence']}]"
                        if c["variants"][n]["first_divergence"] is not None
                        else c["variants"][n]["text"] + " [same]"
                        for n in names
                    ),
                ]
                for c in continuations
            ],
            columns=["prompt", "fine-tune", *names],
        )
        summary = describe(document).splitlines()
        status = summary[0] + ("  \n" + summary[-1] if len(summary) > 2 and "share" in summary[-1] else "")
        return {
            self.behave_status: md_text(status, MAX_MESSAGE_CHARS),
            self.behave_plot: behaviour_figure(document, self._energy_kept(document)),
            self.behave_table: table,
            self.behave_rows: rows,
            self.behave_continuations: side,
        }

    def _energy_kept(self, document: dict[str, Any]) -> dict[int, float] | None:
        """The weight audit's overall energy kept at the document's ranks, if that pair's audit is stored."""
        base, finetune = document.get("base") or {}, document.get("finetune") or {}
        key = self.store.find(str(base.get("spec") or ""), str(finetune.get("spec") or ""))
        report = self.store.load_report(key) if key else None
        if report is None or report.status != "complete":
            return None
        try:
            ranks = document["settings"]["ranks"]
            return {r: report.with_rank(r).summary().overall.energy_retained for r in ranks}
        except (LorafidError, KeyError):
            return None

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
        with gr.Accordion("Audits: examples and past runs (click one to open it)", open=True):
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

    def _adapter_section(self) -> None:
        """Optional: a published PEFT LoRA compared with the fine-tune, its loss next to the optimum."""
        with gr.Accordion("Compare a published adapter (optional)", open=False):
            with gr.Row():
                self.adapter = gr.Textbox(
                    label="Published adapter (PEFT LoRA)", placeholder="org/lora-adapter", scale=3
                )
                self.adapter_revision = gr.Textbox(label="Adapter revision", placeholder="main (optional)", scale=1)
            self.adapter_button = gr.Button("Compare adapter")
            self.adapter_summary = gr.Markdown("", elem_id="adapter-summary")
            self.adapter_plot = gr.Plot(label="This adapter next to the best of each rank", elem_id="adapter-curve")
        self.adapter_button.click(
            self.run_adapter_audit,
            [
                self.base,
                self.finetune,
                self.base_revision,
                self.finetune_revision,
                self.adapter,
                self.adapter_revision,
                self.rank,
                self.token,
            ],
            [self.adapter_summary, self.adapter_plot],
            api_name="adapter_audit",
            concurrency_id="audit",
            concurrency_limit=self.config.concurrency,
        )

    @user_errors
    def run_adapter_audit(
        self,
        base: str,
        finetune: str,
        base_revision: str,
        finetune_revision: str,
        adapter: str,
        adapter_revision: str,
        rank: float,
        token: str,
        oauth_token: gr.OAuthToken | None,
        request: gr.Request,
    ) -> dict[Any, Any]:
        """Audit the pair with the adapter (both models are read again: its numbers need Δ)."""
        fields = {"base model": base, "fine-tuned model": finetune, "adapter": adapter}
        if not all(text.strip() for text in fields.values()):
            raise LorafidError("Enter the base model, the fine-tuned model and the adapter (Hub repo IDs, org/name).")
        for label, text in {**fields, "adapter revision": adapter_revision}.items():
            if len(text.strip()) > MAX_INPUT_CHARS:
                raise LorafidError(f"The {label} field holds {len(text):,} characters; that is not a repo or revision.")
        config = AuditConfig(
            rank=int(rank),
            device=self.config.device,
            base_revision=base_revision.strip() or None,
            finetune_revision=finetune_revision.strip() or None,
            token=self._token(token, oauth_token),
            endpoint=self.config.endpoint,
            allow_local=self.config.allow_local,
            max_model_bytes=self.config.max_model_bytes,
            max_tensor_bytes=self.config.max_tensor_bytes,
            max_tensors=self.config.max_tensors,
        )
        visitor = visitor_id(
            dict(request.headers or {}), request.client.host if request.client else None, self.behind_proxy
        )
        if not self.visitors.take(visitor):
            raise LimitExceededError(
                f"You already have {self.config.max_audits_per_visitor} audit(s) running on this server: wait for it "
                "to finish, then compare the adapter."
            )
        try:
            report = audit_adapter(
                base.strip(),
                finetune.strip(),
                adapter.strip(),
                config,
                adapter_revision=adapter_revision.strip() or None,
            )
        finally:
            self.visitors.give_back(visitor)
        section = section_of(report)
        sentence = section.sentence() if section is not None else ""
        return {self.adapter_summary: "**" + md_text(sentence) + "**", self.adapter_plot: plots.adapter_curve(report)}

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
            [*view, self.progress, self.gallery, self.refs, *rank_controls],
            api_name="run_audit",
            show_progress="hidden",
            concurrency_id="audit",
            concurrency_limit=self.config.concurrency,
        )
        run.then(self.rerender, [self.ref, self.rank, self.metric], view, api_visibility="private", queue=False)
        self.stop_button.click(
            self.stopped,
            [self.ref, self.rank, self.metric],
            [*view, self.progress, self.gallery, self.refs],
            cancels=[run],
            api_name="stop",
            queue=False,
        )
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
            api_name="rerank",
            trigger_mode="always_last",
            show_progress="hidden",
            queue=False,
        )
        self.provider_rank.input(int, self.provider_rank, self.rank, api_visibility="private", queue=False)
        self.rank.change(_provider_choice, self.rank, self.provider_rank, api_visibility="private", queue=False)
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
        ).then(self.quick_picks, [self.ref, self.rank], self.provider_rank, api_visibility="private", queue=False)

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
        config = AuditConfig(
            rank=int(rank),
            device=self.config.device,
            base_revision=base_revision.strip() or None,
            finetune_revision=finetune_revision.strip() or None,
            token=access,
            endpoint=self.config.endpoint,
            allow_local=self.config.allow_local,
            max_model_bytes=self.config.max_model_bytes,
            max_tensor_bytes=self.config.max_tensor_bytes,
            max_tensors=self.config.max_tensors,
            store=self.store,
            compute=self.compute,
        )
        visitor = visitor_id(
            dict(request.headers or {}), request.client.host if request.client else None, self.behind_proxy
        )
        if not self.visitors.take(visitor):
            raise LimitExceededError(
                f"You already have {self.config.max_audits_per_visitor} audit(s) running on this server: wait for it "
                "to finish or press Stop, then run this one."
            )
        try:
            yield from self._stream(
                base.strip(),
                finetune.strip(),
                config,
                metric,
                request,
                anonymous=access is False,
                typed=bool(token.strip()),
            )
        finally:
            self.visitors.give_back(visitor)
            release_memory()  # a stopped or finished audit's pages go back to the OS

    def _stream(
        self,
        base: str,
        finetune: str,
        config: AuditConfig,
        metric: str,
        request: gr.Request,
        *,
        anonymous: bool,
        typed: bool = False,
    ) -> Iterator[dict[Any, Any]]:
        """The audit's frames: planned grid, live charts (paced by their cost), final charts."""
        yield {self.progress: "Reading both models' headers…"}
        job = Audit(base, finetune, config)
        deadline = time.monotonic() + self.config.max_audit_minutes * 60 if self.config.max_audit_minutes else None
        timed_out = False
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
                for step in steps:
                    line = meter.line(step)
                    shown = f"{meter.bar(step)}\n\n{line}"
                    if deadline is not None and time.monotonic() > deadline:
                        timed_out = True
                        steps.close()  # type: ignore[attr-defined]  # keeps every matrix computed so far
                        break
                    if figures.ready():
                        started = time.perf_counter()
                        frame = self._view(ref, job.report(), metric, request)
                        figures.spent(time.perf_counter() - started)
                        yield {**frame, self.progress: shown}
                    elif text.ready():
                        yield {self.progress: shown}
                report = job.report()
        except LorafidError as e:
            said = self._in_app_words(e, typed=typed)
            yield self._failed(job, said, metric, request)
            raise said from e
        if timed_out:
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
        if not job.key:  # failed while planning: nothing of this pair to show
            return {self.progress: f"**Failed:** {_progress_message(error)}"}
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
        """After Stop: show everything the store kept (the run's last frame may lag behind)."""
        release_memory()  # the stopped audit's buffers and headers go back to the OS
        key = ref.removeprefix("store:") if ref.startswith("store:") else ""
        report = self.store.load_report(key) if key else None
        if report is None:
            return {self.progress: "Stopped."}
        # One count, the table's: a matrix in flight at Stop may still land in the store after
        # this line is written, so the line names no number of its own.
        return {
            **self._view(ref, report.with_rank(int(rank)), metric, request),
            self.progress: "**Stopped.** The matrices finished so far are kept (counted in the table below) and the "
            "audit is in the gallery as partial: press **Run audit** with the same models to resume from there.",
            **self._gallery(),
        }

    @user_errors
    def open_entry(self, index: int, refs: list[str], rank: float, metric: str, request: gr.Request) -> dict[Any, Any]:
        """Open an audit from the gallery."""
        if index is None or not 0 <= index < len(refs):
            return {}
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
        params = dict(_parse_query(query)) or dict(request.query_params or {})
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
        token = self._token("", oauth_token)  # their sign-in; no token at all on a public server
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

    # -- the public results registry (LORAFID_REGISTRY) ----------------------------------------

    def _registry(self) -> tuple[Registry | None, RegistryWriter | None]:
        """The registry this server reads published results from, and its batching writer when
        the server holds a write token (``LORAFID_REGISTRY_TOKEN``, a server secret: a visitor's
        token never reaches it). Unset ``LORAFID_REGISTRY``: neither."""
        settings = RegistrySettings.from_env()
        if settings is None:
            return None, None
        cache = self.store.home / "registry" / settings.repo_id.replace("/", "--")
        registry = Registry(
            settings.repo_id, token=settings.token or False, endpoint=self.config.endpoint, cache_dir=cache
        )
        if settings.token is None:
            return registry, None
        writer = RegistryWriter(registry, self.store.home / "registry-outbox", settings.interval_s).start()
        atexit.register(writer.close)  # one last commit; what fails stays in the outbox for the next start
        return registry, writer

    def _publish(self, key: str, report: Report) -> str:
        """Queue a finished audit for the registry when both its repos were public when audited;
        the words to add to the progress line."""
        if self.publisher is None:
            return ""
        reason = publish_refusal(report, visibility=self.store.visibility(key))
        if reason is not None:
            return " Not published: " + md_text(reason, MAX_MESSAGE_CHARS)
        self.publisher.submit(report)
        return " " + md_text(self.publisher.note(), MAX_MESSAGE_CHARS)

    def _publish_probe(self, document: dict[str, Any]) -> str:
        """Queue a finished provider check for the registry when both repos are public now
        (host, model, verdict and distances only); the words to add to the status line."""
        if self.publisher is None:
            return ""
        reason = probe_refusal(document, endpoint=self.config.endpoint)
        if reason is not None:
            return " Not published: " + reason
        try:
            self.publisher.submit_probe(document)
        except LorafidError as e:
            return " Not published: " + str(e)
        return " " + self.publisher.note()

    def _results_tab(self, demo: gr.Blocks) -> None:
        """Every published audit in one sortable table, filterable by base model."""
        assert self.registry is not None
        gr.Markdown(
            f"Every audit published to [{self.registry.repo_id}]({self.registry.url}): energy of the fine-tune's "
            "change kept at typical provider ranks, the rank needed for 90%, links to both repos at the audited "
            "commits and to the full result. Click a column header to sort."
        )
        with gr.Row():
            self.results_base = gr.Dropdown(["All base models"], value="All base models", label="Base model", scale=3)
            refresh = gr.Button("Refresh", scale=1)
        self.results_note = gr.Markdown("", elem_id="results-note")
        self.results = gr.Dataframe(
            headers=list(TABLE_HEADERS),
            datatype=list(TABLE_TYPES),
            interactive=False,
            wrap=True,
            elem_id="results-table",
        )
        outputs = [self.results, self.results_base, self.results_note]
        gr.on(
            [demo.load, refresh.click, self.results_base.input],
            self.results_table,
            [self.results_base],
            outputs,
            api_name="results_table",
            queue=False,
        )

    def results_table(self, base: str) -> dict[Any, Any]:
        """The table's rows (for one base model, or all) and the choice of base models."""
        assert self.registry is not None
        try:
            entries = self.registry.entries()
        except LorafidError as e:
            note = f"The registry could not be read: {md_text(str(e), MAX_MESSAGE_CHARS)} Try Refresh in a minute."
            return {self.results_note: note}
        bases = ["All base models", *sorted({e.base for e in entries})]
        chosen = base if base in bases else "All base models"
        hub_url = self.registry.api.endpoint.rstrip("/")
        try:
            probes = self.registry.probes()
        except LorafidError:
            probes = []  # the audits are still worth showing
        chosen_base = None if chosen == bases[0] else chosen
        rows = table_rows(entries, hub_url=hub_url, registry=self.registry, base=chosen_base, probes=probes)
        skipped = self.registry.unreadable_rows
        note = f"{len(rows)} published audit(s)." + (
            f" {skipped} of a newer lorafid are not shown: this server needs an upgrade." if skipped else ""
        )
        frame = pd.DataFrame(rows, columns=list(TABLE_HEADERS))
        return {
            self.results: frame,
            self.results_base: gr.Dropdown(choices=bases, value=chosen),
            self.results_note: note,
        }

    # -- helpers -------------------------------------------------------------------------

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
        """The error as this page says it: its fields and buttons, not the command line's flags.

        A wrong token and no token get different words; "Sign in" only where the button
        exists; a public server's refusal of local paths offers only what it accepts.
        """
        text = str(error)
        sign_in = ", or press Sign in with Hugging Face" if self.config.oauth else ""
        if isinstance(error, GatedRepoError):
            head = text.split(" (signed in", 1)[0].split(", then", 1)[0]
            text = (
                f"{head} with the Hub account of the token you pasted: that token cannot read it yet."
                if typed
                else f"{head} (signed in to the Hub), then paste a token that can read it in the token field{sign_in}."
            )
        elif isinstance(error, RepoNotFoundError) and "(401)" in text:
            text = text.split(" Create a new one", 1)[0] + (
                " Paste a valid token (Hub settings, Access Tokens), or clear the field for public repos."
            )
        elif isinstance(error, RepoNotFoundError):
            head = text.split(" Check the spelling", 1)[0]
            text = f"{head} Check the spelling (org/name)" + (
                "; if it is private, the token you pasted cannot read it."
                if typed
                else f"; if it is private, paste a token that can read it in the token field{sign_in}."
            )
        if not self.config.allow_local:
            text = re.sub(
                r"Expected a Hub repo ID.*?model\.safetensors\)\.",
                "Enter a Hub repo ID like org/name; a revision goes in its own field.",
                text,
            )
        text = re.sub(r"\s*\((?:--token|HF_TOKEN)[^)]*\)", "", text)
        text = re.sub(r",? (?:with|pass it with) --token or HF_TOKEN", "", text)
        if text == str(error):
            return error
        try:
            return type(error)(text)
        except TypeError:  # a class that takes more than a message
            return LorafidError(text)

    def _gallery(self) -> dict[Any, Any]:
        entries = self.catalog.entries()
        return {self.gallery: gr.Dataset(samples=_samples(entries)), self.refs: [e.ref for e in entries]}

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


def _provider_choice(rank: float) -> str | None:
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
    return gr.Radio(choices=[str(r) for r in PROVIDER_RANKS if r <= largest], value=_provider_choice(rank))


def _rank_label(largest: int) -> str:
    return f"Any rank (1 to {largest:,})"


def _largest_k(report: Report) -> int:
    """The largest rank any of the report's matrices has (min of its shape); a bound for the slider."""
    return max((min(m.shape) for m in report.matrices), default=MAX_RANK)


def behaviour_figure(document: dict[str, Any], energy_kept: dict[int, float] | None) -> Any:
    """KL (left) and top-1 agreement with the weight audit's energy kept (right), by rank."""
    from plotly.subplots import make_subplots

    variants = document.get("variants") or {}
    figure = make_subplots(rows=1, cols=2, subplot_titles=("KL(fine-tune ‖ variant), nats per token", "share"))
    for suffix, label, dash in (("", "lora-only", "solid"), ("+extras", "keep-extras", "dot")):
        points = sorted(
            (v["rank"], v)
            for name, v in variants.items()
            if v.get("kind") == "served" and name.endswith(suffix) and (suffix or not name.endswith("+extras"))
        )
        if not points:
            continue
        ranks = [r for r, _ in points]
        line = {"dash": dash}
        figure.add_scatter(x=ranks, y=[v["kl_mean"] for _, v in points], name=f"KL, {label}", line=line, row=1, col=1)
        figure.add_scatter(
            x=ranks, y=[v["top1_agreement"] for _, v in points], name=f"top-1, {label}", line=line, row=1, col=2
        )
    if "base" in variants:
        figure.add_hline(y=variants["base"]["kl_mean"], line_dash="dash", annotation_text="base", row=1, col=1)
    if energy_kept:
        ranks = sorted(energy_kept)
        figure.add_scatter(x=ranks, y=[energy_kept[r] for r in ranks], name="energy kept (weight audit)", row=1, col=2)
    figure.update_xaxes(type="log", title_text="rank")
    figure.update_yaxes(range=[0, 1.02], row=1, col=2)
    figure.update_layout(height=380, margin={"t": 40, "b": 40, "l": 50, "r": 20}, legend={"orientation": "h"})
    return figure


def _stored_key(query: str, name: str) -> str:
    """The stored document's key that ``?name=KEY`` names, or "" unless it is 16 hex digits."""
    key = dict(_parse_query(query)).get(name, "")
    return key if len(key) == 16 and all(c in "0123456789abcdef" for c in key) else ""


def _parse_query(query: str) -> list[tuple[str, str]]:
    return parse_qsl((query or "")[:4096].lstrip("?"))


def _hub_like(spec: str) -> bool:
    """A Hub repo ID (org/name), as opposed to a local path on a private deployment."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


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
    }


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
