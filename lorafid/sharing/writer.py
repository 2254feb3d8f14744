"""The batching writer and the server's registry settings: a finished audit or provider check
is written to an outbox folder under the store's home at once, and a background thread
commits the whole outbox in one ``HfApi.create_commit`` at most once per ``interval_s``. A
failed commit keeps the outbox for the next try and leaves its reason in ``last_error``:
nothing is lost, the local store still has it all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lorafid.audit.report import Report
from lorafid.errors import RegistryError, ResultSchemaError
from lorafid.names import is_repo_id
from lorafid.sharing.hub_dataset import Registry
from lorafid.sharing.hub_errors import cut
from lorafid.sharing.probes import probe_path, probe_summary
from lorafid.sharing.records import RegistryEntry, entry_for, result_files

logger = logging.getLogger(__name__)


@dataclass
class WriterState:
    """What the writer has done, for the dashboard's notes."""

    commits: int = 0
    published: int = 0
    last_error: str | None = None
    last_attempt: float = field(default=float("-inf"))


class RegistryWriter:
    """Queue results in an outbox folder; commit them all together at most once per ``interval_s``.

    ``submit`` only writes files locally (fast, never fails on the network). The thread
    (``start()``) commits whatever is queued; ``flush()`` does one commit now. A result
    whose name the registry already lists is dropped from the outbox, not committed twice.
    """

    def __init__(self, registry: Registry, outbox: Path, interval_s: float = 60.0) -> None:
        self.registry = registry
        self.outbox = Path(outbox)
        self.outbox.mkdir(parents=True, exist_ok=True)
        self.interval_s = interval_s
        self.state = WriterState()
        self._lock = threading.Lock()  # one flush at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, report: Report) -> RegistryEntry:
        """Put a result in the outbox (atomically: the row is written last, as the marker)."""
        entry = entry_for(report)
        folder = self.outbox / entry.name
        folder.mkdir(parents=True, exist_ok=True)
        for path, content in result_files(report).items():
            write_atomic(folder / path.rsplit("/", 1)[-1], content)
        write_atomic(folder / "entry.json", entry.to_json().encode())
        self._wake.set()
        return entry

    def submit_probe(self, document: Mapping[str, Any]) -> str:
        """Put a provider check in the outbox (its ``PROBE_SCHEMA`` summary); returns its path.
        The caller checks ``probe_refusal`` first. Raises ``RegistryError`` when it lacks a verdict."""
        summary = probe_summary(document) | {"created": datetime.now(UTC).isoformat(timespec="seconds")}
        path = probe_path(summary)
        folder = self.outbox / ("probe-" + path.rsplit("/", 1)[-1].removesuffix(".json"))
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "probe.json", (json.dumps(summary, sort_keys=True, indent=1) + "\n").encode())
        self._wake.set()
        return path

    def pending_probes(self) -> list[tuple[Path, str, bytes]]:
        """Provider checks waiting in the outbox: (folder, path in the registry, content)."""
        out = []
        for file in sorted(self.outbox.glob("probe-*/probe.json"), key=lambda p: p.stat().st_mtime):
            try:
                content = file.read_bytes()
                out.append((file.parent, probe_path(json.loads(content)), content))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return out

    def pending(self) -> list[RegistryEntry]:
        """Results waiting in the outbox, oldest first."""
        out = []
        for row in sorted(self.outbox.glob("*/entry.json"), key=lambda p: p.stat().st_mtime):
            try:
                out.append(RegistryEntry.from_dict(json.loads(row.read_text(encoding="utf-8"))))
            except (OSError, ValueError, ResultSchemaError):
                continue
        return out

    def flush(self) -> int:
        """Commit everything queued, in one commit; returns how many results it published.

        Raises ``RegistryError`` (after recording it in ``state.last_error``) when the commit
        fails; the outbox is kept for the next try.
        """
        with self._lock:
            self.state.last_attempt = time.monotonic()
            queued = self.pending()
            probes = self.pending_probes()
            if not queued and not probes:
                return 0
            try:
                known = {e.name for e in self.registry.entries(refresh=True)}
            except RegistryError:
                known = set()  # the commit below will say what is wrong
            fresh = [e for e in queued if e.name not in known]
            files: dict[str, bytes] = {}
            for entry in fresh:
                folder = self.outbox / entry.name
                files[entry.path] = (folder / entry.path.rsplit("/", 1)[-1]).read_bytes()
                files[entry.spectra_path] = (folder / entry.spectra_path.rsplit("/", 1)[-1]).read_bytes()
            files.update({path: content for _, path, content in probes})
            message = f"lorafid: {len(fresh)} audit result(s)" + (
                f", {len(probes)} provider check(s)" if probes else ""
            )
            if fresh or probes:
                try:
                    self.registry.commit(files, fresh, message)
                except RegistryError as e:
                    self.state.last_error = str(e)
                    kept = len(fresh) + len(probes)
                    logger.warning("%s Kept %d result(s) in %s for the next try.", e, kept, self.outbox)
                    raise
                self.state.commits += 1
                self.state.published += len(fresh) + len(probes)
            self.state.last_error = None
            for entry in queued:
                shutil.rmtree(self.outbox / entry.name, ignore_errors=True)
            for folder, _, _ in probes:
                shutil.rmtree(folder, ignore_errors=True)
            return len(fresh) + len(probes)

    def start(self) -> RegistryWriter:
        """Commit in the background, at most once per ``interval_s``: a result queued after a
        quiet spell is committed at once; those queued soon after wait and go together."""
        if self._thread is None:
            if self.pending():
                self._wake.set()  # left by a previous run (a commit failed, or the server stopped)
            self._thread = threading.Thread(target=self._loop, name="lorafid-registry", daemon=True)
            self._thread.start()
        return self

    def close(self, *, flush: bool = True) -> None:
        """Stop the thread; by default try one last commit (what fails stays in the outbox).
        Only the first call does anything (the app also registers it to run at exit)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if flush:
            with contextlib.suppress(RegistryError):  # logged; kept in the outbox for the next start
                self.flush()

    def note(self) -> str:
        """One line on the state of publishing, for the dashboard."""
        waiting = len(self.pending()) + len(self.pending_probes())
        if self.state.last_error:
            return (
                f"The registry {self.registry.repo_id} could not be written: {self.state.last_error} "
                f"{waiting} result(s) are kept on this server and will be retried."
            )
        if waiting:
            return f"{waiting} result(s) will be published to {self.registry.repo_id} within {self.interval_s:.0f} s."
        return f"Published results go to {self.registry.repo_id}."

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            wait = self.state.last_attempt + self.interval_s - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            with contextlib.suppress(RegistryError):  # in state.last_error; the next round retries
                self.flush()


@dataclass(frozen=True)
class RegistrySettings:
    """The server's registry settings: ``LORAFID_REGISTRY`` (org/name), ``LORAFID_REGISTRY_TOKEN``
    (a write token, a server secret; unset: read only) and ``LORAFID_REGISTRY_INTERVAL_S``
    (seconds between commits, default 60)."""

    repo_id: str
    token: str | None = field(default=None, repr=False)
    interval_s: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RegistrySettings | None:
        """None when ``LORAFID_REGISTRY`` is unset. Example: {"LORAFID_REGISTRY": "org/results"}."""
        env = os.environ if env is None else env
        repo_id = env.get("LORAFID_REGISTRY", "").strip()
        if not repo_id:
            return None
        if not is_repo_id(repo_id):
            raise RegistryError(f"LORAFID_REGISTRY={cut(repo_id)!r} is not a dataset repo ID; use org/name.")
        text = env.get("LORAFID_REGISTRY_INTERVAL_S", "").strip() or "60"
        try:
            interval = float(text)
        except ValueError:
            interval = 0.0
        if not interval > 0:
            raise RegistryError(f"LORAFID_REGISTRY_INTERVAL_S={cut(text)!r} is not a positive number of seconds.")
        return cls(repo_id, env.get("LORAFID_REGISTRY_TOKEN") or None, interval)


def write_atomic(path: Path, content: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)
