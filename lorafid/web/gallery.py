"""Audits to show before anything runs, and who may open them.

``Catalog``: bundled examples (``assets/examples``: ``*.json`` reports with
``*.spectra.safetensors`` sidecars), the store's audits and the registry's published
results; opening one, and finding the audit a permalink names. Access rules: an audit of
two repos public when audited is shared; any other opens only for a visitor whose own
token reads both repos now (``visible``, ``can_read``: one metadata call and one file
lookup per side, no weights). The same rule holds for every stored document of another
check (a behaviour or provider check: ``record_document``, ``document_visible``). Answers
asked without a token are kept a minute (``Recent``). ``ReportCache`` keeps the last few
opened reports for all sessions. Free of Gradio.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafid.audit.report import Report, SourceRecord, load_spectra, spectra_path
from lorafid.audit.store import Store, StoredAudit
from lorafid.errors import GatedRepoError, LorafidError, RegistryError, RepoNotFoundError, ResultSchemaError
from lorafid.sharing.hub_dataset import Registry
from lorafid.web.config import EXAMPLES_DIR
from lorafid.web.recent import Recent
from lorafid.web.text import cut
from lorafid.weights.source import open_source

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GalleryEntry:
    """One openable audit: ``ref`` is ``example:<file>`` or ``store:<key>``."""

    ref: str
    label: str
    status: str
    sentence: str
    base: str = ""  # the two sides, for a gallery that names them in the form's order
    finetune: str = ""


class Catalog:
    """Bundled examples plus the store's audits, and how to open them.

    Who may see a stored audit: everyone when both its repos were public when audited;
    otherwise only a visitor whose own token reads both repos now (``visible``). Such
    audits are never in the shared gallery. ``share_all`` (a private deployment, started
    with ``--allow-local``) lists and opens every audit without checks.
    """

    def __init__(
        self,
        store: Store,
        examples_dir: Path = EXAMPLES_DIR,
        *,
        share_all: bool = False,
        endpoint: str | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.store = store
        self.examples_dir = examples_dir
        self.share_all = share_all
        self.endpoint = endpoint
        self.registry = registry  # published results (LORAFID_REGISTRY): listed and opened after the store
        # file name -> report, with its spectra when the sidecar is there: bundled examples are
        # small (< 1 MB), and without spectra the gallery's sentence could only name grid ranks.
        self._examples: dict[str, Report] = {}
        for path in sorted(examples_dir.glob("*.json")) if examples_dir.is_dir() else []:
            try:
                report = Report.from_json(path.read_text(encoding="utf-8"))
                sidecar = spectra_path(path)
                self._examples[path.name] = report.with_spectra(load_spectra(sidecar)) if sidecar.is_file() else report
            except (LorafidError, OSError):
                continue  # not a report (another tool's JSON): not an example

    def entries(self, limit: int = 50) -> list[GalleryEntry]:
        """Examples first (labelled as such), then shared stored audits with results, latest first.

        Two audits of the same names (another commit of a moved branch) get their short SHAs
        in the label, so the gallery never shows two rows that read the same.
        """
        out = [
            GalleryEntry(
                f"example:{name}",
                f"example: {cut(r.base.spec)} → {cut(r.finetune.spec)}",
                r.status,
                r.summary().sentence(),
                cut(r.base.spec),
                cut(r.finetune.spec),
            )
            for name, r in self._examples.items()
        ]
        stored = self.store.list_audits(limit, shared_only=not self.share_all)
        names = [(a.base_spec, a.finetune_spec) for a in stored]
        out += [
            GalleryEntry(
                f"store:{a.key}",
                _label(a, ambiguous := names.count((a.base_spec, a.finetune_spec)) > 1),
                a.status,
                a.sentence,
                cut(a.base_spec) + (f" @ {(a.base_sha or '?')[:7]}" if ambiguous else ""),
                cut(a.finetune_spec) + (f" @ {(a.finetune_sha or '?')[:7]}" if ambiguous else ""),
            )
            for a in stored
        ]
        return out + self._registry_entries(stored)

    def open(self, ref: str) -> Report:
        """The report behind a gallery entry, with its full spectra when they exist.

        No access check here: refs reach a session only from ``entries`` (shared audits),
        from ``find``/``find_pinned`` after ``visible``, or from the visitor's own run.
        """
        kind, _, name = ref.partition(":")
        if kind == "example" and name in self._examples:
            return self._examples[name]
        if kind == "registry" and self.registry is not None:
            return self.registry.open(name)
        if kind == "store":
            stored = self.store.load_report(name)
            if stored is not None:
                return stored
        raise LorafidError("That audit is no longer available (the store was cleared?); run it again.")

    def find(
        self, base: str, finetune: str, base_revision: str | None = None, finetune_revision: str | None = None
    ) -> tuple[str, Report] | None:
        """(ref, report) of the stored, else bundled, audit of exactly this pair and these revisions
        as typed (local paths, and links to bundled examples); no access check (see ``visible``)."""
        wanted = (base_revision or None, finetune_revision or None)
        key = self.store.find(base, finetune, *wanted)
        stored = self.store.load_report(key) if key else None
        if key and stored is not None:
            return f"store:{key}", stored
        return self.find_example(base, finetune, *wanted)

    def find_example(
        self, base: str, finetune: str, base_revision: str | None = None, finetune_revision: str | None = None
    ) -> tuple[str, Report] | None:
        """A bundled example of this pair as typed, or pinned to its commits (examples are public)."""
        wanted = (base_revision or None, finetune_revision or None)
        for name, report in self._examples.items():
            typed = (report.base.spec, report.finetune.spec) == (base, finetune) and _revisions(report) == wanted
            pinned = (report.base.repo_id, report.finetune.repo_id) == (base, finetune) and wanted == (
                report.base.resolved_sha,
                report.finetune.resolved_sha,
            )
            if typed or pinned:
                return f"example:{name}", self.open(f"example:{name}")
        return None

    def find_pinned(
        self, base_repo: str, finetune_repo: str, base_sha: str, finetune_sha: str
    ) -> tuple[str, Report] | None:
        """(ref, report) of the audit of these two Hub repos at exactly these commits."""
        found = self.find_example(base_repo, finetune_repo, base_sha, finetune_sha)
        if found:
            return found
        key = self.store.find_pinned(base_repo, finetune_repo, base_sha, finetune_sha)
        stored = self.store.load_report(key) if key else None
        if key and stored is not None:
            return f"store:{key}", stored
        return self._registry_find(base_repo, finetune_repo, base_sha, finetune_sha)

    def visible(self, ref: str, report: Report, token: str | bool | None) -> bool:
        """May the visitor holding ``token`` see this audit? Examples and shared audits: yes.

        Otherwise each side that was not public is opened at its audited commit with the
        visitor's own token (one metadata call and one file lookup, no weights): a gated
        repo whose licence they have not accepted, or a private repo they cannot read,
        means no. Network failures are errors, not a silent yes.
        """
        kind, _, key = ref.partition(":")
        if kind in ("example", "registry") or self.share_all:  # registry: published only when public
            return True
        return self._readable(key, (report.base, report.finetune), token)

    def _readable(self, key: str, records: tuple[SourceRecord, SourceRecord], token: str | bool | None) -> bool:
        """Each side public as recorded under ``key``, or readable with ``token`` now."""
        public = self.store.visibility(key)
        return all(
            is_public or can_read(record, token, self.endpoint)
            for is_public, record in zip(public, records, strict=True)
        )

    # -- the registry: after the local store, before "run it" ---------------------------------

    def _registry_entries(self, stored: list[StoredAudit]) -> list[GalleryEntry]:
        """Published results not already listed from the store; none (and a logged reason) when
        the registry cannot be read: the gallery then shows this server's audits only."""
        if self.registry is None:
            return []
        try:
            published = self.registry.entries()
        except RegistryError as e:
            logger.warning("%s The gallery lists this server's audits only.", e)
            return []
        here = {(a.base_sha, a.finetune_sha) for a in stored}
        return [
            GalleryEntry(
                f"registry:{e.name}",
                f"{cut(e.base)} → {cut(e.finetune)} (published)",
                "complete",
                e.sentence,
                cut(e.base),
                cut(e.finetune),
            )
            for e in published
            if (e.base_sha, e.finetune_sha) not in here
        ]

    def _registry_find(self, base: str, finetune: str, base_sha: str, finetune_sha: str) -> tuple[str, Report] | None:
        """The published result of this pair at these commits: one listing (cached) and one download."""
        if self.registry is None:
            return None
        try:
            entry = self.registry.find(base, finetune, base_sha, finetune_sha)
            return (f"registry:{entry.name}", self.registry.open(entry)) if entry else None
        except (RegistryError, ResultSchemaError) as e:
            logger.warning("%s", e)
            return None

    def registry_note(self) -> str:
        """A sentence for the page when the registry cannot be read right now, else ""."""
        if self.registry is None:
            return ""
        try:
            self.registry.entries()
        except RegistryError as e:
            return f" (The public results registry could not be read: {e} Showing this server's results only.)"
        return ""

    def record_visibility(self, key: str, report: Report, *, anonymous: bool) -> None:
        """After planning an audit: note whether each side is readable without any token.

        ``anonymous``: the audit itself sent no token, so every Hub side it read is public;
        otherwise each side is checked once with no token.
        """
        self._record_public(key, (report.base, report.finetune), anonymous=anonymous)

    def _record_public(self, key: str, records: tuple[SourceRecord, SourceRecord], *, anonymous: bool) -> None:
        public = [r.kind == "hub" and (anonymous or can_read(r, False, self.endpoint)) for r in records]
        self.store.set_visibility(key, *public)

    # -- stored documents of other checks (behaviour, provider): the audit's rule ---------------

    def record_document(self, kind: str, key: str, document: dict[str, Any], *, anonymous: bool) -> None:
        """After storing a check's document: note whether each repo is public (as ``record_visibility``)."""
        self._record_public(f"{kind}:{key}", document_records(document), anonymous=anonymous)

    def document_visible(self, kind: str, key: str, document: dict[str, Any], token: str | bool | None) -> bool:
        """May the visitor holding ``token`` see this stored check? The audit's rule: both repos
        public when checked, or readable with the visitor's own token now."""
        return self.share_all or self._readable(f"{kind}:{key}", document_records(document), token)


def can_read(record: SourceRecord, token: str | bool | None, endpoint: str | None) -> bool:
    """Whether ``token`` (False: no token at all) can read this Hub repo at its audited commit.

    Local sources are never readable by others. Opening the source checks exactly what an
    audit would need: the model's metadata and the location of its first weight file.
    """
    if record.kind != "hub" or not record.repo_id or not record.resolved_sha:
        return False
    repo_id, sha = record.repo_id, record.resolved_sha

    def ask() -> bool:
        try:
            open_source(repo_id, revision=sha, token=token, endpoint=endpoint, allow_local=False).close()
        except (GatedRepoError, RepoNotFoundError):
            return False
        return True

    # Without a token the answer is everyone's: kept a minute. A visitor's own token is asked each time.
    return _READABLE.get((repo_id, sha, endpoint), ask) if token is False else ask()


_READABLE: Recent[bool] = Recent(60.0)


def document_records(document: dict[str, Any]) -> tuple[SourceRecord, SourceRecord]:
    """(base, fine-tune) of a stored check's document as source records (for ``can_read``).

    A behaviour check keeps ``kind``/``repo_id``/``resolved_sha``; a provider check
    ``repo_id``/``sha`` (always Hub repos on a public server).
    """

    def record(side: Any) -> SourceRecord:
        side = side if isinstance(side, dict) else {}
        sha = side.get("resolved_sha") or side.get("sha")
        repo = side.get("repo_id")
        kind = side.get("kind") or ("hub" if repo and sha else "local")
        return SourceRecord(
            spec=str(side.get("spec") or ""),
            kind=str(kind),
            repo_id=str(repo) if repo else None,
            requested_revision=None,
            resolved_sha=str(sha) if sha else None,
            path=None,
            files=(),
        )

    return record(document.get("base")), record(document.get("finetune"))


def _label(audit: StoredAudit, ambiguous: bool) -> str:
    label = f"{cut(audit.base_spec)} → {cut(audit.finetune_spec)}"  # the form's order: base, then fine-tune
    if ambiguous:
        label += f" (base @ {(audit.base_sha or '?')[:7]}, fine-tune @ {(audit.finetune_sha or '?')[:7]})"
    return label


class ReportCache:
    """The last few opened reports, shared by all sessions, by gallery ref.

    Sessions keep only a ref in their state: a 70B audit's spectra take ~40 MB, and a
    public app holds thousands of sessions. A miss re-opens the ref from the store.
    """

    def __init__(self, catalog: Catalog, size: int = 8) -> None:
        self.catalog = catalog
        self.size = size
        self._reports: OrderedDict[str, Report] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, ref: str, report: Report) -> None:
        with self._lock:
            self._reports[ref] = report
            self._reports.move_to_end(ref)
            while len(self._reports) > self.size:
                self._reports.popitem(last=False)

    def get(self, ref: str) -> Report:
        with self._lock:
            report = self._reports.get(ref)
        if report is None:
            report = self.catalog.open(ref)
            self.put(ref, report)
        return report


def _revisions(report: Report) -> tuple[str | None, str | None]:
    return report.base.requested_revision or None, report.finetune.requested_revision or None
