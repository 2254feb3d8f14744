"""Stop's request to a running stream: answered by the stream, bounded in wait and in memory."""

import threading
import time

from lorafid.web.stopping import StopSignals


def test_no_running_stream_answers_at_once_and_false() -> None:
    signals = StopSignals()
    started = time.monotonic()
    assert signals.request_stop("page-1", wait_s=5.0) is False  # nothing to stop: cancel the queued run
    assert time.monotonic() - started < 1.0


def test_a_stream_that_ends_on_request_answers_true_after_its_last_frame() -> None:
    signals = StopSignals()
    frames: list[str] = []
    ready = threading.Event()

    def stream() -> None:
        with signals.running("page-1") as stop:
            ready.set()
            while not stop.requested.wait(0.01):
                frames.append("counting")
            time.sleep(0.05)  # the last frame takes a while to build
            frames.append("stopped")

    worker = threading.Thread(target=stream)
    worker.start()
    ready.wait(5)
    assert signals.request_stop("page-1", wait_s=5.0) is True
    assert frames[-1] == "stopped"  # Stop answered only after the stream's own last frame
    worker.join(5)
    assert signals._runs == {}  # the table holds running streams only


def test_a_stream_of_another_page_is_not_stopped() -> None:
    signals = StopSignals()
    with signals.running("page-2") as other:
        assert signals.request_stop("page-1", wait_s=0.1) is False
        assert not other.requested.is_set()


def test_a_step_that_outlasts_the_wait_is_left_to_the_cancel_and_a_second_stop_does_not_wait() -> None:
    signals = StopSignals()
    with signals.running("page-1") as stop:
        started = time.monotonic()
        assert signals.request_stop("page-1", wait_s=0.2) is False  # still in its step: cancel it
        assert 0.15 < time.monotonic() - started < 2.0
        assert stop.requested.is_set()
        started = time.monotonic()
        assert signals.request_stop("page-1", wait_s=5.0) is False  # pressed again: no second wait
        assert time.monotonic() - started < 1.0
