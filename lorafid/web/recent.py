"""``Recent``: answers of the Hub kept for a short while, shared by every visitor of a server.

A permalink or a gallery entry asks the Hub which commit a branch points at and whether a
repo is readable without a token; 60 loads of one link made 181 Hub calls in 9 s. Those
answers change rarely, so each is kept ``ttl_s`` (60 s by default) and at most ``size`` of
them (oldest dropped). Only answers that depend on no visitor's token may be kept here: a
caller keys by what was asked, never by a token. In-process, thread-safe, free of Gradio.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class Recent(Generic[T]):
    """Answers by key for ``ttl_s`` seconds, at most ``size`` of them.

    Example: ``Recent(60).get(("org/x", "main"), lambda: resolve(...))`` asks once a minute.
    Errors are not kept: a failed call is asked again next time.
    """

    def __init__(self, ttl_s: float = 60.0, size: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.size, self._clock = ttl_s, size, clock
        self._answers: OrderedDict[Hashable, tuple[float, T]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        now = self._clock()
        with self._lock:
            kept = self._answers.get(key)
            if kept is not None and now - kept[0] < self.ttl_s:
                return kept[1]
        value = compute()  # outside the lock: one slow Hub call must not hold every visitor
        with self._lock:
            self._answers[key] = (now, value)
            self._answers.move_to_end(key)
            while len(self._answers) > self.size:
                self._answers.popitem(last=False)
        return value
