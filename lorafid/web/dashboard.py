"""What the dashboard (``app.py``) needs besides widgets: settings, gallery, links, words.

Kept free of Gradio so it can be read and tested on its own: ``app.py`` only wires these
to components. Nothing here computes a metric (``report``/``plots`` do) or reads weights.

- ``AppConfig``: the deployment's switches, from the environment (see ``from_env``).
- ``Catalog``: audits to show before anything runs: bundled examples (``assets/examples``:
  ``*.json`` reports with ``*.spectra.safetensors`` sidecars) and the store's audits;
  opening one, and finding the audit a permalink names.
- ``permalink`` / ``parse_link``: ``?base=…&finetune=…&rank=…`` (never a token).
- ``summary_markdown``, ``ProgressMeter``, ``Throttle``: the words and pacing of a run.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import html
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import torch

from lorafid.audit.engine import AuditProgress
from lorafid.audit.report import Report, SourceRecord, load_spectra, spectra_path
from lorafid.audit.spectrum import DeltaSpectrum, delta_spectrum
from lorafid.audit.store import Store, StoredAudit
from lorafid.errors import GatedRepoError, LorafidError, RegistryError, RepoNotFoundError, ResultSchemaError
from lorafid.sharing.registry import Registry
from lorafid.weights.source import open_source

logger = logging.getLogger(__name__)
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"
MAX_RANK = 4096  # slider range; any rank is exact, this only bounds the widget
DEFAULT_RANK = 64
_TRUE = {"1", "true", "yes", "on"}


ZERO_GPU_DURATION_S = 120  # a GPU lease per matrix: one 28672×8192 spectrum takes a few seconds


def zero_gpu_compute(
    env: Mapping[str, str] | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], DeltaSpectrum] | None:
    """On a ZeroGPU Space, the per-matrix spectrum as the one ``@spaces.GPU`` function; else None.

    ZeroGPU lends a GPU only inside decorated calls, so the audit's streaming stays outside
    and only this short function (CPU tensors in, plain numbers out) holds the GPU. Detected
    by ``SPACES_ZERO_GPU``, which ZeroGPU hardware sets; elsewhere the audit picks its device
    itself (``AuditConfig.device``).
    """
    env = os.environ if env is None else env
    if "SPACES_ZERO_GPU" not in env:
        return None
    import spaces  # only on Spaces; never a requirement elsewhere

    @spaces.GPU(duration=ZERO_GPU_DURATION_S)
    def spectrum_on_gpu(base: torch.Tensor, finetune: torch.Tensor) -> DeltaSpectrum:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return delta_spectrum(base.to(device), finetune.to(device))

    return spectrum_on_gpu


@dataclass(frozen=True)
class AppConfig:
    """How this deployment of the dashboard behaves. Defaults are those of a public Space."""

    allow_local: bool = False  # read server paths: only for a private deployment
    endpoint: str | None = None  # Hub URL; None = HF_ENDPOINT or huggingface.co
    max_model_bytes: int | None = None  # refuse audits reading more than this
    # One tensor pair costs ~7x its storage size in memory (float32 copies, Δ, Gram matrix):
    # 0.5 GB fits a 70B model's largest matrix (28672 x 8192 in bf16 = 0.47 GB).
    max_tensor_bytes: int | None = 500_000_000
    max_tensors: int | None = 200_000  # per model; the largest MoE checkpoints list ~100k
    max_audit_minutes: float | None = 60.0  # an audit stops (keeping its results) after this
    max_audits_per_visitor: int = 1  # audits one visitor (address) may run at once
    concurrency: int = 1  # audits running at once
    max_queue: int = 16  # audits waiting; more are refused
    oauth: bool = False  # render "Sign in with Hugging Face" (needs a Space with hf_oauth)
    server_token: bool = False  # let audits fall back to the server's own HF login
    device: str = "auto"
    examples_dir: Path = EXAMPLES_DIR
    store_home: Path | None = field(default=None)  # None = LORAFID_HOME / user cache

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, allow_local: bool = False) -> AppConfig:
        """Read ``LORAFID_ALLOW_LOCAL``, ``LORAFID_CONCURRENCY``, ``LORAFID_MAX_QUEUE``,
        ``LORAFID_MAX_MODEL_GB``, ``LORAFID_MAX_TENSOR_GB``, ``LORAFID_MAX_TENSORS``,
        ``LORAFID_MAX_AUDIT_MINUTES``, ``LORAFID_MAX_AUDITS_PER_VISITOR``,
        ``LORAFID_USE_SERVER_TOKEN``, ``LORAFID_DEVICE`` and ``OAUTH_CLIENT_ID`` (set on
        Spaces with ``hf_oauth: true``).

        Example: {"LORAFID_MAX_MODEL_GB": "40"} -> max_model_bytes=40_000_000_000.
        """
        env = os.environ if env is None else env
        max_gb = _positive_setting(env, "LORAFID_MAX_MODEL_GB", float)
        tensor_gb = _positive_setting(env, "LORAFID_MAX_TENSOR_GB", float)
        defaults = cls()
        return cls(
            allow_local=allow_local or env.get("LORAFID_ALLOW_LOCAL", "").lower() in _TRUE,
            max_model_bytes=int(max_gb * 1e9) if max_gb else None,
            max_tensor_bytes=int(tensor_gb * 1e9) if tensor_gb else defaults.max_tensor_bytes,
            max_tensors=int(_positive_setting(env, "LORAFID_MAX_TENSORS", int) or defaults.max_tensors or 0) or None,
            max_audit_minutes=_positive_setting(env, "LORAFID_MAX_AUDIT_MINUTES", float) or defaults.max_audit_minutes,
            max_audits_per_visitor=int(_positive_setting(env, "LORAFID_MAX_AUDITS_PER_VISITOR", int) or 1),
            concurrency=int(_positive_setting(env, "LORAFID_CONCURRENCY", int) or 1),
            max_queue=int(_positive_setting(env, "LORAFID_MAX_QUEUE", int) or 16),
            oauth=bool(env.get("OAUTH_CLIENT_ID")),
            server_token=env.get("LORAFID_USE_SERVER_TOKEN", "").lower() in _TRUE,
            device=env.get("LORAFID_DEVICE") or "auto",
        )


def _positive_setting(env: Mapping[str, str], name: str, kind: type[int] | type[float]) -> float | None:
    """A positive number from the environment, None when unset; a clear error when not a number."""
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if not value > 0:
        example = "40" if kind is float else "2"
        raise LorafidError(f"{name}={text!r} is not a positive {kind.__name__}; unset it or set e.g. {name}={example}.")
    return value


# -- gallery ---------------------------------------------------------------------------------


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
        public = self.store.visibility(key)
        return all(
            is_public or can_read(record, token, self.endpoint)
            for is_public, record in zip(public, (report.base, report.finetune), strict=True)
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
        sides = (report.base, report.finetune)
        public = [r.kind == "hub" and (anonymous or can_read(r, False, self.endpoint)) for r in sides]
        self.store.set_visibility(key, *public)


def can_read(record: SourceRecord, token: str | bool | None, endpoint: str | None) -> bool:
    """Whether ``token`` (False: no token at all) can read this Hub repo at its audited commit.

    Local sources are never readable by others. Opening the source checks exactly what an
    audit would need: the model's metadata and the location of its first weight file.
    """
    if record.kind != "hub" or not record.repo_id or not record.resolved_sha:
        return False
    try:
        open_source(
            record.repo_id, revision=record.resolved_sha, token=token, endpoint=endpoint, allow_local=False
        ).close()
    except (GatedRepoError, RepoNotFoundError):
        return False
    return True


def resolve_commit(repo: str, revision: str | None, token: str | bool | None, endpoint: str | None) -> str:
    """The commit SHA a branch or tag (None: the default branch) of a Hub repo points at now."""
    source = open_source(repo, revision=revision or None, token=token, endpoint=endpoint, allow_local=False)
    source.close()
    return source.info.resolved_sha or ""


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


# -- links -----------------------------------------------------------------------------------


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


# -- words and pacing ----------------------------------------------------------------------------


def summary_markdown(report: Report) -> str:
    """The summary card: one sentence, then the numbers behind it.

    Every name in it comes from a repo or a user, so each is quoted with ``code_span``: a
    tensor named ``[Sign in](https://…)`` shows as those characters, never as a link.
    """
    if not report.matrices:
        if report.status == "complete" or not report.pending:
            return "**No weight matrix was compared:** this audit has no results."
        return "Waiting for the first matrix…"
    s = report.summary()
    done, planned = len(report.matrices), len(report.matrices) + len(report.pending)
    pins = (
        f"Base {code_span(_pinned(report.base.spec, report.base.resolved_sha))} · "
        f"fine-tune {code_span(_pinned(report.finetune.spec, report.finetune.resolved_sha))}"
    )
    changed = sum(1 for m in report.matrices if m.energy > 0)
    if changed == 0:
        return "\n".join([f"**{md_text(s.sentence())}**", "", _unchanged_line(report), "", pins])
    vector_share = s.lost_outside_lora / (s.overall.energy + s.lost_outside_lora) if s.lost_outside_lora else 0.0
    rank_90 = "beyond full rank" if s.rank_for_90 is None else str(s.rank_for_90)
    lines = [
        f"**{md_text(s.sentence())}**",
        "",
        "| at rank " + str(s.rank) + " | |",
        "|---|---|",
        f"| energy of Δ retained (all matrices) | {s.overall.energy_retained:.2%} |",
        f"| cosine distance (all matrices as one) | {s.overall.cosine_distance:.4f} |",
        f"| served weight vs fine-tune (relative error) | {s.overall.weight_rel_error:.3g} |",
        f"| storage rounding in Δ, estimated (no rank recovers it) | {1.0 - s.noise_floor_retained:.2%} |",
        f"| rank needed for 90% | {rank_90} |",
        f"| Δ energy in 1-D tensors (never in a LoRA) | {vector_share:.2%} |",
        f"| matrices changed | {changed} of {done}{'' if changed == done else ' (the rest are identical)'} |",
        f"| matrices | {done} of {planned}{'' if report.status == 'complete' else ' (partial)'} |",
        "",
        pins,
    ]
    if s.worst:
        name, distance = s.worst[0]
        lines.append(f" · worst matrix {code_span(name)} (cosine distance {distance:.4f})")
    return "\n".join(lines)


def _unchanged_line(report: Report) -> str:
    """What is true when no matrix differs: nothing for a LoRA to carry, or only 1-D tensors changed."""
    done = len(report.matrices)
    changed_vectors = sum(1 for v in report.vectors if v.energy > 0)
    if changed_vectors:
        return (
            f"All {done} compared weight matrices are identical in the two models; {changed_vectors} of "
            f"{len(report.vectors)} 1-D tensors (norms, biases) differ, and no LoRA can carry those."
        )
    return f"No weight differs: all {done} compared matrices and {len(report.vectors)} 1-D tensors are identical."


def _pinned(spec: str, sha: str | None) -> str:
    return f"{spec} @ {sha[:12]}" if sha else spec


# -- untrusted text ------------------------------------------------------------------------------

MAX_ECHO_CHARS = 200
"""Longest piece of user or repo text quoted back in a message; the rest is cut, with its length."""

_ASCII_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")


def cut(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """Untrusted text short enough to echo: a 20 MB repo ID must not come back as a 20 MB message.

    Example: cut("a" * 1000, 5) -> "aaaaa… (1,000 characters)".
    """
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def md_text(text: str, limit: int | None = None) -> str:
    """Untrusted text as literal Markdown: links, emphasis, HTML and bare URLs stay characters.

    Every ASCII punctuation mark is backslash-escaped (CommonMark allows it for each of them),
    which also breaks autolinks ("https\\://…") and ``$`` maths; newlines become spaces so a
    name cannot start a heading or a table. Example: "[a](b)" -> "\\[a\\]\\(b\\)".
    """
    text = str(text) if limit is None else cut(text, limit)
    return _ASCII_PUNCTUATION.sub(r"\\\1", " ".join(text.splitlines()))


def code_span(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """Untrusted text as an inline code span that no backtick inside it can close early.

    The fence is one backtick longer than the longest run inside (CommonMark), padded with a
    space when the text starts or ends with one. Example: "a`b" -> "``a`b``".
    """
    text = " ".join(cut(text, limit).splitlines())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def html_text(text: str, limit: int | None = None) -> str:
    """Untrusted text for HTML contexts (pop-ups): tags and entities shown, not interpreted."""
    return html.escape(str(text) if limit is None else cut(text, limit), quote=False)


class ProgressMeter:
    """The progress line of a run, like the CLI's bar: what is done of what, how fast, how long.

    Example: "12/64 matrices · 120 of 450 MB · 34 MB/s · about 10 s left · 3.5 s".
    Matrices reused from the store count as done but not toward the read rate (nor the ETA).
    """

    def __init__(self) -> None:
        self._reused_bytes = 0

    def line(self, p: AuditProgress) -> str:
        if p.from_store:
            self._reused_bytes = p.bytes_done
        read = p.bytes_done - self._reused_bytes
        per_s = read / p.elapsed_s if p.elapsed_s > 0 and read > 0 else 0.0
        size = f" · {_amount(p.bytes_done, p.bytes_total)}" if p.bytes_total else ""
        rate = f" · {per_s / 1e6:.3g} MB/s" if per_s else ""
        left = max(0, p.bytes_total - p.bytes_done)
        eta = f" · about {_duration(left / per_s)} left" if per_s and left and p.done < p.total else ""
        reused = " · resumed from the store" if self._reused_bytes else ""
        return f"{p.done}/{p.total} matrices{size}{rate}{eta} · {p.elapsed_s:.1f} s{reused}"

    @staticmethod
    def bar(p: AuditProgress) -> str:
        """An HTML progress bar of the bytes read (the matrices' count when sizes are unknown)."""
        done, total = (p.bytes_done, p.bytes_total) if p.bytes_total else (p.done, max(1, p.total))
        return f'<progress value="{done}" max="{total}" aria-label="audit progress"></progress>'


def _amount(done: int, total: int) -> str:
    """Bytes done of total in the unit that suits the total: "12 of 40 kB", "120 of 450 MB", "1.2 of 140 GB"."""
    scale, unit, digits = (1e3, "kB", 0) if total < 1e6 else (1e6, "MB", 0) if total < 1e10 else (1e9, "GB", 1)
    return f"{done / scale:,.{digits}f} of {total / scale:,.{digits}f} {unit}"


def _duration(seconds: float) -> str:
    """Seconds as a reader wants an ETA: "40 s", "3 min 20 s", "2 h 05 min"."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Throttle:
    """True at most once per ``interval_s``: figure rebuilds during a run are paced with it.

    ``spent(seconds)`` reports what the last rebuild cost; the next one then waits at least
    ``cost_factor`` times that. With 20,000 matrices a frame takes seconds to build, and a
    fixed half-second pace spent nearly all of the audit's time redrawing (the app did 354
    matrices in 300 s where the CLI did 1,183 in 60 s); this keeps redrawing under ~1/6.
    """

    def __init__(self, interval_s: float = 0.5, cost_factor: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.cost_factor = cost_factor
        self._clock = clock
        self._wait_s = interval_s
        self._last = float("-inf")

    def ready(self) -> bool:
        now = self._clock()
        if now - self._last < self._wait_s:
            return False
        self._last = now
        return True

    def spent(self, seconds: float) -> None:
        self._wait_s = max(self.interval_s, self.cost_factor * seconds)
        self._last = self._clock()


class VisitorSlots:
    """How many audits each visitor runs at once, capped: one visitor cannot hold every worker.

    A visitor is the client's address (on a Space, the proxy's ``x-forwarded-for`` hop it
    appended). ``take`` returns False at the cap; ``give_back`` after the audit ends.
    """

    def __init__(self, per_visitor: int) -> None:
        self.per_visitor = per_visitor
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, visitor: str) -> bool:
        with self._lock:
            if self._running.get(visitor, 0) >= self.per_visitor:
                return False
            self._running[visitor] = self._running.get(visitor, 0) + 1
            return True

    def give_back(self, visitor: str) -> None:
        with self._lock:
            left = self._running.get(visitor, 0) - 1
            if left > 0:
                self._running[visitor] = left
            else:
                self._running.pop(visitor, None)


def release_memory() -> None:
    """After an audit ends or is stopped: collect its cycles and hand freed heap back to the OS.

    CPython frees a cancelled audit's headers and buffers, but glibc keeps the pages (a
    cancelled audit of two 850k-tensor headers left the process at 3 GB); ``malloc_trim``
    returns them. A no-op where there is no glibc.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def visitor_id(headers: Mapping[str, str], client_host: str | None, behind_proxy: bool) -> str:
    """Who is asking, for per-visitor limits. Behind a known proxy (a Space) the last
    ``x-forwarded-for`` hop is the one the proxy added; elsewhere headers can be forged."""
    forwarded = headers.get("x-forwarded-for", "")
    if behind_proxy and forwarded:
        return forwarded.split(",")[-1].strip()
    return client_host or "unknown"


DOWNLOAD_MAX_AGE_S = 15 * 60  # a prepared download is fetched within seconds; older ones are swept


def write_report_json(report: Report, directory: Path) -> Path:
    """Write the report at its rank for one download request, and return its path.

    Each call gets its own new folder (a random name under ``directory``), so two visitors
    downloading the same pair at the same rank never share, overwrite or half-read a file;
    the file is written under a temporary name and renamed into place (atomic). Folders
    older than ``DOWNLOAD_MAX_AGE_S`` are removed on the way. The file name still says
    the pair and the rank: "lorafid-org_tuned-vs-org_base-rank64.json".
    """
    sweep_downloads(directory)
    slug = "-vs-".join(
        re.sub(r"[^A-Za-z0-9._-]+", "_", s.spec).strip("_")[-60:] for s in (report.finetune, report.base)
    )
    folder = directory / uuid.uuid4().hex
    folder.mkdir(parents=True)
    path = folder / f"lorafid-{slug}-rank{report.rank}.json"
    staging = folder / f".{path.name}.partial"
    staging.write_text(report.to_json(), encoding="utf-8")
    os.replace(staging, path)
    return path


def sweep_downloads(directory: Path, max_age_s: float = DOWNLOAD_MAX_AGE_S) -> None:
    """Remove per-request download folders older than ``max_age_s`` (Gradio serves its own copy)."""
    cutoff = time.time() - max_age_s
    for folder in directory.iterdir() if directory.is_dir() else []:
        try:
            if folder.is_dir() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue  # swept by a concurrent request


def download_dir() -> Path:
    """A private temporary folder for report downloads (Gradio serves files from temp).

    Removed when the process exits, so restarts and test runs leave nothing behind.
    """
    path = Path(tempfile.mkdtemp(prefix="lorafid-downloads-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
