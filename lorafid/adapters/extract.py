"""``lorafid extract``: write the rank-r LoRA adapter a provider would serve, and what it loses.

Input: a (base, fine-tune) pair (Hub repos or local safetensors) and a rank r. Output, in one
folder, a PEFT LoRA adapter that ``peft.PeftModel.from_pretrained`` loads and vLLM accepts:

    adapter_config.json        peft_type LORA, r, lora_alpha = r (scale exactly 1),
                               target_modules, base_model_name_or_path + revision (commit SHA)
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight (r × in)
                               base_model.model.<module>.lora_B.weight (out × r)
    lorafid-report.json        the audit of the pair at rank r (``lorafid.report/1``), with an
                               ``adapter`` section measuring the factors as stored (after --dtype)
    README.md                  a model card: rank, energy kept, source commits, how to load it

The factors are the exact rank-r truncation Δ_r = B·A of Δ = W_finetune − W_base from
``spectrum.decompose`` (one eigendecomposition of the Gram matrix: the same one the audit's
numbers come from; never a randomized SVD). B = Δ·V_r carries the singular values, A = V_rᵀ,
and lora_alpha = r makes PEFT's scale alpha/r exactly 1, so the merged weight is W_base + B·A.
Matrices smaller than r get zero-padded factors (PEFT needs one r; the zeros change nothing);
matrices the fine-tune left unchanged get none.

Streaming and resuming: the audit engine reads each tensor pair once, never a whole model;
each matrix's factors go to ``<out>/.lorafid-extract/`` as soon as they are computed, before
its result is stored there, so an interrupted run resumes with only the missing matrices.
The final file is then written tensor by tensor from those pieces.

Not here: the spectrum math (``spectrum``), fetching (``audit``/``source``), the adapter
comparison (``adapter``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial as partial_call
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorafid.adapters.peft_adapter import (
    CONFIG_FILE,
    PEFT_PREFIX,
    WEIGHTS_FILE,
    AdapterFit,
    AdapterMatrix,
    adapter_fit,
    build_section,
)
from lorafid.audit import spectrum as sp
from lorafid.audit.engine import Audit, AuditConfig, AuditProgress
from lorafid.audit.pairing import MatrixPair, PairingPlan
from lorafid.audit.report import Report, SourceRecord
from lorafid.audit.store import Store
from lorafid.audit.summary import percent
from lorafid.compute import ComputeHook, kernel_device
from lorafid.errors import LorafidError
from lorafid.weights.safetensors_format import TensorInfo, torch_dtype
from lorafid.weights.source import Source, open_source
from lorafid.weights.tensors import read_bytes

REPORT_FILE = "lorafid-report.json"
CARD_FILE = "README.md"
STAGING_DIR = ".lorafid-extract"
VLLM_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""Values vLLM accepts for --max-lora-rank (``MaxLoRARanks`` in vllm/config/lora.py); an adapter
of rank r loads when r ≤ max_lora_rank, and each slot is allocated at max_lora_rank."""
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ExtractConfig:
    """What to extract. Sources, device and filters come from ``audit`` (an ``AuditConfig``)."""

    rank: int
    dtype: str | None = None  # factor dtype: bfloat16 / float16 / float32; None = each fine-tune weight's
    modules_to_save: tuple[str, ...] = ()  # module name suffixes (PEFT's matching) copied whole from the fine-tune
    audit: AuditConfig = field(default_factory=AuditConfig)


@dataclass(frozen=True)
class ExtractResult:
    """What ``Extraction.finish`` wrote."""

    out: Path
    report: Report
    target_modules: tuple[str, ...]
    matrices: int  # modules with factors in the adapter
    warnings: tuple[str, ...]


def vllm_warnings(rank: int, modules_to_save: tuple[str, ...]) -> list[str]:
    """What a vLLM server would say about this adapter, before anyone deploys it.

    Example: rank 48 -> one warning: vLLM needs --max-lora-rank 64, so 16 of 64 slots are padding.
    """
    out: list[str] = []
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        out.append(
            f"rank {rank} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM accepts: "
            "vLLM will refuse this adapter (PEFT loads it)."
        )
    elif rank not in VLLM_MAX_LORA_RANKS:
        slot = next(r for r in VLLM_MAX_LORA_RANKS if r >= rank)
        out.append(
            f"rank {rank} is not one of vLLM's --max-lora-rank values {list(VLLM_MAX_LORA_RANKS)}: serve it with "
            f"--max-lora-rank {slot} (memory is allocated for rank {slot})."
        )
    if modules_to_save:
        out.append(
            "modules_to_save is set: vLLM refuses adapters with modules_to_save (PEFT loads them). Extract "
            "without --modules-to-save for vLLM."
        )
    return out


class Extraction:
    """One extraction. ``plan()``, then iterate ``run()`` (progress per matrix), then ``finish()``.

    Use as a context manager or call ``close()``.
    """

    def __init__(self, base: str, finetune: str, out: Path | str, config: ExtractConfig) -> None:
        if config.rank < 1:
            raise LorafidError(f"The rank must be a positive integer, got {config.rank}.")
        if config.dtype is not None and config.dtype not in DTYPES:
            raise LorafidError(f"Unknown --dtype {config.dtype!r}; use one of {', '.join(DTYPES)}.")
        self.config = config
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise LorafidError(
                f"--out {self.out} is a file, not a folder: name a new folder for the adapter "
                "(or the folder of an interrupted extraction, to resume it)."
            )
        self._created_out = not self.out.exists()  # removed again if the rank is refused
        self._staging = self.out / STAGING_DIR
        self._prepare_staging()
        self._store = Store(self._staging)
        self._finetune_source: Source | None = None  # opened only for --modules-to-save
        self._closed = False
        self.job = Audit(
            base,
            finetune,
            replace(config.audit, rank=config.rank, store=self._store, matrix_math=self._matrix_math),
        )

    def __enter__(self) -> Extraction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.job.close()
        self._store.close()
        if self._finetune_source is not None:
            self._finetune_source.close()

    def plan(self) -> PairingPlan:
        """The matrices to extract, from the headers alone.

        Raises:
            LorafidError: the rank is above the largest matrix's full rank (every factor would
                be zero-padded to it: a rank of 10^9 asked for 192 GB); nothing was read but headers.
        """
        plan = self.job.plan()
        largest = max((min(p.shape) for p in plan.matrices if len(p.shape) == 2), default=0)
        if largest and self.config.rank > largest:
            self.close()
            self._discard_unused_folders()
            raise LorafidError(
                f"--rank {self.config.rank:,} is above the largest matrix's full rank ({largest:,}): rank "
                f"{largest:,} already carries the whole change. Use --rank {largest:,} or less."
            )
        return plan

    def run(self) -> Iterator[AuditProgress]:
        """Decompose every matrix not already staged, writing its factors as it goes."""
        self.plan()  # the rank is checked before any weight is read
        yield from self.job.run()

    def finish(self) -> ExtractResult:
        """Write the adapter, its config, the report and the model card; remove the staging folder.

        Raises:
            LorafidError: matrices are still pending (run() was stopped): run again to resume.
        """
        report = self.job.report()
        if report.pending:
            raise LorafidError(
                f"{len(report.pending)} matrices are not extracted yet; run the same command again to resume."
            )
        by_name = {p.name: p for p in self.plan().matrices}
        fitted: dict[str, AdapterMatrix] = {}
        pieces: list[tuple[MatrixPair, Path]] = []
        for m in report.matrices:
            piece = self._piece(m.name)
            if m.energy == 0.0:
                continue  # unchanged: nothing to add to the base
            if not piece.exists():
                raise LorafidError(
                    f"The staged factors of {m.name} are missing from {self._staging}; run again with --fresh."
                )
            pieces.append((by_name[m.name], piece))
            fitted[m.name] = _matrix_from_metadata(piece)
        if not pieces:
            raise LorafidError("The fine-tune changes no matrix of the base: there is no adapter to extract.")
        extra = self._modules_to_save(report.finetune)
        target_modules = _target_modules([p for p, _ in pieces], self.plan())
        _write_adapter_weights(self.out / WEIGHTS_FILE, pieces, extra, self._read_finetune)
        # Written files say where the models came from, never a path of this machine.
        report = replace(report, base=portable(report.base), finetune=portable(report.finetune))
        adapter_config = self._adapter_config(report.base, target_modules)
        (self.out / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
        notes = tuple(vllm_warnings(self.config.rank, self.config.modules_to_save))
        section = build_section(
            kind="extracted",
            source={"spec": self.out.name, "kind": "local", "path": None},
            settings=adapter_config,
            report=report,
            fitted=fitted,
            not_audited=tuple(sorted(extra)),
            notes=notes,
        )
        report = replace(report, adapter=section.to_dict())
        (self.out / REPORT_FILE).write_text(report.to_json() + "\n")
        (self.out / CARD_FILE).write_text(model_card(report, self.config))
        self.close()
        shutil.rmtree(self._staging, ignore_errors=True)
        return ExtractResult(self.out, report, target_modules, len(pieces), notes)

    # -- internals ---------------------------------------------------------------------

    def _prepare_staging(self) -> None:
        """Keep staged factors only if they were made with the same rank, dtype and filters."""
        manifest = {
            "rank": self.config.rank,
            "dtype": self.config.dtype,
            "include": self.config.audit.include,
            "exclude": self.config.audit.exclude,
        }
        path = self._staging / "manifest.json"
        if self.config.audit.fresh or (path.exists() and json.loads(path.read_text()) != manifest):
            shutil.rmtree(self._staging, ignore_errors=True)
        try:
            (self._staging / "factors").mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(manifest))
        except OSError as e:  # a file where a folder should be, no permission, a full disk
            raise LorafidError(f"Cannot write the adapter under {self.out}: {e.strerror}. Name another --out.") from e

    def _discard_unused_folders(self) -> None:
        """After a refusal: remove the staging folder when it holds no factors (a resumable
        extraction's are kept), and ``out`` when this run created it and it is empty again."""
        if not any((self._staging / "factors").iterdir()):
            shutil.rmtree(self._staging, ignore_errors=True)
        if self._created_out and not any(self.out.iterdir()):
            self.out.rmdir()

    def _piece(self, name: str) -> Path:
        return self._staging / "factors" / (hashlib.sha256(name.encode()).hexdigest()[:24] + ".safetensors")

    def _matrix_math(
        self, pair: MatrixPair, base: torch.Tensor, finetune: torch.Tensor, run: ComputeHook
    ) -> sp.DeltaSpectrum:
        """The audit's per-matrix math: spectrum and factors from one decomposition (``extraction_kernel``,
        run through the audit's compute hook); factors staged here."""
        rank = self.config.rank
        dtype = DTYPES[self.config.dtype] if self.config.dtype else torch_dtype(pair.finetune.dtype)
        spectrum, factors = run(extraction_kernel, base, finetune, rank, dtype)
        if factors is None:
            return spectrum
        lora_b, lora_a, fit = factors
        matrix = AdapterMatrix.build(pair, rank, 1.0, fit, spectrum)
        piece = self._piece(pair.name)
        partial = piece.with_suffix(".partial")
        save_file(
            {"lora_A": lora_a.contiguous(), "lora_B": lora_b.contiguous()},
            str(partial),
            metadata={"name": pair.name, "matrix": json.dumps(asdict(matrix))},
        )
        os.replace(partial, piece)  # a piece exists whole or not at all
        return spectrum

    def _modules_to_save(self, finetune: SourceRecord) -> dict[str, TensorInfo]:
        """Adapter key -> the fine-tune's tensor for every module named in ``modules_to_save``."""
        if not self.config.modules_to_save:
            return {}
        self._finetune_source = _reopen(finetune, self.config.audit)
        found: dict[str, TensorInfo] = {}
        for file in self._finetune_source.weight_files():
            for name, info in self._finetune_source.read_header(file).tensors.items():
                module = name.rpartition(".")[0]
                # PEFT's own test (peft.utils.other._set_trainable): a plain suffix, so "norm" also
                # names "input_layernorm"; the adapter must hold every module PEFT will wrap.
                if any(module.endswith(t) for t in self.config.modules_to_save):
                    found[PEFT_PREFIX + name] = info
        missing = [t for t in self.config.modules_to_save if not any(k.rpartition(".")[0].endswith(t) for k in found)]
        if missing:
            raise LorafidError(
                f"No tensor of the fine-tune belongs to module(s) {', '.join(missing)} named in --modules-to-save "
                "(a tied lm_head has no tensor of its own). Name modules as the model does, e.g. embed_tokens, "
                "lm_head, norm."
            )
        return found

    def _read_finetune(self, info: TensorInfo) -> bytes:
        assert self._finetune_source is not None  # opened by _modules_to_save
        return read_bytes(self._finetune_source, info)

    def _adapter_config(self, base: SourceRecord, target_modules: tuple[str, ...]) -> dict[str, Any]:
        """PEFT 0.21's LoraConfig keys; fields left out take PEFT's defaults."""
        return {
            "peft_type": "LORA",
            "task_type": None,
            "r": self.config.rank,
            "lora_alpha": self.config.rank,  # scale alpha / r = 1: B·A is exactly Δ_r
            "use_rslora": False,
            "use_dora": False,
            "fan_in_fan_out": False,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": list(target_modules),
            "modules_to_save": list(self.config.modules_to_save) or None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "init_lora_weights": True,
            "inference_mode": True,
            "base_model_name_or_path": base.repo_id or base.spec,  # a local base: its folder's name (``portable``)
            "revision": base.resolved_sha,
        }


def extraction_kernel(
    base: torch.Tensor, finetune: torch.Tensor, rank: int, dtype: torch.dtype, device: str | torch.device | None = None
) -> tuple[sp.DeltaSpectrum, tuple[torch.Tensor, torch.Tensor, AdapterFit] | None]:
    """One matrix's extraction (a ``lorafid.compute`` kernel): its spectrum and, unless Δ = 0,
    the rank-``rank`` factors B, A in ``dtype`` (on the CPU, zero-padded to ``rank``) with their
    fit to Δ measured on the factors as stored: what the served adapter carries, rounding included."""
    target = kernel_device(device)
    spectrum, decomposition = sp.decompose(base.to(target), finetune.to(target), rank)
    if spectrum.unchanged:
        return spectrum, None
    lora_b, lora_a = _pad(*decomposition.factors(rank), rank)
    lora_b, lora_a = lora_b.to(dtype), lora_a.to(dtype)
    fit = adapter_fit(decomposition.delta, lora_b, lora_a, 1.0)
    return spectrum, (lora_b.cpu(), lora_a.cpu(), fit)


def portable(record: SourceRecord) -> SourceRecord:
    """A source record fit for files that leave this machine: a local source keeps its folder's
    or file's name only (no absolute path); a Hub record is unchanged."""
    if record.kind == "hub":
        return record
    return replace(record, spec=Path(record.path or record.spec).name, path=None)


def _pad(lora_b: torch.Tensor, lora_a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad factors of a matrix smaller than the rank (k < r) to exactly r: B·A is unchanged."""
    missing = rank - lora_a.shape[0]
    if missing <= 0:
        return lora_b, lora_a
    lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], missing)], dim=1)
    lora_a = torch.cat([lora_a, lora_a.new_zeros(missing, lora_a.shape[1])], dim=0)
    return lora_b, lora_a


def _matrix_from_metadata(piece: Path) -> AdapterMatrix:
    with safe_open(str(piece), framework="pt") as f:
        data = json.loads((f.metadata() or {})["matrix"])
    return AdapterMatrix(**{**data, "shape": tuple(data["shape"])})


def _target_modules(pairs: list[MatrixPair], plan: PairingPlan) -> tuple[str, ...]:
    """PEFT ``target_modules``: leaf names ("q_proj") when every planned matrix of those leaves
    has factors, else the full module names (PEFT matches a name or its dotted suffix), so
    that PEFT never wraps a module whose factors are missing."""
    modules = {p.name.removesuffix(".weight") for p in pairs}
    leaves = {m.rpartition(".")[2] for m in modules}
    planned = {p.name.removesuffix(".weight") for p in plan.matrices}
    if all(m in modules for m in planned if m.rpartition(".")[2] in leaves):
        return tuple(sorted(leaves))
    return tuple(sorted(modules))


def _reopen(record: SourceRecord, config: AuditConfig) -> Source:
    """The same source again, pinned to the commit the audit read."""
    if record.kind == "hub":
        spec = f"{record.repo_id}@{record.resolved_sha}"
        return open_source(spec, token=config.token, endpoint=config.endpoint, allow_local=False)
    return open_source(record.path or record.spec, allow_local=True)


def _write_adapter_weights(
    path: Path,
    pieces: list[tuple[MatrixPair, Path]],
    extra: dict[str, TensorInfo],
    read_extra: Callable[[TensorInfo], bytes],
) -> None:
    """Write ``adapter_model.safetensors`` one tensor at a time (never the whole adapter in memory).

    The safetensors layout: 8-byte little-endian header length, the JSON header (padded with
    spaces to a multiple of 8), then each tensor's bytes at its ``data_offsets``.
    """
    entries: list[tuple[str, str, list[int], int, Callable[[], bytes]]] = []  # key, dtype, shape, size, bytes
    for pair, piece in pieces:
        module = PEFT_PREFIX + pair.name.removesuffix(".weight")
        with safe_open(str(piece), framework="pt") as f:
            for half in ("lora_A", "lora_B"):
                info = f.get_slice(half)
                shape, code = list(info.get_shape()), info.get_dtype()
                entries.append((f"{module}.{half}.weight", code, shape, _nbytes(code, shape), _staged(piece, half)))
    for key, tensor in sorted(extra.items()):
        entries.append((key, tensor.dtype, list(tensor.shape), tensor.size_bytes, partial_call(read_extra, tensor)))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, code, shape, size, _ in entries:
        header[key] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for key, _code, _shape, size, read in entries:
            data = read()
            if len(data) != size:
                raise LorafidError(f"{key}: {len(data)} bytes read, {size} expected; run again with --fresh.")
            fh.write(data)
    os.replace(partial, path)


def _staged(piece: Path, half: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with safe_open(str(piece), framework="pt") as f:
            tensor = f.get_tensor(half)
        return bytes(tensor.contiguous().view(torch.uint8).numpy().data)

    return read


def _nbytes(code: str, shape: list[int]) -> int:
    bits = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16}[code]
    return math.prod(shape) * bits // 8


def model_card(report: Report, config: ExtractConfig) -> str:
    """The README of the adapter folder: what it is, what it keeps, where it came from."""
    summary = report.summary()
    section = report.adapter or {}
    kept = section.get("summary", {}).get("energy_kept")
    base, finetune = report.base, report.finetune
    vectors = summary.lost_outside_lora
    total = summary.overall.energy + vectors
    slot = next((r for r in VLLM_MAX_LORA_RANKS if r >= config.rank), None)

    def where(record: SourceRecord) -> str:
        if record.kind == "hub":
            return f"`{record.repo_id}` at commit `{record.resolved_sha}`"
        return f"a local checkpoint ({Path(record.path or record.spec).name})"

    lines = [
        "---",
        *([f"base_model: {base.repo_id}"] if base.repo_id else []),
        "library_name: peft",
        "tags:",
        "- lora",
        "- lorafid",
        "---",
        "",
        f"# Rank-{config.rank} LoRA extracted from {finetune.repo_id or 'a local fine-tune'}",
        "",
        f"This adapter is the rank-{config.rank} truncation of the difference between the fine-tune and its "
        "base, per weight matrix (the exact truncated SVD, from one eigendecomposition per matrix), "
        "written by lorafid extract.",
        "",
        "| | |",
        "|---|---|",
        f"| rank | {config.rank} (lora_alpha {config.rank}: scale 1) |",
        f"| energy of the fine-tune's change kept, over the {len(report.matrices)} matrices | "
        f"{percent(summary.overall.energy_retained)} (exact truncation) |",
    ]
    if kept is not None:
        lines.append(f"| kept by the factors as stored ({config.dtype or 'fine-tune dtype'}) | {percent(kept)} |")
    if total > 0 and vectors > 0:
        lines.append(f"| change in 1-D tensors (norms, biases), not carried | {percent(vectors / total)} |")
    lines += [
        f"| base | {where(base)} |",
        f"| fine-tune | {where(finetune)} |",
        "",
        f"{summary.sentence()} The full audit, matrix by matrix, is in `{REPORT_FILE}`.",
        "",
        "Embeddings and `lm_head` are not in the adapter"
        + (
            f"; copied whole as modules_to_save: {', '.join(config.modules_to_save)}."
            if config.modules_to_save
            else "."
        ),
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base.repo_id or "BASE"}",',
        f'                                            revision="{base.resolved_sha or "main"}")',
        'model = PeftModel.from_pretrained(base, "THIS_ADAPTER")',
        "```",
        "",
    ]
    if slot is not None and not config.modules_to_save:
        lines += [f"vLLM: `vllm serve BASE --enable-lora --max-lora-rank {slot} --lora-modules name=THIS_ADAPTER`", ""]
    return "\n".join(lines) + "\n"


def push_to_hub(
    out: Path, repo_id: str, *, token: str | None = None, endpoint: str | None = None, private: bool = False
) -> str:
    """Upload the adapter folder to a Hub model repo (created if missing); returns the commit URL.

    ``private``: create the repo private, and refuse to upload into an existing public one (an
    adapter of a gated or private fine-tune carries its weights' change). The token is used for
    these requests only, never written anywhere.
    """
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        if private:
            try:
                public = not api.model_info(repo_id).private
            except hf_errors.RepositoryNotFoundError:
                public = False  # created private below
            if public:
                raise LorafidError(
                    f"{repo_id} exists and is public; this adapter is to be private. Push to a new repo name, make "
                    f"{repo_id} private first, or pass --public."
                )
        api.create_repo(repo_id, exist_ok=True, private=private)
        commit = api.upload_folder(
            folder_path=str(out),
            repo_id=repo_id,
            allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, REPORT_FILE, CARD_FILE],
            commit_message="Add LoRA adapter extracted by lorafid",
        )
    except hf_errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise LorafidError(
            f"Could not push to {repo_id} (HTTP {status}). Pass a token with write access (--token or HF_TOKEN), "
            "or push the folder yourself with `hf upload`."
        ) from e
    return str(commit.commit_url)


def extract(base: str, finetune: str, out: Path | str, config: ExtractConfig) -> ExtractResult:
    """Run a whole extraction (the library's one-call form)."""
    with Extraction(base, finetune, out, config) as job:
        for _ in job.run():
            pass
        result = job.finish()
    for message in result.warnings:
        warnings.warn(message, stacklevel=2)
    return result
