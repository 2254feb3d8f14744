"""The loopback test Hub with one bandwidth cap shared by every connection, in its own process.

A benchmark of "does the audit keep up with the link" needs one link: with
``HubServer(link_bytes_per_s=...)`` every body byte of both origins draws from one pacer,
so the aggregate rate is the cap whatever the number of connections.

The server runs in a child process (``python -m bench.capped_hub``) so that its threads, and
the repos it holds in memory, cost the measured process neither the GIL nor RSS.

Not here: faults (use ``HubServer.inject`` in tests), anything the tests need.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.hub_server import HubServer


@dataclass(frozen=True)
class RunningHub:
    endpoint: str
    repos: dict[str, str]  # repo id -> commit sha
    files: dict[str, list[str]]  # repo id -> weight files


@contextmanager
def serve_in_child(repos: dict[str, Path], bytes_per_s: float | None) -> Iterator[RunningHub]:
    """Serve each local model directory as a Hub repo from a child process, until the block ends."""
    command = [sys.executable, "-m", "bench.capped_hub", "--bytes-per-s", str(bytes_per_s or 0)]
    for repo_id, directory in repos.items():
        command += ["--repo", f"{repo_id}={directory}"]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(f"the hub child exited with {child.wait()} before it was ready")
        ready = json.loads(line)
        yield RunningHub(ready["endpoint"], ready["repos"], ready["files"])
    finally:
        if child.stdin:
            child.stdin.close()  # the child exits when its stdin closes
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", action="append", default=[], help="REPO_ID=DIR (repeatable)")
    parser.add_argument("--bytes-per-s", type=float, default=0.0, help="aggregate cap; 0 = none")
    args = parser.parse_args()
    hub = HubServer(link_bytes_per_s=args.bytes_per_s or None).start()
    shas: dict[str, str] = {}
    files: dict[str, list[str]] = {}
    for spec in args.repo:
        repo_id, directory = spec.split("=", 1)
        content = {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}
        shas[repo_id] = hub.add_repo(repo_id, content)
        files[repo_id] = [n for n in content if n.endswith(".safetensors")]
    print(json.dumps({"endpoint": hub.endpoint, "repos": shas, "files": files}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    hub.stop()


if __name__ == "__main__":
    main()
