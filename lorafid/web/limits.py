"""What one visitor may hold on a shared server, and giving memory back after an audit.

``visitor_id`` says who is asking (behind a Space's proxy, the hop it appended; ``visitor_of``
from a request); ``VisitorSlots`` caps the audits and checks each visitor runs at once;
``VisitorRate`` caps how often one visitor may do something cheap that still costs Hub calls
(opening permalinks); ``release_memory`` returns a finished or stopped audit's heap to the OS.
In-process only: the counts are per server process, not shared between replicas.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from lorafid.errors import LimitExceededError


class VisitorSlots:
    """How many audits each visitor runs at once, capped: one visitor cannot hold every worker.

    A visitor is the client's address (on a Space, the proxy's ``x-forwarded-for`` hop it
    appended). ``take`` returns False at the cap; ``give_back`` after the audit ends.
    """

    def __init__(self, per_visitor: int) -> None:
        self.per_visitor = per_visitor
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, visitor: str) -> bool:
        with self._lock:
            if self._running.get(visitor, 0) >= self.per_visitor:
                return False
            self._running[visitor] = self._running.get(visitor, 0) + 1
            return True

    def give_back(self, visitor: str) -> None:
        with self._lock:
            left = self._running.get(visitor, 0) - 1
            if left > 0:
                self._running[visitor] = left
            else:
                self._running.pop(visitor, None)

    @contextlib.contextmanager
    def hold(self, visitor: str, then: str) -> Iterator[None]:
        """One slot for the length of the block; at the cap, a ``LimitExceededError`` that ends
        with what to do ``then`` ("run this one", "check the provider")."""
        if not self.take(visitor):
            raise LimitExceededError(
                f"You already have {self.per_visitor} audit(s) or check(s) running on this server: wait for it to "
                f"finish or press Stop, then {then}."
            )
        try:
            yield
        finally:
            self.give_back(visitor)


def release_memory() -> None:
    """After an audit ends or is stopped: collect its cycles and hand freed heap back to the OS.

    CPython frees a cancelled audit's headers and buffers, but glibc keeps the pages (a
    cancelled audit of two 850k-tensor headers left the process at 3 GB); ``malloc_trim``
    returns them. A no-op where there is no glibc.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def visitor_id(headers: Mapping[str, str], client_host: str | None, behind_proxy: bool) -> str:
    """Who is asking, for per-visitor limits. Behind a known proxy (a Space) the last
    ``x-forwarded-for`` hop is the one the proxy added; elsewhere headers can be forged."""
    forwarded = headers.get("x-forwarded-for", "")
    if behind_proxy and forwarded:
        return forwarded.split(",")[-1].strip()
    return client_host or "unknown"


def visitor_of(request: Any, behind_proxy: bool) -> str:
    """``visitor_id`` of a Gradio request (its headers and client); "unknown" without one."""
    if request is None:
        return "unknown"
    client = getattr(request, "client", None)
    return visitor_id(dict(getattr(request, "headers", None) or {}), client.host if client else None, behind_proxy)


TOO_MANY_LINKS = "You opened many links in the last minute on this server; wait a minute and reload the page."


class VisitorRate:
    """At most ``per_window`` events per visitor in any ``window_s`` (sliding, thread-safe).

    For events that skip the queue yet call the Hub (a permalink: which commit, who may read
    it): 60 loads of one link made 181 Hub calls in 9 s. ``allow`` counts the event when it
    returns True; past the cap it returns False and counts nothing.
    """

    def __init__(self, per_window: int = 20, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.per_window, self.window_s, self._clock = per_window, window_s, clock
        self._events: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def allow(self, visitor: str) -> bool:
        now = self._clock()
        with self._lock:
            for who in list(self._events):  # forget old events of every visitor: the map stays small
                self._events[who] = [t for t in self._events[who] if now - t < self.window_s]
                if not self._events[who]:
                    del self._events[who]
            recent = self._events.setdefault(visitor, [])
            if len(recent) >= self.per_window:
                return False
            recent.append(now)
            return True
