"""The one retry loop and ``Retry-After`` parser that range reads and provider calls share."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from lorafid.retry import RetryPolicy, Transient, retry_after_s, with_retries

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("7", 7.0),
        ("0.5", 0.5),
        (format_datetime(datetime.fromtimestamp(NOW + 120, UTC), usegmt=True), 120.0),  # an HTTP date
        ("Wed, 21 Oct 2015 07:28:00 GMT", datetime(2015, 10, 21, 7, 28, tzinfo=UTC).timestamp() - NOW),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_reads_seconds_and_http_dates(header: str | None, seconds: float | None) -> None:
    got = retry_after_s(header, now=NOW)
    assert got == (None if seconds is None else pytest.approx(seconds))


def test_the_wait_honours_retry_after_within_its_cap() -> None:
    policy = RetryPolicy(max_retry_after_s=30.0)
    assert policy.wait_s(1, 3600.0) == 30.0
    assert policy.wait_s(3, 2.0) == 2.0
    assert policy.wait_s(1, -5.0) == 0.0  # an HTTP date in the past: go now


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy(base_wait_s=0.5, max_wait_s=8.0)
    for attempt, top in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 8.0)]:
        waits = [policy.wait_s(attempt, None) for _ in range(200)]
        assert top / 2 <= min(waits) and max(waits) <= top


def test_transient_failures_are_retried_until_the_tries_are_spent() -> None:
    calls, waits = [], []

    def attempt() -> str:
        calls.append(1)
        raise Transient("HTTP 503", retry_after_s=1.5)

    with pytest.raises(RuntimeError, match="gave up after 3 tries: HTTP 503") as caught:
        with_retries(
            attempt,
            RetryPolicy(max_tries=3),
            what="test",
            give_up=lambda tries, last: RuntimeError(f"gave up after {tries} tries: {last}"),
            sleep=waits.append,
        )
    assert len(calls) == 3 and waits == [1.5, 1.5]
    assert isinstance(caught.value.__cause__, Transient)


def test_a_success_after_a_failure_returns_its_value() -> None:
    answers = iter([Transient("reset"), "ok"])

    def attempt() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    waits: list[float] = []
    assert with_retries(attempt, RetryPolicy(), what="t", give_up=lambda *_: RuntimeError(), sleep=waits.append) == "ok"
    assert len(waits) == 1


def test_a_permanent_error_is_never_retried() -> None:
    calls: list[int] = []

    def attempt() -> None:
        calls.append(1)
        raise ValueError("HTTP 400: unsupported")

    with pytest.raises(ValueError, match="unsupported"):
        with_retries(
            attempt, RetryPolicy(max_tries=5), what="t", give_up=lambda *_: RuntimeError(), sleep=lambda _: None
        )
    assert calls == [1]


def test_max_retries_zero_means_one_try() -> None:
    assert RetryPolicy.retries(0).max_tries == 1 and RetryPolicy.retries(3).max_tries == 4
    with pytest.raises(ValueError, match="0 or more"):
        RetryPolicy.retries(-1)
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(max_tries=0)
