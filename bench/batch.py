"""A catalogue of 8 small pairs: ``lorafid audit`` one pair after another vs ``lorafid batch`` on local Ray.

    python -m bench.batch                               # 2-core CPU: several minutes, mostly the serial runs
    python -m bench.batch --preset tiny --layers 1      # a quick look
    python -m bench.batch --cap-mb-s 50                 # a slower Hub: bandwidth bounds both

Both sides are the commands a user types, each timed from process start to exit, each
with an empty store (``LORAFID_HOME``), against the loopback Hub (``bench.capped_hub``:
the test server with a CDN redirect, optionally one aggregate bandwidth cap):

1. serial: ``lorafid audit BASE_i FT_i`` for the 8 pairs, one process after another.
2. Ray: ``lorafid batch catalogue.csv --ray local``: starts a local Ray instance, one task
   per pair (1 core each), the progress board, the table.

Printed: both walls and their ratio; then what bounds it: the fixed costs (a Python +
torch start per CLI process, a Ray start per batch, measured apart), the compute (the
audits' own ``compute_s``) spread over the cores, and the bytes over the Hub's cap.

The 8 pairs are one synthetic pair (``bench.synth``) served under 8 repo IDs: each is a
separate audit with its own store key; the bytes are the same, which changes nothing here.
Also checked: both ways give the same loss for every pair (no timing is asserted).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.capped_hub import serve_in_child
from bench.synth import PRESETS, write_pair

PAIRS = 8


def timed(command: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one command, which must succeed."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall_s


def fixed_costs(env: dict[str, str]) -> dict[str, float]:
    """Seconds to start Python with lorafid and torch imported; and to start Ray and run one empty task."""
    startup = timed([sys.executable, "-c", "import lorafid.cli.commands, lorafid.audit.engine"], env)
    script = (
        "import time, logging, ray\n"
        "t = time.perf_counter()\n"
        "ray.init(address='local', include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)\n"
        "ray.get(ray.remote(lambda: None).remote())\n"
        "print(time.perf_counter() - t)\n"
        "ray.shutdown()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return {"python_torch_start_s": startup, "ray_start_s": float(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--layers", type=int, default=2, help="layers per pair")
    parser.add_argument("--cap-mb-s", type=float, default=0.0, help="Hub bandwidth cap, MB/s (0 = none)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        base, finetune = write_pair(work / "pair", PRESETS[args.preset], args.layers)
        repos = {}
        for i in range(PAIRS):
            repos[f"bench/base-{i}"], repos[f"bench/ft-{i}"] = base, finetune
        cap = args.cap_mb_s * 1e6 or None
        with serve_in_child(repos, cap) as hub:
            env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
            env.pop("HF_TOKEN", None)
            costs = fixed_costs(env)
            print(
                f"{PAIRS} pairs · preset {args.preset} × {args.layers} layers · {cores} CPUs · Hub cap "
                f"{args.cap_mb_s or 'none'} MB/s · load average before the runs {os.getloadavg()[0]:.1f}",
                flush=True,
            )

            serial_out = work / "serial"
            serial_out.mkdir()
            serial_env = {**env, "LORAFID_HOME": str(work / "home-serial")}
            serial_s = 0.0
            for i in range(PAIRS):
                command = [sys.executable, "-m", "lorafid", "audit", f"bench/base-{i}", f"bench/ft-{i}"]
                command += [
                    "--rank",
                    str(args.rank),
                    "--device",
                    "cpu",
                    "--quiet",
                    "--out",
                    str(serial_out / f"{i}.json"),
                ]
                serial_s += timed(command, serial_env)
            print(f"serial lorafid audit ×{PAIRS}: {serial_s:7.2f} s", flush=True)

            catalogue = work / "catalogue.csv"
            catalogue.write_text("base,finetune\n" + "".join(f"bench/base-{i},bench/ft-{i}\n" for i in range(PAIRS)))
            ray_out = work / "ray"
            command = [sys.executable, "-m", "lorafid", "batch", str(catalogue), "--ray", "local", "--quiet"]
            command += ["--rank", str(args.rank), "--out", str(ray_out)]
            ray_s = timed(command, {**env, "LORAFID_HOME": str(work / "home-ray")})

        serial_reports = [json.loads((serial_out / f"{i}.json").read_text()) for i in range(PAIRS)]
        rows = json.loads((ray_out / "table.json").read_text())["rows"]
        ray_loss = {r["finetune"]: r["loss"] for r in rows}
        serial_loss = {
            f"bench/ft-{i}": 1 - r["summary"]["overall"]["energy_retained"] for i, r in enumerate(serial_reports)
        }
        worst_gap = max(abs(ray_loss[k] - serial_loss[k]) for k in serial_loss)
        compute_s = sum(r["timings"]["compute_s"] for r in serial_reports)
        size_bytes = sum(r["timings"]["bytes_read"] for r in serial_reports)

    print(f"lorafid batch --ray local: {ray_s:7.2f} s   serial / Ray = {serial_s / ray_s:.2f}×")
    print("what bounds it:")
    print(
        f"  fixed: Python + lorafid + torch start {costs['python_torch_start_s']:.2f} s per CLI process "
        f"(×{PAIRS} = {PAIRS * costs['python_torch_start_s']:.1f} s serial); Ray start + first task "
        f"{costs['ray_start_s']:.2f} s per batch"
    )
    print(
        f"  cores: the audits' compute {compute_s:.1f} s in all (serial CLI, {cores} threads each); "
        f"Ray runs {cores} pairs at once on 1 core each"
    )
    if cap:
        print(
            f"  Hub: {size_bytes / 1e9:.2f} GB at {args.cap_mb_s:g} MB/s takes {size_bytes / cap:.1f} s at least, "
            "either way"
        )
    print(f"  bytes: {size_bytes / PAIRS / 1e6:.1f} MB read per pair, {size_bytes / 1e9:.3f} GB in all")
    print(f"same loss both ways: largest difference {worst_gap:.1e}")
    if args.json:
        results: dict[str, Any] = {
            "pairs": PAIRS,
            "preset": args.preset,
            "layers": args.layers,
            "cpus": cores,
            "cap_mb_s": args.cap_mb_s,
            "serial_s": serial_s,
            "ray_s": ray_s,
            "ratio": serial_s / ray_s,
            "compute_s": compute_s,
            "bytes_read": size_bytes,
            "worst_loss_gap": worst_gap,
            **costs,
        }
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
