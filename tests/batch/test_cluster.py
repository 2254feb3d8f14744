"""``lorafid batch`` on a real two-node Ray cluster that the tests start with Ray's own CLI.

The cluster: a head with no CPU for tasks (``ray start --head --num-cpus 0``) and a worker
node with one (``ray start --address ...``), each with its own temp dir and ports, with token
authentication on (``RAY_AUTH_MODE=token``, a test token in ``RAY_AUTH_TOKEN``) and ``HOME``
moved to a temp dir, so that no token file of this machine takes part. Every Ray process
of the cluster has one of its temp dirs on its command line; teardown kills exactly those
(``ray stop`` would stop every Ray on the machine). The driver runs as the CLI in a
subprocess, as a user runs it. Skipped with the reason when Ray cannot start here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.batch.test_batch import RANK, cli_report, strip_volatile, tensor_reads
from tests.hub_server import HubServer
from tests.models import model_pair, shard_files

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90  # one `ray start` on a busy two-core machine
BATCH_TIMEOUT_S = 300  # the whole batch with a lost node, worker start-ups included


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Cluster:
    """A Ray cluster on this machine, made of ``ray start`` processes we started."""

    root: Path
    env: dict[str, str]  # what every node and driver of the cluster runs with (the Ray token included)
    port: int = 0
    nodes: dict[str, Path] = field(default_factory=dict)  # name -> its temp dir

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, name: str, *, head: bool = False, cpus: int = 1) -> None:
        temp = self.root / name
        temp.mkdir()
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
        }
        if head:
            self.port = free_port()
            ports |= {"--port": self.port, "--dashboard-port": free_port()}
        command = ["ray", "start", "--num-cpus", str(cpus), "--temp-dir", str(temp), "--disable-usage-stats"]
        command += ["--head", "--include-dashboard", "false"] if head else ["--address", self.address]
        command += [str(item) for option, port in ports.items() for item in (option, port)]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=START_TIMEOUT_S)
        self.nodes[name] = temp
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(command[:4])}` failed: {(done.stderr or done.stdout)[-800:]}")

    def processes(self, name: str | None = None) -> dict[int, str]:
        """pid -> command line of our Ray processes (of one node, or of all): those whose command
        line names one of our temp dirs, or that hold a file open in one (Ray's agents retitle
        themselves "ray::...", but keep their logs open)."""
        dirs = [str(self.nodes[name])] if name else [str(d) for d in self.nodes.values()]
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if not any(d in args for d in dirs):
                    opened = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
                    if not any(path.startswith(d) for path in opened for d in dirs):
                        continue
            except OSError:
                continue
            found[int(entry.name)] = args
        return found

    def node_id(self, name: str) -> str:
        """The Ray node ID of a node we started, as its raylet logged it."""
        log = (self.nodes[name] / "session_latest" / "logs" / "raylet.out").read_text(errors="replace")
        found = re.search(r"Setting node ID node_id=([0-9a-f]+)", log)
        assert found, f"no node ID in {name}'s raylet.out"
        return found.group(1)

    def kill_raylet(self, name: str) -> int:
        raylets = [pid for pid, args in self.processes(name).items() if "/raylet/raylet " in args]
        assert len(raylets) == 1, raylets
        os.kill(raylets[0], signal.SIGKILL)
        return raylets[0]

    def stop(self) -> None:
        for _ in range(3):  # processes started while we kill (workers) are caught on the next pass
            for pid in self.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if shutil.which("ray") is None:
        pytest.skip("the `ray` command is not installed (pip install lorafid[batch])")
    # Short: Ray's socket paths live under the temp dir and must stay under 107 characters.
    root = Path(tempfile.mkdtemp(prefix="lfr", dir="/tmp"))
    home = root / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),  # no ~/.ray/auth_token or Hub login of this machine
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "PYTHONPATH": str(ROOT),  # workers import this checkout of lorafid
        "LORAFID_HOME": str(root / "node-store"),  # each node's store (one disk here)
        "OMP_NUM_THREADS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Notice a lost node in ~3 s, not ~15 s.
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    made = Cluster(root, env)
    try:
        made.start("head", head=True, cpus=0)
        made.start("w1")
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
        made.stop()
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"Ray cannot start a cluster here: {e}")
    try:
        yield made
    finally:
        made.stop()
        shutil.rmtree(root, ignore_errors=True)


def run_cli(args: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lorafid", *args], env=env, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT
    )


def test_a_cluster_with_token_auth_that_refuses_us_is_one_clear_line_at_once(cluster: Cluster, tmp_path: Path) -> None:
    catalogue = tmp_path / "c.csv"
    catalogue.write_text("base,finetune\norg/base,org/ft\n")
    no_token = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    no_token["HOME"] = str(tmp_path)  # no token file either
    cases = {
        "address": (["--ray", cluster.address], no_token),
        "auto": (["--ray", "auto"], {**no_token, "RAY_ADDRESS": cluster.address}),
        "wrong token": (["--ray", cluster.address], {**cluster.env, "RAY_AUTH_TOKEN": "0" * 32}),
    }
    for case, (ray_args, env) in cases.items():
        started = time.monotonic()
        done = run_cli(["batch", str(catalogue), "--out", str(tmp_path / "out"), *ray_args], env, timeout_s=120)
        took = time.monotonic() - started
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, (case, done.stderr[-2000:])
        # Ray alone retries ~20 s and then says to start a cluster; the probe answers at once.
        assert took < 15, (case, took)
        host_port = rf"\S+:{cluster.port}"
        if case == "wrong token":
            assert lines[0].startswith("lorafid: error: The Ray cluster at "), lines
            assert "refused this machine's token" in lines[0] and "ray get-auth-token" in lines[0]
        else:
            assert re.fullmatch(
                rf"lorafid: error: The Ray cluster at {host_port} uses token authentication and RAY_AUTH_MODE is "
                r"not 'token' here: export RAY_AUTH_MODE=token and give this machine the cluster's token "
                r"\(RAY_AUTH_TOKEN, or the file ~/.ray/auth_token; `ray get-auth-token` on the head prints it\), "
                r"as on every node of the cluster, then run again\.",
                lines[0],
            ), (case, lines)
        assert "start a cluster" not in done.stderr.lower()


def test_a_lost_node_is_survived_and_the_token_stays_out_of_rays_files(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kill the only worker node's raylet while its task streams; a new node takes the retry."""
    fake_token = "hf_" + secrets.token_hex(12) + "_lorafid_test"
    models = {name: model_pair(layers=4, seed=seed) for seed, name in enumerate(("a", "b"), start=20)}
    size = sum(t.numel() * t.element_size() for base, ft in models.values() for t in (*base.values(), *ft.values()))
    # About 6 s of streaming per pair: the node dies mid-pair, however fast the machine.
    with HubServer(valid_tokens={fake_token}, link_bytes_per_s=size / 12) as hub:
        for name, (base, finetune) in models.items():
            hub.add_repo(f"org/base-{name}", shard_files(base, 2), gated=True)  # needs the token
            hub.add_repo(f"org/ft-{name}", shard_files(finetune, 2, offset=1))
        catalogue = tmp_path / "c.csv"
        catalogue.write_text("base,finetune\n" + "".join(f"org/base-{n},org/ft-{n}\n" for n in models))
        out = tmp_path / "out"
        env = {**cluster.env, "HF_ENDPOINT": hub.endpoint, "LORAFID_HOME": str(tmp_path / "driver-store")}
        args = ["batch", str(catalogue), "--ray", cluster.address, "--out", str(out), "--rank", str(RANK)]
        driver = subprocess.Popen(
            [sys.executable, "-m", "lorafid", *args, "--token", fake_token],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + BATCH_TIMEOUT_S
            while not tensor_reads(hub):  # the worker node's task is streaming
                assert driver.poll() is None, driver.communicate()
                assert time.monotonic() < deadline, "no task started streaming"
                time.sleep(0.1)
            cluster.kill_raylet("w1")
            reads_at_kill = len(tensor_reads(hub))
            cluster.start("w2")  # somewhere for Ray to run the retries
            stdout, stderr = driver.communicate(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.communicate()
        assert driver.returncode == 0, stderr[-3000:]
        rows = json.loads((out / "table.json").read_text())["rows"]
        assert [r["status"] for r in rows] == ["complete", "complete"]
        assert len(tensor_reads(hub)) > reads_at_kill  # the retries streamed again

        # Per node what ran where, in the table and the CLI's summary: the lost node's pair was
        # retried on the new one (the head has no CPU for tasks), and nothing is credited to w1.
        lost, new_node = cluster.node_id("w1")[:8], cluster.node_id("w2")[:8]
        for row in rows:
            assert f"[{new_node}]" in row["nodes"] and f"[{lost}]" not in row["nodes"], row["nodes"]
        assert re.search(rf"^ran on \S+ \[{new_node}\]: org/ft-a, org/ft-b$", stdout, re.M), stdout

        # Each report equals `lorafid audit`'s (same Hub, same token), key for key.
        monkeypatch.setenv("HF_TOKEN", fake_token)
        for row in rows:
            cli_file = cli_report(hub, row["base"], row["finetune"], RANK, tmp_path / "cli", monkeypatch)
            batch = strip_volatile((out / row["report_file"]).read_text())
            assert batch == strip_volatile(cli_file.read_text()), row["finetune"]

    # The token reached the tasks (the gated bases were read) and no file Ray wrote holds it.
    assert any(r.has_authorization for r in hub.requests_matching(origin="hub", path_contains="org/base-a"))
    scanned = 0
    for temp in cluster.nodes.values():
        for path in temp.rglob("*"):
            if path.is_file() and not path.is_symlink() and not path.is_socket():
                scanned += 1
                assert fake_token.encode() not in path.read_bytes(), path
    assert scanned > 20  # logs of three nodes: the scan saw them
    assert any(p.name.startswith("runtime_env_agent") for t in cluster.nodes.values() for p in t.rglob("*.log"))
