"""The public results tables: one row per published audit (``table_rows``), with the provider
checks of the same two commits in a cell. Repo cells link to the Hub at the audited commit;
text that came from a prober (host, model) is never rendered as Markdown.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import quote, urlencode

from lorafid.names import is_commit_sha, is_repo_id
from lorafid.sharing.hub_dataset import Registry
from lorafid.sharing.hub_errors import cut
from lorafid.sharing.records import TABLE_RANKS, RegistryEntry

# -- the public results table ---------------------------------------------------------------------

TABLE_HEADERS: tuple[str, ...] = (
    "Fine-tune",
    "Base",
    *(f"Kept at rank {r} (%)" for r in TABLE_RANKS),
    "Rank for 90%",
    "Matrices",
    "Audited",
    "lorafid",
    "Provider checks",
    "Full result",
)
TABLE_TYPES: tuple[Literal["str", "number", "markdown"], ...] = (
    "markdown",
    "markdown",
    "number",  # one per TABLE_RANKS
    "number",
    "number",
    "number",
    "number",
    "number",
    "str",
    "str",
    "str",  # provider checks: host and model are the prober's text, never rendered as markdown
    "markdown",
)


def table_rows(
    entries: list[RegistryEntry],
    *,
    hub_url: str,
    registry: Registry,
    base: str | None = None,
    probes: list[dict[str, Any]] | None = None,
) -> list[list[Any]]:
    """Rows of the public results table (``TABLE_HEADERS``), optionally for one base model.

    ``probes`` (``Registry.probes()``): the verdicts of published provider checks of the same
    two commits go in the row's "Provider checks" cell, the latest per provider host and model.

    Shares are numbers (percent, so the table sorts them as numbers); repo cells link to the
    Hub at the audited commit; the last cell links to the result file and opens it here.
    Rows whose repo IDs or SHAs are not well-formed are left out (they would be links).
    """
    rows = []
    for e in entries:
        if base and e.base != base:
            continue
        if not all(is_repo_id(r) for r in (e.base, e.finetune)) or not all(
            is_commit_sha(s) for s in (e.base_sha, e.finetune_sha)
        ):
            continue
        link = audit_query(e.base, e.finetune, e.base_sha, e.finetune_sha)
        rows.append(
            [
                f"[{e.finetune}]({hub_url}/{e.finetune}/tree/{e.finetune_sha}) @{e.finetune_sha[:7]}",
                f"[{e.base}]({hub_url}/{e.base}/tree/{e.base_sha}) @{e.base_sha[:7]}",
                *(round(100 * float(e.energy_at.get(str(r), float("nan"))), 3) for r in TABLE_RANKS),
                e.rank_for_90,
                e.matrices,
                e.created[:10],
                e.tool_version,
                provider_checks_cell(probes or [], e),
                f"[JSON]({registry.url}/blob/main/{quote(e.path)}) · [open](?{link})",
            ]
        )
    return rows


def provider_checks_cell(probes: list[dict[str, Any]], entry: RegistryEntry) -> str:
    """The verdicts of the provider checks of this pair at these commits, latest per host and
    model, one "host · model: verdict" per line; "" when none."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for p in sorted(probes, key=lambda p: str(p.get("created", ""))):
        same = (p.get("base"), p.get("finetune"), p.get("base_sha"), p.get("finetune_sha"))
        if same == (entry.base, entry.finetune, entry.base_sha, entry.finetune_sha):
            latest[(p["endpoint_host"], p["model"])] = p
    return "\n".join(
        f"{host} · {cut(model, 80)}: {cut(p['verdict']['sentence'], 240)}"
        for (host, model), p in sorted(latest.items())
    )


# -- the public table of providers ----------------------------------------------------------------

PROVIDER_HEADERS: tuple[str, ...] = (
    "Provider",
    "Model",
    "Verdict",
    "Channel",
    "Requests",
    "Checked",
    "Fine-tune on base",
    "Links",
)
PROVIDER_TYPES: tuple[Literal["str", "number", "markdown"], ...] = (
    "str",  # host and model are the prober's text: never rendered as Markdown
    "str",
    "str",
    "str",
    "number",
    "str",
    "markdown",  # validated repo IDs and SHAs only (probe_well_formed)
    "markdown",
)
# Shares of the table's width: the verdict gets the most, a date or a count the least.
PROVIDER_WIDTHS: tuple[str, ...] = ("13%", "14%", "27%", "9%", "7%", "8%", "14%", "8%")
TABLE_WIDTHS: tuple[str, ...] = ("14%", "12%", "5%", "5%", "5%", "5%", "5%", "7%", "8%", "6%", "20%", "8%")


def channel_name(method: str) -> str:
    """The channel a check read, in a word: "logprobs", "text (sampled)" or "text (greedy)"."""
    return {"completions-text": "text (sampled)", "completions-greedy": "text (greedy)"}.get(method, "logprobs")


def provider_rows(
    probes: list[dict[str, Any]], *, hub_url: str, registry: Registry, host: str | None = None
) -> list[list[Any]]:
    """Rows of the public table of providers (``PROVIDER_HEADERS``): one per provider host and
    model, the latest published check of it (of any pair), optionally for one host.

    ``probes``: ``Registry.probes()`` (published summaries: host, model, verdict, distances;
    never a key or a URL path). Repo cells link to the Hub at the checked commits; the last cell
    links to the published check and to the audit of the same two commits here. A check
    published before its request count was kept shows no count.
    """
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for p in sorted(probes, key=lambda p: str(p.get("created", ""))):
        latest[(str(p["endpoint_host"]), str(p["model"]))] = p
    rows = []
    for (where, model), p in sorted(latest.items()):
        if host and where != host:
            continue
        link = audit_query(p["base"], p["finetune"], p["base_sha"], p["finetune_sha"])
        check = f"[JSON]({registry.url}/blob/main/{quote(str(p['path']))}) · " if p.get("path") else ""
        rows.append(
            [
                where,
                cut(model, 80),
                cut(str(p["verdict"]["sentence"]), 400),
                channel_name(str(p.get("method") or "")),
                p.get("requests") if isinstance(p.get("requests"), int) and p.get("requests") else None,
                str(p.get("created", ""))[:10],
                f"[{p['finetune']}]({hub_url}/{p['finetune']}/tree/{p['finetune_sha']}) @{p['finetune_sha'][:7]} "
                f"on [{p['base']}]({hub_url}/{p['base']}/tree/{p['base_sha']}) @{p['base_sha'][:7]}",
                f"{check}[audit](?{link}) · [provider](?{urlencode({'provider': where})})",
            ]
        )
    return rows


def provider_hosts(probes: list[dict[str, Any]]) -> list[str]:
    """The hosts of published checks, sorted: the table's filter."""
    return sorted({str(p["endpoint_host"]) for p in probes})


def audit_query(base: str, finetune: str, base_sha: str, finetune_sha: str) -> str:
    """The dashboard's query string that opens the audit of these two repos at these commits."""
    return urlencode({"base": base, "finetune": finetune, "base_revision": base_sha, "finetune_revision": finetune_sha})
