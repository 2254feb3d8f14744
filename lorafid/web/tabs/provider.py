"""The Provider check tab: does an OpenAI-compatible API serve the fine-tune, an extraction, or else?

Runs ``lorafid.providers.probe`` within the server's endpoint rules and each visitor's
request budget (``lorafid.providers.netguard``), announces the number of requests before any
is sent, stores each check (no key, no URL path) and reopens one from ``?probe=KEY``.
"""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from lorafid.audit.store import Store
from lorafid.compute import ComputeHook
from lorafid.errors import LorafidError
from lorafid.names import parse_ranks
from lorafid.providers.netguard import ProbeServerSettings, VisitorBudget
from lorafid.providers.probe import DEFAULT_QUANTIZED
from lorafid.providers.probe_report import ProbeReport
from lorafid.providers.quantize import SCHEMES
from lorafid.web import plots
from lorafid.web.config import MAX_RANK, AppConfig, check_deadline, check_token
from lorafid.web.gallery import Catalog
from lorafid.web.limits import TOO_MANY_LINKS, VisitorRate, VisitorSlots, visitor_of
from lorafid.web.links import stored_key
from lorafid.web.tabs.common import (
    MAX_INPUT_CHARS,
    open_stored_check,
    scroll_if_linked_js,
    stored_check_download,
    stored_check_link,
    user_errors,
)
from lorafid.web.text import md_text, rounded

PROBE_INTRO = """**Does an API serve this fine-tune, or a rank-r LoRA extracted from it?** The provider's
log-probabilities on a fixed prompt set, or, where it gives none, text it samples, are compared
with the fine-tune, its extractions at each candidate rank, its quantized copies and the base,
all computed here from the public weights. The plan, and the number of requests, is shown
before any is sent; a request budget fits rate-limited plans (5 requests is enough for text).
"""
CHANNEL_CHOICES = (
    "auto",
    "completions-echo",
    "prompt-logprobs",
    "chat-top-logprobs",
    "completions-text",
    "completions-greedy",
)
MAX_BUDGET = 50  # requests one dashboard check may spend, whatever a visitor asks


class ProviderTab:
    """The provider check tab of the Dashboard.

    Uses the Dashboard's ``config``, ``store``, ``catalog`` (who may see a stored check),
    ``downloads``, ``behind_proxy``, ``probe_settings``, ``probe_budget``, ``visitors`` (one
    slot per running check), ``link_rate`` (permalinks opened per visitor) and ``tabs`` (a
    link opens this tab), and ``ResultsTab._publish_probe``.
    """

    config: AppConfig
    store: Store
    catalog: Catalog
    downloads: Path
    behind_proxy: bool
    probe_settings: ProbeServerSettings
    probe_budget: VisitorBudget
    visitors: VisitorSlots
    link_rate: VisitorRate
    tabs: gr.Tabs
    compute: ComputeHook | None
    _publish_probe: Callable[[dict[str, Any]], str]  # ResultsTab's

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
        with gr.Row():
            self.probe_channel = gr.Dropdown(
                list(CHANNEL_CHOICES),
                value="auto",
                label="Channel (auto: log-probabilities where offered, else sampled text)",
            )
            self.probe_requests = gr.Number(
                label=f"Request budget (retries included; 0 or blank: as planned, at most {MAX_BUDGET})",
                value=None,
                precision=0,
                minimum=0,
                maximum=MAX_BUDGET,
            )
            self.probe_quantized = gr.CheckboxGroup(
                [*SCHEMES, "base:int8", "base:fp8"],
                value=list(DEFAULT_QUANTIZED),
                label="Quantized candidates (each costs one local forward pass; base:… = the extractions on a "
                "quantized base)",
            )
        self.probe_button = gr.Button("Check provider", variant="primary")
        self.probe_status = gr.Markdown(elem_id="probe-status")
        self.probe_verdict = gr.Markdown()
        self.probe_plot = gr.Plot(label="Distance from the provider, by candidate")
        self.probe_table = gr.Dataframe(
            headers=["candidate", "KL nats/token", "95% interval", "top-1 agreement", "evidence"],
            label="Candidates, closest first",
            elem_id="probe-table",
            interactive=False,
            wrap=True,
        )
        self.probe_rows = gr.Dataframe(
            headers=["prompt", "text", "tokens"],
            label="Per prompt (for sampled text: per continuation): its evidence",
            interactive=False,
        )
        with gr.Row():
            self.probe_file = gr.File(label="JSON (lorafid.probe/1)", interactive=False)
            self.probe_link = gr.Markdown()
        outputs = [self.probe_status, self.probe_verdict, self.probe_plot, self.probe_table, self.probe_rows]
        outputs += [self.probe_file, self.probe_link]
        inputs = [self.probe_endpoint, self.probe_model, self.probe_key, self.probe_base, self.probe_finetune]
        self.probe_button.click(
            self.run_probe,
            [*inputs, self.probe_ranks, self.probe_channel, self.probe_requests, self.probe_quantized],
            outputs,
            api_name="run_probe",
            show_progress="minimal",
            concurrency_id="audit",  # the local candidates read and run weights like an audit
            concurrency_limit=self.config.concurrency,
        )
        probe_query = gr.Textbox(visible=False)
        # a link restores the ranks, channel and budget, and opens this tab
        linked = [self.probe_ranks, self.probe_channel, self.probe_requests, self.tabs]
        demo.load(
            self.open_probe_link,
            [probe_query],
            [*outputs, self.probe_endpoint, self.probe_model, self.probe_base, self.probe_finetune, *linked],
            js="(query) => [window.location.search]",
            api_visibility="private",
            queue=False,
        ).then(None, js=scroll_if_linked_js("probe", "#probe-status"), api_visibility="private", queue=False)

    @user_errors
    def run_probe(
        self,
        endpoint: str,
        model: str,
        api_key: str,
        base: str,
        finetune: str,
        ranks: str,
        channel: str | None,
        budget: float | None,
        quantized: list[str] | None,
        request: gr.Request,
        oauth_token: gr.OAuthToken | None = None,
    ) -> Iterator[dict[Any, Any]]:
        """Take the visitor's slot and request budget, plan (the models' limits checked, the plan
        announced before any request to the provider), probe, store, show."""
        from lorafid.providers.probe import Probe, ProbeConfig, probe_prompts

        fields = {"endpoint": endpoint, "model name": model, "base model": base, "fine-tuned model": finetune}
        for label, value in fields.items():
            if not value.strip() or len(value) > MAX_INPUT_CHARS * 2:
                raise LorafidError(f"Give the {label} (at most {MAX_INPUT_CHARS * 2} characters).")
        rank_list = parse_ranks(ranks, max_count=12, max_rank=MAX_RANK * 64, what="candidate ranks")
        if channel not in (None, *CHANNEL_CHOICES):
            raise LorafidError(f"Pick a channel from the list ({', '.join(CHANNEL_CHOICES)}).")
        budget = budget or None  # an empty number field reads as 0: as planned
        if budget is not None and not (1 <= budget <= MAX_BUDGET and float(budget).is_integer()):
            raise LorafidError(f"The request budget is a whole number from 1 to {MAX_BUDGET}, or blank.")
        schemes = tuple(q for q in (quantized or []) if q.removeprefix("base:") in SCHEMES)[: 2 * len(SCHEMES)]
        texts, prompt_set = probe_prompts(None)
        private = self.probe_settings.any_endpoint or self.config.allow_local
        hub_token = check_token(oauth_token.token if oauth_token else None, private=private)
        config = ProbeConfig(
            endpoint=endpoint.strip(),
            model=model.strip(),
            api_key=api_key.strip() or None,
            ranks=rank_list,
            policy=self.probe_settings.policy(),
            hub_token=hub_token,
            hub_endpoint=self.config.endpoint,
            allow_local=self.config.allow_local,
            device=self.config.device,
            max_model_bytes=self.config.max_model_bytes,
            max_tensor_bytes=self.config.max_tensor_bytes,
            max_tensors=self.config.max_tensors,
            deadline=check_deadline(self.config),
            compute=self.compute,  # the local candidates' blocks on ZeroGPU's GPU, as the other checks
            direction_cache=self.config.direction_cache(),
            channel=None if channel in (None, "auto") else channel,
            max_requests=int(budget) if budget is not None else None,
            quantized=schemes,
        )
        probe = Probe(base.strip(), finetune.strip(), texts, prompt_set, config)
        visitor = visitor_of(request, self.behind_proxy)
        # A check reads and runs weights like an audit: it takes one of the visitor's audit slots.
        with self.visitors.hold(visitor, "check the provider"):
            # The most this check may send comes off the visitor's (and the server's) budget before
            # anything is fetched; what the plan does not need goes back once it is known.
            reserved = int(budget) if budget is not None else MAX_BUDGET
            self.probe_budget.take(visitor, reserved)
            try:
                plan = probe.plan()  # the models' limits, then the tokenizer: no request to the provider yet
                if plan.max_requests > MAX_BUDGET:
                    raise LorafidError(
                        f"This check could send up to {plan.max_requests} requests; this server allows {MAX_BUDGET} "
                        "per check. Give a request budget."
                    )
            except BaseException:
                self.probe_budget.give_back(visitor, reserved)
                raise
            self.probe_budget.give_back(visitor, max(0, reserved - plan.max_requests))
            yield {self.probe_status: md_text(plan.describe()), self.probe_verdict: "", self.probe_link: ""}
            for step in probe.run():  # a few dozen steps at most: each answer, then each prompt scored
                where = "the provider" if step.stage == "provider" else "local candidates"
                yield {self.probe_status: md_text(f"{plan.describe()}\n\n{where}: {step.message}")}
            report = probe.report()
        document = report.to_dict()
        key = self.store.put_document("probe", document)
        self.catalog.record_document("probe", key, document, anonymous=hub_token is False)
        path = stored_check_download(self.downloads, "probe", key, report.to_json())
        status = f"Read by {report.method}; {report.requests['sent']} requests sent."
        if report.status != "complete":
            status += f" Partial: {len(report.failed_prompts)} prompts failed; the rest are shown."
        status += self._publish_probe(document)
        yield self._probe_view(document) | {
            self.probe_status: md_text(status),
            self.probe_file: path,
            self.probe_link: stored_check_link(request, "probe", key),
        }

    def open_probe_link(
        self, query: str, request: gr.Request, oauth_token: gr.OAuthToken | None = None
    ) -> dict[Any, Any]:
        """On page load: ``?probe=KEY`` shows a stored provider check (it holds no key, no URL path),
        to those the audit's rule lets see it (both repos public when checked, or readable with
        their own sign-in)."""
        key = stored_key(query, "probe")
        if not key:
            return {self.probe_status: gr.update()}  # an empty dict reads as one value: "needed 11, returned 1"
        if not self.link_rate.allow(visitor_of(request, self.behind_proxy)):
            return {self.probe_status: TOO_MANY_LINKS}
        token = oauth_token.token if oauth_token else False
        report = open_stored_check(
            self.store, self.catalog, "probe", key, token, ProbeReport.from_dict, "provider check"
        )
        if isinstance(report, str):
            return {self.probe_status: report}
        document = report.to_dict()
        path = stored_check_download(self.downloads, "probe", key, report.to_json())
        settings = document.get("settings") or {}
        ranks = settings.get("ranks") or []
        channel = settings.get("channel") if settings.get("channel") in CHANNEL_CHOICES else "auto"
        budget = settings.get("max_requests") if isinstance(settings.get("max_requests"), int) else None
        return self._probe_view(document) | {
            self.tabs: gr.Tabs(selected="provider-check"),  # a probe link opens on its own tab
            self.probe_file: path,
            self.probe_link: stored_check_link(request, "probe", key),  # as after a run
            self.probe_ranks: ",".join(str(int(r)) for r in ranks),
            self.probe_channel: channel,
            self.probe_requests: budget,
            self.probe_status: md_text(
                f"Stored provider check of {document.get('endpoint_host', '')}. Only the host was kept (never the "
                "URL's path, port or key), so the Endpoint field is left empty: give the full URL to check again."
            ),
            self.probe_endpoint: "",
            self.probe_model: str(document.get("model", "")),
            self.probe_base: str((document.get("base") or {}).get("spec") or ""),
            self.probe_finetune: str((document.get("finetune") or {}).get("spec") or ""),
        }

    def _probe_view(self, document: dict[str, Any]) -> dict[Any, Any]:
        """Verdict, chart and both tables of a ``lorafid.probe/1`` document (either channel kind)."""
        text = document.get("method") in ("completions-text", "completions-greedy")
        key = "gap" if text else "distance"
        candidates = sorted((document.get("candidates") or {}).values(), key=lambda c: c[key])
        agreement = "argmax_agreement" if text else "top1_agreement"
        columns = ["candidate", "gap nats/token" if text else "KL nats/token", "95% interval"]
        greedy = document.get("method") == "completions-greedy"
        columns += ["agreement" if greedy else "fit z" if text else "top-1 agreement", "evidence"]
        table = pd.DataFrame(
            [
                [
                    c["name"],
                    rounded(c[key]),
                    f"{c['interval'][0]:.3g} to {c['interval'][1]:.3g}",
                    round(c["fit_z"], 1) if text and not greedy else rounded(c[agreement]),
                    "ruled out" if c["ruled_out"] else "held",
                ]
                for c in candidates
            ],
            columns=columns,
        )
        names = [c["name"] for c in candidates]
        if text:
            rows = pd.DataFrame(
                [[r["index"], r["text"], r["tokens"], r.get("finish")] for r in document["prompts"]],
                columns=["prompt", "text", "tokens", "ended by"],
            )
        else:
            rows = pd.DataFrame(
                [
                    [r["index"], r["text"], r["tokens"], *(rounded(r["distance"].get(n)) for n in names)]
                    for r in document["prompts"]
                ],
                columns=["prompt", "text", "tokens", *names],
            )
        sentence = (document.get("verdict") or {}).get("sentence", "")
        return {
            self.probe_verdict: "**" + md_text(sentence) + "**",
            self.probe_plot: plots.probe_distances(document),
            self.probe_table: table,
            self.probe_rows: rows,
        }
