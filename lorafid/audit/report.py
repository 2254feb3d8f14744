"""The audit report: records, versioned JSON, and any rank re-derived exactly.

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

import functools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import load_file, save_file

from lorafid import __version__
from lorafid.audit import spectrum as sp
from lorafid.audit.pairing import SkippedTensor
from lorafid.errors import LorafidError, SpectrumNotLoadedError

if TYPE_CHECKING:
    from lorafid.audit.summary import Summary

SCHEMA = "lorafid.report/1"
RANK_GRID: tuple[int, ...] = tuple(2**i for i in range(16))  # 1 … 32768: beyond any LLM's k
"""Ranks at which the cumulative energy of every matrix is kept in the JSON."""
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
class MatrixResult:
    """One audited matrix: statistics of Δ that hold at every rank."""

    name: str
    layer: int | None
    module: str
    shape: tuple[int, int]
    dtype: str  # storage dtype of the fine-tune's tensor
    full_rank: int
    energy: float  # ‖Δ‖_F²
    finetune_norm_sq: float
    base_norm_sq: float
    mean_abs_delta: float
    noise_energy: float
    rank_for_energy: dict[str, int]  # "0.9" -> smallest rank keeping 90% of Δ's energy
    stable_rank: float
    effective_rank: float
    energy_grid: tuple[float, ...]  # energy retained at RANK_GRID[i]
    sigma_sq: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_spectrum(
        cls, *, name: str, layer: int | None, module: str, dtype: str, spectrum: sp.DeltaSpectrum
    ) -> MatrixResult:
        rows, cols = spectrum.shape
        return cls(
            name=name,
            layer=layer,
            module=module,
            shape=(rows, cols),
            dtype=dtype,
            full_rank=spectrum.full_rank,
            energy=spectrum.energy,
            finetune_norm_sq=spectrum.finetune_norm_sq,
            base_norm_sq=spectrum.base_norm_sq,
            mean_abs_delta=spectrum.mean_abs_delta,
            noise_energy=spectrum.noise_energy,
            rank_for_energy={str(p): sp.rank_for_energy(spectrum, p) for p in sp.ENERGY_TARGETS},
            stable_rank=sp.stable_rank(spectrum),
            effective_rank=sp.effective_rank(spectrum),
            energy_grid=tuple(sp.energy_retained(spectrum, r) for r in RANK_GRID),
            sigma_sq=spectrum.sigma_sq,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any], sigma_sq: np.ndarray | None = None) -> MatrixResult:
        """The record from its JSON fields (the report's or the store's); derived ``at_rank`` is ignored."""
        fields = {k: v for k, v in data.items() if k != "at_rank"}
        fields["shape"] = tuple(fields["shape"])
        fields["energy_grid"] = tuple(fields["energy_grid"])
        return cls(**fields, sigma_sq=sigma_sq)

    def spectrum(self) -> sp.DeltaSpectrum:
        """The full spectrum; ``sigma_sq`` is empty when not loaded (grid ranks only)."""
        return self._spectrum

    @functools.cached_property
    def _spectrum(self) -> sp.DeltaSpectrum:
        return sp.DeltaSpectrum(
            shape=self.shape,
            sigma_sq=self.sigma_sq if self.sigma_sq is not None else np.zeros(0),
            energy=self.energy,
            finetune_norm_sq=self.finetune_norm_sq,
            base_norm_sq=self.base_norm_sq,
            mean_abs_delta=self.mean_abs_delta,
            noise_energy=self.noise_energy,
        )

    @functools.cached_property
    def _cumulative(self) -> np.ndarray | None:
        """Σ_{i≤r} σ_i² / E for r = 1…k, computed once per record; None without the spectrum.

        Every rank read is then one lookup: a slider move over 560 matrices of k = 8192 used
        to re-sum each spectrum for each rank it asked about (seconds; bench/summary_speed.py).
        """
        return None if self.sigma_sq is None else sp.cumulative_energy(self.spectrum())

    def __getstate__(self) -> dict[str, Any]:
        # Pickles (Ray results) carry the record, not what is derived from it.
        return {k: v for k, v in self.__dict__.items() if k not in ("_cumulative", "_spectrum")}

    def energy_retained(self, rank: int) -> float:
        """Exact at any rank with the spectrum loaded; at grid ranks (and r ≥ k) without it."""
        if rank >= self.full_rank or self.energy == 0.0:
            return 1.0  # exactly: the rank-k "approximation" is Δ itself (as spectrum.energy_retained)
        if rank <= 0:
            return 0.0
        curve = self._cumulative
        if curve is not None:
            return float(curve[min(rank, len(curve)) - 1])
        if rank in RANK_GRID:
            return self.energy_grid[RANK_GRID.index(rank)]
        raise SpectrumNotLoadedError(
            f"Rank {rank} of {self.name} needs the full spectrum, which this report was loaded without. "
            f"Load the .spectra.safetensors file written next to the report, or pick a rank from {RANK_GRID[:10]}."
        )

    def retained_at(self, ranks: Sequence[int]) -> np.ndarray:
        """``energy_retained`` at each of ``ranks``: one array lookup when the spectrum is loaded.

        Example: σ² = (16, 9, 4, 1) at ranks (1, 2, 4, 9) → (16/30, 25/30, 1, 1).
        """
        wanted = np.asarray(ranks, dtype=np.int64)
        curve = self._cumulative
        if curve is None or self.energy == 0.0 or len(curve) == 0:
            return np.array([self.energy_retained(int(r)) for r in wanted], dtype=np.float64)
        kept = curve[np.clip(wanted, 1, len(curve)) - 1]
        return np.where(wanted >= self.full_rank, 1.0, np.where(wanted <= 0, 0.0, kept))

    def metrics(self, rank: int) -> sp.RankMetrics:
        return sp.metrics_from_retained(self.spectrum(), rank, self.energy_retained(rank))

    def noise_floor_retained(self, rank: int) -> float:
        return sp.noise_floor_retained(self.spectrum(), rank)

    def noise_floor_at(self, ranks: Sequence[int]) -> np.ndarray:
        """``noise_floor_retained`` at each of ``ranks``, as one array."""
        return sp.noise_floor_curve(self.spectrum(), np.asarray(ranks, dtype=np.int64))


@dataclass(frozen=True)
class VectorResult:
    """A 1-D tensor (norm, bias): a LoRA cannot carry it, so its whole delta is lost."""

    name: str
    layer: int | None
    module: str
    shape: tuple[int, ...]
    energy: float  # ‖Δ‖²
    finetune_norm_sq: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VectorResult:
        return cls(**{**data, "shape": tuple(data["shape"])})


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
        from lorafid.audit.summary import summarize  # summary.py reads these records: import it late

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
        schema = data.get("schema") if isinstance(data, dict) else None
        if schema != SCHEMA:
            raise LorafidError(
                f"Not a lorafid report (schema {schema!r}, expected {SCHEMA!r}); "
                "was it written by another tool or a newer lorafid?"
            )
        try:
            return cls._decode(data)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise LorafidError(
                f"The report is incomplete or damaged ({what}). Write it again with lorafid audit --out."
            ) from e

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


_MOVED_TO_SUMMARY = ("GroupSummary", "Summary", "percent", "summarize", "aggregate_rank_for_energy")


def __getattr__(name: str) -> Any:
    """Summaries moved to ``lorafid.audit.summary``; ``from lorafid.audit.report import percent`` still works."""
    if name in _MOVED_TO_SUMMARY:
        from lorafid.audit import summary

        return getattr(summary, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
