"""The registry: published audits in a Hugging Face dataset repo, so results outlive the server.

A public server's local store is lost when its machine restarts (a Space's disk is wiped when
it sleeps). Results of audits whose two repos are public go to a dataset repo
(``LORAFID_REGISTRY=org/name``) as well, and any server, or the CLI, reads them back.

Layout of the dataset; every file is named by what fixed its numbers and never rewritten::

    results/<base repo>/<fine-tune repo>/<name>.json                 the report (lorafid.report/1),
                                                                      as ``lorafid audit --out`` writes it
    results/<base repo>/<fine-tune repo>/<name>.spectra.safetensors  its full spectra (σ² per matrix)
    index/<utc time>-<random>.jsonl                                   one row per result of one commit
                                                                      (lorafid.registry/1)
    probes/<base repo>/<fine-tune repo>/<base SHA>-<fine-tune SHA>-<hash>.json
                                                                      a provider check's verdict
                                                                      (lorafid.registry.probe/1: host,
                                                                      model, distances; no key, no path)

    <name> = <base commit SHA>-<fine-tune commit SHA>-<settings hash>-lorafid<version>

Example: ``results/org/base/org/tuned/3f2a…e1-9c4d…07-5b1e0c2a9d3f-lorafid0.1.0.json``.

Writing (``RegistryWriter``): a finished audit is written to an outbox folder under the
store's home at once, and a background thread commits the whole outbox in one
``HfApi.create_commit`` at most once per ``interval_s``: a busy server makes few commits.
A failed commit (registry unreachable, token read-only) keeps the outbox for the next try
and leaves its reason in ``last_error``: nothing is lost, the local store still has it all.
huggingface_hub's ``CommitScheduler`` was considered: it creates the repo in its
constructor (a server could not start while the Hub is down), uploads a folder by mtime
and keeps what it sent in memory only; a small writer is clearer.

Reading (``Registry``): ``entries()`` lists ``index/`` (one API call, cached for
``listing_ttl_s``) and reads each index file once (they never change); ``find`` answers
a permalink; ``open`` downloads one result (report and spectra) and refuses schemas it
does not know with a message that says which lorafid wrote them.

Integrity: ``compare`` re-checks a published result against a re-run, within the
precision bar (energy retained and cosine distance within 1e-5 at every rank).

Here: the ``Registry`` (reading and committing the dataset) and ``publish``. The records are
``lorafid.sharing.records`` and ``probes``, what may be published ``policy``, the batching writer
``writer``, re-checking a result ``verify``, the public tables ``table``. Not here: who may
see what (``lorafid.web.gallery``), computing anything (``lorafid.audit``). The server's
write token is only ever the one given to ``Registry``; a visitor's token never reaches it.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, overload

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import (
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)
from safetensors.numpy import load as load_safetensors

from lorafid import __version__
from lorafid.audit.report import Report
from lorafid.audit.store import default_home
from lorafid.errors import RegistryError, ResultSchemaError
from lorafid.names import is_repo_id, looks_like_short_sha
from lorafid.sharing.hub_errors import NETWORK_ERRORS, cut, reason
from lorafid.sharing.probes import probe_well_formed
from lorafid.sharing.records import RegistryEntry, attach_spectra, entry_for, read_published, result_files

DOWN_FOR_S = 60.0
"""After a connection failure, reads fail at once for this long: huggingface_hub retries a
connection for ~24 s, which no page load should wait for twice."""


class Registry:
    """One registry dataset on the Hub: commit results, list them, open one.

    ``token``: the server's (or, in the CLI, the user's) token; False reads anonymously.
    Downloads are cached under ``cache_dir``: result and index files never change.
    """

    def __init__(
        self,
        repo_id: str,
        *,
        token: str | bool | None = False,
        endpoint: str | None = None,
        cache_dir: Path | None = None,
        listing_ttl_s: float = 30.0,
    ) -> None:
        if not is_repo_id(repo_id):
            raise RegistryError(
                f"{cut(repo_id)!r} is not a dataset repo ID; use org/name, e.g. my-org/lorafid-results."
            )
        self.repo_id = repo_id
        endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None  # read now, as source.py does
        self.api = HfApi(endpoint=endpoint, token=token, library_name="lorafid", library_version=__version__)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache() / repo_id.replace("/", "--")
        self.listing_ttl_s = listing_ttl_s
        self.unreadable_rows = 0  # index rows of a schema this lorafid does not know (skipped, counted)
        self._created = False
        self._lock = threading.Lock()
        self._listing: tuple[float, list[RegistryEntry]] | None = None
        self._probes: tuple[float, list[dict[str, Any]]] | None = None
        self._down: tuple[float, str] | None = None  # (until, why) after a connection failure
        # One download per file at a time: two downloads of one path into ``cache_dir`` race, and a
        # reader could find the file gone between its download and its read.
        self._downloading: dict[str, threading.Lock] = {}

    @property
    def url(self) -> str:
        return f"{self.api.endpoint}/datasets/{self.repo_id}"

    # -- write --------------------------------------------------------------------------
    def commit(self, files: Mapping[str, bytes], rows: list[RegistryEntry], message: str) -> str:
        """One commit adding ``files`` and an index file with ``rows``; returns its SHA.

        Creates the dataset on first use (exists_ok). Raises ``RegistryError`` with the reason.
        """
        shard = f"index/{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}.jsonl"
        operations = [CommitOperationAdd(path, content) for path, content in files.items()]
        if rows or not files:  # provider checks alone need no index row: ``probes()`` lists their folder
            operations.append(CommitOperationAdd(shard, "".join(r.to_json() + "\n" for r in rows).encode()))
        try:
            if not self._created:
                # Public: anyone must be able to read and check what is published.
                self.api.create_repo(self.repo_id, repo_type="dataset", private=False, exist_ok=True)
                self._created = True
            info = self.api.create_commit(self.repo_id, operations, commit_message=message, repo_type="dataset")
        except NETWORK_ERRORS as e:
            self._note_failure(e)
            raise RegistryError(f"Could not write to the registry {self.repo_id} ({reason(e)}).") from e
        with self._lock:
            self._listing = self._probes = None
        return str(info.oid)

    # -- read ---------------------------------------------------------------------------
    def entries(self, *, refresh: bool = False) -> list[RegistryEntry]:
        """Every published result, latest first, one per name. Raises ``RegistryError``."""
        with self._lock:
            if not refresh and self._listing and time.monotonic() - self._listing[0] < self.listing_ttl_s:
                return list(self._listing[1])
        self._check_up()
        try:
            shards = sorted(
                (f.path for f in self.api.list_repo_tree(self.repo_id, "index", repo_type="dataset")),
                reverse=True,
            )
        except RemoteEntryNotFoundError:
            shards = []  # no index yet: nothing published
        except RepositoryNotFoundError as e:
            raise RegistryError(
                f"The registry {self.repo_id} was not found: nothing was published to it yet, its name is "
                "wrong, or it is private and this server has no token that reads it."
            ) from e
        except NETWORK_ERRORS as e:
            self._note_failure(e)
            raise RegistryError(f"Could not read the registry {self.repo_id} ({reason(e)}).") from e
        rows: dict[str, RegistryEntry] = {}
        unreadable = 0
        for shard in shards:
            for line in self._read(shard).decode("utf-8", "replace").splitlines():
                try:
                    entry = RegistryEntry.from_dict(json.loads(line))
                except (ResultSchemaError, json.JSONDecodeError, AttributeError):
                    unreadable += 1
                    continue
                rows.setdefault(entry.name, entry)  # shards are newest first
        out = sorted(rows.values(), key=lambda e: e.created, reverse=True)
        with self._lock:
            self._listing = (time.monotonic(), out)
            self.unreadable_rows = unreadable
        return list(out)

    def probes(self, *, refresh: bool = False) -> list[dict[str, Any]]:
        """Every published provider check (``PROBE_SCHEMA`` summaries), from ``probes/``.

        One listing call (cached like ``entries``); each file is read once (they never change).
        Files of another schema, or malformed, are skipped. Raises ``RegistryError``.
        """
        with self._lock:
            if not refresh and self._probes and time.monotonic() - self._probes[0] < self.listing_ttl_s:
                return list(self._probes[1])
        self._check_up()
        try:
            paths = sorted(
                f.path
                for f in self.api.list_repo_tree(self.repo_id, "probes", recursive=True, repo_type="dataset")
                if f.path.endswith(".json")
            )
        except (RemoteEntryNotFoundError, RepositoryNotFoundError):
            paths = []  # nothing published yet
        except NETWORK_ERRORS as e:
            self._note_failure(e)
            raise RegistryError(f"Could not read the registry {self.repo_id} ({reason(e)}).") from e
        out = []
        for path in paths:
            try:
                data = json.loads(self._read(path))
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and probe_well_formed(data):
                out.append(data | {"path": path})  # where the full check is, for the tables' links
        with self._lock:
            self._probes = (time.monotonic(), out)
        return list(out)

    def find(
        self, base: str, finetune: str, base_revision: str | None = None, finetune_revision: str | None = None
    ) -> RegistryEntry | None:
        """The latest result of this pair as a permalink names it (``org/name[@rev]`` specs).

        A revision that looks like a commit SHA (7-40 hex digits) matches the published SHA
        by prefix; a branch or tag matches the revision asked for when audited; none matches
        any result of the pair.
        """
        base_repo, _, base_at = base.partition("@")
        finetune_repo, _, finetune_at = finetune.partition("@")
        wanted = (base_revision or base_at or None, finetune_revision or finetune_at or None)
        for entry in self.entries():
            if (entry.base, entry.finetune) != (base_repo, finetune_repo):
                continue
            pairs = (
                (wanted[0], entry.base_sha, entry.base_revision),
                (wanted[1], entry.finetune_sha, entry.finetune_revision),
            )
            if all(revision_matches(w, sha, asked) for w, sha, asked in pairs):
                return entry
        return None

    def entry(self, ref: str) -> RegistryEntry:
        """A published result by content name, a unique prefix of it, or its path."""
        ref = ref.strip().removesuffix(".json")
        matches = [e for e in self.entries() if e.name.startswith(ref) or e.path.removesuffix(".json") == ref]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise RegistryError(
                f"No result {cut(ref)!r} in the registry {self.repo_id}; "
                f"`lorafid open {self.repo_id}` lists what it holds."
            )
        raise RegistryError(f"{cut(ref)!r} names {len(matches)} results in {self.repo_id}; give more of the name.")

    def open(self, ref: str | RegistryEntry) -> Report:
        """A published result with its full spectra: one small download each, cached."""
        entry = ref if isinstance(ref, RegistryEntry) else self.entry(ref)
        where = f"{self.repo_id}/{entry.path}"
        text = self._read(entry.path, missing_ok=True)
        if text is None:
            raise RegistryError(f"{where} is listed in the index but missing from the dataset.")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RegistryError(f"{where} is not valid JSON ({e}).") from e
        report = read_published(data, where)
        if (report.base.resolved_sha, report.finetune.resolved_sha) != (entry.base_sha, entry.finetune_sha):
            raise RegistryError(f"{where} does not hold the commits its index row names; it was not opened.")
        blob = self._read(entry.spectra_path, missing_ok=True)
        if blob is None:
            return report  # grid ranks only; with_rank says so for others
        try:
            spectra = load_safetensors(blob)
        except Exception as e:  # safetensors raises its own types for corrupt files
            raise RegistryError(f"Cannot read the spectra of {where}: {e}.") from e
        return attach_spectra(report, spectra, where)

    def _check_up(self) -> None:
        with self._lock:
            down = self._down
        if down and time.monotonic() < down[0]:
            raise RegistryError(f"The registry {self.repo_id} is unreachable ({down[1]}); trying again shortly.")

    def _note_failure(self, error: Exception) -> None:
        """Connection failures (not refusals such as 403) make reads fail fast for ``DOWN_FOR_S``."""
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, httpx2.TransportError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            with self._lock:
                self._down = (time.monotonic() + DOWN_FOR_S, reason(error))

    @overload
    def _read(self, path: str) -> bytes: ...
    @overload
    def _read(self, path: str, *, missing_ok: bool) -> bytes | None: ...

    def _read(self, path: str, *, missing_ok: bool = False) -> bytes | None:
        """A file of the dataset, from the local cache or one download (None: missing, if allowed)."""
        local = self.cache_dir / path
        if not local.is_file():
            with self._lock:
                downloading = self._downloading.setdefault(path, threading.Lock())
            with downloading:
                if not local.is_file():  # another reader may have fetched it meanwhile
                    self._check_up()
                    try:
                        self.api.hf_hub_download(self.repo_id, path, repo_type="dataset", local_dir=self.cache_dir)
                    except RemoteEntryNotFoundError as e:
                        if missing_ok:
                            return None
                        raise RegistryError(f"{path} is missing from the registry {self.repo_id}.") from e
                    except NETWORK_ERRORS as e:
                        self._note_failure(e)
                        raise RegistryError(
                            f"Could not download {path} from the registry {self.repo_id} ({reason(e)})."
                        ) from e
        return local.read_bytes()


def publish(registry: Registry, report: Report) -> RegistryEntry:
    """Publish one result now, in its own commit (the CLI's ``--publish``)."""
    entry = entry_for(report)
    registry.commit(result_files(report), [entry], f"lorafid: {entry.finetune} vs {entry.base}")
    return entry


def revision_matches(wanted: str | None, sha: str, asked: str | None) -> bool:
    if not wanted:
        return True
    if looks_like_short_sha(wanted):
        return sha.startswith(wanted)
    return wanted == asked


def default_cache() -> Path:
    return default_home() / "registry"
