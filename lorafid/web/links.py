"""Permalinks: ``?base=…&finetune=…&rank=…`` written and read back (never a token).

``permalink``, ``example_link`` and ``report_link`` write them (a report's link pins both
commits); ``parse_link`` reads one, dropping unknown or oversized values rather than
failing; ``page_url`` is the address the visitor sees behind a proxy; ``stored_key`` reads a
stored check's ``?probe=KEY`` / ``?behaviour=KEY``. ``resolve_commit`` is the one network
call here: the commit a branch points at now. Free of Gradio.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from lorafid.audit.report import Report, SourceRecord
from lorafid.web.recent import Recent
from lorafid.weights.source import open_source


@dataclass(frozen=True)
class Link:
    """What a permalink names. Unknown or malformed parameters are dropped, never errors."""

    base: str = ""
    finetune: str = ""
    base_revision: str = ""
    finetune_revision: str = ""
    rank: int | None = None
    metric: str | None = None
    example: str = ""  # a bundled example's file name: its models are not Hub repos


def permalink(
    page_url: str,
    base: str,
    finetune: str,
    rank: int,
    base_revision: str | None = None,
    finetune_revision: str | None = None,
    metric: str | None = None,
) -> str:
    """A shareable URL that re-opens this audit at this rank (and metric). Never carries a token.

    Example: permalink("http://127.0.0.1:7860/", "org/base", "org/tuned", 64, metric="mse")
    -> "http://127.0.0.1:7860/?base=org%2Fbase&finetune=org%2Ftuned&rank=64&metric=mse"
    """
    params = {"base": base, "finetune": finetune, "rank": str(rank)}
    if base_revision:
        params["base_revision"] = base_revision
    if finetune_revision:
        params["finetune_revision"] = finetune_revision
    if metric:
        params["metric"] = metric
    return page_url.split("?", 1)[0] + "?" + urlencode(params)


def example_link(page_url: str, name: str, rank: int, metric: str | None = None) -> str:
    """The permalink of a bundled example: by file name, as its models are not Hub repos.

    Example: example_link("http://h/", "minilm-lora-r8.json", 8) -> "http://h/?example=minilm-lora-r8.json&rank=8"
    """
    params = {"example": name, "rank": str(rank)} | ({"metric": metric} if metric else {})
    return page_url.split("?", 1)[0] + "?" + urlencode(params)


def report_link(page_url: str, report: Report, metric: str | None = None) -> str:
    """The permalink of a report: Hub sides pinned to the commits audited, so the link names
    exactly what it shows even after a branch moves; local sides as typed."""
    base, finetune = (_link_side(r) for r in (report.base, report.finetune))
    return permalink(page_url, base[0], finetune[0], report.rank, base[1], finetune[1], metric)


def _link_side(record: SourceRecord) -> tuple[str, str | None]:
    if record.kind == "hub" and record.repo_id and record.resolved_sha:
        return record.repo_id, record.resolved_sha
    return record.spec, record.requested_revision


MAX_LINK_VALUE_CHARS = 300  # a repo ID is at most 96 characters; longer values are not links we made


def parse_link(params: Mapping[str, str], metrics: Mapping[str, object]) -> Link:
    """Read permalink query parameters (``metrics``: the allowed metric keys).

    Values longer than ``MAX_LINK_VALUE_CHARS`` are dropped, never echoed.
    """

    def value(name: str) -> str:
        text = str(params.get(name, "")).strip()
        return text if len(text) <= MAX_LINK_VALUE_CHARS else ""

    rank_text = value("rank")
    rank = int(rank_text) if rank_text.isdigit() and 1 <= int(rank_text) <= 10**6 else None
    metric = params.get("metric")
    return Link(
        base=value("base"),
        finetune=value("finetune"),
        base_revision=value("base_revision"),
        finetune_revision=value("finetune_revision"),
        rank=rank,
        metric=metric if metric in metrics else None,
        example=example if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\.json", example := value("example")) else "",
    )


def page_url(headers: Mapping[str, str], fallback: str) -> str:
    """The URL the user sees, behind a proxy too (Spaces set ``x-forwarded-*``)."""
    host = headers.get("x-forwarded-host") or headers.get("host")
    if not host:
        return fallback
    proto = headers.get("x-forwarded-proto") or fallback.split("://", 1)[0] or "http"
    return f"{proto}://{host}/"


def resolve_commit(repo: str, revision: str | None, token: str | bool | None, endpoint: str | None) -> str:
    """The commit SHA a branch or tag (None: the default branch) of a Hub repo points at now.

    Asked without a visitor's own token (False, or None: the server's), the answer is kept a
    minute for everyone (``Recent``): a branch that moves shows its new commit within 60 s.
    """

    def ask() -> str:
        source = open_source(repo, revision=revision or None, token=token, endpoint=endpoint, allow_local=False)
        source.close()
        return source.info.resolved_sha or ""

    return ask() if isinstance(token, str) else _COMMITS.get((repo, revision or None, token, endpoint), ask)


_COMMITS: Recent[str] = Recent(60.0)


def stored_key(query: str, name: str) -> str:
    """The stored document's key that ``?name=KEY`` names, or "" unless it is 16 hex digits."""
    key = dict(parse_query(query)).get(name, "")
    return key if len(key) == 16 and all(c in "0123456789abcdef" for c in key) else ""


def parse_query(query: str) -> list[tuple[str, str]]:
    """A query string's (name, value) pairs, read from its first 4,096 characters."""
    return parse_qsl((query or "")[:4096].lstrip("?"))
