"""The audit report: the whole audit as one record, versioned JSON, and any rank re-derived exactly.

A ``Report`` holds, per matrix, the scalar statistics of Δ plus its cumulative energy on a
fixed rank grid (``RANK_GRID``); the full spectrum (``sigma_sq``) rides along in memory
when known, and is persisted in the store and in a ``.spectra.safetensors`` sidecar, not
in the JSON, which stays a few MB even for a 70B pair. ``Report.with_rank(r)`` re-derives
every metric at rank r from the spectra (exact at any r) or, without them, from the grid
(exact at grid ranks; other ranks raise).

JSON layout (``"schema": "lorafid.report/1"``), keys in a stable order:
    schema, tool_version, created, status, base, finetune, settings, timings, summary,
    matrices[], vectors[], skipped[], pending[].
The summary and each matrix's ``at_rank`` block are derived: ``from_json`` ignores them
and recomputes, so ``Report.from_json(r.to_json()) == r``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from lorafid import __version__
from lorafid.audit import spectrum as sp
from lorafid.audit.matrices import RANK_GRID, MatrixResult, VectorResult
from lorafid.audit.pairing import SkippedTensor
from lorafid.audit.summary import Summary, summarize
from lorafid.documents import decode_document
from lorafid.errors import LorafidError, SpectrumNotLoadedError

SCHEMA = "lorafid.report/1"
PROVIDER_RANKS: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
"""Ranks LoRA-serving providers typically use; marks on the dashboard's slider."""


@dataclass(frozen=True)
class SourceRecord:
    """Where one model came from, pinned: what was asked for and what was read."""

    spec: str
    kind: str  # "hub" | "local"
    repo_id: str | None
    requested_revision: str | None
    resolved_sha: str | None  # the commit every byte was read from (hub)
    path: str | None
    files: tuple[str, ...]


@dataclass(frozen=True)
class AuditSettings:
    """Everything that shaped the numbers (the rank only picks where they are read)."""

    rank: int
    device: str
    include_embeddings: bool = False
    include: str | None = None
    exclude: str | None = None
    numerics: dict[str, str | bool] = field(default_factory=lambda: dict(sp.NUMERICS))
    # Learned while pairing, not chosen: the wrapper prefix stripped from each side's names
    # (a masked-LM fine-tune's "bert." against its bare encoder base).
    base_name_prefix: str = ""
    finetune_name_prefix: str = ""


@dataclass(frozen=True)
class Timings:
    elapsed_s: float = 0.0
    wait_for_bytes_s: float = 0.0  # time the math device sat idle waiting for weights
    compute_s: float = 0.0
    bytes_read: int = 0


@dataclass(frozen=True)
class Report:
    """One audit of a base/fine-tune pair, complete or partial."""

    base: SourceRecord
    finetune: SourceRecord
    settings: AuditSettings
    matrices: tuple[MatrixResult, ...]
    vectors: tuple[VectorResult, ...] = ()
    skipped: tuple[SkippedTensor, ...] = ()
    pending: tuple[str, ...] = ()  # planned matrices not computed yet (a stopped audit)
    status: str = "complete"  # "complete" | "partial"
    timings: Timings = Timings()
    tool_version: str = __version__
    created: str = ""
    # A PEFT adapter compared with this fine-tune (``lorafid.adapters.peft_adapter.AdapterSection.to_dict``),
    # audited or written by ``lorafid extract``; None for a plain audit.
    adapter: dict[str, Any] | None = None

    @property
    def rank(self) -> int:
        return self.settings.rank

    def with_rank(self, rank: int) -> Report:
        """The same audit read at another rank: no weights, no recompute."""
        if rank < 1:
            raise LorafidError(f"Rank must be a positive integer, got {rank}.")
        for m in self.matrices:
            m.energy_retained(rank)  # raises SpectrumNotLoadedError now, not halfway through a figure
        return replace(self, settings=replace(self.settings, rank=rank))

    def has_spectra(self) -> bool:
        return all(m.sigma_sq is not None for m in self.matrices)

    def with_spectra(self, spectra: dict[str, np.ndarray]) -> Report:
        """Attach full spectra (from the store or a sidecar) by matrix name."""
        matrices = tuple(replace(m, sigma_sq=spectra[m.name]) if m.name in spectra else m for m in self.matrices)
        return replace(self, matrices=matrices)

    def summary(self) -> Summary:
        """Energy-weighted figures at this rank (``lorafid.audit.summary``)."""
        return summarize(self.matrices, self.vectors, self.rank)

    def compare_py(self) -> dict[str, Any]:
        """The seed post's ``results.json`` layout, over the tensors its script covers.

        Its script keeps 2-D tensors whose name contains neither "embed" nor "lm_head".
        """
        view: dict[str, Any] = {}
        for m in self.matrices:
            if "embed" in m.name or "lm_head" in m.name:
                continue
            at = m.metrics(self.rank)
            view[m.name] = {
                "loss": {"mse": at.mse, "cosine_distance": at.cosine_distance},
                "mean_diff_value": m.mean_abs_delta,
                "diff_rank": m.full_rank,
            }
        return view

    def to_dict(self) -> dict[str, Any]:
        summary = self.summary()
        return {
            "schema": SCHEMA,
            "tool_version": self.tool_version,
            "created": self.created,
            "status": self.status,
            "base": asdict(self.base),
            "finetune": asdict(self.finetune),
            "settings": asdict(self.settings),
            "timings": asdict(self.timings),
            "summary": {**asdict(summary), "sentence": summary.sentence()},
            "rank_grid": list(RANK_GRID),
            "matrices": [_matrix_to_dict(m, self.rank) for m in self.matrices],
            "vectors": [asdict(v) for v in self.vectors],
            "skipped": [asdict(s) for s in self.skipped],
            "pending": list(self.pending),
            **({"adapter": self.adapter} if self.adapter is not None else {}),
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Decode ``to_dict``'s layout. Raises LorafidError (only) for anything else.

        The one place where a damaged or foreign document becomes a message: a missing or
        mistyped field is reported by name, never as a KeyError/TypeError traceback.
        """
        return decode_document(data, SCHEMA, "report", "Write it again with lorafid audit --out.", cls._decode)

    @classmethod
    def _decode(cls, data: dict[str, Any]) -> Report:
        return cls(
            base=_source_from_dict(data["base"]),
            finetune=_source_from_dict(data["finetune"]),
            settings=AuditSettings(**data["settings"]),
            matrices=tuple(MatrixResult.from_dict(m) for m in data["matrices"]),
            vectors=tuple(VectorResult.from_dict(v) for v in data["vectors"]),
            skipped=tuple(_skipped_from_dict(s) for s in data["skipped"]),
            pending=tuple(data["pending"]),
            status=data["status"],
            timings=Timings(**data["timings"]),
            tool_version=data["tool_version"],
            created=data["created"],
            adapter=data.get("adapter"),
        )

    @classmethod
    def from_json(cls, text: str) -> Report:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LorafidError(f"The report is not valid JSON ({e}).") from e
        return cls.from_dict(data)


def _matrix_to_dict(m: MatrixResult, rank: int) -> dict[str, Any]:
    out = {k: v for k, v in asdict(m).items() if k != "sigma_sq"}
    try:
        at = asdict(m.metrics(rank))
        at["noise_floor_retained"] = m.noise_floor_retained(rank)
    except SpectrumNotLoadedError:
        at = None
    out["at_rank"] = at
    return out


def _source_from_dict(data: dict[str, Any]) -> SourceRecord:
    return SourceRecord(**{**data, "files": tuple(data["files"])})


def _skipped_from_dict(data: dict[str, Any]) -> SkippedTensor:
    shapes = {k: tuple(data[k]) if data.get(k) is not None else None for k in ("base_shape", "finetune_shape")}
    return SkippedTensor(**{**data, **shapes})


def spectra_path(report_path: Path) -> Path:
    """Where the full spectra of ``report.json`` live: ``report.spectra.safetensors``."""
    return report_path.with_name(report_path.stem + ".spectra.safetensors")


def save_spectra(report: Report, path: Path) -> None:
    """Write every matrix's σ² (float64) to a safetensors file, keyed by matrix name."""
    spectra = {
        m.name: np.ascontiguousarray(m.sigma_sq, dtype=np.float64) for m in report.matrices if m.sigma_sq is not None
    }
    save_file(spectra, str(path), metadata={"schema": SCHEMA, "content": "sigma_sq per matrix"})


def load_spectra(path: Path) -> dict[str, np.ndarray]:
    """Read spectra written by ``save_spectra`` (safetensors: no code is ever executed)."""
    try:
        return dict(load_file(str(path)))
    except Exception as e:  # the safetensors library raises its own types for corrupt files
        raise LorafidError(f"Cannot read the spectra file {path}: {e}. Re-run the audit to rewrite it.") from e
