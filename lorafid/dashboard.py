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
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import torch

from lorafid.audit import AuditProgress
from lorafid.errors import LorafidError
from lorafid.report import Report, load_spectra, spectra_path
from lorafid.spectrum import DeltaSpectrum, delta_spectrum
from lorafid.store import Store

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
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
        ``LORAFID_MAX_MODEL_GB``, ``LORAFID_USE_SERVER_TOKEN``, ``LORAFID_DEVICE`` and
        ``OAUTH_CLIENT_ID`` (set on Spaces with ``hf_oauth: true``).

        Example: {"LORAFID_MAX_MODEL_GB": "40"} -> max_model_bytes=40_000_000_000.
        """
        env = os.environ if env is None else env
        max_gb = _positive_setting(env, "LORAFID_MAX_MODEL_GB", float)
        return cls(
            allow_local=allow_local or env.get("LORAFID_ALLOW_LOCAL", "").lower() in _TRUE,
            max_model_bytes=int(max_gb * 1e9) if max_gb else None,
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


class Catalog:
    """Bundled examples plus the store's audits, and how to open them."""

    def __init__(self, store: Store, examples_dir: Path = EXAMPLES_DIR) -> None:
        self.store = store
        self.examples_dir = examples_dir
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
        """Examples first (labelled as such), then stored audits, latest first."""
        out = [
            GalleryEntry(
                f"example:{name}",
                f"example: {r.finetune.spec} vs {r.base.spec}",
                r.status,
                r.summary().sentence(),
            )
            for name, r in self._examples.items()
        ]
        out += [
            GalleryEntry(f"store:{a.key}", f"{a.finetune_spec} vs {a.base_spec}", a.status, a.sentence)
            for a in self.store.list_audits(limit)
        ]
        return out

    def open(self, ref: str) -> Report:
        """The report behind a gallery entry, with its full spectra when they exist."""
        kind, _, name = ref.partition(":")
        if kind == "example" and name in self._examples:
            return self._examples[name]
        if kind == "store":
            stored = self.store.load_report(name)
            if stored is not None:
                return stored
        raise LorafidError("That audit is no longer available (the store was cleared?); run it again.")

    def find(
        self, base: str, finetune: str, base_revision: str | None = None, finetune_revision: str | None = None
    ) -> tuple[str, Report] | None:
        """(ref, report) of the stored, else bundled, audit of exactly this pair and these revisions."""
        wanted = (base_revision or None, finetune_revision or None)
        key = self.store.find(base, finetune, *wanted)
        stored = self.store.load_report(key) if key else None
        if key and stored is not None:
            return f"store:{key}", stored
        for name, report in self._examples.items():
            if (report.base.spec, report.finetune.spec) == (base, finetune) and _revisions(report) == wanted:
                return f"example:{name}", self.open(f"example:{name}")
        return None


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


def permalink(
    page_url: str,
    base: str,
    finetune: str,
    rank: int,
    base_revision: str | None = None,
    finetune_revision: str | None = None,
) -> str:
    """A shareable URL that re-opens this audit at this rank. Never carries a token.

    Example: permalink("http://127.0.0.1:7860/", "org/base", "org/tuned", 64)
    -> "http://127.0.0.1:7860/?base=org%2Fbase&finetune=org%2Ftuned&rank=64"
    """
    params = {"base": base, "finetune": finetune, "rank": str(rank)}
    if base_revision:
        params["base_revision"] = base_revision
    if finetune_revision:
        params["finetune_revision"] = finetune_revision
    return page_url.split("?", 1)[0] + "?" + urlencode(params)


def parse_link(params: Mapping[str, str], metrics: Mapping[str, object]) -> Link:
    """Read permalink query parameters (``metrics``: the allowed metric keys)."""
    rank_text = params.get("rank", "")
    rank = int(rank_text) if rank_text.isdigit() and 1 <= int(rank_text) <= 10**6 else None
    metric = params.get("metric")
    return Link(
        base=params.get("base", "").strip(),
        finetune=params.get("finetune", "").strip(),
        base_revision=params.get("base_revision", "").strip(),
        finetune_revision=params.get("finetune_revision", "").strip(),
        rank=rank,
        metric=metric if metric in metrics else None,
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
    """The summary card: one sentence, then the numbers behind it."""
    if not report.matrices:
        return "Waiting for the first matrix…"
    s = report.summary()
    vector_share = s.lost_outside_lora / (s.overall.energy + s.lost_outside_lora) if s.lost_outside_lora else 0.0
    done, planned = len(report.matrices), len(report.matrices) + len(report.pending)
    rank_90 = "beyond full rank" if s.rank_for_90 is None else str(s.rank_for_90)
    lines = [
        f"**{s.sentence()}**",
        "",
        "| at rank " + str(s.rank) + " | |",
        "|---|---|",
        f"| energy of Δ retained (all matrices) | {s.overall.energy_retained:.2%} |",
        f"| mean cosine distance | {s.overall.mean_cosine_distance:.4f} |",
        f"| served weight vs fine-tune (relative error) | {s.overall.weight_rel_error:.3g} |",
        f"| best possible if the rest were storage rounding | {s.noise_floor_retained:.2%} |",
        f"| rank needed for 90% | {rank_90} |",
        f"| Δ energy in 1-D tensors (never in a LoRA) | {vector_share:.2%} |",
        f"| matrices | {done} of {planned}{'' if report.status == 'complete' else ' (partial)'} |",
        "",
        f"Base `{_pinned(report.base.spec, report.base.resolved_sha)}` · "
        f"fine-tune `{_pinned(report.finetune.spec, report.finetune.resolved_sha)}`",
    ]
    if s.worst:
        name, distance = s.worst[0]
        lines.append(f" · worst matrix `{name}` (cosine distance {distance:.4f})")
    return "\n".join(lines)


def _pinned(spec: str, sha: str | None) -> str:
    return f"{spec} @ {sha[:12]}" if sha else spec


class ProgressMeter:
    """The progress line of a run: "12/64 matrices · 340 MB/s · 3.2 s".

    Matrices reused from the store count as done but not toward the read rate.
    """

    def __init__(self) -> None:
        self._reused_bytes = 0

    def line(self, p: AuditProgress) -> str:
        if p.from_store:
            self._reused_bytes = p.bytes_done
        read = p.bytes_done - self._reused_bytes
        rate = f" · {read / p.elapsed_s / 1e6:.3g} MB/s" if p.elapsed_s > 0 and read > 0 else ""
        reused = " · resumed from the store" if self._reused_bytes else ""
        return f"{p.done}/{p.total} matrices{rate} · {p.elapsed_s:.1f} s{reused}"


class Throttle:
    """True at most once per ``interval_s``: figure rebuilds during a run are paced with it."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self._last = float("-inf")

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return False
        self._last = now
        return True


def write_report_json(report: Report, directory: Path) -> Path:
    """Write the report at its rank for download; the name says the pair and the rank."""
    slug = "-vs-".join(
        re.sub(r"[^A-Za-z0-9._-]+", "_", s.spec).strip("_")[-60:] for s in (report.finetune, report.base)
    )
    path = directory / f"lorafid-{slug}-rank{report.rank}.json"
    path.write_text(report.to_json(), encoding="utf-8")
    return path


def download_dir() -> Path:
    """A private temporary folder for report downloads (Gradio serves files from temp).

    Removed when the process exits, so restarts and test runs leave nothing behind.
    """
    path = Path(tempfile.mkdtemp(prefix="lorafid-downloads-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
