"""The pace and words of a running audit: its progress line and how often to redraw.

``ProgressMeter`` says what is done of what, how fast and how long is left (like the CLI's
bar); ``Throttle`` paces chart rebuilds by what the last one cost. Free of Gradio; reads
only ``AuditProgress`` records.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from lorafid.audit.engine import AuditProgress


class ProgressMeter:
    """The progress line of a run, like the CLI's bar: what is done of what, how fast, how long.

    Example: "12/64 matrices · 120 of 450 MB · 34 MB/s · about 10 s left · 3.5 s".
    Matrices reused from the store count as done but not toward the read rate (nor the ETA).
    """

    def __init__(self) -> None:
        self._reused_bytes = 0

    def line(self, p: AuditProgress) -> str:
        if p.from_store:
            self._reused_bytes = p.bytes_done
        read = p.bytes_done - self._reused_bytes
        per_s = read / p.elapsed_s if p.elapsed_s > 0 and read > 0 else 0.0
        size = f" · {_amount(p.bytes_done, p.bytes_total)}" if p.bytes_total else ""
        rate = f" · {per_s / 1e6:.3g} MB/s" if per_s else ""
        left = max(0, p.bytes_total - p.bytes_done)
        eta = f" · about {_duration(left / per_s)} left" if per_s and left and p.done < p.total else ""
        reused = " · resumed from the store" if self._reused_bytes else ""
        return f"{p.done}/{p.total} matrices{size}{rate}{eta} · {p.elapsed_s:.1f} s{reused}"

    @staticmethod
    def bar(p: AuditProgress) -> str:
        """An HTML progress bar of the bytes read (the matrices' count when sizes are unknown)."""
        done, total = (p.bytes_done, p.bytes_total) if p.bytes_total else (p.done, max(1, p.total))
        return f'<progress value="{done}" max="{total}" aria-label="audit progress"></progress>'


def _amount(done: int, total: int) -> str:
    """Bytes done of total in the unit that suits the total: "12 of 40 kB", "120 of 450 MB", "1.2 of 140 GB"."""
    scale, unit, digits = (1e3, "kB", 0) if total < 1e6 else (1e6, "MB", 0) if total < 1e10 else (1e9, "GB", 1)
    return f"{done / scale:,.{digits}f} of {total / scale:,.{digits}f} {unit}"


def _duration(seconds: float) -> str:
    """Seconds as a reader wants an ETA: "40 s", "3 min 20 s", "2 h 05 min"."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Throttle:
    """True at most once per ``interval_s``: figure rebuilds during a run are paced with it.

    ``spent(seconds)`` reports what the last rebuild cost; the next one then waits at least
    ``cost_factor`` times that. With 20,000 matrices a frame takes seconds to build, and a
    fixed half-second pace spent nearly all of the audit's time redrawing (the app did 354
    matrices in 300 s where the CLI did 1,183 in 60 s); this keeps redrawing under ~1/6.
    """

    def __init__(self, interval_s: float = 0.5, cost_factor: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.cost_factor = cost_factor
        self._clock = clock
        self._wait_s = interval_s
        self._last = float("-inf")

    def ready(self) -> bool:
        now = self._clock()
        if now - self._last < self._wait_s:
            return False
        self._last = now
        return True

    def spent(self, seconds: float) -> None:
        self._wait_s = max(self.interval_s, self.cost_factor * seconds)
        self._last = self._clock()
