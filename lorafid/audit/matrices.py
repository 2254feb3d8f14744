"""Per-matrix records of an audit: the statistics of one Δ that hold at every rank.

``MatrixResult`` keeps a matrix's scalar statistics plus its cumulative energy on a fixed
rank grid (``RANK_GRID``) and, when known, its full spectrum; any rank's metrics are
re-derived from them. ``VectorResult`` is a 1-D tensor a LoRA cannot carry. The report
(``report.py``) and the summaries (``summary.py``) both read these records.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lorafid.audit import spectrum as sp
from lorafid.errors import SpectrumNotLoadedError

RANK_GRID: tuple[int, ...] = tuple(2**i for i in range(16))  # 1 … 32768: beyond any LLM's k
"""Ranks at which the cumulative energy of every matrix is kept in the JSON."""


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
