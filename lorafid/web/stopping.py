"""Stop, asked of a running stream by its own page, answered by the stream itself.

Gradio's ``cancels=`` kills an event's stream from outside: frames the run sent just before
the kill can reach the page after the Stop handler's own answer and overwrite it (the page
then shows a run still counting matrices, or "Error", under a Stop the gallery recorded). So
Stop first asks the run to end: the run sees the request between two steps, closes its job
(which keeps what it computed) and sends the last frame itself, in order. Only a run that does
not answer in time (one step still reading a large matrix) or one still waiting in the queue
is cancelled from outside.

Requests are keyed by the page's session; a session holds at most a few runs at once, and an
entry lives only while its run does, so the table is bounded by the concurrent runs.
"""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

STOP_WAIT_S = 10.0  # how long Stop waits for the run to send its last frame before cancelling it


@dataclass
class RunSignal:
    """One running stream: ``requested`` is set by Stop, ``ended`` by the stream on its way out."""

    requested: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)


class StopSignals:
    """The running streams of every page session, and Stop's request to each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, list[RunSignal]] = {}

    @contextmanager
    def running(self, session: str) -> Iterator[RunSignal]:
        """Register a stream of ``session`` for as long as the block runs."""
        signal = RunSignal()
        with self._lock:
            self._runs.setdefault(session, []).append(signal)
        try:
            yield signal
        finally:
            signal.ended.set()
            with self._lock:
                runs = self._runs.get(session, [])
                if signal in runs:
                    runs.remove(signal)
                if not runs:
                    self._runs.pop(session, None)

    def request_stop(self, session: str, wait_s: float = STOP_WAIT_S) -> bool:
        """Ask every running stream of ``session`` to stop; True once all have ended within
        ``wait_s`` (their last frames are sent), False if none was running or one did not end.

        A second Stop while the first still waits does not wait again (a visitor pressing Stop
        repeatedly holds one server thread, not one per press): it answers at once.
        """
        with self._lock:
            runs = list(self._runs.get(session, []))
            asked_before = any(run.requested.is_set() for run in runs)
            for run in runs:
                run.requested.set()
        deadline = time.monotonic() + (0.0 if asked_before else wait_s)
        return bool(runs) and all(run.ended.wait(max(0.0, deadline - time.monotonic())) for run in runs)
