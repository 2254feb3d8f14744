"""Catalogue audits on Ray: one task per pair, each streaming from the Hub itself.

The driver (``run_batch``) reads no weights. It asks the Hub which commit each repo points
at now (one metadata request per repo) and takes from the store the pairs audited before at
that endpoint, at those commits, with the same tensor selection (``reuse``). It submits one
Ray task per other pair (or, for a pair split by layer, one task per chunk of layers and a
merge task), shows progress, writes each report to ``out`` as it arrives, and ends with a
table sorted by loss (``table.csv``, ``table.json``; ``results_table``) that names the
node(s) each pair ran on.

A task runs the same ``Audit`` as ``lorafid audit``: it opens both repos, streams the
tensors, and writes every matrix to the store under the worker's ``LORAFID_HOME`` as soon
as it exists. So a task that Ray retries after losing its worker or its node resumes at
matrix level, and a batch run again resumes partial pairs the same way. Only the report and
its spectra (8 bytes per singular value) travel back to the driver.

Driver-side state stays on the driver: outcomes, the queue and the table live in this
process; its two small actors (the progress board, the token's holder) are placed on the
driver's own node, and losing the board only stops the byte counts.

Secrets: the Hub token is handed to a small actor on the driver's node (``secret``) and
each task asks it for the token: never a task argument, never in a runtime environment
(Ray writes those to its logs), never in the object store (Ray may spill it to disk). The
endpoint, not a secret, is an argument, so every node reads the same Hub.

Failures: a pair that fails (missing or gated repo, corrupt file, a worker lost more than
``max_retries`` times) is recorded with its error; the other pairs go on. What it computed
before failing stays in the store for the next run.

Example::

    connect("local")
    result = run_batch(load_catalogue(Path("catalogue.csv")), BatchOptions(rank=64), out=Path("audits"))
    for row in result.table(): print(row.label, row.loss)

Not here: joining Ray (``cluster``), what runs on the workers (``tasks``), the table and
files (``results``), which stored results may be reused (``reuse``), reading catalogues
(``catalogue``), the audit itself (``audit``). Ray is imported only when a batch runs:
``import lorafid`` never needs it.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafid.audit.engine import AuditConfig
from lorafid.audit.report import Report
from lorafid.audit.store import Store
from lorafid.batch.catalogue import CataloguePair
from lorafid.batch.cluster import connect, import_ray, node_label
from lorafid.batch.progress import ProgressBoard
from lorafid.batch.results import BatchResult, PairOutcome, write_pair, write_table
from lorafid.batch.reuse import HubSide, ReuseIndex, hub_endpoint, resolve_commits, selection
from lorafid.batch.secret import SecretHolder
from lorafid.batch.tasks import PairResult, PairTask, audit_task, part_task
from lorafid.compute import ComputeHook
from lorafid.errors import LorafidError

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
    # None: the driver's HF_TOKEN or stored login. Tasks ask a small actor on the driver's node for it.
    token: str | None = field(default=None, repr=False)
    store_home: Path | None = None  # None: each worker's LORAFID_HOME (on a local Ray: the driver's)
    progress: bool = True  # live byte counts from the tasks (one small actor on the driver's node)
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

    @property
    def selection(self) -> str:
        return selection(self.include_embeddings, self.include, self.exclude)


@dataclass(frozen=True)
class BatchProgress:
    """The driver's view after each event, for one progress bar."""

    done: int  # pairs finished (complete, failed or taken from the store)
    total: int
    failed: int
    bytes_done: int  # weights streamed by running and finished tasks (as last reported)
    bytes_total: int  # of the pairs planned so far


@dataclass
class _Plan:
    """What the driver knows before submitting: each pair's commits now, and who must start afresh."""

    endpoint: str
    sides: dict[int, tuple[HubSide, HubSide]]  # pair index -> both sides, for pairs of two Hub repos
    fresh: set[int] = field(default_factory=set)  # pairs whose stored results came from another Hub


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
    index = ReuseIndex(store.home)
    token = options.token or _driver_token()
    outcomes: dict[int, PairOutcome] = {}
    todo: list[int] = []
    driver: _Driver | None = None
    interrupted = False
    try:
        plan = _plan(pairs, options, token)
        for i, pair in enumerate(pairs):
            stored = None if options.fresh else _stored_complete(store, index, plan, i, options)
            if stored is None:
                todo.append(i)
                continue
            key, report = stored
            outcomes[i] = write_pair(out, i, pair, _first_rank(pair, options), key, report, from_store=True)
        plan.fresh = {i for i in todo if _from_another_hub(index, plan, i) and not options.fresh}
        driver = _Driver(ray, pairs, options, store, out, outcomes, on_progress, token=token, plan=plan, index=index)
        driver.run(todo)
    except KeyboardInterrupt:
        interrupted = True
        if driver is not None:
            driver.cancel()
    finally:
        if driver is not None:
            driver.close()
        index.close()
        store.close()
    result = BatchResult(
        tuple(outcomes.get(i, PairOutcome(i, pair, "pending")) for i, pair in enumerate(pairs)), interrupted
    )
    if out is not None:
        write_table(result.table(options.rank), out)
    return result


def _plan(pairs: Sequence[CataloguePair], options: BatchOptions, token: str | None) -> _Plan:
    """Resolve every Hub repo of the catalogue to its commit now (one request per repo and revision)."""
    endpoint = hub_endpoint(options.endpoint)
    specs = [(p.base, p.base_revision) for p in pairs] + [(p.finetune, p.finetune_revision) for p in pairs]
    commits = resolve_commits(specs, endpoint=endpoint, token=token)
    sides = {}
    for i, pair in enumerate(pairs):
        base, finetune = commits[(pair.base, pair.base_revision)], commits[(pair.finetune, pair.finetune_revision)]
        if base is not None and finetune is not None:
            sides[i] = (base, finetune)
    return _Plan(endpoint, sides)


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
        *,
        token: str | None = None,
        plan: _Plan | None = None,
        index: ReuseIndex | None = None,
    ) -> None:
        self.ray, self.pairs, self.options, self.store, self.out = ray, pairs, options, store, out
        self.outcomes = outcomes
        self.on_progress = on_progress
        self.plan = plan or _Plan(hub_endpoint(options.endpoint), {})
        self.index = index
        gpus = options.gpus_per_task
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.task_options: dict[str, Any] = {
            "num_cpus": options.cpus_per_task,
            "num_gpus": gpus,
            "max_retries": options.max_retries,
        }
        # Not an argument, not a runtime environment (Ray logs those), not the object store
        # (Ray may spill it to disk): a small actor on this node hands it out (``secret``).
        self.secret: list[Any] = [self._hold(token)] if token else []
        self.audit_remote = ray.remote(audit_task).options(**self.task_options)
        self.part_remote = ray.remote(part_task).options(**self.task_options)
        self.board: Any = None  # the progress actor, started with the first task
        self._asked: Any = None  # the board's answer being computed
        self._running: dict[tuple[int, int], tuple[int, int]] = {}  # its latest answer
        self._finished_bytes: dict[int, int] = {}  # pair index -> its weights, from its result
        self.streaming: set[Any] = set()  # refs that count against max_concurrent
        self.finals: dict[Any, int] = {}  # ref of a pair's report -> catalogue index
        self._labels: dict[str, str] = {}  # node ID -> its label in the table

    def run(self, todo: list[int]) -> None:
        queue: deque[tuple[int, int, int]] = deque()  # (index, part, parts); part == parts: the report task
        for index in todo:
            parts = self.pairs[index].split or self.options.split
            queue.extend((index, part, parts) for part in range(parts) if parts > 1)
            queue.append((index, parts, parts))
        part_refs: dict[int, list[Any]] = {}
        if todo and self.options.progress:
            self.board = self._start_board()
        self._progress()
        while queue or self.finals:
            while queue and (queue[0][1] == queue[0][2] > 1 or len(self.streaming) < self.options.max_concurrent):
                index, part, parts = queue.popleft()
                task = self._task(index)
                if part < parts:
                    ref = self.part_remote.remote(task, self.board, self.secret, part, parts)
                    part_refs.setdefault(index, []).append(ref)
                    self.streaming.add(ref)
                    continue
                ref = self.audit_remote.remote(task, self.board, self.secret, *part_refs.pop(index, []))
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
        for actor in (self.board, *self.secret):
            if actor is not None:
                with contextlib.suppress(Exception):  # already gone with its node: nothing to stop
                    self.ray.kill(actor)

    def cancel(self) -> None:
        for ref in self.streaming | self.finals.keys():
            self.ray.cancel(ref)

    def _start_board(self) -> Any:
        """The progress actor, on this driver's node: a lost worker node cannot take it along."""
        return self._here(ProgressBoard)

    def _hold(self, token: str) -> Any:
        """The token's holder, on this driver's node, given the token (one call, waited for)."""
        holder = self._here(SecretHolder)
        self.ray.get(holder.set.remote(token))
        return holder

    def _here(self, actor: type) -> Any:
        """An actor of class ``actor`` on this driver's node, taking no CPU."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = self.ray.get_runtime_context().get_node_id()
        strategy = NodeAffinitySchedulingStrategy(node_id=here, soft=False)
        return self.ray.remote(num_cpus=0, scheduling_strategy=strategy)(actor).remote()

    def _task(self, index: int) -> PairTask:
        pair, options = self.pairs[index], self.options
        config = AuditConfig(
            rank=_first_rank(pair, options),
            include_embeddings=options.include_embeddings,
            include=options.include,
            exclude=options.exclude,
            base_revision=pair.base_revision,
            finetune_revision=pair.finetune_revision,
            endpoint=self.plan.endpoint,
            fresh=options.fresh or index in self.plan.fresh,
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
        _keep(self.store, result.key, report, replace=index in self.plan.fresh)
        outcome = write_pair(
            self.out, index, pair, _first_rank(pair, self.options), result.key, report, from_store=False
        )
        self.outcomes[index] = outcome.on_nodes(tuple(self._label(n) for n in result.nodes if n))
        self._remember(result.key, report)

    def _remember(self, key: str, report: Report) -> None:
        """Index a complete Hub pair by the endpoint and the commits its report says were read."""
        base, finetune = report.base, report.finetune
        if self.index is None or report.status != "complete" or base.kind != "hub" or finetune.kind != "hub":
            return
        if base.repo_id and base.resolved_sha and finetune.repo_id and finetune.resolved_sha:
            self.index.record(
                self.plan.endpoint,
                HubSide(base.repo_id, base.resolved_sha),
                HubSide(finetune.repo_id, finetune.resolved_sha),
                self.options.selection,
                key,
            )

    def _label(self, node_id: str) -> str:
        """A node's label: its address and ID; refreshed from Ray when a new node shows up."""
        if node_id not in self._labels:
            with contextlib.suppress(Exception):  # the GCS is busy or gone: the ID alone still says where
                self._labels.update({str(n.get("NodeID")): node_label(n) for n in self.ray.nodes()})
        return self._labels.get(node_id, f"? [{node_id[:8]}]")

    def _progress(self) -> None:
        if self.on_progress is None:
            return
        if self.board is not None:
            # Never wait on the board: the actor takes seconds to start, and the tasks must not.
            try:
                if self._asked is None:
                    self._asked = self.board.snapshot.remote()
                elif self.ray.wait([self._asked], timeout=0)[0]:
                    self._running = self.ray.get(self._asked)
                    self._asked = self.board.snapshot.remote()
            except self.ray.exceptions.RayError:
                self.board = None  # lost (its node died): results still come; only byte counts stop
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


def _stored_complete(
    store: Store, index: ReuseIndex, plan: _Plan, i: int, options: BatchOptions
) -> tuple[str, Report] | None:
    """(key, report) when this pair was audited complete at this endpoint, at the commits its
    repos point at now, with this tensor selection: no byte of weights needed.

    Only pairs of two Hub repos are taken from the store (local files are re-planned by
    their task, which resumes by the audit's own key).
    """
    sides = plan.sides.get(i)
    if sides is None or index.origin(*sides) != plan.endpoint:
        return None  # not audited by a batch from this Hub, or another Hub's audit came since
    key = index.find(plan.endpoint, *sides, options.selection)
    report = store.load_report(key) if key else None
    if key is None or report is None or report.status != "complete":
        return None
    if (report.base.resolved_sha, report.finetune.resolved_sha) != (sides[0].sha, sides[1].sha):
        return None
    return key, report


def _from_another_hub(index: ReuseIndex, plan: _Plan, i: int) -> bool:
    """True when a batch last audited these two commits from another endpoint: whatever the
    store holds under the audit's key (which pins commits and file layout, not the Hub) may
    be that Hub's bytes, so the pair starts from scratch. Records this endpoint as theirs now."""
    sides = plan.sides.get(i)
    if sides is None:
        return False
    origin = index.origin(*sides)
    index.set_origin(*sides, plan.endpoint)
    return origin is not None and origin != plan.endpoint


def _keep(store: Store, key: str, report: Report, *, replace: bool = False) -> None:
    """Copy a report into the driver's store unless it is there already (a task on another node).

    ``replace``: overwrite what is stored under ``key`` (it came from another Hub).
    """
    stored = store.load_report(key)
    if stored is not None and stored.status == "complete" and not replace:
        return
    if replace:
        store.forget(key)
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
