"""What runs on the Ray workers of a batch: the audit of a pair, or of a chunk of its layers.

Each function here is a plain function that ``lorafid.batch.driver`` wraps with ``ray.remote``; Ray
ships it by reference, so workers import this module (and the audit engine), nothing else.

The token is never a task argument, nor in the runtime environment (Ray writes runtime
environments, environment variables included, to its ``runtime_env_agent.log`` on every node):
the task gets the handle of the driver's ``SecretHolder`` actor and asks it for the token,
which it keeps in the audit's config, in memory only. No token: the worker's own ``HF_TOKEN``
or login, as for ``lorafid audit``.

Every matrix goes to the store under the worker's ``LORAFID_HOME`` as it is computed (the
audit does that), so a task that Ray retries on the same machine starts where the dead one
stopped. Chunks of a split pair keep their progress in ``LORAFID_HOME/parts`` (their own
audits, kept out of the dashboard's gallery) and hand their matrices to the pair's report
task, which files them under the pair's key and computes whatever is left.

Each result names the Ray node(s) it was computed on, for the batch's table. Progress goes to
the driver's board without waiting; a board that is gone (its node lost) is forgotten, never
an error of the task.

Not here: scheduling, retries and results (``lorafid.batch.driver``); the audit (``lorafid.audit.engine``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lorafid.audit.engine import Audit, AuditConfig, AuditProgress
from lorafid.audit.matrices import MatrixResult
from lorafid.audit.store import Store, default_home

PARTS_STORE = "parts"  # sub-folder of LORAFID_HOME for the chunks of split pairs
_PROGRESS_EVERY_S = 0.5


@dataclass(frozen=True)
class PairTask:
    """A task's arguments: everything but the token (see ``secret``)."""

    index: int
    base: str
    finetune: str
    config: AuditConfig  # token None (set from the secret), store None (set from store_home)
    store_home: str | None  # None: the worker's LORAFID_HOME


@dataclass(frozen=True)
class PairResult:
    key: str
    report_json: str
    spectra: dict[str, np.ndarray]
    size_bytes: int  # the weights the audit covers, both sides (progress)
    nodes: tuple[str, ...] = ()  # Ray node IDs that computed it: the report task's first, then its chunks'


@dataclass(frozen=True)
class PartResult:
    matrices: tuple[MatrixResult, ...]
    node: str  # the Ray node ID of the chunk task


def audit_task(task: PairTask, board: Any, secret: list[Any], *parts: PartResult) -> PairResult:
    """The whole audit of one pair; ``parts``: matrices already computed by the pair's chunk tasks.

    ``secret``: [] or [the driver's ``SecretHolder`` actor].
    """
    store = Store(task.store_home)
    try:
        config = replace(task.config, store=store, token=_token(secret))
        if parts:
            with Audit(task.base, task.finetune, config) as probe:
                probe.plan()  # its key: where the chunks' matrices go, so that the audit finds them done
                if config.fresh:
                    store.forget(probe.key)
                for part in parts:
                    for matrix in part.matrices:
                        store.put_matrix(probe.key, matrix)
            config = replace(config, fresh=False)
        with Audit(task.base, task.finetune, config) as job:
            _drive(job, board, (task.index, -1))
            report = job.report()
            spectra = {m.name: m.sigma_sq for m in report.matrices if m.sigma_sq is not None}
            nodes = tuple(dict.fromkeys((_node(), *(p.node for p in parts))))
            return PairResult(job.key, report.to_json(indent=None), spectra, job.plan().size_bytes, nodes)
    finally:
        store.close()


def part_task(task: PairTask, board: Any, secret: list[Any], part: int, parts: int) -> PartResult:
    """Matrices of chunk ``part`` of ``parts`` of the pair's layers, not stored yet (with spectra).

    Chunks are contiguous runs of layers (layers 0-7 of 32 in 4 parts): a chunk then reads
    few shards. Matrices outside the layers (lm_head) and 1-D tensors are left to the report task.
    """
    config = replace(task.config, token=_token(secret))
    store = Store(task.store_home)
    try:
        with Audit(task.base, task.finetune, replace(config, store=store)) as probe:
            plan = probe.plan()
            done = set() if config.fresh else set(store.matrices(probe.key))
        layers = sorted({m.layer for m in plan.matrices if m.layer is not None})
        mine = set(chunk(layers, part, parts))
        names = [m.name for m in plan.matrices if m.layer in mine and m.name not in done]
    finally:
        store.close()
    if not names:
        return PartResult((), _node())
    home = Path(task.store_home) if task.store_home else default_home()
    parts_store = Store(home / PARTS_STORE)
    try:
        # Exact names, so that this audit reads exactly these matrices; its own key keeps
        # its progress apart (a retried chunk resumes from its own stored matrices).
        only = "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
        config = replace(config, include=only, exclude=None, store=parts_store)
        with Audit(task.base, task.finetune, config) as job:
            _drive(job, board, (task.index, part))
            return PartResult(job.report().matrices, _node())
    finally:
        parts_store.close()


def _token(secret: list[Any]) -> str | None:
    """The token the driver's holder keeps (``secret``: [] or [its actor]), or None: the worker's own lookup."""
    if not secret:
        return None
    import ray

    token = ray.get(secret[0].get.remote())
    return str(token) if token else None


def _node() -> str:
    """The Ray node ID this task runs on ("" outside Ray: the functions are plain too)."""
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id()) if ray.is_initialized() else ""
    except Exception:  # a name for the table only
        return ""


def _drive(job: Audit, board: Any, key: tuple[int, int]) -> None:
    """Run the audit to the end, telling the progress board every half second (if it is still there)."""
    last = 0.0
    step: AuditProgress | None = None
    for step in job.run():
        if board is not None and time.monotonic() - last >= _PROGRESS_EVERY_S:
            board = _tell(board, key, step)
            last = time.monotonic()
    if board is not None and step is not None:
        _tell(board, key, step)


def _tell(board: Any, key: tuple[int, int], step: AuditProgress) -> Any:
    """Send one update without waiting; the board, or None once it is gone (its node was lost)."""
    try:
        board.update.remote(key, step.bytes_done, step.bytes_total)
    except Exception:  # progress is a nicety: the audit goes on without it
        return None
    return board


def chunk(items: list[int], part: int, parts: int) -> list[int]:
    """Contiguous chunk ``part`` of ``parts``, sizes differing by at most one.

    Example: items 0..9, parts 3 -> [0, 1, 2, 3], [4, 5, 6], [7, 8, 9].
    """
    size, extra = divmod(len(items), parts)
    start = part * size + min(part, extra)
    return items[start : start + size + (1 if part < extra else 0)]
