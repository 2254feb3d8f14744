"""The variants a forward runs, and each one's weights, built from the two models' tensors as read.

A variant (``Variant``) is the fine-tune, the base, or a served extraction at rank r: each 2-D
matrix inside the blocks is W_base + Δ_r, Δ_r the exact rank-r truncated SVD of W_ft − W_base,
and every tensor a LoRA server cannot carry (embeddings, ``lm_head``, norms, biases) is the
base's, or with ``keep_extras`` the fine-tune's. Hooks may change a variant's final weights
(``weight_hook``, e.g. rounding to 8 bits) or the base under its delta (``base_hook``, a
quantized base).

``VariantWeights`` builds them: Δ of each matrix is decomposed once (``spectrum.decompose``)
for every asked rank below its full rank; at or above it, a served matrix is the fine-tune's
own tensor. Between passes over the same weights only the directions are kept (k × rank, not
Δ), and Δ is rebuilt from the tensors read again; between runs, in a ``DirectionCache`` on disk.

Not here: reading the tensors and running the blocks (``forward``), the linear algebra
(``spectrum``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from lorafid.audit import spectrum as sp
from lorafid.audit.pairing import is_embedding
from lorafid.behaviour.direction_cache import CachedDirections, DirectionCache
from lorafid.errors import MissingModelFileError

VARIANT_KINDS: tuple[str, ...] = ("finetune", "base", "served")
WeightHook = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Variant:
    """One set of weights to run: the fine-tune, the base, or a served extraction at a rank.

    Example: ``Variant("rank-64+extras", "served", rank=64, keep_extras=True)``.
    """

    name: str  # "finetune", "base", "rank-64", "rank-64+extras", ...: the key in every result
    kind: str  # "finetune" | "base" | "served"
    rank: int | None = None  # for kind == "served": the rank of every block matrix's Δ_r
    keep_extras: bool = False  # served: tensors a LoRA server cannot carry come from the fine-tune (True) or the base
    # Applied to every final weight of this variant (model parameter name, float tensor on the
    # compute device) -> the weight to use, e.g. rounding to 8 bits as a provider might serve it.
    weight_hook: WeightHook | None = field(default=None, compare=False)
    # Served variants only: applied to the base's weights before the rank-r delta is added, as a
    # LoRA server whose base is quantized (e.g. fp8) computes W = Q(W_base) + B·A.
    base_hook: WeightHook | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in VARIANT_KINDS:
            raise ValueError(
                f"Variant {self.name!r}: kind must be one of {', '.join(VARIANT_KINDS)}, not {self.kind!r}"
            )
        if self.kind == "served" and (self.rank is None or self.rank < 0):
            raise ValueError(f"Variant {self.name!r}: a served variant needs a rank ≥ 0")
        if self.kind != "served" and (self.rank is not None or self.keep_extras or self.base_hook):
            raise ValueError(f"Variant {self.name!r}: rank, keep_extras and base_hook apply to served variants only")


def served(rank: int, keep_extras: bool = False) -> Variant:
    """The served extraction at ``rank``, named ``rank-R`` or ``rank-R+extras``."""
    return Variant(f"rank-{rank}{'+extras' if keep_extras else ''}", "served", rank=rank, keep_extras=keep_extras)


FINETUNE = Variant("finetune", "finetune")
BASE = Variant("base", "base")


class VariantWeights:
    """Each variant's weights on ``device`` in ``dtype``, from ``{"base": {...}, "finetune": {...}}``
    tensors as read. ``hold(purpose, tensors)`` is told what is materialised (peak memory) and
    ``timed(seconds)`` how long each decomposition took."""

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        hold: Callable[[str, Mapping[str, torch.Tensor] | Sequence[torch.Tensor]], None],
        timed: Callable[[float], None],
        cache: DirectionCache | None = None,
        reused: Callable[[], None] = lambda: None,
    ) -> None:
        self.device, self.dtype = device, dtype
        self._hold, self._timed, self._reused = hold, timed, reused
        self.cache = cache
        self.kept: dict[str, CachedDirections] = {}  # matrix name -> its directions, between passes

    def kept_vectors(self) -> list[torch.Tensor]:
        """The directions kept between passes (for the memory count)."""
        return [kept.vectors for kept in self.kept.values()]

    def final(self, variant: Variant, name: str, tensor: torch.Tensor) -> torch.Tensor:
        weight = tensor.to(self.device, self.dtype, non_blocking=True)
        return variant.weight_hook(name, weight) if variant.weight_hook else weight

    def extra(
        self,
        variant: Variant,
        name: str,
        raw: dict[str, dict[str, torch.Tensor]],
        shared: dict[tuple[str, str], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """A tensor a LoRA server does not carry: the base's, or the fine-tune's where the variant keeps it.

        With ``shared``, variants without a weight hook share one compute-dtype copy per side: an
        8B model's head is 2.1 GB in float32, and seven variants need two copies, not seven.
        """
        side = "finetune" if variant.kind == "finetune" or variant.keep_extras else "base"
        if name not in raw[side]:
            raise MissingModelFileError(f"The {side} has no tensor {name}; cannot run the {variant.name} variant.")
        if shared is None or variant.weight_hook is not None:
            return self.final(variant, name, raw[side][name])
        if (side, name) not in shared:
            shared[side, name] = self.final(variant, name, raw[side][name])
        return shared[side, name]

    def _served_matrix(
        self,
        variant: Variant,
        name: str,
        raw: dict[str, dict[str, torch.Tensor]],
        low_ranks: LowRanks,
    ) -> torch.Tensor:
        """W_base + Δ_r of one carried matrix; at or above its full rank, the fine-tune's own tensor
        (W_base + Δ = W_ft: nothing to build), unless the base is quantized first (``base_hook``)."""
        assert variant.rank is not None
        finetune = raw["finetune"][name]
        if variant.rank >= min(finetune.shape) and variant.base_hook is None:
            return finetune
        base_weight = raw["base"][name].to(self.device, torch.float32)
        if name in low_ranks.decompositions:
            low_rank = low_ranks.truncated(name, variant.rank)
        else:  # every asked rank is at or above this matrix's full rank: Δ itself
            low_rank = finetune.to(self.device, torch.float32) - base_weight
        if variant.base_hook is not None:
            base_weight = variant.base_hook(name, base_weight)
        return base_weight + low_rank

    def _decomposition(
        self, name: str, base: torch.Tensor, finetune: torch.Tensor, max_rank: int, keep: bool
    ) -> sp.Decomposition:
        """Δ of one carried matrix with its top ``max_rank`` directions (``spectrum.decompose``), or
        the directions an earlier pass kept, or an earlier run (``cache``), with Δ rebuilt as
        ``decompose`` builds it (float32 W_ft − W_base, the same values). With ``keep``, the
        directions found are kept for a later pass; with a cache, decomposed ones are stored."""
        kept = self.kept.get(name)
        # Enough directions kept, or none at all: Δ was zero (``decompose`` keeps none), at any rank.
        if kept is not None and (kept.vectors.shape[1] >= max_rank or kept.vectors.shape[1] == 0):
            return self._rebuilt(base, finetune, kept)
        cache = self.cache
        key = cache.key(base, finetune) if cache is not None else ""
        if cache is not None:
            found = cache.load(key, max_rank, min(base.shape), sp.direction_side(base.shape))
            if found is not None:
                self._reused()
                found = replace(found, vectors=found.vectors.to(self.device))
                if keep:
                    self.kept[name] = found
                return self._rebuilt(base, finetune, found)
        started = time.perf_counter()
        _, decomposition = sp.decompose(
            base.to(self.device, torch.float32), finetune.to(self.device, torch.float32), max_rank
        )
        self._timed(time.perf_counter() - started)
        directions = CachedDirections(decomposition.vectors, decomposition.side, decomposition.solver)
        if keep:  # the directions only: Δ is rebuilt from the reads
            self.kept[name] = directions
        if cache is not None:
            cache.store(key, directions)
        return decomposition

    def _rebuilt(self, base: torch.Tensor, finetune: torch.Tensor, found: CachedDirections) -> sp.Decomposition:
        """Directions found before, with Δ rebuilt as ``decompose`` builds it (float32 W_ft − W_base)."""
        delta = finetune.to(self.device, torch.float32, copy=True).sub_(base.to(self.device, torch.float32))
        return sp.Decomposition(delta=delta, vectors=found.vectors, side=found.side, solver=found.solver)

    def block(
        self,
        variants: Sequence[Variant],
        raw: dict[str, dict[str, torch.Tensor]],
        prefix: str,
        *,
        keep: bool = False,
        direction_rank: int | None = None,
    ) -> Generator[tuple[Variant, dict[str, torch.Tensor]], None, None]:
        """Each variant with its block weights (names relative to ``prefix``), one variant alive at a
        time. With ``keep``, each matrix's directions are kept for a later pass; with
        ``direction_rank`` too, found up to that rank (the largest a later pass may ask for)."""
        ranks = sorted({v.rank for v in variants if v.kind == "served" and v.rank is not None})
        decompositions: dict[str, sp.Decomposition] = {}
        low_ranks = LowRanks(decompositions)
        delta_names: set[str] = set()  # the matrices served as W_base + Δ_r
        if ranks:
            for name, base in raw["base"].items():
                finetune = raw["finetune"].get(name)
                if finetune is None or not carried(name, base, finetune):
                    continue
                delta_names.add(name)
                # Ranks at or above this matrix's full rank serve it whole: no directions needed.
                below = [r for r in ranks if r < min(base.shape)]
                if below:
                    wanted = max(below)
                    if keep and direction_rank is not None:
                        wanted = max(wanted, min(direction_rank, min(base.shape) - 1))
                    decompositions[name] = self._decomposition(name, base, finetune, wanted, keep)
            self._hold("decompositions", [t for d in decompositions.values() for t in (d.delta, d.vectors)])
        # Served variants by rank: both serving modes of a rank one after the other share its Δ_r.
        served_by_rank = sorted((v for v in variants if v.kind == "served"), key=lambda v: v.rank or 0)
        for variant in [*(v for v in variants if v.kind != "served"), *served_by_rank]:
            if variant.kind == "served":
                assert variant.rank is not None
                side = "finetune" if variant.keep_extras else "base"
                weights: dict[str, torch.Tensor] = {}
                for name, tensor in raw[side].items():
                    if name in delta_names:
                        weights[name] = self.final(variant, name, self._served_matrix(variant, name, raw, low_ranks))
                    elif side == "base" and variant.base_hook is not None:
                        weights[name] = self.final(variant, name, variant.base_hook(name, tensor.to(self.device)))
                    else:
                        weights[name] = self.final(variant, name, tensor)
            else:
                weights = {name: self.final(variant, name, t) for name, t in raw[variant.kind].items()}
            self._hold("variant", weights)
            self._hold("low ranks", low_ranks.tensors())
            yield variant, {name.removeprefix(prefix): t for name, t in weights.items()}
            del weights
        decompositions.clear()
        low_ranks.clear()


class LowRanks:
    """Δ_r of each decomposed matrix of one block, for the ranks its served variants ask.

    (B, A) = ``Decomposition.factors`` at the largest rank is found once per matrix, and
    Δ_r = B[:, :r] · A[:r] once per rank: both serving modes of a rank (asked one after the
    other) share it. Before, each variant made its own factors and product: at ranks 16 to 512
    in both modes, about three times the products (at rank 512, 1024-wide matrices and 1,024
    tokens, one product cost half a forward). Δ_r depends on the largest rank only through B's
    columns, which are the same products however many columns: a candidate gets the same
    weights in any grid or pass that decomposes to the same rank (the refined grid does).
    Holds, per matrix, B (m × max rank) and the last Δ_r (m × n, float32).
    """

    def __init__(self, decompositions: dict[str, sp.Decomposition]) -> None:
        self.decompositions = decompositions
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._last: dict[str, tuple[int, torch.Tensor]] = {}

    def truncated(self, name: str, rank: int) -> torch.Tensor:
        """Δ_r of matrix ``name`` (``Decomposition.truncated``); read it, never write to it."""
        decomposition = self.decompositions[name]
        if rank >= decomposition.full_rank:
            return decomposition.delta
        if name not in self._factors:
            self._factors[name] = decomposition.factors(decomposition.max_rank)
        r = min(rank, decomposition.max_rank)
        last = self._last.get(name)
        if last is not None and last[0] == r:
            return last[1]
        b, a = self._factors[name]
        with torch.no_grad(), sp.exact_matmul():
            value = b[:, :r] @ a[:r]
        self._last[name] = (r, value)
        return value

    def tensors(self) -> list[torch.Tensor]:
        """What this holds now (for the memory count)."""
        return [t for b, a in self._factors.values() for t in (b, a)] + [v for _, v in self._last.values()]

    def clear(self) -> None:
        self._factors.clear()
        self._last.clear()


def carried(name: str, base: torch.Tensor, finetune: torch.Tensor) -> bool:
    """A block matrix a LoRA server carries as a rank-r delta (the audit's rule: 2-D, not an embedding)."""
    return base.ndim == 2 and base.shape == finetune.shape and not is_embedding(name)
