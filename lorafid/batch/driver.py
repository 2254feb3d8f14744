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

Not here: what runs on the workers (``batch_tasks``), the table and files (``batch_results``),
reading catalogues (``catalogue``), the audit itself (``audit``). Ray is imported only when a
batch runs: ``import lorafid`` never needs it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafid.audit.engine import AuditConfig
from lorafid.audit.report import Report
from lorafid.audit.store import Store
from lorafid.batch.catalogue import CataloguePair
from lorafid.batch.progress import ProgressBoard
from lorafid.batch.results import BatchResult, PairOutcome, write_pair, write_table
from lorafid.batch.tasks import PairResult, PairTask, audit_task, part_task
from lorafid.compute import ComputeHook
from lorafid.errors import LorafidError, MissingExtraError

_POLL_S = 0.5  # how often the driver looks at progress while no task finishes


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
    # Where every task's per-matrix math runs, as AuditConfig.compute (``lorafid.compute``); must pickle.
    compute: ComputeHook | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        wrong = [
            f"{name} must be {rule}"
            for name, ok, rule in (
                ("rank", self.rank >= 1, "at least 1"),
                ("split", self.split >= 1, "at least 1"),
                ("max_concurrent", self.max_concurrent >= 1, "at least 1"),
                ("max_retries", self.max_retries >= 0, "0 or more"),
                ("cpus_per_task", self.cpus_per_task > 0, "positive"),
                ("gpus_per_task", self.gpus_per_task is None or self.gpus_per_task >= 0, "0 or more"),
            )
            if not ok
        ]
        if wrong:
            raise LorafidError("Batch options: " + "; ".join(wrong) + ".")


@dataclass(frozen=True)
class BatchProgress:
    """The driver's view after each event, for one progress bar."""

    done: int  # pairs finished (complete, failed or taken from the store)
    total: int
    failed: int
    bytes_done: int  # weights streamed by running and finished tasks (as last reported)
    bytes_total: int  # of the pairs planned so far


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
            _check_reachable(address)
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise LorafidError(
            f"Could not connect to Ray at {address!r} ({e}). Start a cluster with `ray start --head` and pass "
            "the address it prints, or use --ray local."
        ) from e


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on a cluster address nobody answers at: Ray itself would retry without end.

    Example: "10.0.0.5:6379" and "ray://10.0.0.5:10001" are probed; "auto" is left to Ray.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"nothing answers at {host}:{port}: {e.strerror or e}") from e


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
        outcomes[index] = write_pair(out, index, pair, _first_rank(pair, options), key, report, from_store=True)
    driver = _Driver(ray, pairs, options, store, out, outcomes, on_progress)
    interrupted = False
    try:
        driver.run(todo)
    except KeyboardInterrupt:
        interrupted = True
        driver.cancel()
    finally:
        driver.close()
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
        self.audit_remote = ray.remote(audit_task).options(**self.task_options)
        self.part_remote = ray.remote(part_task).options(**self.task_options)
        self.board: Any = None  # the progress actor, started with the first task
        self._asked: Any = None  # the board's answer being computed
        self._running: dict[tuple[int, int], tuple[int, int]] = {}  # its latest answer
        self._finished_bytes: dict[int, int] = {}  # pair index -> its weights, from its result
        self.streaming: set[Any] = set()  # refs that count against max_concurrent
        self.finals: dict[Any, int] = {}  # ref of a pair's report -> catalogue index

    def run(self, todo: list[int]) -> None:
        queue: deque[tuple[int, int, int]] = deque()  # (index, part, parts); part == parts: the report task
        for index in todo:
            parts = self.pairs[index].split or self.options.split
            queue.extend((index, part, parts) for part in range(parts) if parts > 1)
            queue.append((index, parts, parts))
        part_refs: dict[int, list[Any]] = {}
        if todo and self.options.progress:
            self.board = self.ray.remote(num_cpus=0)(ProgressBoard).remote()
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

    def close(self) -> None:
        if self.board is not None:
            self.ray.kill(self.board)

    def cancel(self) -> None:
        for ref in self.streaming | self.finals.keys():
            self.ray.cancel(ref)

    def _task(self, index: int) -> PairTask:
        pair, options = self.pairs[index], self.options
        config = AuditConfig(
            rank=_first_rank(pair, options),
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
        return PairTask(index, pair.base, pair.finetune, config, home)

    def _collect(self, ref: Any, index: int) -> None:
        pair = self.pairs[index]
        try:
            result: PairResult = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            self.outcomes[index] = PairOutcome(index, pair, "failed", error=_task_error(e, self.options.max_retries))
            return
        self._finished_bytes[index] = result.size_bytes
        report = Report.from_json(result.report_json).with_spectra(result.spectra)
        _keep(self.store, result.key, report)
        self.outcomes[index] = write_pair(
            self.out, index, pair, _first_rank(pair, self.options), result.key, report, from_store=False
        )

    def _progress(self) -> None:
        if self.on_progress is None:
            return
        if self.board is not None:
            # Never wait on the board: the actor takes seconds to start, and the tasks must not.
            if self._asked is None:
                self._asked = self.board.snapshot.remote()
            elif self.ray.wait([self._asked], timeout=0)[0]:
                self._running = self.ray.get(self._asked)
                self._asked = self.board.snapshot.remote()
        # A split pair's report task covers the whole pair: once it reports, its chunks no longer count.
        whole = {index for index, part in self._running if part == -1}
        running = [
            v
            for (index, part), v in self._running.items()
            if index not in self._finished_bytes and (part == -1 or index not in whole)
        ]
        finished = sum(self._finished_bytes.values())
        done = finished + sum(d for d, _ in running)
        total = finished + sum(t for _, t in running)
        failed = sum(o.status == "failed" for o in self.outcomes.values())
        self.on_progress(BatchProgress(len(self.outcomes), len(self.pairs), failed, done, total))


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


def _task_error(error: Exception, retries: int) -> str:
    """One line for the table: the audit's own message, else what Ray says happened."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, LorafidError):
        return str(cause)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    name = type(error).__name__
    if "WorkerCrashed" in name or "NodeDied" in name or "ObjectLost" in name:
        tries = f"{retries + 1} times" if retries else "once"
        return f"the worker running this pair was lost {tries} ({name}); see `ray logs` on its node"
    first = str(error).strip().splitlines()
    return f"{name}: {first[0] if first else 'no message'}"


def _driver_token() -> str | None:
    """HF_TOKEN, else the stored login of this machine: what tasks on other nodes need."""
    from huggingface_hub import get_token

    return get_token()


def _first_rank(pair: CataloguePair, options: BatchOptions) -> int:
    """The rank a pair's report is written at: its row's first, else the batch's."""
    return (pair.ranks or (options.rank,))[0]
