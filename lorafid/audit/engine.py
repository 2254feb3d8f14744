"""Orchestration: plan an audit, stream tensor pairs, compute spectra, keep every result.

``Audit.run()`` is a generator yielding one ``AuditProgress`` per matrix. A background
thread fetches the next pairs (a bounded queue of ``prefetch`` pairs) while the current
one is on the math device, so compute hides behind I/O. Peak memory is a few tensor pairs
whatever the model size: the queue, the pair being filled and the pair being computed.

Every result is written to the store as soon as it exists; ``Audit.report()`` can be
called at any time (a Stop button, Ctrl-C, an error) and returns what was computed, marked
``partial``. Re-running the same audit reads only the matrices that are missing.

Not here: how bytes arrive (``source``), the linear algebra (``spectrum``), the JSON
(``report``), progress bars or UI.
"""

from __future__ import annotations

import contextlib
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import torch

from lorafid.audit import spectrum as sp
from lorafid.audit.matrices import MatrixResult, VectorResult
from lorafid.audit.pairing import MatrixPair, PairingPlan, SkippedTensor, plan_pairs
from lorafid.audit.report import AuditSettings, Report, SourceRecord, Timings
from lorafid.audit.store import Store, audit_key
from lorafid.compute import ComputeHook, kernel_device
from lorafid.errors import EmptySelectionError, LimitExceededError, LorafidError, NoCommonTensorsError
from lorafid.progress import Progress
from lorafid.weights.safetensors_format import TensorInfo, header_cap
from lorafid.weights.source import Source, open_source
from lorafid.weights.tensors import read_tensor, tensor_indexes

T = TypeVar("T")
MatrixMath = Callable[[MatrixPair, torch.Tensor, torch.Tensor, ComputeHook], sp.DeltaSpectrum]
"""``(pair, base, finetune, run) -> spectrum``: a job's own per-matrix math (``AuditConfig.matrix_math``)."""


def spectrum_kernel(
    base: torch.Tensor, finetune: torch.Tensor, device: str | torch.device | None = None
) -> sp.DeltaSpectrum:
    """The audit's kernel (``lorafid.compute``): one matrix's spectrum, CPU tensors in, plain numbers out."""
    target = kernel_device(device)
    return sp.delta_spectrum(base.to(target, non_blocking=True), finetune.to(target, non_blocking=True))


@dataclass(frozen=True)
class AuditConfig:
    """How to run an audit. Defaults suit a laptop and a Space alike."""

    rank: int = 64  # where the report is read; every rank is derivable afterwards
    device: str = "auto"  # "auto" = first CUDA device if present, else "cpu"
    include_embeddings: bool = False  # embeddings / lm_head: not served by multi-LoRA
    include: str | None = None  # regex on tensor names: audit only these
    exclude: str | None = None  # regex on tensor names: skip these
    base_revision: str | None = None  # overrides "@rev" in the base spec
    finetune_revision: str | None = None
    # Used for requests only, never stored. None: huggingface_hub's lookup (HF_TOKEN, stored
    # login); False: send no token at all (a public app must not lend its own login).
    token: str | bool | None = field(default=None, repr=False)
    endpoint: str | None = None  # Hub URL; None = HF_ENDPOINT or huggingface.co
    allow_local: bool = True  # the public app turns this off
    prefetch: int = 2  # pairs fetched ahead of the math device (memory: ~prefetch+2 pairs)
    fresh: bool = False  # ignore stored results and recompute everything
    max_model_bytes: int | None = None  # refuse pairs whose audited bytes exceed this
    max_tensor_bytes: int | None = None  # refuse pairs with a tensor larger than this (peak memory ~7x)
    max_tensors: int | None = None  # refuse models whose headers list more tensors than this
    store: Store | None = field(default=None, repr=False)  # None = Store() under LORAFID_HOME
    # Where each matrix's math runs (``lorafid.compute``): None runs it here, on ``device``. A
    # ZeroGPU Space passes ``zero_gpu_hook()``: the GPU is held only while a kernel runs (CPU
    # tensors in, plain numbers out), never while bytes stream in.
    compute: ComputeHook | None = field(default=None, repr=False)
    # Replaces the per-matrix math (the extraction writes that matrix's factors, the adapter
    # audit compares the adapter's): called with the pair, both CPU tensors and ``run``, which
    # runs a kernel through ``compute`` (or here). It runs before the matrix is stored, so
    # whatever it writes exists for every stored matrix.
    matrix_math: MatrixMath | None = field(default=None, repr=False)


@dataclass(frozen=True)
class AuditProgress(Progress):
    """One matrix of a running audit done (``lorafid.progress``), for progress bars and live
    charts: ``stage`` "matrices", ``done`` of ``total`` matrices (stored ones included)."""

    bytes_done: int = 0  # bytes of planned tensors consumed so far (fetched or from the store)
    bytes_total: int = 0
    latest: MatrixResult | None = None  # the matrix just finished; None for a flagged or 1-D one
    from_store: bool = False

    @classmethod
    def of(
        cls,
        done: int,
        total: int,
        bytes_done: int,
        bytes_total: int,
        elapsed_s: float,
        latest: MatrixResult | None,
        from_store: bool = False,
    ) -> AuditProgress:
        """A step, its ``message`` in words ("12/48 matrices, 1.2 of 3.4 GB")."""
        message = f"{done}/{total} matrices, {bytes_done / 1e9:.2f} of {bytes_total / 1e9:.2f} GB"
        return cls("matrices", done, total, elapsed_s, message, bytes_done, bytes_total, latest, from_store)


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda if available else cpu; anything else must name an available device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise LorafidError(f"Unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LorafidError(f"Device {name!r} asked for, but no CUDA GPU is available here; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LorafidError(f"Device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
    return device


class Audit:
    """One audit of a (base, fine-tune) pair. Use as a context manager or call ``close()``."""

    def __init__(self, base: str, finetune: str, config: AuditConfig | None = None) -> None:
        self.config = config or AuditConfig()
        self.device = resolve_device(self.config.device)
        self._owns_store = self.config.store is None  # a store we opened is ours to close
        self.store = self.config.store or Store()
        self._specs = (base, finetune)
        self._sources: tuple[Source, Source] | None = None
        self._plan: PairingPlan | None = None
        self._headers: tuple[dict[str, TensorInfo], dict[str, TensorInfo]] = ({}, {})
        self._key = ""
        self._done: dict[str, MatrixResult] = {}
        self._vectors: dict[str, VectorResult] = {}
        self._flagged: list[SkippedTensor] = []
        self._timings = {"wait_for_bytes_s": 0.0, "compute_s": 0.0}
        self._started = 0.0
        self._created = ""

    def __enter__(self) -> Audit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close both sources and the store this audit opened (a store passed in stays open)."""
        try:
            if self._sources:
                for source in self._sources:
                    source.close()
        finally:
            if self._owns_store:
                self.store.close()

    @property
    def key(self) -> str:
        """The store key of this audit (after ``plan()``)."""
        return self._key

    def plan(self) -> PairingPlan:
        """Open both sources, read every header, pair tensors. Idempotent."""
        if self._plan is not None:
            return self._plan
        cfg = self.config
        _check_patterns(cfg)  # before any request: a typo in a pattern costs nothing

        def opened(spec: str, revision: str | None) -> Source:
            return open_source(
                spec, revision=revision, token=cfg.token, endpoint=cfg.endpoint, allow_local=cfg.allow_local
            )

        base = opened(self._specs[0], cfg.base_revision)
        try:
            finetune = opened(self._specs[1], cfg.finetune_revision)
        except BaseException:
            base.close()  # nobody else holds it yet: its HTTP connections would leak
            raise
        self._sources = (base, finetune)
        # A tensor limit also caps header length: a flood of tiny tensors is refused unfetched.
        base_index, finetune_index = tensor_indexes(
            base, finetune, max_header_bytes=header_cap(cfg.max_tensors) if cfg.max_tensors else None
        )
        self._headers = (base_index, finetune_index)
        self._check_tensor_count()
        self._plan = _plan_pairs(self._headers, cfg)
        if cfg.max_model_bytes is not None and self._plan.size_bytes > cfg.max_model_bytes:
            raise LimitExceededError(
                f"This audit would read {self._plan.size_bytes / 1e9:.1f} GB, above this server's limit of "
                f"{cfg.max_model_bytes / 1e9:.1f} GB. Run it with the CLI on your own machine: "
                f"lorafid audit {self._specs[0]} {self._specs[1]}"
            )
        self._check_tensor_sizes(self._plan)
        self._key = audit_key(self._record(0), self._record(1), self._settings(), _identity(self._headers))
        if cfg.fresh:
            self.store.forget(self._key)
        self._done = {n: m for n, m in self.store.matrices(self._key).items() if n in self._planned_names()}
        self._vectors = self.store.vectors(self._key)
        return self._plan

    def run(self) -> Iterator[AuditProgress]:
        """Compute every planned matrix not already stored, yielding progress after each.

        Closing the generator early (Stop, Ctrl-C) keeps everything computed so far.
        """
        plan = self.plan()
        self._started = time.perf_counter()
        self._created = datetime.now(UTC).isoformat(timespec="seconds")
        self.store.save_report(self._key, self.report())
        total = len(plan.matrices)
        bytes_total = plan.size_bytes
        bytes_done = sum(p.size_bytes for p in plan.matrices if p.name in self._done)
        bytes_done += sum(p.size_bytes for p in plan.vectors if p.name in self._vectors)
        for pair in plan.matrices:
            if pair.name in self._done:
                yield AuditProgress.of(
                    len(self._done), total, bytes_done, bytes_total, 0.0, self._done[pair.name], True
                )
        todo = [p for p in (*plan.vectors, *plan.matrices) if p.name not in self._done and p.name not in self._vectors]
        try:
            for pair, base, finetune in self._prefetched(todo):
                latest = self._compute(pair, base, finetune)
                del base, finetune
                bytes_done += pair.size_bytes
                if len(pair.shape) == 2:
                    elapsed = time.perf_counter() - self._started
                    yield AuditProgress.of(len(self._done), total, bytes_done, bytes_total, elapsed, latest)
        finally:
            self.store.save_report(self._key, self.report())

    def report(self) -> Report:
        """The report of what is computed so far: ``complete`` once every matrix is done."""
        plan = self.plan()
        base, finetune = self._require_sources()
        matrices = tuple(self._done[p.name] for p in plan.matrices if p.name in self._done)
        flagged = {s.name for s in self._flagged}
        pending = tuple(p.name for p in plan.matrices if p.name not in self._done and p.name not in flagged)
        bytes_read = sum(getattr(s, "bytes_read", 0) for s in (base, finetune))
        return Report(
            base=self._record(0),
            finetune=self._record(1),
            settings=self._settings(),
            matrices=matrices,
            vectors=tuple(self._vectors[p.name] for p in plan.vectors if p.name in self._vectors),
            skipped=(*plan.skipped, *self._flagged),
            pending=pending,
            status="partial" if pending else "complete",
            timings=Timings(
                elapsed_s=time.perf_counter() - self._started if self._started else 0.0,
                wait_for_bytes_s=self._timings["wait_for_bytes_s"],
                compute_s=self._timings["compute_s"],
                bytes_read=bytes_read,
            ),
            created=self._created,
        )

    # -- internals ---------------------------------------------------------------------

    def run_kernel(self, kernel: Callable[..., T], /, *args: Any) -> T:
        """Run a kernel through the configured hook, or here on this audit's device."""
        if self.config.compute is not None:
            return self.config.compute(kernel, *args)
        return kernel(*args, device=self.device)

    def _compute(self, pair: MatrixPair, base: torch.Tensor, finetune: torch.Tensor) -> MatrixResult | None:
        started = time.perf_counter()
        try:
            if len(pair.shape) == 1:  # tiny: never worth a device transfer
                self._vectors[pair.name] = _vector_result(pair, base, finetune)
                self.store.put_vector(self._key, self._vectors[pair.name])
                return None
            if self.config.matrix_math is not None:
                spectrum = self.config.matrix_math(pair, base, finetune, self.run_kernel)
            else:
                spectrum = self.run_kernel(spectrum_kernel, base, finetune)
        except sp.NonFiniteWeightsError:
            self._flagged.append(
                SkippedTensor(
                    pair.name, "non_finite", f"{pair.name}: NaN or Inf in the weights", pair.base.shape, pair.shape
                )
            )
            return None
        finally:
            self._timings["compute_s"] += time.perf_counter() - started
        result = MatrixResult.from_spectrum(
            name=pair.name, layer=pair.layer, module=pair.module, dtype=pair.finetune.dtype, spectrum=spectrum
        )
        self.store.put_matrix(self._key, result)
        self._done[pair.name] = result
        return result

    def _prefetched(self, pairs: list[MatrixPair]) -> Iterator[tuple[MatrixPair, torch.Tensor, torch.Tensor]]:
        """Yield (pair, base tensor, fine-tune tensor), fetched ``prefetch`` pairs ahead."""
        ready: queue.Queue[Any] = queue.Queue(maxsize=max(1, self.config.prefetch))
        stop = threading.Event()
        base_source, finetune_source = self._require_sources()
        pin = self.device.type == "cuda"

        def fetch_all() -> None:
            with ThreadPoolExecutor(2, thread_name_prefix="lorafid-fetch") as both:
                try:
                    for pair in pairs:
                        if stop.is_set():
                            return
                        jobs = [
                            both.submit(read_tensor, base_source, pair.base, pin),
                            both.submit(read_tensor, finetune_source, pair.finetune, pin),
                        ]
                        item = (pair, jobs[0].result(), jobs[1].result())
                        while not stop.is_set():
                            try:
                                ready.put(item, timeout=0.2)
                                break
                            except queue.Full:
                                continue
                    ready.put(None)
                except BaseException as e:  # handed to the consumer, which re-raises it
                    ready.put(e)

        fetcher = threading.Thread(target=fetch_all, name="lorafid-prefetch", daemon=True)
        fetcher.start()
        try:
            while True:
                waited = time.perf_counter()
                item = ready.get()
                self._timings["wait_for_bytes_s"] += time.perf_counter() - waited
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while fetcher.is_alive():  # unblock a fetcher waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    ready.get(timeout=0.1)

    def _check_tensor_count(self) -> None:
        """A public server's cap on tensors per model: 850k tiny tensors would hold it for minutes."""
        limit = self.config.max_tensors
        for spec, tensors in zip(self._specs, self._headers, strict=True):
            if limit is not None and len(tensors) > limit:
                raise LimitExceededError(
                    f"{spec[:200]} lists {len(tensors):,} tensors, above this server's limit of {limit:,} per "
                    f"model. Run it with the CLI on your own machine: lorafid audit BASE FINETUNE"
                )

    def _check_tensor_sizes(self, plan: PairingPlan) -> None:
        """One tensor must fit in memory several times over (Δ in float32, its Gram matrix): refuse
        it before any byte is read, with the size the header claims."""
        limit = self.config.max_tensor_bytes
        if limit is None:
            return
        for pair in (*plan.matrices, *plan.vectors):
            size = max(pair.base.size_bytes, pair.finetune.size_bytes)
            if size > limit:
                raise LimitExceededError(
                    f"Tensor {pair.name[:200]} {list(pair.shape)} takes {size / 1e9:.2f} GB, above this server's "
                    f"per-tensor limit of {limit / 1e9:.2f} GB. Run it with the CLI on your own machine: "
                    "lorafid audit BASE FINETUNE"
                )

    def _planned_names(self) -> set[str]:
        assert self._plan is not None
        return {p.name for p in self._plan.matrices}

    def _require_sources(self) -> tuple[Source, Source]:
        if self._sources is None:
            raise LorafidError("The audit has not been planned yet; call plan() or run() first.")
        return self._sources

    def _record(self, side: int) -> SourceRecord:
        """The pinned record of the base (side 0) or the fine-tune (side 1)."""
        info = self._require_sources()[side].info
        files = sorted({t.file for t in self._headers[side].values()})
        # A record is the source's info (same fields, same names) plus the files read.
        return SourceRecord(**asdict(info), files=tuple(files))

    def _settings(self) -> AuditSettings:
        cfg = self.config
        return AuditSettings(
            rank=cfg.rank,
            device=str(self.device),
            include_embeddings=cfg.include_embeddings,
            include=cfg.include,
            exclude=cfg.exclude,
            base_name_prefix=self._plan.base_prefix if self._plan else "",
            finetune_name_prefix=self._plan.finetune_prefix if self._plan else "",
        )


def audit(base: str, finetune: str, config: AuditConfig | None = None) -> Report:
    """Run a whole audit and return its report (the library's one-call form)."""
    with Audit(base, finetune, config) as job:
        for _ in job.run():
            pass
        return job.report()


def _check_patterns(cfg: AuditConfig) -> None:
    for label, pattern in (("include", cfg.include), ("exclude", cfg.exclude)):
        if pattern:
            try:
                re.compile(pattern)
            except re.error as e:
                raise LorafidError(
                    f"The {label} pattern {pattern!r} is not a valid regular expression ({e}); fix it, or leave it out."
                ) from e


def _plan_pairs(headers: tuple[dict[str, TensorInfo], dict[str, TensorInfo]], cfg: AuditConfig) -> PairingPlan:
    """``plan_pairs`` with the settings; when the filters leave nothing, say so instead of blaming the models."""
    try:
        return plan_pairs(*headers, include_embeddings=cfg.include_embeddings, include=cfg.include, exclude=cfg.exclude)
    except NoCommonTensorsError:
        if not (cfg.include or cfg.exclude):
            raise
        unfiltered = plan_pairs(*headers, include_embeddings=cfg.include_embeddings)  # raises if the models differ
        filters = ", ".join(
            f"{label} {pattern!r}" for label, pattern in (("include", cfg.include), ("exclude", cfg.exclude)) if pattern
        )
        example = unfiltered.matrices[0].name
        raise EmptySelectionError(
            f"The filter ({filters}) matched none of the {len(unfiltered.matrices)} weight matrices the models share "
            f"(for example {example}). Patterns are regular expressions searched in tensor names; loosen them."
        ) from None


def _identity(headers: tuple[dict[str, TensorInfo], dict[str, TensorInfo]]) -> dict[str, Any]:
    """What pins the bytes beyond the sources' records: every tensor's file and offsets."""
    return {
        side: sorted((n, t.file, t.start, t.end, t.dtype) for n, t in tensors.items())
        for side, tensors in zip(("base", "finetune"), headers, strict=True)
    }


def _vector_result(pair: MatrixPair, base: torch.Tensor, finetune: torch.Tensor) -> VectorResult:
    delta = finetune.to(torch.float64) - base.to(torch.float64)
    if not bool(torch.isfinite(delta).all()):
        raise sp.NonFiniteWeightsError("NaN or Inf in the weights")
    return VectorResult(
        name=pair.name,
        layer=pair.layer,
        module=pair.module,
        shape=pair.shape,
        energy=float(delta.square().sum()),
        finetune_norm_sq=float(finetune.to(torch.float64).square().sum()),
    )
