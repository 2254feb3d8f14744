"""The result store: one SQLite file under ``LORAFID_HOME`` that keeps every audit.

Results are written per matrix as they are computed, so an interrupted audit (Ctrl-C,
SIGKILL, a stopped dashboard job) resumes with only the missing matrices, and a finished
one re-opens instantly from a permalink or the gallery.

An audit's key hashes what fixes its numbers: both models' resolved identities (Hub
commit SHAs; for local files, path, size and mtime) and the settings that change which
tensors are read. The rank is not part of it: every rank comes from the same spectra.

Spectra are stored as raw little-endian float64 bytes and read back with
``np.frombuffer``: nothing in the store is ever unpickled. Tokens are never stored.

Visibility: for each audit the app records whether each side was readable anonymously
(public) when it was audited (``set_visibility``). Only audits public on both sides are
listed for everyone (``list_audits(shared_only=True)``); an audit without that record (a
CLI run, an older store) counts as private.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs

from lorafid.audit.matrices import MatrixResult, VectorResult
from lorafid.audit.report import SCHEMA, AuditSettings, Report, SourceRecord
from lorafid.errors import LorafidError

_VERSION_1 = """
CREATE TABLE IF NOT EXISTS audits (
    key TEXT PRIMARY KEY,
    base_spec TEXT NOT NULL,
    finetune_spec TEXT NOT NULL,
    status TEXT NOT NULL,
    updated REAL NOT NULL,
    report_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS matrices (
    audit_key TEXT NOT NULL,
    name TEXT NOT NULL,
    result_json TEXT NOT NULL,
    sigma_sq BLOB NOT NULL,
    PRIMARY KEY (audit_key, name)
);
CREATE TABLE IF NOT EXISTS vectors (
    audit_key TEXT NOT NULL,
    name TEXT NOT NULL,
    result_json TEXT NOT NULL,
    PRIMARY KEY (audit_key, name)
);
CREATE TABLE IF NOT EXISTS documents (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    created REAL NOT NULL,
    body_json TEXT NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE TABLE IF NOT EXISTS visibility (
    audit_key TEXT PRIMARY KEY,
    base_public INTEGER NOT NULL,
    finetune_public INTEGER NOT NULL,
    checked REAL NOT NULL
);
"""

# Version 2: permalinks and the CLI look audits up by the pair as typed (``find``).
_VERSION_2 = "CREATE INDEX IF NOT EXISTS audits_by_pair ON audits (base_spec, finetune_spec);"

MIGRATIONS: tuple[str, ...] = (_VERSION_1, _VERSION_2)
"""``MIGRATIONS[i]`` brings a store from version i to i + 1 (``PRAGMA user_version``).

A store written before versions were recorded reads as version 0; its tables already exist
and version 1 only creates what is missing. Add a migration at the end, never edit one.
"""
STORE_VERSION = len(MIGRATIONS)


def default_home() -> Path:
    """``$LORAFID_HOME``, else the user's cache directory (e.g. ~/.cache/lorafid)."""
    return Path(os.environ.get("LORAFID_HOME") or platformdirs.user_cache_dir("lorafid"))


def audit_key(base: SourceRecord, finetune: SourceRecord, settings: AuditSettings, identity: dict[str, Any]) -> str:
    """A stable hash of what fixes an audit's numbers (``identity``: per-source file stamps)."""
    payload = {
        "schema": SCHEMA,
        "base": [base.kind, base.repo_id or base.path, base.resolved_sha],
        "finetune": [finetune.kind, finetune.repo_id or finetune.path, finetune.resolved_sha],
        "include_embeddings": settings.include_embeddings,
        "include": settings.include,
        "exclude": settings.exclude,
        "identity": identity,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class StoredAudit:
    """One row of the gallery."""

    key: str
    base_spec: str
    finetune_spec: str
    status: str
    updated: float
    sentence: str
    base_sha: str | None = None  # resolved commits, to tell apart audits of the same names
    finetune_sha: str | None = None


class Store:
    """Thread-safe access to one store file. Cheap to create; one connection per instance."""

    def __init__(self, home: Path | str | None = None) -> None:
        self.home = Path(home) if home is not None else default_home()
        self.home.mkdir(parents=True, exist_ok=True)
        self.path = self.home / "store.sqlite3"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")  # readers (the app) never block the writer
        try:
            self.version = self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> int:
        """Bring the file to ``STORE_VERSION``, one migration per transaction; refuse a newer file."""
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > STORE_VERSION:
            raise LorafidError(
                f"The store {self.path} was written by a newer lorafid (store version {version}; this one reads "
                f"up to {STORE_VERSION}). Upgrade lorafid, or set LORAFID_HOME to another folder."
            )
        for target in range(version + 1, STORE_VERSION + 1):
            # BEGIN IMMEDIATE: two processes opening one old store migrate it once, in turn.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if int(self._db.execute("PRAGMA user_version").fetchone()[0]) < target:
                    for statement in filter(str.strip, MIGRATIONS[target - 1].split(";")):
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {target}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return STORE_VERSION

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put_matrix(self, key: str, result: MatrixResult) -> None:
        if result.sigma_sq is None:
            raise ValueError("a stored matrix needs its full spectrum")
        row = {k: v for k, v in asdict(result).items() if k != "sigma_sq"}
        blob = np.ascontiguousarray(result.sigma_sq, dtype="<f8").tobytes()
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO matrices VALUES (?, ?, ?, ?)", (key, result.name, json.dumps(row), blob)
            )

    def put_vector(self, key: str, result: VectorResult) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)", (key, result.name, json.dumps(asdict(result)))
            )

    def matrices(self, key: str) -> dict[str, MatrixResult]:
        """Every stored matrix of an audit, with its spectrum, by name."""
        with self._lock:
            rows = self._db.execute("SELECT result_json, sigma_sq FROM matrices WHERE audit_key = ?", (key,)).fetchall()
        out = {}
        for text, blob in rows:
            result = MatrixResult.from_dict(json.loads(text), sigma_sq=np.frombuffer(blob, dtype="<f8").copy())
            out[result.name] = result
        return out

    def vectors(self, key: str) -> dict[str, VectorResult]:
        with self._lock:
            rows = self._db.execute("SELECT result_json FROM vectors WHERE audit_key = ?", (key,)).fetchall()
        out = {}
        for (text,) in rows:
            result = VectorResult.from_dict(json.loads(text))
            out[result.name] = result
        return out

    def save_report(self, key: str, report: Report) -> None:
        """Keep the report's frame (sources, settings, skipped, status); matrices live per row."""
        frame = report.to_dict()
        frame["matrices"], frame["vectors"] = [], []
        frame["order"] = [m.name for m in report.matrices] + list(report.pending)
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO audits VALUES (?, ?, ?, ?, ?, ?)",
                (key, report.base.spec, report.finetune.spec, report.status, time.time(), json.dumps(frame)),
            )

    def put_document(self, kind: str, document: dict[str, Any]) -> str:
        """Keep a finished JSON result of another check (e.g. kind "probe"); its key is the first
        16 hex digits of the SHA-256 of its canonical JSON, so the same result keeps one key.
        The caller stores nothing secret in it (no token, no API key)."""
        body = json.dumps(document, sort_keys=True, separators=(",", ":"))
        key = hashlib.sha256(body.encode()).hexdigest()[:16]
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?)", (kind, key, time.time(), body))
        return key

    def load_document(self, kind: str, key: str) -> dict[str, Any] | None:
        """A document kept by ``put_document``, or None."""
        with self._lock:
            row = self._db.execute("SELECT body_json FROM documents WHERE kind = ? AND key = ?", (kind, key)).fetchone()
        return dict(json.loads(row[0])) if row else None

    def load_report(self, key: str) -> Report | None:
        """The stored audit with full spectra, matrices in the order they were planned."""
        with self._lock:
            row = self._db.execute("SELECT report_json FROM audits WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        frame = json.loads(row[0])
        report = Report.from_dict(frame)
        matrices = self.matrices(key)
        order = {name: i for i, name in enumerate(frame.get("order", []))}
        done = sorted(matrices.values(), key=lambda m: (order.get(m.name, len(order)), m.layer or 0, m.name))
        pending = tuple(n for n in report.pending if n not in matrices)
        status = report.status if pending or report.status == "complete" else "complete"
        # replace(), not a new Report: every field of the stored frame survives (the adapter section too).
        return replace(
            report,
            matrices=tuple(done),
            vectors=tuple(self.vectors(key).values()),
            pending=pending,
            status=status,
        )

    def find(
        self,
        base_spec: str,
        finetune_spec: str,
        base_revision: str | None = None,
        finetune_revision: str | None = None,
    ) -> str | None:
        """Key of the latest audit of this pair as typed (for permalinks): complete first.

        Revisions given apart from the spec (``--base-revision``, the app's revision boxes)
        must match too: an audit of ``main`` never answers for ``v2``.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT key, report_json FROM audits WHERE base_spec = ? AND finetune_spec = ? "
                "ORDER BY status = 'complete' DESC, updated DESC",
                (base_spec, finetune_spec),
            ).fetchall()
        wanted = (base_revision or None, finetune_revision or None)
        for key, frame_text in rows:
            frame = json.loads(frame_text)
            requested = (frame["base"]["requested_revision"], frame["finetune"]["requested_revision"])
            if requested == wanted or _revision_in_spec(base_spec, finetune_spec, wanted, requested):
                return str(key)
        return None

    def list_audits(self, limit: int = 50, *, shared_only: bool = False) -> list[StoredAudit]:
        """The gallery: latest first; only audits with at least one result (a crash at 0 is no entry).

        ``shared_only``: only audits whose two sides were both public when audited.
        """
        shared = (
            "AND EXISTS (SELECT 1 FROM visibility v WHERE v.audit_key = a.key AND v.base_public AND v.finetune_public)"
        )
        with self._lock:
            rows = self._db.execute(
                "SELECT key, base_spec, finetune_spec, status, updated, report_json FROM audits a "
                "WHERE EXISTS (SELECT 1 FROM matrices m WHERE m.audit_key = a.key) "
                + (shared if shared_only else "")
                + " ORDER BY updated DESC LIMIT ?",
                (limit,),
            ).fetchall()
        out = []
        for key, base, finetune, status, updated, text in rows:
            frame = json.loads(text)
            sentence = frame.get("summary", {}).get("sentence", "")
            shas = (frame["base"].get("resolved_sha"), frame["finetune"].get("resolved_sha"))
            out.append(StoredAudit(key, base, finetune, status, updated, sentence, *shas))
        return out

    def find_pinned(self, base_repo: str, finetune_repo: str, base_sha: str, finetune_sha: str) -> str | None:
        """Key of the latest audit of these two Hub repos at exactly these commits (complete first)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key FROM audits WHERE json_extract(report_json, '$.base.repo_id') = ? "
                "AND json_extract(report_json, '$.finetune.repo_id') = ? "
                "AND json_extract(report_json, '$.base.resolved_sha') = ? "
                "AND json_extract(report_json, '$.finetune.resolved_sha') = ? "
                "ORDER BY status = 'complete' DESC, updated DESC LIMIT 1",
                (base_repo, finetune_repo, base_sha, finetune_sha),
            ).fetchall()
        return str(rows[0][0]) if rows else None

    def set_visibility(self, key: str, base_public: bool, finetune_public: bool) -> None:
        """Record whether each side was readable without a token when audited."""
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO visibility VALUES (?, ?, ?, ?)",
                (key, int(base_public), int(finetune_public), time.time()),
            )

    def visibility(self, key: str) -> tuple[bool, bool]:
        """(base public, fine-tune public) as recorded; (False, False) when never recorded."""
        with self._lock:
            row = self._db.execute(
                "SELECT base_public, finetune_public FROM visibility WHERE audit_key = ?", (key,)
            ).fetchone()
        return (bool(row[0]), bool(row[1])) if row else (False, False)

    def forget(self, key: str) -> None:
        """Drop an audit and its results (``--fresh``)."""
        with self._lock, self._db:
            tables = (
                ("audits", "key"),
                ("matrices", "audit_key"),
                ("vectors", "audit_key"),
                ("visibility", "audit_key"),
            )
            for table, column in tables:
                self._db.execute(f"DELETE FROM {table} WHERE {column} = ?", (key,))


def _revision_in_spec(
    base_spec: str, finetune_spec: str, wanted: tuple[str | None, str | None], requested: tuple[str | None, str | None]
) -> bool:
    """True when no separate revision is asked for and the stored ones came from "@rev" in the specs."""
    from_specs = tuple(spec.partition("@")[2] or None for spec in (base_spec, finetune_spec))
    return wanted == (None, None) and requested == from_specs
