"""The loopback test Hub with one bandwidth cap shared by every connection, in its own process.

``tests.hub_server.HubServer`` can pace each response (``Faults.slow_bytes_per_s``), but a
client that reads with 8 parallel ranged GETs then gets 8× that rate. A benchmark of "does
the audit keep up with the link" needs one link: here every body byte of both origins
draws from one pacer, so the aggregate rate is the cap whatever the number of connections.

The server runs in a child process (``python -m bench.capped_hub``) so that its threads, and
the repos it holds in memory, cost the measured process neither the GIL nor RSS.

Not here: faults (use ``HubServer.inject`` in tests), anything the tests need.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_PIECE_BYTES = 64 * 2**10  # small enough that 8 connections interleave smoothly at 25 MB/s


class Pacer:
    """Hands out send slots so that all callers together stay at ``bytes_per_s``; no burst credit."""

    def __init__(self, bytes_per_s: float) -> None:
        self.bytes_per_s = bytes_per_s
        self._lock = threading.Lock()
        self._free_at = time.monotonic()

    def wait(self, size_bytes: int) -> None:
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + size_bytes / self.bytes_per_s
            until = self._free_at
        time.sleep(max(0.0, until - time.monotonic()))


def start_capped_hub(bytes_per_s: float | None) -> object:
    """A started ``HubServer`` whose file bytes share one ``Pacer`` (None: no cap)."""
    from tests.hub_server import HubServer

    hub = HubServer().start()
    if bytes_per_s:
        pacer = Pacer(bytes_per_s)

        def write_paced(self: object, data: bytes) -> None:
            view = memoryview(data)
            for i in range(0, len(view), _PIECE_BYTES):
                piece = view[i : i + _PIECE_BYTES]
                pacer.wait(len(piece))
                self.wfile.write(piece)  # type: ignore[attr-defined]
                self._sent += len(piece)  # type: ignore[attr-defined]

        # HubServer has no hook for a shared cap; its handler's one pacing method is replaced
        # on both origins. Fails loudly (AttributeError) if tests/hub_server.py changes shape.
        for server in hub._servers:
            handler = server.RequestHandlerClass
            getattr(handler, "_write_paced")  # noqa: B009
            server.RequestHandlerClass = type(f"Capped{handler.__name__}", (handler,), {"_write_paced": write_paced})
    return hub


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
    hub = start_capped_hub(args.bytes_per_s or None)
    shas: dict[str, str] = {}
    files: dict[str, list[str]] = {}
    for spec in args.repo:
        repo_id, directory = spec.split("=", 1)
        content = {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}
        shas[repo_id] = hub.add_repo(repo_id, content)  # type: ignore[attr-defined]
        files[repo_id] = [n for n in content if n.endswith(".safetensors")]
    print(json.dumps({"endpoint": hub.endpoint, "repos": shas, "files": files}), flush=True)  # type: ignore[attr-defined]
    sys.stdin.read()  # until the parent closes our stdin
    hub.stop()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
