"""Catalogue audits on Ray: one task per pair, each streaming from the Hub itself.

The driver (``run_batch``) reads no weights. It skips pairs the store already holds
complete, submits one Ray task per pair (or, for a pair split by layer, one task per chunk
of layers and a merge task), shows progress, writes each report to ``out`` as it arrives,
and ends with a table sorted by loss (``table.csv``, ``table.json``; ``results_table``).

A task runs the same ``Audit`` as ``lorafid audit``: it opens both repos, streams the
tensors, and writes every matrix to the store under the worker's ``LORAFID_HOME`` as soon
as it exists. So a task that Ray retries after losing its worker resumes at matrix level,
and a batch run again resumes partial pairs the same way. Only the report and its spectra
(8 bytes per singular value) travel back to the driver.

Secrets: the Hub token reaches tasks as ``HF_TOKEN`` in the tasks' runtime environment,
never as a task argument (Ray keeps arguments in task specs, logs and the dashboard). The
endpoint, not a secret, is an argument, so every node reads the same Hub.

Failures: a pair that fails (missing or gated repo, corrupt file, a worker lost more than
``max_retries`` times) is recorded with its error; the other pairs go on. What it computed
before failing stays in the store for the next run.

Example::

    connect("local")
    result = run_batch(load_catalogue(Path("catalogue.csv")), BatchOptions(rank=64), out=Path("audits"))
    for row in result.table(): print(row.label, row.loss)

Not here: the audit itself (``audit``), the JSON (``report``), reading catalogues
(``catalogue``). Ray is imported only when a batch runs: ``import lorafid`` never needs it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafid import spectrum as sp
from lorafid.audit import Audit, AuditConfig, AuditProgress
from lorafid.catalogue import CataloguePair
from lorafid.errors import LorafidError, MissingExtraError
from lorafid.report import MatrixResult, Report, save_spectra
from lorafid.store import Store, default_home

TABLE_SCHEMA = "lorafid.batch/1"
_PARTS_STORE = "parts"  # sub-folder of LORAFID_HOME for the chunks of split pairs (kept out of the gallery)
_PROGRESS_EVERY_S = 0.5
_POLL_S = 0.5


@dataclass(frozen=True)
class BatchOptions:
    """How a batch runs. Each default suits a laptop; a cluster mostly raises ``max_concurrent``."""

    rank: int = 64  # for pairs whose row names no rank
    split: int = 1  # tasks per pair, by chunks of layers, for pairs whose row names no split
    include_embeddings: bool = False
    include: str | None = None
    exclude: str | None = None
    fresh: bool = False  # recompute every pair, even those stored complete
    cpus_per_task: float = 1.0  # Ray sets each task's thread count (OMP_NUM_THREADS) to this
    gpus_per_task: float | None = None  # None: 1 when the cluster has GPUs, else 0
    max_concurrent: int = 8  # streaming tasks in flight: keeps a catalogue under the Hub's rate limits
    max_retries: int = 3  # Ray retries of a task whose worker died (OOM, a lost node)
    endpoint: str | None = None  # None: the driver's HF_ENDPOINT, else huggingface.co
    # None: the driver's HF_TOKEN or stored login. Sent to tasks only as HF_TOKEN in their runtime env.
    token: str | None = field(default=None, repr=False)
    store_home: Path | None = None  # None: each worker's LORAFID_HOME (on a local Ray: the driver's)
    progress: bool = True  # live byte counts from the tasks (one small actor)
    # Replaces the per-matrix math in every task, as AuditConfig.compute; must pickle.
    compute: Callable[[torch.Tensor, torch.Tensor], sp.DeltaSpectrum] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class BatchProgress:
    """The driver's view after each event, for one progress bar."""

    done: int  # pairs finished (complete, failed or taken from the store)
    total: int
    failed: int
    bytes_done: int  # weights streamed by running and finished tasks (as last reported)
    bytes_total: int  # of the pairs planned so far


@dataclass(frozen=True)
class PairOutcome:
    """What became of one catalogue row."""

    index: int  # position in the catalogue
    pair: CataloguePair
    status: str  # "complete" | "failed" | "pending" (the batch was interrupted first)
    report: Report | None = field(default=None, repr=False)  # at the pair's first rank, with spectra
    key: str | None = None  # store key: the dashboard opens it as "store:<key>"
    error: str | None = None
    from_store: bool = False  # complete before this run: nothing was fetched
    report_file: str | None = None  # relative to ``out``


@dataclass(frozen=True)
class TableRow:
    """One line of the final table: a pair read at one rank."""

    label: str
    base: str
    finetune: str
    rank: int
    status: str
    loss: float | None  # share of the fine-tune's change lost at this rank (1 − energy retained)
    energy_retained: float | None
    weight_rel_error: float | None  # ‖W_ft − W_served‖ / ‖W_ft‖ over the audited matrices
    rank_for_90: int | None  # smallest rank keeping 90% of the change
    matrices: int
    sentence: str
    base_sha: str | None
    finetune_sha: str | None
    gallery_ref: str | None  # "store:<key>", what the dashboard's gallery opens
    report_file: str | None
    error: str | None


@dataclass(frozen=True)
class BatchResult:
    outcomes: tuple[PairOutcome, ...]  # catalogue order
    interrupted: bool = False

    @property
    def failed(self) -> list[PairOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def table(self, default_rank: int = 64) -> list[TableRow]:
        return results_table(self.outcomes, default_rank)


# -- Ray -----------------------------------------------------------------------------------


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise MissingExtraError("lorafid batch runs on Ray, which is not installed: pip install lorafid[batch]") from e
    return ray


def connect(address: str | None = "local", *, num_cpus: int | None = None) -> None:
    """Start or join Ray unless this process is connected already.

    ``"local"`` / None: a private Ray instance on this machine (``num_cpus``: its size, default
    all cores). ``"auto"``: the cluster that ``ray start`` runs on this machine, or
    ``RAY_ADDRESS``. Anything else: a cluster address (``host:6379`` or ``ray://host:10001``).
    """
    ray = import_ray()
    if ray.is_initialized():
        return
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address in (None, "local"):
            # Reports and spectra are small (a 70B pair: ~40 MB): a small object store is plenty.
            ray.init(
                address="local", num_cpus=num_cpus, include_dashboard=False, object_store_memory=512 * 2**20, **quiet
            )
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise LorafidError(
            f"Could not connect to Ray at {address!r} ({e}). Start a cluster with `ray start --head` and pass "
            "the address it prints, or use --ray local."
        ) from e


def run_batch(
    pairs: Sequence[CataloguePair],
    options: BatchOptions | None = None,
    *,
    out: Path | None = None,
    on_progress: Callable[[BatchProgress], None] | None = None,
) -> BatchResult:
    """Audit every pair on Ray (starting a local instance if none is connected).

    Each finished pair is written to ``out/pairs/`` at once; ``out/table.csv`` and
    ``out/table.json`` at the end, also after Ctrl-C (the result is then ``interrupted``, its
    unfinished pairs ``pending``, and their computed matrices kept in the store).
    """
    options = options or BatchOptions()
    ray = import_ray()
    connect()
    store = Store(options.store_home)
    outcomes: dict[int, PairOutcome] = {}
    todo: list[int] = []
    for index, pair in enumerate(pairs):
        stored = None if options.fresh else _stored_complete(store, pair, options)
        if stored is None:
            todo.append(index)
            continue
        key, report = stored
        outcomes[index] = _finish(out, index, pair, options, key, report, from_store=True)
    driver = _Driver(ray, pairs, options, store, out, outcomes, on_progress)
    interrupted = False
    try:
        driver.run(todo)
    except KeyboardInterrupt:
        interrupted = True
        driver.cancel()
    finally:
        store.close()
    result = BatchResult(
        tuple(outcomes.get(i, PairOutcome(i, pair, "pending")) for i, pair in enumerate(pairs)), interrupted
    )
    if out is not None:
        write_table(result.table(options.rank), out)
    return result


class _Driver:
    """Submits tasks under the concurrency cap, collects results, reports progress."""

    def __init__(
        self,
        ray: Any,
        pairs: Sequence[CataloguePair],
        options: BatchOptions,
        store: Store,
        out: Path | None,
        outcomes: dict[int, PairOutcome],
        on_progress: Callable[[BatchProgress], None] | None,
    ) -> None:
        self.ray, self.pairs, self.options, self.store, self.out = ray, pairs, options, store, out
        self.outcomes = outcomes
        self.on_progress = on_progress
        gpus = options.gpus_per_task
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.task_options: dict[str, Any] = {
            "num_cpus": options.cpus_per_task,
            "num_gpus": gpus,
            "max_retries": options.max_retries,
        }
        token = options.token or _driver_token()
        if token:  # the environment, not the arguments: Ray shows arguments in task specs and logs
            self.task_options["runtime_env"] = {"env_vars": {"HF_TOKEN": token}}
        self.audit_remote = ray.remote(_audit_task).options(**self.task_options)
        self.part_remote = ray.remote(_part_task).options(**self.task_options)
        self.board = ray.remote(num_cpus=0)(_Board).remote() if options.progress else None
        self.streaming: set[Any] = set()  # refs that count against max_concurrent
        self.finals: dict[Any, int] = {}  # ref of a pair's report -> catalogue index

    def run(self, todo: list[int]) -> None:
        queue: deque[tuple[int, int, int]] = deque()  # (index, part, parts); part == parts: the report task
        for index in todo:
            parts = self.pairs[index].split or self.options.split
            queue.extend((index, part, parts) for part in range(parts) if parts > 1)
            queue.append((index, parts, parts))
        part_refs: dict[int, list[Any]] = {}
        self._progress()
        while queue or self.finals:
            while queue and (queue[0][1] == queue[0][2] > 1 or len(self.streaming) < self.options.max_concurrent):
                index, part, parts = queue.popleft()
                task = self._task(index)
                if part < parts:
                    ref = self.part_remote.remote(task, self.board, part, parts)
                    part_refs.setdefault(index, []).append(ref)
                    self.streaming.add(ref)
                    continue
                ref = self.audit_remote.remote(task, self.board, *part_refs.pop(index, []))
                self.finals[ref] = index
                if parts == 1:
                    self.streaming.add(ref)
            ready, _ = self.ray.wait(list(self.streaming | self.finals.keys()), num_returns=1, timeout=_POLL_S)
            for ref in ready:
                self.streaming.discard(ref)
                if ref in self.finals:
                    self._collect(ref, self.finals.pop(ref))
            self._progress()

    def cancel(self) -> None:
        for ref in self.streaming | self.finals.keys():
            self.ray.cancel(ref)

    def _task(self, index: int) -> _Task:
        pair, options = self.pairs[index], self.options
        config = AuditConfig(
            rank=(pair.ranks or (options.rank,))[0],
            include_embeddings=options.include_embeddings,
            include=options.include,
            exclude=options.exclude,
            base_revision=pair.base_revision,
            finetune_revision=pair.finetune_revision,
            endpoint=options.endpoint or os.environ.get("HF_ENDPOINT") or None,
            fresh=options.fresh,
            compute=options.compute,
        )
        home = str(options.store_home) if options.store_home is not None else None
        return _Task(index, pair.base, pair.finetune, config, home)

    def _collect(self, ref: Any, index: int) -> None:
        pair = self.pairs[index]
        try:
            result: _PairResult = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            self.outcomes[index] = PairOutcome(index, pair, "failed", error=_task_error(e, self.options.max_retries))
            return
        report = Report.from_json(result.report_json).with_spectra(result.spectra)
        _keep(self.store, result.key, report)
        self.outcomes[index] = _finish(self.out, index, pair, self.options, result.key, report, from_store=False)

    def _progress(self) -> None:
        if self.on_progress is None:
            return
        done_bytes, total_bytes = self.ray.get(self.board.totals.remote()) if self.board is not None else (0, 0)
        failed = sum(o.status == "failed" for o in self.outcomes.values())
        self.on_progress(BatchProgress(len(self.outcomes), len(self.pairs), failed, done_bytes, total_bytes))


# -- tasks (run on Ray workers) ---------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    """A task's arguments: everything but the token, which comes from the environment."""

    index: int
    base: str
    finetune: str
    config: AuditConfig  # token None (the worker's HF_TOKEN), store None (set from store_home)
    store_home: str | None  # None: the worker's LORAFID_HOME


@dataclass(frozen=True)
class _PairResult:
    key: str
    report_json: str
    spectra: dict[str, np.ndarray]


class _Board:
    """A Ray actor holding the latest byte counts of every running task (key: (pair, part))."""

    def __init__(self) -> None:
        self._bytes: dict[tuple[int, int], tuple[int, int]] = {}

    def update(self, key: tuple[int, int], done: int, total: int) -> None:
        self._bytes[key] = (done, total)

    def totals(self) -> tuple[int, int]:
        return sum(d for d, _ in self._bytes.values()), sum(t for _, t in self._bytes.values())


def _audit_task(task: _Task, board: Any, *parts: tuple[MatrixResult, ...]) -> _PairResult:
    """The whole audit of one pair; ``parts``: matrices already computed by the pair's chunk tasks."""
    store = Store(task.store_home)
    try:
        config = replace(task.config, store=store)
        if parts:
            with Audit(task.base, task.finetune, config) as probe:
                probe.plan()  # its key: where the chunks' matrices go, so that the audit finds them done
                if config.fresh:
                    store.forget(probe.key)
                for matrices in parts:
                    for matrix in matrices:
                        store.put_matrix(probe.key, matrix)
            config = replace(config, fresh=False)
        with Audit(task.base, task.finetune, config) as job:
            _drive(job, board, (task.index, -1))
            report = job.report()
            spectra = {m.name: m.sigma_sq for m in report.matrices if m.sigma_sq is not None}
            return _PairResult(job.key, report.to_json(indent=None), spectra)
    finally:
        store.close()


def _part_task(task: _Task, board: Any, part: int, parts: int) -> tuple[MatrixResult, ...]:
    """Matrices of chunk ``part`` of ``parts`` of the pair's layers, not stored yet (with spectra).

    Chunks are contiguous runs of layers (layers 0-7 of 32 in 4 parts): a chunk then reads
    few shards. Matrices outside the layers (lm_head) and 1-D tensors are left to the report task.
    """
    store = Store(task.store_home)
    try:
        with Audit(task.base, task.finetune, replace(task.config, store=store)) as probe:
            plan = probe.plan()
            done = set() if task.config.fresh else set(store.matrices(probe.key))
        layers = sorted({m.layer for m in plan.matrices if m.layer is not None})
        mine = set(_chunk(layers, part, parts))
        names = [m.name for m in plan.matrices if m.layer in mine and m.name not in done]
    finally:
        store.close()
    if not names:
        return ()
    home = Path(task.store_home) if task.store_home else default_home()
    parts_store = Store(home / _PARTS_STORE)
    try:
        # Exact names, so that this audit reads exactly these matrices; its own key keeps
        # its progress apart (a retried chunk resumes from its own stored matrices).
        only = "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
        config = replace(task.config, include=only, exclude=None, fresh=False, store=parts_store)
        with Audit(task.base, task.finetune, config) as job:
            _drive(job, board, (task.index, part))
            return job.report().matrices
    finally:
        parts_store.close()


def _drive(job: Audit, board: Any, key: tuple[int, int]) -> None:
    """Run the audit to the end, telling the progress board every half second."""
    last = 0.0
    step: AuditProgress | None = None
    for step in job.run():
        if board is not None and time.monotonic() - last >= _PROGRESS_EVERY_S:
            board.update.remote(key, step.bytes_done, step.bytes_total)
            last = time.monotonic()
    if board is not None and step is not None:
        board.update.remote(key, step.bytes_done, step.bytes_total)


def _chunk(items: list[int], part: int, parts: int) -> list[int]:
    """Contiguous chunk ``part`` of ``parts``, sizes differing by at most one.

    Example: items 0..9, parts 3 -> [0, 1, 2, 3], [4, 5, 6], [7, 8, 9].
    """
    size, extra = divmod(len(items), parts)
    start = part * size + min(part, extra)
    return items[start : start + size + (1 if part < extra else 0)]


# -- results -------------------------------------------------------------------------------


def _stored_complete(store: Store, pair: CataloguePair, options: BatchOptions) -> tuple[str, Report] | None:
    """(key, report) when the store holds this pair complete with these settings: no request needed.

    A pair is matched by its specs and revisions as written; a branch that has moved since
    is not noticed (pin the revision, or pass fresh).
    """
    key = store.find(pair.base, pair.finetune, pair.base_revision, pair.finetune_revision)
    report = store.load_report(key) if key else None
    if key is None or report is None or report.status != "complete":
        return None
    settings = report.settings
    if (settings.include_embeddings, settings.include, settings.exclude) != (
        options.include_embeddings,
        options.include,
        options.exclude,
    ):
        return None
    return key, report


def _keep(store: Store, key: str, report: Report) -> None:
    """Copy a report into the driver's store unless it is there already (a task on another node)."""
    stored = store.load_report(key)
    if stored is not None and stored.status == "complete":
        return
    for matrix in report.matrices:
        store.put_matrix(key, matrix)
    for vector in report.vectors:
        store.put_vector(key, vector)
    store.save_report(key, report)


def _finish(
    out: Path | None,
    index: int,
    pair: CataloguePair,
    options: BatchOptions,
    key: str,
    report: Report,
    *,
    from_store: bool,
) -> PairOutcome:
    """The outcome of a complete pair, its report written to ``out/pairs/`` at the pair's first rank."""
    report = report.with_rank((pair.ranks or (options.rank,))[0])
    relative = None
    if out is not None:
        relative = f"pairs/{index + 1:03d}-{_slug(pair.name)}.json"
        path = out / relative
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(report.to_json() + "\n")
            save_spectra(report, path.with_name(path.stem + ".spectra.safetensors"))
        except OSError as e:
            raise LorafidError(f"Cannot write {path}: {e.strerror}.") from e
    return PairOutcome(index, pair, report.status, report, key, None, from_store, relative)


def results_table(outcomes: Sequence[PairOutcome], default_rank: int = 64) -> list[TableRow]:
    """One row per pair and rank: the worst loss first, then failed and pending pairs in catalogue order."""
    rows: list[TableRow] = []
    for o in outcomes:
        for rank in o.pair.ranks or (default_rank,):
            rows.append(_row(o, rank))
    return sorted(rows, key=lambda r: (r.loss is None, -(r.loss or 0.0)))


def _row(outcome: PairOutcome, rank: int) -> TableRow:
    pair, report = outcome.pair, outcome.report
    if report is None:
        return TableRow(
            pair.name,
            pair.base,
            pair.finetune,
            rank,
            status=outcome.status,
            loss=None,
            energy_retained=None,
            weight_rel_error=None,
            rank_for_90=None,
            matrices=0,
            sentence="",
            base_sha=None,
            finetune_sha=None,
            gallery_ref=None,
            report_file=None,
            error=outcome.error or ("not run: the batch was interrupted" if outcome.status == "pending" else None),
        )
    summary = report.with_rank(rank).summary()
    return TableRow(
        pair.name,
        pair.base,
        pair.finetune,
        rank,
        status=outcome.status,
        loss=1.0 - summary.overall.energy_retained,
        energy_retained=summary.overall.energy_retained,
        weight_rel_error=summary.overall.weight_rel_error,
        rank_for_90=summary.rank_for_90,
        matrices=len(report.matrices),
        sentence=summary.sentence(),
        base_sha=report.base.resolved_sha,
        finetune_sha=report.finetune.resolved_sha,
        gallery_ref=f"store:{outcome.key}" if outcome.key else None,
        report_file=outcome.report_file,
        error=None,
    )


def write_table(rows: Sequence[TableRow], out: Path) -> None:
    """``out/table.csv`` (one line per row) and ``out/table.json`` (``{"schema", "created", "rows"}``)."""
    names = list(TableRow.__dataclass_fields__)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with (out / "table.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=names)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
        document = {
            "schema": TABLE_SCHEMA,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "rows": [asdict(r) for r in rows],
        }
        (out / "table.json").write_text(json.dumps(document, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    except OSError as e:
        raise LorafidError(f"Cannot write the table to {out}: {e.strerror}.") from e


def _task_error(error: Exception, retries: int) -> str:
    """One line for the table: the audit's own message, else what Ray says happened."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, LorafidError):
        return str(cause)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    name = type(error).__name__
    if "WorkerCrashed" in name or "NodeDied" in name or "ObjectLost" in name:
        return f"the worker running this pair was lost {retries + 1} times ({name}); see `ray logs` on its node"
    first = str(error).strip().splitlines()
    return f"{name}: {first[0] if first else 'no message'}"


def _driver_token() -> str | None:
    """HF_TOKEN, else the stored login of this machine: what tasks on other nodes need."""
    from huggingface_hub import get_token

    return get_token()


def _slug(text: str) -> str:
    """A file-name-safe form: "org/ft-a @ v2" -> "org_ft-a_v2"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "pair"
