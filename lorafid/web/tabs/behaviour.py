"""The Behaviour tab: next-token KL and top-1 agreement of the served extraction.

Runs ``lorafid.behaviour.check`` (imported on first use: it loads transformers), stores
each check, reopens one from ``?behaviour=KEY``, and draws its KL beside the weight audit's
energy kept when that pair's audit is stored. Measures nothing itself.
"""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from lorafid.audit.store import Store
from lorafid.behaviour.report import BehaviourReport
from lorafid.compute import ComputeHook
from lorafid.errors import LorafidError
from lorafid.names import parse_ranks
from lorafid.web.config import MAX_RANK, AppConfig, check_deadline, check_token
from lorafid.web.gallery import Catalog
from lorafid.web.limits import TOO_MANY_LINKS, VisitorRate, VisitorSlots, visitor_of
from lorafid.web.links import stored_key
from lorafid.web.tabs.common import (
    MAX_INPUT_CHARS,
    MAX_MESSAGE_CHARS,
    TEXT_INTERVAL_S,
    open_stored_check,
    scroll_if_linked_js,
    stored_check_download,
    stored_check_link,
    user_errors,
)
from lorafid.web.text import md_text, rounded

BEHAVIOUR_INTRO = """**What does the served extraction do to the model's outputs?** The fine-tune, its base and the
extraction at each rank run side by side on a built-in set of 36 short prompts, one layer at a
time (weights are read once, by HTTP ranges); each is scored against the fine-tune: KL of the
next-token distributions, top-1 agreement, log-likelihood change, and greedy continuations.
"lora-only" is what a multi-LoRA server runs (embeddings, lm_head, norms at the base's values);
"keep-extras" keeps the fine-tune's. Llama, Mistral, Qwen2 and Qwen3 models.
"""
TABLE_FIELDS = ("kl_mean", "kl_p95", "kl_max", "top1_agreement", "loglik_delta")  # after the name, before tokens
BEHAVIOUR_GENERATE_BYTES = 4 * 2**30  # side-by-side continuations only when the whole models fit in this


class BehaviourTab:
    """The behaviour tab of the Dashboard.

    Uses the Dashboard's ``config``, ``store``, ``catalog`` (who may see a stored check),
    ``downloads``, ``compute``, ``visitors`` (one slot per running check), ``link_rate``
    (permalinks opened per visitor) and ``behind_proxy``, and the weight audit's ``base`` and
    ``finetune`` fields (``AuditTab``), which it follows.
    """

    config: AppConfig
    store: Store
    catalog: Catalog
    downloads: Path
    compute: ComputeHook | None
    visitors: VisitorSlots
    link_rate: VisitorRate
    behind_proxy: bool
    base: gr.Textbox
    finetune: gr.Textbox
    tabs: gr.Tabs

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
        self.behave_status = gr.Markdown(elem_id="behaviour-status")
        # No panel label: it covered the figure's titles, which say what is drawn.
        self.behave_plot = gr.Plot(show_label=False, elem_id="behaviour-plot")
        self.behave_table = gr.Dataframe(
            headers=["variant", "KL mean", "KL p95", "KL max", "top-1 agreement", "Δ log-likelihood", "tokens"],
            label="Each variant against the fine-tune",
            elem_id="behaviour-table",
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
            [*outputs, self.behave_base, self.behave_finetune, self.behave_ranks, self.tabs],
            js="(query) => [window.location.search]",
            api_visibility="private",
            queue=False,
        ).then(None, js=scroll_if_linked_js("behaviour", "#behaviour-status"), api_visibility="private", queue=False)

    @user_errors
    def run_behaviour(
        self,
        base: str,
        finetune: str,
        ranks: str,
        serving: str,
        chat: bool,
        request: gr.Request,
        oauth_token: gr.OAuthToken | None = None,
    ) -> Iterator[dict[Any, Any]]:
        """Stream the check (progress in the status line), then store it and show every view."""
        from lorafid.behaviour.check import BehaviourCheck, BehaviourConfig

        for label, value in (("base model", base), ("fine-tuned model", finetune)):
            if not value.strip() or len(value) > MAX_INPUT_CHARS:
                raise LorafidError(f"Give the {label} (at most {MAX_INPUT_CHARS} characters).")
        rank_list = parse_ranks(ranks, max_count=8, max_rank=MAX_RANK * 64)
        token = check_token(oauth_token.token if oauth_token else None, private=self.config.allow_local)
        config = BehaviourConfig(
            ranks=rank_list,
            serving=serving if serving in ("both", "lora-only", "keep-extras") else "both",
            chat_template=bool(chat),
            continuation_tokens=16,
            max_generate_bytes=BEHAVIOUR_GENERATE_BYTES,
            device=self.config.device,
            compute=self.compute,
            direction_cache=self.config.direction_cache(),
            token=token,
            endpoint=self.config.endpoint,
            allow_local=self.config.allow_local,
            max_model_bytes=self.config.max_model_bytes,
            max_tensor_bytes=self.config.max_tensor_bytes,
            max_tensors=self.config.max_tensors,
            deadline=check_deadline(self.config),
        )
        check = BehaviourCheck(base.strip(), finetune.strip(), config)
        visitor = visitor_of(request, self.behind_proxy)
        # A check reads and runs weights like an audit: it takes one of the visitor's audit slots.
        with self.visitors.hold(visitor, "check the behaviour"):
            shown = 0.0
            for step in check.run():
                if time.monotonic() - shown > TEXT_INTERVAL_S or step.stage == "done":
                    shown = time.monotonic()
                    yield {self.behave_status: md_text(f"{step.stage}: {step.done}/{step.total}. {step.message}")}
            report = check.report()
        document = report.to_dict()
        key = self.store.put_document("behaviour", document)
        self.catalog.record_document("behaviour", key, document, anonymous=token is False)
        path = stored_check_download(self.downloads, "behaviour", key, json.dumps(document, indent=1))
        yield self._behaviour_view(report) | {
            self.behave_file: path,
            self.behave_link: stored_check_link(request, "behaviour", key),
        }

    def open_behaviour_link(
        self, query: str, request: gr.Request, oauth_token: gr.OAuthToken | None = None
    ) -> dict[Any, Any]:
        """On page load: ``?behaviour=KEY`` shows a stored behaviour check, to those the audit's
        rule lets see it (both repos public when checked, or readable with their own sign-in)."""
        key = stored_key(query, "behaviour")
        if not key:
            return {self.behave_status: gr.update()}  # an empty dict reads as one value: "needed 9, returned 1"
        if not self.link_rate.allow(visitor_of(request, self.behind_proxy)):
            return {self.behave_status: TOO_MANY_LINKS}
        token = oauth_token.token if oauth_token else False
        report = open_stored_check(
            self.store, self.catalog, "behaviour", key, token, BehaviourReport.from_dict, "behaviour check"
        )
        if isinstance(report, str):
            return {self.behave_status: report}
        document = report.to_dict()
        path = stored_check_download(self.downloads, "behaviour", key, json.dumps(document, indent=1))
        return self._behaviour_view(report) | {
            self.behave_file: path,  # the same download and link as after a run
            self.behave_link: stored_check_link(request, "behaviour", key),
            self.tabs: gr.Tabs(selected="behaviour"),  # a behaviour link opens on its own tab
            self.behave_base: str(report.base.get("spec") or ""),
            self.behave_finetune: str(report.finetune.get("spec") or ""),
            # The ranks it ran, so Run behaviour check repeats this check, not the default ranks.
            self.behave_ranks: ",".join(str(r) for r in report.settings.get("ranks") or [] if isinstance(r, int)),
        }

    def _behaviour_view(self, report: BehaviourReport) -> dict[Any, Any]:
        """Status line, chart and the three tables of a behaviour check."""
        from lorafid.behaviour.check import describe

        document = report.to_dict()  # the tables and chart read the JSON layout, as downloaded
        variants = dict(sorted((document.get("variants") or {}).items(), key=lambda kv: _variant_order(kv[1])))
        table = pd.DataFrame(
            [[name, *(rounded(v[k]) for k in TABLE_FIELDS), v["tokens"]] for name, v in variants.items()],
            columns=["variant", "KL mean", "KL p95", "KL max", "top-1 agreement", "Δ log-likelihood", "tokens"],
        )
        rows = pd.DataFrame(
            [
                [r["id"], r["text"], r["tokens"], *(rounded(r["variants"][n]["kl_mean"]) for n in variants)]
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
        summary = describe(report).splitlines()
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


def behaviour_figure(document: dict[str, Any], energy_kept: dict[int, float] | None) -> Any:
    """KL (left, log axis) and top-1 agreement with the weight audit's energy kept (right), by rank.

    KL spans decades (4.6 nats for the base, 1e-8 at a high rank), so its axis is logarithmic:
    a linear one drew 0.07 and 4e-8 both flat at 0. A KL of exactly 0 (a rank at full rank) is
    drawn at the floor, a decade under the smallest positive value. Ticks are the ranks run.
    """
    from plotly.subplots import make_subplots

    variants = document.get("variants") or {}
    figure = make_subplots(
        rows=1,
        cols=2,
        # Two short lines each: one long line per panel ran into the other's on a phone.
        subplot_titles=("KL per token (nats)<br>fine-tune ‖ served", "top-1 agreement<br>and energy kept"),
        horizontal_spacing=0.14,
    )
    # Titles of at most 19 characters a line, a size under the axes' text: at 390 px each panel
    # is ~150 px wide, and the titles at the default size ran into each other.
    figure.update_annotations(font_size=13)
    positive = [float(v["kl_mean"]) for v in variants.values() if float(v.get("kl_mean") or 0) > 0]
    floor = min(positive) / 10 if positive else 1e-12
    ran: set[int] = set()
    for suffix, label, dash in (("", "lora-only", "solid"), ("+extras", "keep-extras", "dot")):
        points = sorted(
            (v["rank"], v)
            for name, v in variants.items()
            if v.get("kind") == "served" and name.endswith(suffix) and (suffix or not name.endswith("+extras"))
        )
        if not points:
            continue
        ranks = [r for r, _ in points]
        ran.update(ranks)
        line = {"dash": dash}
        figure.add_scatter(
            x=ranks,
            y=[max(float(v["kl_mean"]), floor) for _, v in points],
            customdata=[float(v["kl_mean"]) for _, v in points],
            hovertemplate="rank %{x}: KL %{customdata:.3g} nats/token<extra>" + label + "</extra>",
            name=f"KL, {label}",
            line=line,
            row=1,
            col=1,
        )
        figure.add_scatter(
            x=ranks, y=[v["top1_agreement"] for _, v in points], name=f"top-1, {label}", line=line, row=1, col=2
        )
    if energy_kept:
        ranks = sorted(energy_kept)
        ran.update(ranks)
        figure.add_scatter(x=ranks, y=[energy_kept[r] for r in ranks], name="energy kept (weight audit)", row=1, col=2)
    if "base" in variants and ran:
        # A legend entry, not a label on the plot: a label sat on the panel's title on a phone.
        base_kl = float(variants["base"]["kl_mean"])
        figure.add_scatter(
            x=[min(ran), max(ran)],
            y=[max(base_kl, floor)] * 2,
            mode="lines",
            line={"dash": "dash", "color": "grey"},
            name=f"KL, base: {base_kl:.3g}",
            hovertemplate=f"base: KL {base_kl:.3g} nats/token<extra></extra>",
            row=1,
            col=1,
        )
    ticks = sorted(ran)
    figure.update_xaxes(type="log", title_text="rank", tickvals=ticks, ticktext=[str(r) for r in ticks])
    figure.update_yaxes(type="log", exponentformat="power", row=1, col=1)
    figure.update_yaxes(range=[0, 1.02], tickformat=".0%", row=1, col=2)
    figure.update_layout(
        height=420,
        margin={"t": 70, "b": 40, "l": 60, "r": 20},
        # Under the axes' titles, not over them.
        legend={"orientation": "h", "y": -0.28, "x": 0},
    )
    return figure


def _variant_order(variant: dict[str, Any]) -> tuple[int, int, bool]:
    """Tables list the base, then ranks in numeric order, lora-only before keep-extras (a stored
    document's keys are sorted as text: rank-16, rank-256, rank-64)."""
    rank = variant.get("rank")
    return (
        0 if variant.get("kind") == "base" else 1,
        rank if isinstance(rank, int) else 0,
        bool(variant.get("keep_extras")),
    )
