"""Network faults during a whole audit: the same numbers as a clean run, or a clear error.

``test_source.py`` checks the bytes of single reads under each fault; this file checks the
promise users rely on, end to end through the audit engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorafid.audit.engine import Audit, AuditConfig, audit
from lorafid.audit.report import Report
from lorafid.audit.store import Store
from lorafid.errors import FetchError
from tests.hub_server import HubServer
from tests.models import model_pair, shard_files


@pytest.fixture
def served(hub: HubServer) -> HubServer:
    base, finetune = model_pair()
    hub.add_repo("org/base", shard_files(base, 2))
    hub.add_repo("org/finetune", shard_files(finetune, 3, offset=1))
    return hub


def run(hub: HubServer, home: Path) -> Report:
    config = AuditConfig(rank=4, device="cpu", endpoint=hub.endpoint, store=Store(home))
    return audit("org/base", "org/finetune", config)


RECOVERABLE: dict[str, dict[str, Any]] = {
    "dropped_connection": {"drop_connection_after_bytes": 10, "times": 2},
    "truncated_body": {"truncate_body": True, "times": 2},
    "server_errors": {"status_sequence": [500, 502, 503]},
    "rate_limited": {"rate_limit": 2, "retry_after": "0"},
    "slow_body": {"slow_bytes_per_s": 200_000},
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", sorted(RECOVERABLE))
def test_transient_fault_gives_the_same_numbers(served: HubServer, tmp_path: Path, fault: str) -> None:
    clean = run(served, tmp_path / "clean")
    with served.inject(**RECOVERABLE[fault]):
        faulty = run(served, tmp_path / "faulty")
    assert faulty.status == "complete"
    assert faulty.matrices == clean.matrices
    assert faulty.vectors == clean.vectors


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"ignore_range": True}, "Range"),
        ({"wrong_content_range": True}, "Content-Range"),
        ({"status_sequence": [503] * 20}, "503"),
        ({"drop_connection_after_bytes": 0}, "org/"),
    ],
)
def test_persistent_fault_stops_with_a_clear_error_and_keeps_results(
    served: HubServer, tmp_path: Path, fault: dict[str, Any], message: str
) -> None:
    store = Store(tmp_path / "home")
    config = AuditConfig(rank=4, device="cpu", endpoint=served.endpoint, store=store)
    with Audit("org/base", "org/finetune", config) as job:
        job.plan()  # headers are read before the fault starts
        steps = job.run()
        next(steps)
        with served.inject(**fault), pytest.raises(FetchError, match=message):
            for _ in steps:
                pass
        kept = job.report()
    assert kept.status == "partial"
    assert len(kept.matrices) >= 1
    # What was computed before the fault is in the store, ready for a resume.
    assert set(store.matrices(job.key)) >= {m.name for m in kept.matrices}


@pytest.mark.timeout(90)
def test_expired_cdn_urls_are_re_resolved_mid_audit(served: HubServer, tmp_path: Path) -> None:
    clean = run(served, tmp_path / "clean")
    config = AuditConfig(rank=4, device="cpu", endpoint=served.endpoint, store=Store(tmp_path / "home"))
    with Audit("org/base", "org/finetune", config) as job:
        steps = job.run()
        next(steps)
        served.expire_cdn_urls()  # signed URLs handed out so far now answer 403
        for _ in steps:
            pass
        report = job.report()
    assert report.matrices == clean.matrices
    assert any(r.status == 403 for r in served.requests if r.origin == "cdn")
