"""The weight audit's adapter section: a published PEFT LoRA compared with the fine-tune.

Its loss is shown next to the optimum of each rank (``lorafid.adapters.peft_adapter``
computes it; both models are read again, as its numbers need Δ). One audit per visitor at a
time, counted with the weight audits.
"""

from collections.abc import Callable
from typing import Any

import gradio as gr

from lorafid.adapters.peft_adapter import audit_adapter, section_of
from lorafid.audit.store import Store
from lorafid.compute import ComputeHook
from lorafid.errors import LorafidError
from lorafid.web import plots
from lorafid.web.config import AppConfig, audit_config
from lorafid.web.limits import VisitorSlots, visitor_id
from lorafid.web.tabs.common import MAX_INPUT_CHARS, user_errors
from lorafid.web.text import md_text


class AdapterTab:
    """The adapter section, built inside the weight audit tab from its form.

    Uses the Dashboard's ``config``, ``store`` and ``compute`` (one audit config for both audits),
    ``visitors``, ``behind_proxy`` and ``_token``, and the
    weight audit's fields (``AuditTab``): ``base``, ``finetune``, their revisions, ``rank``
    and ``token``.
    """

    config: AppConfig
    store: Store
    compute: ComputeHook | None
    visitors: VisitorSlots
    behind_proxy: bool
    base: gr.Textbox
    finetune: gr.Textbox
    base_revision: gr.Textbox
    finetune_revision: gr.Textbox
    rank: gr.Slider
    token: gr.Textbox
    _token: Callable[[str, gr.OAuthToken | None], str | bool | None]  # the Dashboard's

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
        config = audit_config(
            self.config,
            rank=int(rank),
            base_revision=base_revision,
            finetune_revision=finetune_revision,
            token=self._token(token, oauth_token),
            store=self.store,
            compute=self.compute,
        )
        visitor = visitor_id(
            dict(request.headers or {}), request.client.host if request.client else None, self.behind_proxy
        )
        with self.visitors.hold(visitor, "compare the adapter"):
            report = audit_adapter(
                base.strip(),
                finetune.strip(),
                adapter.strip(),
                config,
                adapter_revision=adapter_revision.strip() or None,
            )
        section = section_of(report)
        sentence = section.sentence() if section is not None else ""
        return {self.adapter_summary: "**" + md_text(sentence) + "**", self.adapter_plot: plots.adapter_curve(report)}
