"""Which pairs a batch may take from the store: those audited at the same Hub, at the same commits.

Before submitting anything the driver asks the Hub, once per repo and revision, which commit
each side points at now (one metadata call, no file read: ``resolve_commits``). A stored
result is reused only when it was computed from the same endpoint, the same two repos at
those same commits, and the same tensor selection (``ReuseIndex``). So a branch that moved,
or another Hub that serves other weights under the same repo IDs, is audited afresh, and an
unchanged pair costs one metadata request per repo and no byte of weights.

The index is a small SQLite file beside the store (``batch-index.sqlite3`` in the driver's
``LORAFID_HOME``), written by the driver when a pair completes, from the commits the task's
report says it read. Nothing secret is written (no token).

Not here: local paths (a task re-plans them, and resumes from its node's store by the audit's
own key, which pins each file's size and mtime); the audit itself.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants

from lorafid.errors import LorafidError
from lorafid.retry import RetryPolicy
from lorafid.weights.source import model_info, parse_source_spec

INDEX_FILE = "batch-index.sqlite3"
RESOLVERS = 8  # metadata requests in flight at once when a catalogue's commits are resolved

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    endpoint TEXT NOT NULL,
    base TEXT NOT NULL,
    base_sha TEXT NOT NULL,
    finetune TEXT NOT NULL,
    finetune_sha TEXT NOT NULL,
    selection TEXT NOT NULL,
    audit_key TEXT NOT NULL,
    PRIMARY KEY (endpoint, base, base_sha, finetune, finetune_sha, selection)
);
CREATE TABLE IF NOT EXISTS origins (
    base TEXT NOT NULL,
    base_sha TEXT NOT NULL,
    finetune TEXT NOT NULL,
    finetune_sha TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    PRIMARY KEY (base, base_sha, finetune, finetune_sha)
);
"""


@dataclass(frozen=True)
class HubSide:
    """One side of a pair as the Hub names it now: repo ID and the commit its revision points at."""

    repo_id: str
    sha: str


def hub_endpoint(endpoint: str | None) -> str:
    """The Hub URL tasks read from: the batch's, else HF_ENDPOINT, else huggingface.co (no trailing /)."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def resolve_commits(
    specs: Iterable[tuple[str, str | None]], *, endpoint: str, token: str | None, retry: RetryPolicy | None = None
) -> dict[tuple[str, str | None], HubSide | None]:
    """For each (spec, revision): the repo and the commit it points at now; None for a local path or
    a repo the Hub does not show (the task then reports why). One metadata request per distinct
    repo and revision, at most ``RESOLVERS`` at once, each asked again after an answer worth
    another try (``weights.source.model_info``): a pair not resolved is audited afresh instead of
    taken from the store, which for a large model costs far more than a few retries."""
    api = HfApi(endpoint=endpoint, token=token)
    out: dict[tuple[str, str | None], HubSide | None] = {}
    where_of: dict[tuple[str, str | None], tuple[str, str | None]] = {}
    for spec, revision in specs:
        if (spec, revision) in out or (spec, revision) in where_of:
            continue
        try:
            info = parse_source_spec(spec, revision=revision, allow_local=True)
        except LorafidError:
            out[(spec, revision)] = None
            continue
        if info.kind != "hub" or info.repo_id is None:
            out[(spec, revision)] = None
            continue
        where_of[(spec, revision)] = (info.repo_id, info.requested_revision)
    distinct = list(dict.fromkeys(where_of.values()))
    policy = retry or RetryPolicy()
    with ThreadPoolExecutor(max_workers=RESOLVERS, thread_name_prefix="lorafid-resolve") as pool:
        answers = dict(zip(distinct, pool.map(lambda w: _commit(api, w[0], w[1], policy), distinct), strict=True))
    for key, where in where_of.items():
        out[key] = answers[where]
    return out


def _commit(api: HfApi, repo_id: str, revision: str | None, retry: RetryPolicy) -> HubSide | None:
    try:
        sha = model_info(api, repo_id, revision, retry).sha
    except Exception:  # missing, gated, offline after the retries: the task reports it in one line
        return None
    return HubSide(repo_id, sha) if sha else None


def selection(include_embeddings: bool, include: str | None, exclude: str | None) -> str:
    """The tensor selection as one string: it changes which matrices a result holds."""
    return json.dumps([include_embeddings, include, exclude])


class ReuseIndex:
    """(endpoint, base@sha, fine-tune@sha, selection) -> the store key of the complete audit;
    and for each base@sha, fine-tune@sha, the endpoint a batch last audited them from.

    The second answers what the store's own key cannot: an audit's key pins both commits and
    the files' layout, not the Hub, so two Hubs that serve other bytes under the same commit
    SHA (a mirror gone wrong, a test server) would share a key and its stored matrices.
    """

    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(home / INDEX_FILE, timeout=30)
        with self._db:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def find(self, endpoint: str, base: HubSide, finetune: HubSide, chosen: str) -> str | None:
        row = self._db.execute(
            "SELECT audit_key FROM pairs WHERE endpoint = ? AND base = ? AND base_sha = ? AND finetune = ? "
            "AND finetune_sha = ? AND selection = ?",
            (endpoint, base.repo_id, base.sha, finetune.repo_id, finetune.sha, chosen),
        ).fetchone()
        return str(row[0]) if row else None

    def record(self, endpoint: str, base: HubSide, finetune: HubSide, chosen: str, key: str) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO pairs VALUES (?, ?, ?, ?, ?, ?, ?)",
                (endpoint, base.repo_id, base.sha, finetune.repo_id, finetune.sha, chosen, key),
            )

    def origin(self, base: HubSide, finetune: HubSide) -> str | None:
        """The endpoint a batch last audited these two commits from; None: never (or not by a batch)."""
        row = self._db.execute(
            "SELECT endpoint FROM origins WHERE base = ? AND base_sha = ? AND finetune = ? AND finetune_sha = ?",
            (base.repo_id, base.sha, finetune.repo_id, finetune.sha),
        ).fetchone()
        return str(row[0]) if row else None

    def set_origin(self, base: HubSide, finetune: HubSide, endpoint: str) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO origins VALUES (?, ?, ?, ?, ?)",
                (base.repo_id, base.sha, finetune.repo_id, finetune.sha, endpoint),
            )
