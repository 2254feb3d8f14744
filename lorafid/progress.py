"""One progress shape for every long job: ``run()`` yields ``Progress``, ``report()`` returns the result.

The audit, the extraction, the adapter audit, the layer-streamed forward, the behaviour check
and the provider check all work this way, so a progress bar (the CLI's tqdm), a live page (the
dashboard's streamed frames) or a script drive any of them alike, and stopping early is just
not asking for the next step (``report()`` then says ``partial``). Jobs that need more per step
subclass ``Progress`` (the audit adds the matrix just finished, for live charts).

Not here: drawing progress (``cli.output``, ``web``).

Example::

    job = BehaviourCheck(base, finetune)
    for step in job.run():
        print(f"{step.stage}: {step.done}/{step.total} {step.message}")
    document = job.report()
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

R = TypeVar("R", covariant=True)
T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One step of a running job."""

    stage: str  # what the job is doing now: "reading", "scoring", "provider", "local", ...
    done: int  # units of this stage finished
    total: int  # units of this stage in all (0: unknown)
    elapsed_s: float  # since the job started
    message: str = ""  # one line for a person, e.g. "stage 3/6: 12.5 MB read"


class Job(Protocol[R]):
    """A long job: ``run()`` does the work step by step, ``report()`` returns what it has."""

    def run(self) -> Iterator[Progress]: ...

    def report(self) -> R: ...


def run_to_end(job: Job[T]) -> T:
    """Run a job without watching it, and return its report."""
    for _ in job.run():
        pass
    return job.report()


def in_background(work: Callable[[Callable[[Progress], None]], T]) -> Generator[Progress, None, T]:
    """Run ``work(emit)`` in a thread and yield each ``Progress`` it emits, as it comes; the
    generator's return value is ``work``'s (``result = yield from in_background(work)``).

    For work that reports from worker threads (concurrent requests to a provider): the job's own
    generator stays the one way progress leaves it. An exception in ``work`` is raised here.
    """
    steps: queue.Queue[Progress | None] = queue.Queue()
    outcome: dict[str, T] = {}
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome["result"] = work(steps.put)
        except BaseException as e:  # handed to the caller's thread, which raises it
            failure.append(e)
        finally:
            steps.put(None)

    thread = threading.Thread(target=target, name="lorafid-job", daemon=True)
    thread.start()
    while (step := steps.get()) is not None:
        yield step
    thread.join()
    if failure:
        raise failure[0]
    return outcome["result"]
