"""The one retry loop: bounded exponential backoff for transient failures, ``Retry-After`` honoured.

Range reads of weights (``weights.http_ranges``) and provider calls (``providers.openai_api``)
both raise ``Transient`` for a failure worth another try (429, 5xx, a dropped connection, a
short body) and run their one attempt through ``with_retries``. Anything else propagates at
once: a permanent error is never retried.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff: waits 0.5, 1, 2, 4 s between 5 tries (~7.5 s at most).

    ``max_tries`` counts the first attempt: ``RetryPolicy(max_tries=1)`` never retries.
    """

    max_tries: int = 5
    base_wait_s: float = 0.5
    max_wait_s: float = 8.0
    max_retry_after_s: float = 30.0  # a server asking for longer is treated as asking for 30 s

    def __post_init__(self) -> None:
        if self.max_tries < 1:
            raise ValueError(f"max_tries is {self.max_tries}; it counts the first attempt, so it is at least 1")

    @classmethod
    def retries(cls, count: int) -> RetryPolicy:
        """A policy allowing ``count`` retries after the first attempt (``--max-retries``)."""
        if count < 0:
            raise ValueError(f"--max-retries is {count}; give 0 or more")
        return cls(max_tries=count + 1)

    def wait_s(self, attempt: int, retry_after_s: float | None) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.max_retry_after_s)
        # Jitter keeps parallel requests that failed together from retrying in lockstep.
        return min(self.max_wait_s, self.base_wait_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


class Transient(Exception):
    """A failure worth another try; ``retry_after_s`` is what the server asked us to wait."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


def worth_retrying(status: int) -> bool:
    """An HTTP status worth another try from the Hub or its CDN: 408, 429 or any 5xx."""
    return status in (408, 429) or status >= 500


def retry_after_s(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: a number or an HTTP date (RFC 9110). None when absent or unreadable."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now)
    except (TypeError, ValueError, IndexError):
        return None


def with_retries(
    attempt: Callable[[], T],
    policy: RetryPolicy,
    *,
    what: str,
    give_up: Callable[[int, Transient], Exception],
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Run ``attempt`` until it returns, retrying on ``Transient`` up to ``policy.max_tries`` tries.

    ``give_up(tries, last)`` builds the error raised when the tries are spent; ``what``
    names the work in the log line written before each wait.
    """
    tries = 0
    while True:
        tries += 1
        try:
            return attempt()
        except Transient as e:
            if tries >= policy.max_tries:
                raise give_up(tries, e) from e
            wait = policy.wait_s(tries, e.retry_after_s)
            logger.info("%s: %s; retrying in %.1f s (try %d of %d)", what, e, wait, tries + 1, policy.max_tries)
            (sleep or time.sleep)(wait)
