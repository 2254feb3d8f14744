"""The result store: one SQLite file under ``LORAFID_HOME`` that keeps every audit.

Results are written per matrix as they are computed, so an interrupted audit (Ctrl-C,
SIGKILL, a stopped dashboard job) resumes with only the missing matrices, and a finished
one re-opens instantly from a permalink or the gallery.

An audit's key hashes what fixes its numbers: both models' resolved identities (Hub
commit SHAs; for local files, path, size and mtime) and the settings that change which
tensors are read. The rank is not part of it: every rank comes from the same spectra.

Spectra are stored as raw little-endian float64 bytes and read back with
``np.frombuffer``: nothing in the store is ever unpickled. Tokens are never stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs

from lorafid.report import SCHEMA, AuditSettings, MatrixResult, Report, SourceRecord, VectorResult

_SCHEMA_SQL = """
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
"""


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


class Store:
    """Thread-safe access to one store file. Cheap to create; one connection per instance."""

    def __init__(self, home: Path | str | None = None) -> None:
        self.home = Path(home) if home is not None else default_home()
        self.home.mkdir(parents=True, exist_ok=True)
        self.path = self.home / "store.sqlite3"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")  # readers (the app) never block the writer
        self._db.executescript(_SCHEMA_SQL)

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
            fields = json.loads(text)
            fields["shape"] = tuple(fields["shape"])
            fields["energy_grid"] = tuple(fields["energy_grid"])
            result = MatrixResult(**fields, sigma_sq=np.frombuffer(blob, dtype="<f8").copy())
            out[result.name] = result
        return out

    def vectors(self, key: str) -> dict[str, VectorResult]:
        with self._lock:
            rows = self._db.execute("SELECT result_json FROM vectors WHERE audit_key = ?", (key,)).fetchall()
        out = {}
        for (text,) in rows:
            fields = json.loads(text)
            out[fields["name"]] = VectorResult(**{**fields, "shape": tuple(fields["shape"])})
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
        return Report(
            base=report.base,
            finetune=report.finetune,
            settings=report.settings,
            matrices=tuple(done),
            vectors=tuple(self.vectors(key).values()),
            skipped=report.skipped,
            pending=pending,
            status=status,
            timings=report.timings,
            tool_version=report.tool_version,
            created=report.created,
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

    def list_audits(self, limit: int = 50) -> list[StoredAudit]:
        """The gallery: latest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, base_spec, finetune_spec, status, updated, report_json FROM audits "
                "ORDER BY updated DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            StoredAudit(key, base, finetune, status, updated, json.loads(frame).get("summary", {}).get("sentence", ""))
            for key, base, finetune, status, updated, frame in rows
        ]

    def forget(self, key: str) -> None:
        """Drop an audit and its results (``--fresh``)."""
        with self._lock, self._db:
            for table, column in (("audits", "key"), ("matrices", "audit_key"), ("vectors", "audit_key")):
                self._db.execute(f"DELETE FROM {table} WHERE {column} = ?", (key,))


def _revision_in_spec(
    base_spec: str, finetune_spec: str, wanted: tuple[str | None, str | None], requested: tuple[str | None, str | None]
) -> bool:
    """True when no separate revision is asked for and the stored ones came from "@rev" in the specs."""
    from_specs = tuple(spec.partition("@")[2] or None for spec in (base_spec, finetune_spec))
    return wanted == (None, None) and requested == from_specs
