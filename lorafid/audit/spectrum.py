"""Δ = W_finetune − W_base → singular-value energies → every metric at any rank.

This is the only module that does linear algebra. It takes two tensors and returns plain
numbers (NumPy float64), so callers never hold device tensors and any rank can be
re-derived later from the stored spectrum without touching weights.

Method (the numerics policy, recorded in every report as ``NUMERICS``):
    Δ in float32 (exact for bf16/fp16 inputs: both fit in float32 and their difference
    is rounded once). The eigenvalues of the Gram matrix ΔᵀΔ (or ΔΔᵀ, the smaller side)
    are exactly σ_i². The Gram matrix is formed in float32 with TF32 off, and its
    eigenvalues are computed in float32, then again in float64 only where float32's
    rounding could move the cumulative-energy curve by more than ``FLOAT32_NOISE_BUDGET``
    (see ``float32_noise_share``): in practice, nearly exactly-low-rank deltas. Measured
    on 2 CPU cores for a 4096×4096 Gram: ``eigvalsh`` 1.0-1.9 s in float32 against
    2.3-3.4 s in float64; the curve's error vs a float64 SVD stays ≤ 3e-7 either way
    (docs/ARCHITECTURE.md, "Numerics policy"). ``svdvals`` in float32 takes 10.8 s for a
    14336×4096 Δ, and the full SVD with U and V that a LoRA extractor runs costs more still.

Not done here: randomized / top-r SVD (biased: it under-counts retained energy), any I/O,
any notion of layers or files.

Worked example (the seed post's 4×4): Δ = diag(4, 3, 2, 1), σ² = (16, 9, 4, 1), E = 30.
At rank 2 the LoRA keeps diag(4, 3, 0, 0): energy_retained = 25/30, mse = 5/16,
cosine_distance = 1 − sqrt(25/30) ≈ 0.0871.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

# Re-exported: callers catch ``sp.NonFiniteWeightsError``; the class lives with every other error.
from lorafid.errors import NonFiniteWeightsError as NonFiniteWeightsError

ENERGY_TARGETS: tuple[float, ...] = (0.5, 0.9, 0.99)
"""Energy shares for ``rank_for_energy``: "what rank would have kept half / 90% / 99%"."""

NUMERICS: dict[str, str | bool] = {
    "method": "gram-eigvalsh",  # exact full spectrum; never randomized SVD
    "delta_dtype": "float32",
    "gram_dtype": "float32",
    # float32 eigenvalues, recomputed in float64 where their noise could exceed FLOAT32_NOISE_BUDGET
    "eigen_dtype": "float32-checked",
    "tf32": False,
}
"""The numerics policy, in one place; ``report.py`` copies it into every report."""


class _FloatLayout(NamedTuple):
    """Where a float dtype keeps its exponent, and how fine its rounding step is."""

    mantissa_bits: int  # the rounding step (ulp) of a stored w is 2**(exponent(w) − mantissa_bits)
    as_int: torch.dtype  # the integer dtype of the same width, to view the bits
    exponent_mask: int  # the exponent field within those bits


# Storage dtypes with a rounding floor (the storage-precision noise floor); others have none.
_FLOAT_LAYOUTS: dict[torch.dtype, _FloatLayout] = {
    torch.bfloat16: _FloatLayout(7, torch.int16, 0x7F80),
    torch.float16: _FloatLayout(10, torch.int16, 0x7C00),
    torch.float32: _FloatLayout(23, torch.int32, 0x7F800000),
    torch.float64: _FloatLayout(52, torch.int64, 0x7FF0000000000000),
}
FLOAT32_NOISE_BUDGET = 1e-7
"""Largest estimated error of the cumulative-energy curve (a share of E) accepted from float32
eigenvalues: a hundredth of the 1e-5 bar, the rest is left for the float32 Gram itself."""

# Column block of the CPU Gram product: 512 ran best for k = 4096 on 2 cores (nb=2: 2.0 s,
# nb=4: 1.67 s, nb=8: 1.55 s, full product: 2.8 s).
_GRAM_BLOCK = 512


@dataclass(frozen=True)
class DeltaSpectrum:
    """Everything about one Δ that any metric at any rank needs, as plain numbers.

    ``sigma_sq`` holds all k = min(m, n) squared singular values, descending, clipped at 0.
    ``energy`` is Σσ² (= ‖Δ‖_F²), taken from the unclipped eigenvalues so that the
    cumulative curve ends at exactly 1.
    """

    shape: tuple[int, int]
    sigma_sq: np.ndarray = field(compare=False, repr=False)
    energy: float
    finetune_norm_sq: float  # ‖W_ft‖_F², for errors relative to the served weight
    base_norm_sq: float
    mean_abs_delta: float  # = the seed post's mean_diff_value
    noise_energy: float  # estimated energy of storage rounding in Δ (see noise_floor_energy)
    eigen_dtype: str = field(default="float64", compare=False)  # what the eigenvalues were computed in

    @property
    def full_rank(self) -> int:
        """k = min(m, n): the rank the fine-tune's change may use (the post's diff_rank)."""
        return min(self.shape)

    @property
    def unchanged(self) -> bool:
        """True when Δ is exactly zero: loss 0 at every rank, never NaN."""
        return self.energy == 0.0


@dataclass(frozen=True)
class RankMetrics:
    """Every metric at one rank r (r above k behaves as k); defined in docs/ARCHITECTURE.md, "Metrics"."""

    rank: int
    energy_retained: float
    mse: float
    cosine_distance: float
    delta_rel_error: float
    weight_rel_error: float
    adapter_params: int  # r·(m + n): the size of a rank-r LoRA of this matrix
    full_params: int  # m·n


@contextmanager
def exact_matmul() -> Iterator[None]:
    """Turn TF32 off for the duration: TF32 keeps 10 mantissa bits, too few for 1e-5."""
    previous = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous[0])
        torch.backends.cuda.matmul.allow_tf32 = previous[1]


def delta_spectrum(base: torch.Tensor, finetune: torch.Tensor) -> DeltaSpectrum:
    """Compute the full spectrum of Δ = finetune − base and its scalar statistics.

    Args:
        base, finetune: 2-D tensors of equal shape, float16/bfloat16/float32/float64, on
            any device (the math runs where the tensors are).

    Returns:
        A ``DeltaSpectrum`` of NumPy/Python numbers (no device tensors).

    Raises:
        ValueError: shapes differ or are not 2-D (a caller bug: pairing checks shapes).
        NonFiniteWeightsError: NaN/Inf in either weight.
    """
    with torch.no_grad(), exact_matmul():
        delta, stats = _delta_and_stats(base, finetune)
        gram = _gram_lower(delta)
        del delta
        eigenvalues, eigen_dtype = _checked_eigenvalues(gram)
    return _spectrum(base.shape, eigenvalues.cpu().numpy(), stats, eigen_dtype)


def _checked_eigenvalues(gram: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Eigenvalues of the float32 Gram (lower triangle): float32, or float64 where that could matter.

    Float32 ``eigvalsh`` takes about half the time of float64 at k = 4096 on CPU. Its
    eigenvalues are each within k·u·λ_max of the exact ones (u = 2**-24; the textbook bound
    for a backward-stable symmetric solver), and their errors cancel in the partial sums that
    make the curve (measured ≤ 3e-7 of E on flat, decaying and exactly-low-rank spectra). What
    does not cancel is the noise in eigenvalues that are truly zero; ``float32_noise_share``
    estimates it, and above ``FLOAT32_NOISE_BUDGET`` the eigenvalues are computed again in float64.
    """
    values = torch.linalg.eigvalsh(gram, UPLO="L")
    if float32_noise_share(values) <= FLOAT32_NOISE_BUDGET:
        return values.to(torch.float64), "float32"
    return torch.linalg.eigvalsh(gram.to(torch.float64), UPLO="L"), "float64"


def float32_noise_share(eigenvalues: torch.Tensor) -> float:
    """Estimated share of E by which float32 eigenvalues of a Gram matrix may move the curve.

    A Gram matrix has no negative eigenvalue, so the most negative computed one, −ν, is pure
    rounding noise, and measures it. Eigenvalues within ν of zero cannot be told from that
    noise: each may be off by up to ν, and partial sums of them do not cancel (a nearly
    exactly-low-rank Δ has thousands). The estimate is ``count(λ ≤ ν) · ν / E``; 0 when no
    eigenvalue is negative. Example: Δ of exact rank 8 at k = 4096 in float32: ν ≈ 3.4·u·λ_max,
    4088 eigenvalues at the noise level, estimate 1e-4 → float64. A bf16 full fine-tune's Δ at
    the same size has no negative eigenvalue → 0 → float32.
    """
    values = eigenvalues.to(torch.float64)
    total = float(values.sum())
    noise = -float(values.min()) if values.numel() else 0.0
    if noise <= 0.0:
        return 0.0
    if total <= 0.0:
        return math.inf
    return int((values <= noise).sum()) * noise / total


@dataclass(frozen=True)
class Decomposition:
    """Δ with its top singular directions: the exact rank-r truncation for any r ≤ ``max_rank``.

    The directions are eigenvectors of the same Gram matrix whose eigenvalues make the
    spectrum, so the audit's numbers and the extraction describe one decomposition. With
    ``side == "right"`` (m ≥ n, Gram = ΔᵀΔ) ``vectors`` holds V_r (n × r) and Δ_r = (ΔV_r)V_rᵀ;
    with ``side == "left"`` (m < n, Gram = ΔΔᵀ) it holds U_r (m × r) and Δ_r = U_r(U_rᵀΔ).
    Tensors are float32 on the device of the inputs; not for storage (Δ is a whole matrix).
    ``solver`` says how the directions were found (``decompose``): "float32-refined" or "float64".

    Example: Δ = diag(4, 3, 2, 1), rank 2 → factors B (4×2), A (2×4) with B @ A = diag(4, 3, 0, 0).
    """

    delta: torch.Tensor = field(repr=False)
    vectors: torch.Tensor = field(repr=False)  # columns in order of decreasing σ
    side: str  # "right" or "left"
    solver: str = "float64"

    @property
    def max_rank(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def full_rank(self) -> int:
        """k = min(m, n): from this rank on, the truncation is Δ itself."""
        return min(self.delta.shape)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with Δ_r = B @ A, B of shape m × r and A of shape r × n (r capped at max_rank).

        PEFT's names: B is ``lora_B`` (out × r) and A is ``lora_A`` (r × in) for a weight of
        shape out × in, before any ``lora_alpha / r`` scaling.
        """
        r = max(0, min(rank, self.max_rank))
        top = self.vectors[:, :r]
        with torch.no_grad(), exact_matmul():
            if self.side == "right":
                return self.delta @ top, top.T.contiguous()
            return top.contiguous(), top.T @ self.delta

    def truncated(self, rank: int) -> torch.Tensor:
        """Δ_r, the best rank-r approximation of Δ (Eckart–Young), as a dense float32 matrix.

        At or above the full rank k this is Δ itself (exactly, with no product and whatever
        ``max_rank``): the tensor this decomposition holds, so read it, never write to it.
        """
        if rank >= self.full_rank:
            return self.delta
        b, a = self.factors(rank)
        with torch.no_grad(), exact_matmul():
            return b @ a


def decompose(base: torch.Tensor, finetune: torch.Tensor, max_rank: int) -> tuple[DeltaSpectrum, Decomposition]:
    """The spectrum of Δ (as ``delta_spectrum``) and its top ``max_rank`` directions.

    One symmetric eigendecomposition of the Gram matrix gives both, so one read of the weights
    serves every metric and every rank-r variant up to ``max_rank``. No randomized SVD: the
    directions are those of the exact truncated SVD, up to float rounding (directions of
    repeated singular values are any basis of their space, as in any SVD).

    How (``_top_eigenpairs``): a float32 ``eigh`` (about half the time of float64 on CPU), its
    eigenvalues checked by the audit's noise guard (``float32_noise_share``), then a float64
    Rayleigh–Ritz step in the span of the top float32 eigenvectors (``_refined_top``), accepted
    where the residuals bound the served weights' error within half the bar. Where they do
    not, or the noise guard fires (nearly exactly-low-rank Δ), or the window is over 0.4·k
    (the refinement would then cost what float64 saves: ``max_rank`` above about k/5), the
    float64 ``eigh`` of the same Gram matrix decides. Either way each served weight
    W_base + Δ_r is within 1e-6 relative of the float64 SVD's (``tests/audit/test_spectrum.py``).
    ``max_rank`` ≤ 0 computes no eigenvectors.

    Raises: as ``delta_spectrum``.
    """
    with torch.no_grad(), exact_matmul():
        delta, stats = _delta_and_stats(base, finetune)
        gram = _gram_lower(delta)
        keep = max(0, min(max_rank, gram.shape[0]))
        eigenvalues, top, solver = _top_eigenpairs(gram, keep, stats.finetune_norm_sq)
        del gram
    eigen_dtype = "float64" if solver == "float64" else "float32"
    spectrum = _spectrum(base.shape, eigenvalues.cpu().numpy(), stats, eigen_dtype)
    side = direction_side(delta.shape)
    if spectrum.unchanged:
        top = top[:, :0]  # Δ = 0: every rank-r truncation is 0, with no directions
    # Row-major, as directions read back from a file are: the product Δ·V_r then takes the same
    # kernel (and rounding) whether the directions are fresh or kept (``direction_cache``).
    return spectrum, Decomposition(delta=delta, vectors=top.contiguous(), side=side, solver=solver)


def direction_side(shape: torch.Size | tuple[int, ...]) -> str:
    """Which side of an m × n Δ the Gram matrix, and so the directions, are on: "right" (m ≥ n:
    ΔᵀΔ, V of length n) or "left" (m < n: ΔΔᵀ, U of length m). Either way a direction has
    min(m, n) entries."""
    return "right" if shape[0] >= shape[1] else "left"


REFINE_ERROR_BUDGET = 5e-7
"""Largest estimated error of a served weight W_base + Δ_r, relative to ‖W_ft‖, accepted from the
refined float32 directions: half the 1e-6 bar (the estimate is a bound, and the float32 rounding
of the served weight, ~3e-8, takes far less than the other half). Above it, float64 decides."""

# The float32 path is taken where its Rayleigh–Ritz window is at most this share of k: the step costs
# about 2·k²·w float64 flops, and at k = 1024 a window of k/2 cost what the float64 eigh saves
# (measured, ``bench.decompose``: rank 256 of a 4096×1024 Δ, 0.88× with a 512-wide window).
_WINDOW_SHARE = 0.4
# Directions beyond the kept ones in the window: the wider it is, the larger the gap to what lies
# outside it and the smaller the residual bound. A fine-tune's Δ is mostly a noise bulk under a few
# strong directions: with 32 more, a rank-64 window in the bulk failed the budget for 1024-wide bf16
# matrices; with 256 more it passed, served weights 2e-7 from the float64 SVD's (``bench.candidates``).
_WINDOW_MARGIN = 256


def _window(keep: int, k: int) -> int:
    """Width of the Rayleigh–Ritz window for the top ``keep`` of k directions (see ``_WINDOW_MARGIN``)."""
    return keep + max(keep, min(_WINDOW_MARGIN, k // 4))


def _top_eigenpairs(gram: torch.Tensor, keep: int, weight_norm_sq: float) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(every eigenvalue, float64; the top ``keep`` eigenvectors, float32, descending; the solver).

    ``gram`` holds the Gram matrix in its lower triangle (float32). With ``keep == 0`` only the
    eigenvalues are computed, exactly as ``delta_spectrum`` does. ``weight_norm_sq`` is ‖W_ft‖²,
    the scale of the served weights' error budget.
    """
    k = gram.shape[0]
    if keep == 0:
        values, eigen_dtype = _checked_eigenvalues(gram)
        return values, gram.new_zeros(k, 0), eigen_dtype
    if _window(keep, k) <= _WINDOW_SHARE * k:
        values, vectors = torch.linalg.eigh(gram, UPLO="L")
        if float32_noise_share(values) <= FLOAT32_NOISE_BUDGET:
            refined = _refined_top(gram, values, vectors, keep, REFINE_ERROR_BUDGET**2 * weight_norm_sq)
            if refined is not None:
                return values.to(torch.float64), refined, "float32-refined"
        del vectors
    values, vectors = torch.linalg.eigh(gram.to(torch.float64), UPLO="L")
    # eigh sorts ascending: the largest `keep` eigenvalues are the last columns.
    top = vectors[:, k - keep :].flip(-1).to(torch.float32)
    return values, top, "float64"


def _refined_top(
    gram: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor, keep: int, error_budget_sq: float
) -> torch.Tensor | None:
    """The top ``keep`` eigenvectors by a float64 Rayleigh–Ritz step in the span of the top
    float32 ones, or None where the served weights they give could miss the bar.

    The window: the top w = ``_window(keep, k)`` float32 eigenvectors, made orthonormal in
    float64. Within it, the float64 ``eigh`` of the projected Gram matrix separates directions
    however close their eigenvalues (float32 alone mixes eigenvalues closer than ~4·u·λ_max,
    a fast-decaying tail or a noise bulk). What it cannot remove is a component outside the
    window; the residual of each Ritz pair (θ_j, v_j), ρ_j = ‖G·v_j − θ_j·v_j‖, bounds it:
    sin ≤ ρ_j / (θ_j − λ_out), λ_out the largest eigenvalue outside (Davis–Kahan). Such a
    component of size c moves Δ_r by about c·sqrt(θ_j + λ_out) in Frobenius norm; summed over
    the kept directions, its square must stay within ``error_budget_sq``.
    Costs about 2·k²·w float64 flops (one product G·q), a fraction of the float64 ``eigh`` for w ≤ 0.4·k.
    """
    k = gram.shape[0]
    width = _window(keep, k)  # well below k (``_top_eigenpairs``)
    basis = vectors[:, k - width :].to(torch.float64)  # eigh sorts ascending: the top w columns
    try:
        # Cholesky QR: the float32 eigenvectors are orthonormal to about u·sqrt(k) already.
        chol = torch.linalg.cholesky(basis.T @ basis)
    except torch.linalg.LinAlgError:
        return None
    q = torch.linalg.solve_triangular(chol, basis.T, upper=False).T
    del basis
    # G = L + Lᵀ − diag(L) from its lower triangle L, made whole once: one product G·q instead of
    # the two that L alone needs (0.017 s against 0.027 s at k = 1024, w = 320, one thread).
    full = gram.to(torch.float64).tril_()
    full += full.tril(-1).T
    gq = full @ q
    del full
    theta, rotation = torch.linalg.eigh(q.T @ gq)
    theta, rotation = theta[width - keep :].flip(0), rotation[:, width - keep :].flip(-1)
    top = q @ rotation
    residual = (gq @ rotation - top * theta).norm(dim=0)
    outside = float(values[k - width - 1])  # the largest float32 eigenvalue below the window
    gap = theta - outside
    if not bool((gap > 0).all()):
        return None
    error_sq = float(((residual / gap).square() * (theta + max(outside, 0.0))).sum())
    if not error_sq <= error_budget_sq:
        return None
    return top.to(torch.float32)


class _DeltaStats(NamedTuple):
    finetune_norm_sq: float
    base_norm_sq: float
    mean_abs_delta: float
    noise_energy: float


def _delta_and_stats(base: torch.Tensor, finetune: torch.Tensor) -> tuple[torch.Tensor, _DeltaStats]:
    """Δ in float32 and the scalars every spectrum records; checks shapes and finiteness."""
    if base.ndim != 2 or base.shape != finetune.shape:
        raise ValueError(f"need two 2-D tensors of one shape, got {base.shape} and {finetune.shape}")
    # One allocation, Δ built in place. copy=True: for float32 input, .to() would
    # otherwise return the caller's tensor and sub_ would overwrite their weights.
    delta = finetune.to(torch.float32, copy=True)
    finetune_norm_sq = _sum_of_squares(delta)  # delta still holds W_ft here
    delta.sub_(base)
    # One pass gives mean |Δ| and the finiteness check: a NaN/Inf makes the sum non-finite.
    abs_sum = float(delta.abs().sum()) if delta.numel() else 0.0
    if not math.isfinite(abs_sum):
        if not bool(torch.isfinite(delta).all()):
            raise NonFiniteWeightsError("NaN or Inf in the weights")
        abs_sum = float(delta.abs().sum(dtype=torch.float64))  # finite values, float32 sum overflowed
    mean_abs = abs_sum / delta.numel() if delta.numel() else 0.0
    stats = _DeltaStats(finetune_norm_sq, _sum_of_squares(base), mean_abs, noise_floor_energy(finetune))
    return delta, stats


def _spectrum(
    shape: torch.Size | tuple[int, ...], eigenvalues: np.ndarray, stats: _DeltaStats, eigen_dtype: str = "float64"
) -> DeltaSpectrum:
    """A ``DeltaSpectrum`` from the Gram matrix's eigenvalues (any order) and Δ's scalars."""
    rows, cols = int(shape[0]), int(shape[1])
    signed = np.sort(eigenvalues)[::-1]
    energy = float(signed.sum())
    if energy <= 0.0 or stats.mean_abs_delta == 0.0:
        # Exactly equal weights: Δ = 0 and nothing can be lost.
        energy, signed = 0.0, np.zeros_like(signed)
    return DeltaSpectrum(
        shape=(rows, cols),
        sigma_sq=np.clip(signed, 0.0, None),
        energy=energy,
        finetune_norm_sq=stats.finetune_norm_sq,
        base_norm_sq=stats.base_norm_sq,
        mean_abs_delta=stats.mean_abs_delta,
        noise_energy=min(stats.noise_energy, energy),
        eigen_dtype=eigen_dtype,
    )


def noise_floor_energy(weight: torch.Tensor) -> float:
    """Estimated energy that rounding the fine-tune to its storage dtype put into Δ.

    Rounding to nearest leaves an error uniform in ±ulp/2, variance ulp²/12, where
    ulp(w) = 2**(e − mantissa_bits) for |w| = f·2**e with f in [0.5, 1). Summed over the
    matrix, this is energy that no rank recovers: spread evenly over the spectrum, a
    rank-r LoRA keeps about r/k of it. Example: one bf16 weight of 1.0 has
    ulp = 2**(1 − 1 − 7) = 2**-7, so its rounding noise energy is 2**-14 / 12.
    """
    layout = _FLOAT_LAYOUTS.get(weight.dtype)
    if layout is None:
        return 0.0
    # Keeping only the exponent field of each weight's bits gives the float 2**(e − 1) (sign,
    # mantissa cleared), so ulp = that · 2**-bits with no frexp/ldexp pass: 0.1 s instead of
    # 2.8 s for 14336×4096 bf16 weights on 2 CPU cores. Zeros and subnormals map to 0.
    power = (weight.view(layout.as_int) & layout.exponent_mask).view(weight.dtype)
    return _sum_of_squares(power) * 4.0**-layout.mantissa_bits / 12.0


def _sum_of_squares(x: torch.Tensor) -> float:
    """Σx², summed in float32 by torch's cascaded sum (relative error ~1e-8 at 58M elements).

    Not ``torch.linalg.vector_norm(x, dtype=torch.float32)`` nor ``torch.dot``: on CPU they
    accumulate with too few partial sums and were off by 1% and 0.1% on a 14336×4096 matrix.
    """
    if x.dtype == torch.float64:
        return float(x.square().sum())
    x32 = x.to(torch.float32)
    squares = x32.square_() if x32 is not x else x32.square()  # never overwrite the caller's
    total = float(squares.sum())
    return total if math.isfinite(total) else float(x.to(torch.float64).square().sum())


def _gram_lower(delta: torch.Tensor) -> torch.Tensor:
    """The float32 Gram matrix of Δ's smaller side; only its lower triangle is filled.

    ``eigvalsh(..., UPLO="L")`` reads only the lower triangle, so on CPU the products above
    the diagonal are skipped, block by block: 1.55 s instead of 2.8 s for a 14336×4096 Δ
    on 2 CPU cores, with bit-identical entries. GPUs get the plain product (not measured).
    """
    x = delta if direction_side(delta.shape) == "right" else delta.T  # Gram = xᵀx, k×k
    k = x.shape[1]
    if delta.device.type != "cpu" or k <= _GRAM_BLOCK:
        return x.T @ x
    gram = torch.zeros(k, k, dtype=torch.float32, device=delta.device)
    starts = [*range(0, k, _GRAM_BLOCK), k]
    for i in range(len(starts) - 1):
        rows_i = slice(starts[i], starts[i + 1])
        for j in range(i + 1):
            cols_j = slice(starts[j], starts[j + 1])
            gram[rows_i, cols_j] = x[:, rows_i].T @ x[:, cols_j]
    return gram


def cumulative_energy(spectrum: DeltaSpectrum) -> np.ndarray:
    """Share of E kept at rank 1..k (index r−1). All ones for an unchanged matrix."""
    if spectrum.unchanged:
        return np.ones(spectrum.full_rank)
    kept = np.cumsum(spectrum.sigma_sq) / spectrum.energy
    return np.clip(np.maximum.accumulate(kept), 0.0, 1.0)


def energy_retained(spectrum: DeltaSpectrum, rank: int) -> float:
    """Σ_{i≤r} σ_i² / E, the share of the fine-tune's change a rank-r LoRA keeps."""
    if rank >= spectrum.full_rank or spectrum.unchanged:
        return 1.0  # exactly: the rank-k "approximation" is Δ itself
    if rank <= 0:
        return 0.0
    curve = cumulative_energy(spectrum)
    return float(curve[min(rank, len(curve)) - 1])


def metrics_from_retained(spectrum: DeltaSpectrum, rank: int, retained: float) -> RankMetrics:
    """The metric table from the retained-energy share at ``rank``.

    Split out so that a report without its full spectrum (only the cumulative curve on a
    rank grid) derives the same numbers at the grid's ranks.
    """
    rows, cols = spectrum.shape
    lost_energy = max(0.0, 1.0 - retained) * spectrum.energy
    weight_norm = math.sqrt(spectrum.finetune_norm_sq)
    return RankMetrics(
        rank=rank,
        energy_retained=retained,
        mse=lost_energy / (rows * cols),
        cosine_distance=0.0 if spectrum.unchanged else 1.0 - math.sqrt(retained),
        delta_rel_error=math.sqrt(max(0.0, 1.0 - retained)) if not spectrum.unchanged else 0.0,
        weight_rel_error=math.sqrt(lost_energy) / weight_norm if weight_norm > 0 else 0.0,
        adapter_params=min(rank, spectrum.full_rank) * (rows + cols),
        full_params=rows * cols,
    )


def metrics_at_rank(spectrum: DeltaSpectrum, rank: int) -> RankMetrics:
    """Every metric at ``rank``, exactly, from the stored spectrum (``RankMetrics``)."""
    return metrics_from_retained(spectrum, rank, energy_retained(spectrum, rank))


def rank_for_energy(spectrum: DeltaSpectrum, share: float) -> int:
    """Smallest r with energy_retained(r) ≥ share; 0 for an unchanged matrix.

    Example: σ² = (16, 9, 4, 1) → share 0.5 needs r = 1 (16/30 = 0.53), 0.9 needs r = 3.
    """
    if spectrum.unchanged:
        return 0
    curve = cumulative_energy(spectrum)
    # A tiny tolerance so that a share reached up to float rounding counts as reached.
    return int(np.searchsorted(curve, share - 1e-12, side="left")) + 1


def stable_rank(spectrum: DeltaSpectrum) -> float:
    """E / σ_1²: how many directions carry Δ's energy, robustly (1 for a rank-1 Δ)."""
    if spectrum.unchanged:
        return 0.0
    return spectrum.energy / float(spectrum.sigma_sq[0])


def effective_rank(spectrum: DeltaSpectrum) -> float:
    """exp of the Shannon entropy of σ_i²/E (Roy & Vetterli): k for a flat spectrum."""
    if spectrum.unchanged:
        return 0.0
    p = spectrum.sigma_sq / spectrum.sigma_sq.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def noise_floor_retained(spectrum: DeltaSpectrum, rank: int) -> float:
    """Best energy_retained a rank-r LoRA could show if the rest of Δ were pure rounding.

    The rounding noise (``noise_energy``) is spread evenly over the k directions, so
    rank r keeps r/k of it and loses the rest: ``1 − noise·(1 − r/k)/E``. A measured
    retention close to this line is loss from storage precision, not from the rank.
    """
    return float(noise_floor_curve(spectrum, np.array([rank]))[0])


def noise_floor_curve(spectrum: DeltaSpectrum, ranks: np.ndarray) -> np.ndarray:
    """``noise_floor_retained`` at each of ``ranks`` (the charts draw it at ~30 ranks per matrix).

    Example: noise 0.3 of E = 30, k = 4: ranks (1, 4) → (1 − 0.3·0.75/30, 1) = (0.9925, 1).
    """
    if spectrum.unchanged:
        return np.ones(len(ranks))
    k = spectrum.full_rank
    kept_share = np.minimum(ranks, k) / k
    return 1.0 - spectrum.noise_energy * (1.0 - kept_share) / spectrum.energy
