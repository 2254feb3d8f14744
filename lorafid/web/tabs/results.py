"""The public results registry (``LORAFID_REGISTRY``): publishing, and the Published results tab.

Finished audits and provider checks of two public repos are queued for the registry's
batching writer, which uses the server's own token (``LORAFID_REGISTRY_TOKEN``), never a
visitor's; the tab lists every published audit in one table. Without ``LORAFID_REGISTRY``
there is no registry, nothing is published and the tab is not shown.
"""

import atexit
from collections.abc import Sequence
from typing import Any

import gradio as gr
import pandas as pd

from lorafid.audit.report import Report
from lorafid.audit.store import Store
from lorafid.errors import LorafidError
from lorafid.sharing.hub_dataset import Registry
from lorafid.sharing.policy import probe_refusal, publish_refusal
from lorafid.sharing.table import (
    PROVIDER_HEADERS,
    PROVIDER_TYPES,
    PROVIDER_WIDTHS,
    TABLE_HEADERS,
    TABLE_TYPES,
    TABLE_WIDTHS,
    provider_hosts,
    provider_rows,
    table_rows,
)
from lorafid.sharing.writer import RegistrySettings, RegistryWriter
from lorafid.web.config import AppConfig
from lorafid.web.links import parse_query
from lorafid.web.tabs.common import MAX_MESSAGE_CHARS
from lorafid.web.text import cards_html, md_text

# A ?provider= link opens on the table of providers, not on the audits above it.
SCROLL_TO_PROVIDERS_JS = (
    "() => { if (new URLSearchParams(window.location.search).get('provider')) "
    "setTimeout(() => document.querySelector('#providers')?.scrollIntoView({block: 'start'}), 300); }"
)  # after the tab switch has drawn the table: scrolling earlier finds nothing to scroll to


class ResultsTab:
    """The registry, publishing and the published results tab of the Dashboard.

    Uses the Dashboard's ``config``, ``store``, ``registry`` and ``publisher`` (the last two
    made by ``_registry`` in ``__init__``).
    """

    config: AppConfig
    store: Store
    registry: Registry | None
    publisher: RegistryWriter | None
    tabs: gr.Tabs

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
        self.results_base, refresh, self.results_note, self.results, self.results_cards = filtered_table(
            "results", "Base model", "All base models", TABLE_HEADERS, TABLE_TYPES, TABLE_WIDTHS
        )
        outputs = [self.results, self.results_base, self.results_note, self.results_cards]
        gr.on(
            [demo.load, refresh.click, self.results_base.input],
            self.results_table,
            [self.results_base],
            outputs,
            api_name="results_table",
            queue=False,
        )
        gr.Markdown(
            elem_id="providers",
            value="### Providers\nThe latest published check of each provider host and model: its verdict, the channel "
            "it read (log-probabilities, or sampled text where a provider gives none), the requests it took, "
            "both repos at the checked commits and links to the full check. Click a column header to sort; link one "
            "provider with `?provider=<host>`.",
        )
        self.providers_host, refresh_providers, self.providers_note, self.providers, self.providers_cards = (
            filtered_table("providers", "Provider", "All providers", PROVIDER_HEADERS, PROVIDER_TYPES, PROVIDER_WIDTHS)
        )
        provider_query = gr.Textbox(visible=False)
        provider_outputs = [self.providers, self.providers_host, self.providers_note, self.providers_cards]
        demo.load(
            self.providers_link,
            [provider_query],
            [*provider_outputs, self.tabs],
            js="(query) => [window.location.search]",
            api_name="providers_link",
            queue=False,
        ).then(None, js=SCROLL_TO_PROVIDERS_JS, api_visibility="private", queue=False)
        gr.on(
            [refresh_providers.click, self.providers_host.input],
            self.providers_table,
            [self.providers_host],
            provider_outputs,
            api_name="providers_table",
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
            self.results_cards: cards_html(list(TABLE_HEADERS), list(TABLE_TYPES), rows),
        }

    def providers_link(self, query: str) -> dict[Any, Any]:
        """On page load: the table of providers; ``?provider=<host>`` shows that host's rows and
        opens this tab."""
        host = dict(parse_query(query)).get("provider", "").strip()
        shown = self.providers_table(host or "All providers")
        if host:
            shown[self.tabs] = gr.Tabs(selected="published-results")
        else:
            shown[self.tabs] = gr.update()
        return shown

    def providers_table(self, host: str) -> dict[Any, Any]:
        """One row per provider host and model (the latest check), for one host or all."""
        assert self.registry is not None
        try:
            probes = self.registry.probes()
        except LorafidError as e:
            note = f"The registry could not be read: {md_text(str(e), MAX_MESSAGE_CHARS)} Try Refresh in a minute."
            return {self.providers_note: note}
        hosts = ["All providers", *provider_hosts(probes)]
        chosen = host if host in hosts else hosts[0]
        hub_url = self.registry.api.endpoint.rstrip("/")
        rows = provider_rows(
            probes, hub_url=hub_url, registry=self.registry, host=None if chosen == hosts[0] else chosen
        )
        missing = host and host not in hosts and host != "All providers"
        note = (f"No published check of {md_text(host, 80)}; showing every provider. " if missing else "") + (
            f"{len(rows)} provider check(s)."
        )
        return {
            self.providers: pd.DataFrame(rows, columns=list(PROVIDER_HEADERS)),
            self.providers_host: gr.Dropdown(choices=hosts, value=chosen),
            self.providers_note: note,
            self.providers_cards: cards_html(list(PROVIDER_HEADERS), list(PROVIDER_TYPES), rows),
        }


def filtered_table(
    name: str,
    label: str,
    everything: str,
    headers: Sequence[str],
    types: Sequence[Any],
    widths: Sequence[Any],
) -> tuple[gr.Dropdown, gr.Button, gr.Markdown, gr.Dataframe, gr.HTML]:
    """A published table's widgets: its filter (``everything`` first), Refresh, a note, the table
    (``#{name}-table``, sortable by its headers) and its phone cards (``#{name}-cards``: CSS shows
    these and hides the table under 640 px, where a dozen columns do not fit)."""
    with gr.Row():
        choice = gr.Dropdown([everything], value=everything, label=label, scale=3)
        refresh = gr.Button("Refresh", scale=1)
    note = gr.Markdown("", elem_id=f"{name}-note")
    table = gr.Dataframe(
        headers=list(headers),
        datatype=list(types),
        interactive=False,
        wrap=True,
        column_widths=list(widths),
        elem_id=f"{name}-table",
    )
    cards = gr.HTML(elem_id=f"{name}-cards", elem_classes="phone-cards")
    return choice, refresh, note, table, cards
