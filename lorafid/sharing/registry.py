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

Not here: who may see what (``dashboard``), computing anything (``audit``). The server's
write token is only ever the one given to ``Registry``; a visitor's token never reaches it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, overload
from urllib.parse import quote, urlencode

import httpx2
import numpy as np
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from lorafid import __version__
from lorafid.audit import spectrum as sp
from lorafid.audit.matrices import RANK_GRID, MatrixResult
from lorafid.audit.report import SCHEMA, Report
from lorafid.audit.store import default_home
from lorafid.errors import RegistryError, ResultSchemaError, VerificationError
from lorafid.names import is_commit_sha, is_repo_id, looks_like_short_sha

logger = logging.getLogger(__name__)

REGISTRY_SCHEMA = "lorafid.registry/1"
"""Schema of one index row (``RegistryEntry``)."""
TABLE_RANKS: tuple[int, ...] = (64, 128, 256, 512)
"""Ranks whose kept energy each index row carries: those LoRA-serving providers typically use."""
PRECISION = 1e-5
"""The precision bar: energy retained and cosine distance agree within this (absolute)."""
_NETWORK_ERRORS = (HfHubHTTPError, httpx2.HTTPError, OSError, ValueError)
DOWN_FOR_S = 60.0
"""After a connection failure, reads fail at once for this long: huggingface_hub retries a
connection for ~24 s, which no page load should wait for twice."""


# -- what is published --------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryEntry:
    """One published result, as a row of the index: enough for the gallery and the table.

    ``energy_at`` holds the energy-weighted share of Δ kept at ``TABLE_RANKS`` (exact: from
    the spectra when published); ``rank_for_90`` the smallest rank keeping 90% overall.
    """

    path: str  # the report's path in the dataset; the spectra sit beside it
    base: str  # repo IDs
    finetune: str
    base_sha: str
    finetune_sha: str
    base_revision: str | None  # as asked for when audited
    finetune_revision: str | None
    settings_hash: str
    tool_version: str
    report_schema: str
    numerics: dict[str, str | bool]
    created: str
    matrices: int
    energy_at: dict[str, float]
    rank_for_90: int | None
    sentence: str
    schema: str = REGISTRY_SCHEMA

    @property
    def name(self) -> str:
        """The content name: what ``lorafid open`` and ``--verify`` take as REF."""
        return self.path.rsplit("/", 1)[-1].removesuffix(".json")

    @property
    def spectra_path(self) -> str:
        return self.path.removesuffix(".json") + ".spectra.safetensors"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RegistryEntry:
        if data.get("schema") != REGISTRY_SCHEMA:
            raise ResultSchemaError(
                f"An index row has schema {data.get('schema')!r}; this lorafid {__version__} reads "
                f"{REGISTRY_SCHEMA}. Upgrade lorafid to read it."
            )
        try:
            entry = cls(**{k: data[k] for k in cls.__dataclass_fields__})
            texts = (entry.path, entry.base, entry.finetune, entry.base_sha, entry.finetune_sha, entry.created)
            well_formed = (
                all(isinstance(t, str) for t in texts)
                and entry.path.startswith("results/")
                and entry.path.endswith(".json")
                and ".." not in entry.path
                and all(isinstance(v, float | int) for v in entry.energy_at.values())
                and (entry.rank_for_90 is None or isinstance(entry.rank_for_90, int))
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ResultSchemaError(f"An index row of {REGISTRY_SCHEMA} is malformed ({e}).") from e
        if not well_formed:
            raise ResultSchemaError(f"An index row of {REGISTRY_SCHEMA} is malformed (a field of the wrong type).")
        return entry


def settings_hash(report: Report) -> str:
    """12 hex digits of what, besides the two commits, fixes the numbers (the rank does not)."""
    s = report.settings
    payload = {
        "include_embeddings": s.include_embeddings,
        "include": s.include,
        "exclude": s.exclude,
        "numerics": s.numerics,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def result_path(report: Report) -> str:
    """Where a result lives in the registry (see the module docstring)."""
    base, finetune = report.base, report.finetune
    if not (base.repo_id and finetune.repo_id and base.resolved_sha and finetune.resolved_sha):
        raise RegistryError("Only audits of two Hub repos, pinned to commits, can be published.")
    name = f"{base.resolved_sha}-{finetune.resolved_sha}-{settings_hash(report)}-lorafid{report.tool_version}"
    return f"results/{base.repo_id}/{finetune.repo_id}/{name}.json"


def entry_for(report: Report) -> RegistryEntry:
    """The index row of a complete report (with its spectra, for exact figures)."""
    summary = report.summary()
    total = sum(m.energy for m in report.matrices)
    energy_at = {
        str(r): (sum(m.energy * m.energy_retained(r) for m in report.matrices) / total if total else 1.0)
        for r in TABLE_RANKS
    }
    return RegistryEntry(
        path=result_path(report),
        base=str(report.base.repo_id),
        finetune=str(report.finetune.repo_id),
        base_sha=str(report.base.resolved_sha),
        finetune_sha=str(report.finetune.resolved_sha),
        base_revision=report.base.requested_revision,
        finetune_revision=report.finetune.requested_revision,
        settings_hash=settings_hash(report),
        tool_version=report.tool_version,
        report_schema=SCHEMA,
        numerics=dict(report.settings.numerics),
        created=report.created,
        matrices=len(report.matrices),
        energy_at=energy_at,
        rank_for_90=summary.rank_for_90,
        sentence=summary.sentence(),
    )


def publish_refusal(
    report: Report, *, visibility: tuple[bool, bool] | None = None, endpoint: str | None = None
) -> str | None:
    """Why this audit may not be published, or None when it may.

    Only complete audits of two Hub repos that were public when audited are published.
    ``visibility``: (base public, fine-tune public) as the app recorded it while auditing;
    without it (the CLI), each repo is checked now with a metadata call that sends no token.

    Example: a fine-tune that is gated -> "org/tuned is gated: only audits of two public
    repos are published."
    """
    if report.status != "complete" or report.pending:
        return "only complete audits are published."
    if not report.matrices:
        return "this audit has no result to publish."
    if report.base.kind != "hub" or report.finetune.kind != "hub":
        return "audits of local files are never published."
    if not (report.base.resolved_sha and report.finetune.resolved_sha):
        return "the audit is not pinned to commits."
    if visibility is not None:
        for record, public in zip((report.base, report.finetune), visibility, strict=True):
            if not public:
                return f"{record.repo_id} was not public when audited: only audits of two public repos are published."
        return None
    repos = [(str(r.repo_id), str(r.resolved_sha)) for r in (report.base, report.finetune)]
    return _not_public(repos, endpoint, "audits")


# -- reading and writing the dataset --------------------------------------------------------------


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
                f"{_cut(repo_id)!r} is not a dataset repo ID; use org/name, e.g. my-org/lorafid-results."
            )
        self.repo_id = repo_id
        endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None  # read now, as source.py does
        self.api = HfApi(endpoint=endpoint, token=token, library_name="lorafid", library_version=__version__)
        self.cache_dir = Path(cache_dir) if cache_dir else _default_cache() / repo_id.replace("/", "--")
        self.listing_ttl_s = listing_ttl_s
        self.unreadable_rows = 0  # index rows of a schema this lorafid does not know (skipped, counted)
        self._created = False
        self._lock = threading.Lock()
        self._listing: tuple[float, list[RegistryEntry]] | None = None
        self._probes: tuple[float, list[dict[str, Any]]] | None = None
        self._down: tuple[float, str] | None = None  # (until, why) after a connection failure

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
        except _NETWORK_ERRORS as e:
            self._note_failure(e)
            raise RegistryError(f"Could not write to the registry {self.repo_id} ({_reason(e)}).") from e
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
        except _NETWORK_ERRORS as e:
            self._note_failure(e)
            raise RegistryError(f"Could not read the registry {self.repo_id} ({_reason(e)}).") from e
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
        except _NETWORK_ERRORS as e:
            self._note_failure(e)
            raise RegistryError(f"Could not read the registry {self.repo_id} ({_reason(e)}).") from e
        out = []
        for path in paths:
            try:
                data = json.loads(self._read(path))
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and _probe_well_formed(data):
                out.append(data)
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
            if all(_revision_matches(w, sha, asked) for w, sha, asked in pairs):
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
                f"No result {_cut(ref)!r} in the registry {self.repo_id}; "
                f"`lorafid open {self.repo_id}` lists what it holds."
            )
        raise RegistryError(f"{_cut(ref)!r} names {len(matches)} results in {self.repo_id}; give more of the name.")

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
                self._down = (time.monotonic() + DOWN_FOR_S, _reason(error))

    @overload
    def _read(self, path: str) -> bytes: ...
    @overload
    def _read(self, path: str, *, missing_ok: bool) -> bytes | None: ...

    def _read(self, path: str, *, missing_ok: bool = False) -> bytes | None:
        """A file of the dataset, from the local cache or one download (None: missing, if allowed)."""
        local = self.cache_dir / path
        if not local.is_file():
            self._check_up()
            try:
                self.api.hf_hub_download(self.repo_id, path, repo_type="dataset", local_dir=self.cache_dir)
            except RemoteEntryNotFoundError as e:
                if missing_ok:
                    return None
                raise RegistryError(f"{path} is missing from the registry {self.repo_id}.") from e
            except _NETWORK_ERRORS as e:
                self._note_failure(e)
                raise RegistryError(
                    f"Could not download {path} from the registry {self.repo_id} ({_reason(e)})."
                ) from e
        return local.read_bytes()


def read_published(data: Mapping[str, Any], where: str) -> Report:
    """A report from published JSON: the current schema is read; any other is refused, saying why.

    Example: {"schema": "lorafid.report/2", "tool_version": "0.3.0", ...} -> ResultSchemaError
    "… was written by lorafid 0.3.0 as lorafid.report/2; this lorafid … reads lorafid.report/1:
    upgrade lorafid to open it."
    """
    schema = data.get("schema")
    if schema == SCHEMA:
        try:
            return Report.from_dict(dict(data))
        except (KeyError, TypeError, ValueError) as e:
            raise ResultSchemaError(f"{where} claims {SCHEMA} but does not follow it ({e}); it was not opened.") from e
    tool = data.get("tool_version", "an unknown version")
    if isinstance(schema, str) and schema.startswith("lorafid.report/"):
        version = schema.rpartition("/")[2]
        newer = version.isdigit() and int(version) > int(SCHEMA.rpartition("/")[2])
        advice = "upgrade lorafid to open it" if newer else f"open it with lorafid {tool}, or re-run the audit"
        raise ResultSchemaError(
            f"{where} was written by lorafid {tool} as {schema}; this lorafid {__version__} reads {SCHEMA}: {advice}."
        )
    raise ResultSchemaError(f"{where} is not a lorafid result (schema {_cut(str(schema))!r}).")


def attach_spectra(report: Report, spectra: Mapping[str, np.ndarray], where: str) -> Report:
    """Attach downloaded spectra after checking they fit: one per matrix, k values each."""
    for m in report.matrices:
        got = spectra.get(m.name)
        if got is None or got.shape != (min(m.shape),) or not np.all(np.isfinite(got)):
            raise RegistryError(f"The spectra of {where} do not match its report ({m.name}); it was not opened.")
    return report.with_spectra({m.name: np.asarray(spectra[m.name], dtype=np.float64) for m in report.matrices})


def result_files(report: Report) -> dict[str, bytes]:
    """The two files of a published result: the report JSON and its spectra."""
    path = result_path(report)
    spectra = {m.name: np.ascontiguousarray(m.sigma_sq, dtype="<f8") for m in report.matrices if m.sigma_sq is not None}
    if len(spectra) != len(report.matrices):
        raise RegistryError("A result is published with its full spectra; this report was loaded without them.")
    return {
        path: (report.to_json() + "\n").encode(),
        path.removesuffix(".json") + ".spectra.safetensors": save_safetensors(
            spectra, metadata={"schema": SCHEMA, "content": "sigma_sq per matrix"}
        ),
    }


def publish(registry: Registry, report: Report) -> RegistryEntry:
    """Publish one result now, in its own commit (the CLI's ``--publish``)."""
    entry = entry_for(report)
    registry.commit(result_files(report), [entry], f"lorafid: {entry.finetune} vs {entry.base}")
    return entry


# -- provider checks ------------------------------------------------------------------------------

PROBE_SCHEMA = "lorafid.registry.probe/1"
"""Schema of a published provider check: the summary of a ``lorafid.probe/1`` document.

It carries the endpoint's host only (never a key, a URL path or a query), the model name at
the endpoint, both repos at their commits, the verdict and each candidate's distance::

    probes/<base repo>/<fine-tune repo>/<base SHA>-<fine-tune SHA>-<content hash>.json
"""
_HOST_RE = re.compile(r"^[A-Za-z0-9.:-]{1,253}$")


def probe_summary(document: Mapping[str, Any]) -> dict[str, Any]:
    """What is published of a provider check (``PROBE_SCHEMA``): chosen fields, nothing else.

    Raises ``RegistryError`` when the document lacks what a published check needs.
    """
    base, finetune = document.get("base") or {}, document.get("finetune") or {}
    verdict = document.get("verdict") or {}
    candidates = document.get("candidates") or {}
    try:
        summary: dict[str, Any] = {
            "schema": PROBE_SCHEMA,
            "probe_schema": str(document["schema"]),
            "tool_version": str(document["tool_version"]),
            "endpoint_host": str(document["endpoint_host"]),
            "model": str(document["model"])[:200],
            "method": str(document.get("method") or ""),
            "base": str(base.get("repo_id") or ""),
            "finetune": str(finetune.get("repo_id") or ""),
            "base_sha": str(base.get("sha") or ""),
            "finetune_sha": str(finetune.get("sha") or ""),
            "verdict": {
                "sentence": str(verdict["sentence"]),
                "closest": str(verdict["closest"]),
                "matches": bool(verdict["matches"]),
                "consistent": [str(c) for c in verdict.get("consistent") or ()],
            },
            # A log-probability check's KL distance, or a text check's log-likelihood gap to the
            # closest candidate (which of the two: "method"); lower is closer either way.
            "distances": {
                str(name): {
                    "distance": float(c["distance"] if "distance" in c else c["gap"]),
                    "interval": [float(x) for x in c["interval"]],
                }
                for name, c in candidates.items()
            },
            "prompts": int((document.get("prompt_set") or {}).get("count") or 0),
        }
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RegistryError(f"This provider check cannot be published: it lacks {e}.") from e
    if not _probe_well_formed(summary | {"created": ""}):
        raise RegistryError("This provider check cannot be published: it is not of two Hub repos pinned to commits.")
    return summary


def probe_path(summary: Mapping[str, Any]) -> str:
    """Where a provider check lives in the registry: named by both commits and its content."""
    content = {k: v for k, v in summary.items() if k != "created"}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{summary['base_sha']}-{summary['finetune_sha']}-{digest}"
    return f"probes/{summary['base']}/{summary['finetune']}/{name}.json"


def probe_refusal(document: Mapping[str, Any], *, endpoint: str | None = None) -> str | None:
    """Why this provider check may not be published, or None: only complete checks with a
    verdict, of two Hub repos that are public now (checked with calls that send no token)."""
    if document.get("status") != "complete" or not document.get("verdict"):
        return "only complete provider checks with a verdict are published."
    try:
        summary = probe_summary(document)
    except RegistryError as e:
        return str(e).removeprefix("This provider check cannot be published: ")
    return _not_public(
        [(summary["base"], summary["base_sha"]), (summary["finetune"], summary["finetune_sha"])], endpoint, "checks"
    )


def _not_public(repos: list[tuple[str, str]], endpoint: str | None, what: str) -> str | None:
    """Why these (repo, commit) pairs are not all public now, or None; ``what`` names what is
    published ("audits", "checks"). Asked with calls that send no token."""
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=False)
    for repo_id, sha in repos:
        try:
            info = api.model_info(repo_id, revision=sha, token=False)
        except (RepositoryNotFoundError, GatedRepoError):
            return f"{repo_id} is not public: only {what} of two public repos are published."
        except _NETWORK_ERRORS as e:
            return f"could not confirm that {repo_id} is public ({_reason(e)})."
        if info.private or info.gated:
            kind = "private" if info.private else "gated"
            return f"{repo_id} is {kind}: only {what} of two public repos are published."
    return None


def _probe_well_formed(data: Mapping[str, Any]) -> bool:
    verdict = data.get("verdict")
    return (
        data.get("schema") == PROBE_SCHEMA
        and isinstance(data.get("endpoint_host"), str)
        and bool(_HOST_RE.match(data["endpoint_host"]))
        and isinstance(data.get("model"), str)
        and isinstance(data.get("created"), str)
        and all(isinstance(data.get(k), str) and is_repo_id(data[k]) for k in ("base", "finetune"))
        and all(isinstance(data.get(k), str) and is_commit_sha(data[k]) for k in ("base_sha", "finetune_sha"))
        and isinstance(verdict, dict)
        and isinstance(verdict.get("sentence"), str)
        and isinstance(verdict.get("matches"), bool)
    )


# -- batching writer ------------------------------------------------------------------------------


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
            _write_atomic(folder / path.rsplit("/", 1)[-1], content)
        _write_atomic(folder / "entry.json", entry.to_json().encode())
        self._wake.set()
        return entry

    def submit_probe(self, document: Mapping[str, Any]) -> str:
        """Put a provider check in the outbox (its ``PROBE_SCHEMA`` summary); returns its path.
        The caller checks ``probe_refusal`` first. Raises ``RegistryError`` when it lacks a verdict."""
        summary = probe_summary(document) | {"created": datetime.now(UTC).isoformat(timespec="seconds")}
        path = probe_path(summary)
        folder = self.outbox / ("probe-" + path.rsplit("/", 1)[-1].removesuffix(".json"))
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / "probe.json", (json.dumps(summary, sort_keys=True, indent=1) + "\n").encode())
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


# -- server settings ------------------------------------------------------------------------------


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
            raise RegistryError(f"LORAFID_REGISTRY={_cut(repo_id)!r} is not a dataset repo ID; use org/name.")
        text = env.get("LORAFID_REGISTRY_INTERVAL_S", "").strip() or "60"
        try:
            interval = float(text)
        except ValueError:
            interval = 0.0
        if not interval > 0:
            raise RegistryError(f"LORAFID_REGISTRY_INTERVAL_S={_cut(text)!r} is not a positive number of seconds.")
        return cls(repo_id, env.get("LORAFID_REGISTRY_TOKEN") or None, interval)


# -- integrity ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """A re-run against a published result: the largest differences and where they are."""

    matrices: int
    ranks_compared: int
    max_energy_diff: float
    max_cosine_diff: float
    worst: str  # "matrix @ rank r"
    problems: tuple[str, ...]  # disagreements beyond the bar, or in what was audited

    @property
    def agrees(self) -> bool:
        return not self.problems


def compare(published: Report, recomputed: Report, tolerance: float = PRECISION) -> Comparison:
    """Check a re-run against a published result at every rank (every grid rank without spectra).

    Also checks that both read the same commits and audited the same matrices.
    Example: identical reports -> Comparison(agrees=True, max_energy_diff=0.0, ...).
    """
    problems: list[str] = []
    sides = (("base", published.base, recomputed.base), ("fine-tune", published.finetune, recomputed.finetune))
    for side, was, now in sides:
        if was.resolved_sha != now.resolved_sha:
            problems.append(f"the {side} was read at commit {now.resolved_sha}, the result is of {was.resolved_sha}")
    if settings_hash(published) != settings_hash(recomputed):
        problems.append("the settings differ (include/exclude/embeddings or numerics)")
    ours = {m.name: m for m in recomputed.matrices}
    names = [m.name for m in published.matrices]
    missing = [n for n in names if n not in ours]
    extra = sorted(set(ours) - set(names))
    if missing or extra:
        problems.append(f"matrices differ: {len(missing)} missing from the re-run, {len(extra)} not in the result")
    worst, max_energy, max_cosine, compared = "", 0.0, 0.0, 0
    for m in published.matrices:
        if m.name not in ours:
            continue
        ranks, a, b = _curves(m, ours[m.name])
        compared += len(ranks)
        energy_diff = np.abs(a - b)
        cosine_diff = np.abs(np.sqrt(np.clip(a, 0, 1)) - np.sqrt(np.clip(b, 0, 1)))
        i = int(np.argmax(np.maximum(energy_diff, cosine_diff)))
        if max(energy_diff[i], cosine_diff[i]) >= max(max_energy, max_cosine):
            worst = f"{m.name} @ rank {ranks[i]}"
        max_energy, max_cosine = max(max_energy, float(energy_diff.max())), max(max_cosine, float(cosine_diff.max()))
        if energy_diff.max() > tolerance or cosine_diff.max() > tolerance:
            problems.append(f"{m.name} at rank {ranks[i]}: energy retained {a[i]:.7f} published, {b[i]:.7f} recomputed")
    return Comparison(len(names), compared, max_energy, max_cosine, worst, tuple(problems))


def verify(published: Report, recomputed: Report, where: str, tolerance: float = PRECISION) -> Comparison:
    """``compare``, raising ``VerificationError`` (listing up to 5 problems) when they disagree."""
    result = compare(published, recomputed, tolerance)
    if not result.agrees:
        listed = "; ".join(result.problems[:5]) + (
            f"; and {len(result.problems) - 5} more" if len(result.problems) > 5 else ""
        )
        raise VerificationError(f"The re-run does not reproduce {where} within {tolerance:g}: {listed}.")
    return result


def _curves(a: MatrixResult, b: MatrixResult) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Energy retained by both at the ranks both can answer exactly: 1..k with spectra, else the grid."""
    k = min(a.full_rank, b.full_rank)
    if a.sigma_sq is not None and b.sigma_sq is not None and a.shape == b.shape:
        ranks = list(range(1, k + 1))
        return ranks, _full_curve(a), _full_curve(b)
    ranks = [r for r in RANK_GRID if r < k] + [k]
    return ranks, np.array([a.energy_retained(r) for r in ranks]), np.array([b.energy_retained(r) for r in ranks])


def _full_curve(m: MatrixResult) -> np.ndarray:
    curve = sp.cumulative_energy(m.spectrum()).astype(np.float64)
    curve[-1] = 1.0  # rank k keeps all of Δ by definition (energy_retained says so too)
    return curve


# -- small helpers --------------------------------------------------------------------------------


def _revision_matches(wanted: str | None, sha: str, asked: str | None) -> bool:
    if not wanted:
        return True
    if looks_like_short_sha(wanted):
        return sha.startswith(wanted)
    return wanted == asked


def _write_atomic(path: Path, content: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def _default_cache() -> Path:
    return default_home() / "registry"


def _reason(error: Exception) -> str:
    """A short reason from a Hub or network error: its first line, cut."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _cut(text, 200)


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
        link = urlencode(
            {"base": e.base, "finetune": e.finetune, "base_revision": e.base_sha, "finetune_revision": e.finetune_sha}
        )
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
        f"{host} · {_cut(model, 80)}: {_cut(p['verdict']['sentence'], 240)}"
        for (host, model), p in sorted(latest.items())
    )
