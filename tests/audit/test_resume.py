"""An audit killed with SIGKILL resumes: only what is missing is fetched, the report is the same."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorafid.audit.engine import AuditConfig, audit
from lorafid.audit.report import Report
from lorafid.audit.store import Store
from tests.hub_server import HubServer
from tests.models import model_pair, shard_files


def stored_matrices(home: Path) -> int:
    path = home / "store.sqlite3"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=1) as db:
            return int(db.execute("SELECT COUNT(*) FROM matrices").fetchone()[0])
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


def tensor_reads(hub: HubServer) -> list[str]:
    """Byte ranges fetched for tensor data (header probes start at byte 0)."""
    return [r.range for r in hub.requests if r.origin == "cdn" and r.range and not r.range.startswith("bytes=0-")]


@pytest.mark.timeout(120)
def test_sigkill_then_resume_fetches_only_the_missing(hub: HubServer, tmp_path: Path) -> None:
    base, finetune = model_pair(layers=4)
    hub.add_repo("org/base", shard_files(base, 2))
    hub.add_repo("org/finetune", shard_files(finetune, 3, offset=1))
    home = tmp_path / "home"
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "LORAFID_HOME": str(home)}
    command = [sys.executable, "-m", "lorafid", "audit", "org/base", "org/finetune", "--rank", "4", "--quiet"]
    out = tmp_path / "resumed.json"

    with hub.inject(slow_bytes_per_s=6000):  # ~0.5 s per tensor: time to kill mid-way
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while stored_matrices(home) < 3 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    kept = stored_matrices(home)
    assert process.returncode == -signal.SIGKILL
    assert 3 <= kept < 16, "the audit should have been killed part-way"

    # The server records a response when it ends: let the killed client's slow ones finish.
    settle_deadline = time.monotonic() + 20
    seen = -1
    while len(hub.requests) != seen and time.monotonic() < settle_deadline:
        seen = len(hub.requests)
        time.sleep(1.0)
    hub.clear_requests()
    result = subprocess.run([*command, "--out", str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    resumed = Report.from_json(out.read_text())
    assert resumed.status == "complete" and len(resumed.matrices) == 16
    # 1-D tensors are read first, so all 4 were stored before the kill; each missing matrix is
    # read once per side (one range each: far below the 16 MiB chunk size), nothing else.
    assert len(tensor_reads(hub)) == 2 * (16 - kept)

    # Same numbers as an uninterrupted run.
    clean = audit(
        "org/base",
        "org/finetune",
        AuditConfig(rank=4, device="cpu", endpoint=hub.endpoint, store=Store(tmp_path / "clean")),
    )
    assert resumed.matrices == clean.matrices
    assert json.loads(out.read_text())["summary"] == json.loads(clean.to_json())["summary"]
