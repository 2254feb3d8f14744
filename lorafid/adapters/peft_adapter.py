"""A PEFT LoRA adapter against the fine-tune it stands for: how much of Δ it carries.

Input: an adapter (a Hub repo ``org/name[@rev]`` or a local PEFT folder with
``adapter_config.json`` and ``adapter_model.safetensors``) and a (base, fine-tune) pair.
Output: for every matrix the adapter touches, its served change X = s·B·A (s = PEFT's
scale) compared with Δ = W_finetune − W_base, beside the best any adapter of that rank could
do (from Δ's spectrum); the fine-tune's changed matrices the adapter leaves out; the matrices
the adapter changes where the fine-tune did not. The result is the report's ``adapter`` section.

PEFT conventions followed exactly (peft 0.21): tensor names
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (``lora_embedding_A/B`` for
embeddings); scale ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``, with
per-module ``rank_pattern`` / ``alpha_pattern``; ``fan_in_fan_out`` (GPT-2's Conv1D stores
the weight as in × out, so X is (s·B·A)ᵀ), and embeddings (X = (s·B·A)ᵀ as well).
Refused with a clear message: DoRA (its magnitude rescales each column, so BA alone is not
the change) and every PEFT type other than LORA.

Numbers per matrix (float64; X never formed as a whole m×n matrix):
    energy_kept      = 1 − ‖Δ − X‖²/‖Δ‖²   (equals the spectrum's energy_retained for the
                       optimal rank-r X; negative when X is farther from Δ than serving the base)
    delta_rel_error  = ‖Δ − X‖/‖Δ‖
    cosine_distance  = 1 − ⟨Δ, X⟩/(‖Δ‖‖X‖)
Worked example: Δ = diag(4, 3, 2, 1) and an adapter X = diag(4, 0, 0, 0) (rank 1, B = e₁·4,
A = e₁ᵀ, s = 1): ‖Δ − X‖² = 14, energy_kept = 1 − 14/30 = 0.533, the best rank 1 keeps 16/30,
the same; X = diag(0, 3, 0, 0) keeps 9/30 = 0.3 and falls short of it.

Not here: fetching and scheduling (``audit``), spectra (``spectrum``), writing adapters
(``extract``).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from lorafid.audit import spectrum as sp
from lorafid.audit.engine import Audit, AuditConfig, AuditProgress, spectrum_kernel
from lorafid.audit.pairing import MatrixPair, PairingPlan, is_embedding
from lorafid.audit.report import Report
from lorafid.audit.store import Store
from lorafid.audit.summary import percent
from lorafid.compute import ComputeHook, kernel_device
from lorafid.errors import AdapterMismatchError, LorafidError, UnsupportedAdapterError
from lorafid.weights.safetensors_format import TensorInfo
from lorafid.weights.source import Source, open_source
from lorafid.weights.tensors import read_tensor

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before every module name it saves
_MAX_CONFIG_BYTES = 1 << 20
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")
# Rows of Δ converted to float64 at a time: 8 MB of float64 per block for a 4096-wide Δ.
_ROW_BLOCK = 256
_SAME_SHARE = 1e-6  # energy shares closer than this are equal within the spectrum's precision


@dataclass(frozen=True)
class LoraSettings:
    """The parts of a PEFT ``LoraConfig`` that decide what the adapter adds to each weight."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False  # weights stored in × out (GPT-2 Conv1D): X is transposed
    target_modules: tuple[str, ...] | str = ()
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module regex -> r
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module regex -> lora_alpha
    modules_to_save: tuple[str, ...] = ()  # full tensors, not low-rank: listed, not audited
    base_model_name_or_path: str | None = None
    revision: str | None = None

    def rank(self, module: str) -> int:
        """r for one module (``rank_pattern`` first, as PEFT does)."""
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def scale(self, module: str) -> float:
        """PEFT's scaling for one module: alpha / r, or alpha / sqrt(r) with rsLoRA.

        Example: r = 8, lora_alpha = 16 -> 2.0; with use_rslora -> 16 / sqrt(8) ≈ 5.657.
        """
        r = self.rank(module)
        alpha = float(_pattern_value(self.alpha_pattern, module, self.lora_alpha))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def parse_config(data: Mapping[str, Any], where: str) -> LoraSettings:
    """Validate an ``adapter_config.json`` and keep what the audit needs.

    Raises:
        UnsupportedAdapterError: not LORA, DoRA, or r / lora_alpha missing or not positive.
    """
    peft_type = str(data.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"{where} is a PEFT {peft_type or 'adapter of unknown type'}, not a LoRA: lorafid audits plain LoRA "
            "adapters only (its change is s·B·A per matrix). Merge it into the base and audit the merged model "
            "as a fine-tune instead."
        )
    if data.get("use_dora"):
        raise UnsupportedAdapterError(
            f"{where} is a DoRA adapter (use_dora): its magnitude vector rescales every column, so B·A is not "
            "its change and vLLM-style servers do not load it. Merge it (PeftModel.merge_and_unload) and audit "
            "the merged model as a fine-tune instead."
        )
    try:
        r, alpha = int(data["r"]), float(data["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise UnsupportedAdapterError(f"{where}: adapter_config.json has no usable r / lora_alpha ({e}).") from e
    if r < 1 or not math.isfinite(alpha):
        raise UnsupportedAdapterError(f"{where}: r = {r} and lora_alpha = {alpha} do not make a LoRA scale.")
    targets = data.get("target_modules") or ()
    return LoraSettings(
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(data.get("use_rslora")),
        fan_in_fan_out=bool(data.get("fan_in_fan_out")),
        target_modules=targets if isinstance(targets, str) else tuple(sorted(targets)),
        rank_pattern={str(k): int(v) for k, v in (data.get("rank_pattern") or {}).items()},
        alpha_pattern={str(k): float(v) for k, v in (data.get("alpha_pattern") or {}).items()},
        modules_to_save=tuple(data.get("modules_to_save") or ()),
        base_model_name_or_path=data.get("base_model_name_or_path"),
        revision=data.get("revision"),
    )


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's ``get_pattern_key``: the first pattern p with re.match(rf"(.*\\.)?({p})$", module)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraModule:
    """Where one module's factors are in the adapter file, and how they apply."""

    module: str  # e.g. "model.layers.0.self_attn.q_proj" (PEFT's prefix removed)
    lora_a: TensorInfo  # r × in
    lora_b: TensorInfo  # out × r
    transposed: bool  # X = (s·B·A)ᵀ: fan_in_fan_out layouts and embeddings

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    def weight_shape(self) -> tuple[int, int]:
        """The shape of the weight this module changes, as stored in the model's checkpoint."""
        out_features, in_features = int(self.lora_b.shape[0]), int(self.lora_a.shape[1])
        return (in_features, out_features) if self.transposed else (out_features, in_features)


@dataclass(frozen=True)
class AdapterFit:
    """Δ against one adapter matrix X, as plain float64 numbers."""

    energy: float  # ‖Δ‖²
    adapter_energy: float  # ‖X‖²
    inner: float  # ⟨Δ, X⟩
    residual: float  # ‖Δ − X‖²
    method: str  # "factored" | "dense"

    @property
    def energy_kept(self) -> float | None:
        """1 − ‖Δ − X‖²/‖Δ‖²; None when Δ = 0 (nothing to keep)."""
        return 1.0 - self.residual / self.energy if self.energy > 0 else None

    @property
    def delta_rel_error(self) -> float | None:
        return math.sqrt(self.residual / self.energy) if self.energy > 0 else None

    @property
    def cosine_distance(self) -> float | None:
        if self.energy <= 0 or self.adapter_energy <= 0:
            return None if self.energy <= 0 else 1.0
        return 1.0 - self.inner / math.sqrt(self.energy * self.adapter_energy)


def factored_is_cheaper(rows: int, cols: int, rank: int) -> bool:
    """True when ⟨Δ, BA⟩ via BᵀΔ costs fewer flops than forming BA block by block.

    Factored: 2·m·n·r (BᵀΔ) + 2·(m+n)·r² (the two r×r Gram matrices). Dense: 2·m·n·r (BA)
    + 3·m·n (subtract, square, sum). So the factored form wins while (m+n)·r² < 1.5·m·n:
    up to r ≈ 55 for 4096×4096, r ≈ 70 for 14336×4096. Example: (4096, 4096, 16) -> True.
    """
    return (rows + cols) * rank * rank < 1.5 * rows * cols


def adapter_fit(
    delta: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor, scale: float, *, transposed: bool = False
) -> AdapterFit:
    """Compare Δ with X = scale·B·A (or its transpose), in float64, without an m×n X.

    Args:
        delta: Δ as stored (m × n, any float dtype, any device).
        lora_b: B, out × r.  lora_a: A, r × in.  scale: PEFT's scaling.
        transposed: X = (scale·B·A)ᵀ (fan_in_fan_out, embeddings).

    Both forms take Δ in row blocks of ``_ROW_BLOCK`` rows converted to float64, so the
    extra memory is a block and r-sized products. The factored form expands
    ‖Δ − X‖² = ‖Δ‖² − 2s⟨Δ, BA⟩ + s²‖BA‖², with ⟨Δ, BA⟩ = Σ(BᵀΔ)⊙A and
    ‖BA‖² = Σ(BᵀB)⊙(AAᵀ); in float64 its cancellation error is ~1e-16·(‖Δ‖² + ‖X‖²).

    Raises:
        AdapterMismatchError: the factors' shapes do not fit Δ.
    """
    d = delta.T if transposed else delta
    rows, cols = d.shape
    if lora_b.shape[0] != rows or lora_a.shape[1] != cols or lora_b.shape[1] != lora_a.shape[0]:
        raise AdapterMismatchError(
            f"factors B {list(lora_b.shape)} and A {list(lora_a.shape)} cannot make a change of shape "
            f"{list(delta.shape)}{' (transposed)' if transposed else ''}."
        )
    rank = int(lora_a.shape[0])
    b = lora_b.to(device=d.device, dtype=torch.float64)
    a = lora_a.to(device=d.device, dtype=torch.float64)
    energy = inner = residual = adapter_energy = 0.0
    with torch.no_grad(), sp.exact_matmul():
        if factored_is_cheaper(rows, cols, rank):
            bt_delta = torch.zeros(rank, cols, dtype=torch.float64, device=d.device)
            for start in range(0, rows, _ROW_BLOCK):
                block = d[start : start + _ROW_BLOCK].to(torch.float64)
                energy += float(block.square().sum())
                bt_delta += b[start : start + _ROW_BLOCK].T @ block
            inner = scale * float((bt_delta * a).sum())
            adapter_energy = scale * scale * float(((b.T @ b) * (a @ a.T)).sum())
            residual = max(0.0, energy - 2.0 * inner + adapter_energy)
            method = "factored"
        else:
            for start in range(0, rows, _ROW_BLOCK):
                block = d[start : start + _ROW_BLOCK].to(torch.float64)
                served = (b[start : start + _ROW_BLOCK] @ a).mul_(scale)
                energy += float(block.square().sum())
                inner += float((block * served).sum())
                adapter_energy += float(served.square().sum())
                residual += float((block - served).square_().sum())
            method = "dense"
    return AdapterFit(energy=energy, adapter_energy=adapter_energy, inner=inner, residual=residual, method=method)


class PublishedAdapter:
    """An opened PEFT LoRA adapter: its settings, where each module's factors are, a reader.

    Reads ``adapter_config.json`` and the safetensors header only; factors are read per module
    (they are small: r·(m + n) numbers). Use as a context manager or call ``close()``.
    """

    def __init__(
        self,
        spec: str,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        endpoint: str | None = None,
        allow_local: bool = True,
    ) -> None:
        self.source: Source = open_source(
            spec, revision=revision, token=token, endpoint=endpoint, allow_local=allow_local
        )
        try:
            where = self.source.describe()
            raw = self.source.read_small_file(CONFIG_FILE, _MAX_CONFIG_BYTES)
            if raw is None:
                raise UnsupportedAdapterError(
                    f"{where} has no {CONFIG_FILE}: it is not a PEFT adapter. Pass the folder or repo that "
                    "PeftModel.save_pretrained wrote."
                )
            try:
                config = json.loads(raw)
            except json.JSONDecodeError as e:
                raise UnsupportedAdapterError(f"{where}: {CONFIG_FILE} is not valid JSON ({e}).") from e
            self.settings = parse_config(config, where)
            self.modules, self.other_tensors = _index_factors(self.source, self.settings, where)
        except BaseException:
            self.source.close()
            raise

    def __enter__(self) -> PublishedAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.source.close()

    def factors(self, module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) of one module, as stored (read by byte range)."""
        return read_tensor(self.source, module.lora_b), read_tensor(self.source, module.lora_a)


def _index_factors(source: Source, settings: LoraSettings, where: str) -> tuple[dict[str, LoraModule], tuple[str, ...]]:
    """Pair every module's lora_A with its lora_B; other tensors are named, not audited."""
    tensors: dict[str, TensorInfo] = {}
    files = source.weight_files()
    for file in [WEIGHTS_FILE] if WEIGHTS_FILE in files else files:
        tensors.update(source.read_header(file).tensors)
    if any("lora_magnitude_vector" in name for name in tensors):
        raise UnsupportedAdapterError(
            f"{where} holds DoRA magnitude vectors (lora_magnitude_vector): B·A alone is not its change. "
            "Merge it and audit the merged model as a fine-tune instead."
        )
    halves: dict[str, dict[str, TensorInfo]] = {}
    other: list[str] = []
    for name, info in tensors.items():
        match = _LORA_KEY.match(name)
        if match is None:
            other.append(name)  # modules_to_save copies, lora biases: full tensors, not low-rank
            continue
        module = match["module"].removeprefix(PEFT_PREFIX)
        halves.setdefault(module, {})[match["kind"].replace("_embedding", "")] = info
    modules: dict[str, LoraModule] = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise UnsupportedAdapterError(
                f"{where}: module {module} has {sorted(pair)} but not both lora_A and lora_B."
            )
        a, b = pair["lora_A"], pair["lora_B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise UnsupportedAdapterError(
                f"{where}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, which do not make "
                "a product B·A (convolution LoRAs are not supported)."
            )
        embedding = any(_LORA_KEY.match(n) and "lora_embedding" in n for n in (a.name, b.name))
        modules[module] = LoraModule(module, a, b, transposed=embedding or settings.fan_in_fan_out)
    if not modules:
        raise UnsupportedAdapterError(f"{where} has no lora_A / lora_B tensors: it is not a LoRA adapter.")
    return modules, tuple(sorted(other))


def match_modules(adapter: Mapping[str, LoraModule], plan: PairingPlan, where: str) -> dict[str, LoraModule]:
    """Fine-tune matrix name -> the adapter module that changes it, with shapes checked.

    Names match exactly (module + ".weight"), else when one name is the other under a
    wrapper prefix, uniquely ("model.layers.0.q_proj" and "layers.0.q_proj.weight").

    Raises:
        AdapterMismatchError: a module matches no matrix of the fine-tune, or its shape differs
            (an adapter made for another base model).
    """
    by_name = {p.name: p for p in plan.matrices}
    out: dict[str, LoraModule] = {}
    problems: list[str] = []
    for module, lora in adapter.items():
        weight = f"{module}.weight"
        pair = by_name.get(weight) or _by_suffix(weight, by_name)
        if pair is None:
            skipped = {s.name: s.reason for s in plan.skipped}
            reason = skipped.get(weight)
            problems.append(f"{module}: {'skipped in the fine-tune (' + reason + ')' if reason else 'no such matrix'}")
            continue
        flipped = replace(lora, transposed=not lora.transposed)
        if tuple(pair.shape) != lora.weight_shape() and tuple(pair.shape) == flipped.weight_shape():
            # PEFT decides fan_in_fan_out per module from its class (Conv1D: in × out, Linear: out ×
            # in) whatever the config says; a non-square weight shows which layout it is.
            lora = flipped
        if tuple(pair.shape) != lora.weight_shape():
            problems.append(
                f"{module}: the adapter changes a {list(lora.weight_shape())} weight, the model's is {list(pair.shape)}"
            )
            continue
        out[pair.name] = lora
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise AdapterMismatchError(
            f"The adapter {where} does not fit these models ({shown}). It was made for another base model "
            "(or architecture): pass the base and fine-tune it belongs to."
        )
    return out


def _by_suffix(weight: str, by_name: Mapping[str, MatrixPair]) -> MatrixPair | None:
    """The one matrix whose name ends with ``.weight`` or that ``weight`` ends with, else None."""
    found = [p for n, p in by_name.items() if n.endswith("." + weight) or weight.endswith("." + n)]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class AdapterMatrix:
    """One matrix the adapter changes, beside the best adapter of its rank."""

    name: str
    layer: int | None
    module: str
    shape: tuple[int, int]
    rank: int
    scale: float
    energy: float  # ‖Δ‖²
    adapter_energy: float  # ‖X‖²
    energy_kept: float | None  # 1 − ‖Δ − X‖²/‖Δ‖²; None when the fine-tune left it unchanged
    delta_rel_error: float | None
    cosine_distance: float | None
    best_energy_kept: float  # the spectrum's energy_retained at this rank (Eckart–Young)
    best_delta_rel_error: float
    best_cosine_distance: float
    method: str  # "factored" | "dense": how ⟨Δ, X⟩ was computed

    @classmethod
    def build(
        cls, pair: MatrixPair, rank: int, scale: float, fit: AdapterFit, spectrum: sp.DeltaSpectrum
    ) -> AdapterMatrix:
        best = sp.metrics_at_rank(spectrum, rank)
        return cls(
            name=pair.name,
            layer=pair.layer,
            module=pair.module,
            shape=(int(pair.shape[0]), int(pair.shape[1])),
            rank=rank,
            scale=scale,
            energy=fit.energy,
            adapter_energy=fit.adapter_energy,
            energy_kept=fit.energy_kept,
            delta_rel_error=fit.delta_rel_error,
            cosine_distance=fit.cosine_distance,
            best_energy_kept=best.energy_retained,
            best_delta_rel_error=best.delta_rel_error,
            best_cosine_distance=best.cosine_distance,
            method=fit.method,
        )


@dataclass(frozen=True)
class AdapterSection:
    """The report's ``adapter`` section (JSON via ``to_dict``)."""

    kind: str  # "published" (audited) | "extracted" (written by lorafid extract)
    source: dict[str, Any]  # spec, kind, repo_id, requested_revision, resolved_sha, path
    settings: dict[str, Any]  # r, lora_alpha, use_rslora, fan_in_fan_out, patterns, ...
    matrices: tuple[AdapterMatrix, ...]
    uncovered: tuple[tuple[str, float], ...]  # (matrix, ‖Δ‖²): changed by the fine-tune, not by the adapter
    unchanged_but_adapted: tuple[tuple[str, float], ...]  # (matrix, ‖X‖²): Δ = 0 but X ≠ 0
    not_audited: tuple[str, ...]  # full tensors in the adapter (modules_to_save, biases)
    notes: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        """Energy-weighted figures over the covered matrices, and over every changed matrix."""
        covered = [m for m in self.matrices if m.energy > 0]
        energy = sum(m.energy for m in covered)
        residual = sum(m.energy * (1.0 - (m.energy_kept or 0.0)) for m in covered)
        best_lost = sum(m.energy * (1.0 - m.best_energy_kept) for m in covered)
        uncovered = sum(e for _, e in self.uncovered)
        total = energy + uncovered
        ranks = sorted({m.rank for m in self.matrices})
        return {
            "rank": self.settings.get("r"),
            "ranks": ranks,
            "matrices": len(self.matrices),
            "energy_kept": 1.0 - residual / energy if energy else None,
            "best_energy_kept": 1.0 - best_lost / energy if energy else None,
            "energy_kept_all": 1.0 - (residual + uncovered) / total if total else None,
            "best_energy_kept_all": 1.0 - (best_lost + uncovered) / total if total else None,
            "uncovered_energy_share": uncovered / total if total else 0.0,
        }

    def sentence(self) -> str:
        s = self.summary()
        if s["energy_kept"] is None:
            return "The adapter changes no matrix that the fine-tune changed."
        text = (
            f"The adapter (rank {s['rank']}) carries {percent(max(0.0, s['energy_kept']))} of the change of the "
            f"{s['matrices']} matrices it touches; "
        )
        # The spectrum's shares are exact to ~1e-7 (float32 Gram matrix): closer than that is "as good".
        if s["energy_kept"] >= s["best_energy_kept"] - _SAME_SHARE:
            text += f"no rank-{s['rank']} adapter could carry more"
        else:
            text += f"the best rank-{s['rank']} adapter would carry {percent(s['best_energy_kept'])}"
        if self.uncovered:
            share = percent(s["uncovered_energy_share"])
            text += f"; it leaves out {len(self.uncovered)} changed matrices ({share} of the change)"
        if self.unchanged_but_adapted:
            text += f"; it changes {len(self.unchanged_but_adapted)} matrices the fine-tune did not"
        return text + "."

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source": self.source,
            "settings": self.settings,
            "summary": {**self.summary(), "sentence": self.sentence()},
            "matrices": [asdict(m) for m in self.matrices],
            "uncovered": [{"name": n, "energy": e} for n, e in self.uncovered],
            "unchanged_but_adapted": [{"name": n, "adapter_energy": e} for n, e in self.unchanged_but_adapted],
            "not_audited": list(self.not_audited),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterSection:
        return cls(
            kind=data["kind"],
            source=dict(data["source"]),
            settings=dict(data["settings"]),
            matrices=tuple(AdapterMatrix(**{**m, "shape": tuple(m["shape"])}) for m in data["matrices"]),
            uncovered=tuple((u["name"], u["energy"]) for u in data["uncovered"]),
            unchanged_but_adapted=tuple((u["name"], u["adapter_energy"]) for u in data["unchanged_but_adapted"]),
            not_audited=tuple(data["not_audited"]),
            notes=tuple(data.get("notes", ())),
        )


def build_section(
    *,
    kind: str,
    source: dict[str, Any],
    settings: dict[str, Any],
    report: Report,
    fitted: Mapping[str, AdapterMatrix],
    not_audited: tuple[str, ...] = (),
    notes: tuple[str, ...] = (),
) -> AdapterSection:
    """The section from per-matrix fits and the report (which knows every changed matrix)."""
    changed = {m.name: m.energy for m in report.matrices if m.energy > 0}
    matrices = tuple(fitted[m.name] for m in report.matrices if m.name in fitted)
    return AdapterSection(
        kind=kind,
        source=source,
        settings=settings,
        matrices=matrices,
        uncovered=tuple((n, e) for n, e in changed.items() if n not in fitted),
        unchanged_but_adapted=tuple(
            (m.name, m.adapter_energy) for m in matrices if m.energy == 0 and m.adapter_energy > 0
        ),
        not_audited=not_audited,
        notes=notes,
    )


class AdapterAudit:
    """``lorafid audit BASE FINETUNE --adapter ADAPTER``: the audit, plus the adapter's fit per matrix.

    One read of each model: the audit's per-matrix hook computes the spectrum and, for the
    matrices the adapter covers, Δ against X. The audit runs on a store of its own that lives
    as long as this object: results cached by an earlier plain audit of the pair lack Δ,
    which the adapter's numbers need, so they are not reused.
    """

    def __init__(
        self,
        base: str,
        finetune: str,
        adapter: str,
        config: AuditConfig | None = None,
        *,
        adapter_revision: str | None = None,
    ) -> None:
        config = config or AuditConfig()
        self.adapter = PublishedAdapter(
            adapter,
            revision=adapter_revision,
            token=config.token,
            endpoint=config.endpoint,
            allow_local=config.allow_local,
        )
        self._scratch = tempfile.TemporaryDirectory(prefix="lorafid-adapter-")
        self._store = Store(self._scratch.name)
        embeddings = config.include_embeddings or any(is_embedding(m) for m in self.adapter.modules)
        self._fits: dict[str, AdapterMatrix] = {}
        self._covered: dict[str, LoraModule] = {}
        self.job = Audit(
            base,
            finetune,
            replace(
                config, store=self._store, fresh=True, include_embeddings=embeddings, matrix_math=self._matrix_math
            ),
        )

    def __enter__(self) -> AdapterAudit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.job.close()
        self.adapter.close()
        self._store.close()
        self._scratch.cleanup()

    def plan(self) -> PairingPlan:
        """Plan the audit and check the adapter fits it, before any weight is read."""
        plan = self.job.plan()
        if not self._covered:
            self._covered = match_modules(self.adapter.modules, plan, self.adapter.source.describe())
        return plan

    def run(self) -> Iterator[AuditProgress]:
        self.plan()
        yield from self.job.run()

    def report(self) -> Report:
        """The audit's report with its ``adapter`` section (over the matrices done so far)."""
        report = self.job.report()
        info = self.adapter.source.info
        settings = json.loads(json.dumps(asdict(self.adapter.settings)))  # JSON types: lists, not tuples
        notes: list[str] = []
        wanted = self.adapter.settings.base_model_name_or_path
        if wanted and report.base.repo_id and wanted != report.base.repo_id:
            notes.append(f"the adapter names {wanted} as its base; this audit used {report.base.repo_id}")
        section = build_section(
            kind="published",
            source=asdict(info),
            settings=settings,
            report=report,
            fitted=self._fits,
            not_audited=self.adapter.other_tensors,
            notes=tuple(notes),
        )
        return replace(report, adapter=section.to_dict())

    def _matrix_math(
        self, pair: MatrixPair, base: torch.Tensor, finetune: torch.Tensor, run: ComputeHook
    ) -> sp.DeltaSpectrum:
        """The audit's per-matrix math: the spectrum, and where the adapter covers the matrix its
        fit to Δ, both in one kernel run through the audit's compute hook (a GPU on ZeroGPU)."""
        lora = self._covered.get(pair.name)
        if lora is None:
            return run(spectrum_kernel, base, finetune)
        lora_b, lora_a = self.adapter.factors(lora)
        scale = self.adapter.settings.scale(lora.module)
        try:
            spectrum, fit = run(adapter_fit_kernel, base, finetune, lora_b, lora_a, scale, lora.transposed)
        except AdapterMismatchError as e:
            raise AdapterMismatchError(f"{lora.module}: {e}") from e
        self._fits[pair.name] = AdapterMatrix.build(pair, lora.rank, scale, fit, spectrum)
        return spectrum


def adapter_fit_kernel(
    base: torch.Tensor,
    finetune: torch.Tensor,
    lora_b: torch.Tensor,
    lora_a: torch.Tensor,
    scale: float,
    transposed: bool,
    device: str | torch.device | None = None,
) -> tuple[sp.DeltaSpectrum, AdapterFit]:
    """One covered matrix of an adapter audit (a ``lorafid.compute`` kernel): Δ's spectrum and
    the adapter's fit to Δ, from CPU tensors to plain numbers."""
    target = kernel_device(device)
    base, finetune = base.to(target), finetune.to(target)
    spectrum = sp.delta_spectrum(base, finetune)
    with torch.no_grad():
        delta = finetune.to(torch.float32) - base.to(torch.float32)
    return spectrum, adapter_fit(delta, lora_b, lora_a, scale, transposed=transposed)


def audit_adapter(
    base: str, finetune: str, adapter: str, config: AuditConfig | None = None, *, adapter_revision: str | None = None
) -> Report:
    """Run a whole adapter audit and return the report with its ``adapter`` section."""
    with AdapterAudit(base, finetune, adapter, config, adapter_revision=adapter_revision) as job:
        for _ in job.run():
            pass
        return job.report()


def section_of(report: Report) -> AdapterSection | None:
    """The report's adapter section as records, or None."""
    data = getattr(report, "adapter", None)
    if not data:
        return None
    try:
        return AdapterSection.from_dict(data)
    except (KeyError, TypeError) as e:
        raise LorafidError(f"The report's adapter section is malformed ({e}).") from e
