"""The whole audit end to end: matrices/s, GB/s, peak RSS, and how long compute waits for bytes.

    python -m bench.throughput                          # 2-core CPU: ~3 min
    python -m bench.throughput --preset llama8b --layers 4 --hub-layers 2 --cap-mb-s 200
    python -m bench.throughput --device cuda --preset llama8b --layers 4 32 --cap-mb-s 0

Three measurements on synthetic pairs (``bench.synth``), each audit in a fresh subprocess so
that its peak RSS (``VmHWM``) is its own:

1. local files, for each ``--layers`` count (default 4 and 32 layers of equal shapes): peak
   RSS must not grow with the model (target: within 10%).
2. the loopback Hub (``bench.capped_hub``: the test server, a "CDN" redirect, one aggregate
   bandwidth cap) at ``--cap-mb-s``: the plain download of both models' weight files through
   the same server, then the audit of the same repos. Target: audit wall ≤ 1.1× download.
3. for every run: ``Report.timings.wait_for_bytes_s / elapsed_s``, the share of time the math
   device sat idle waiting for weights (≈ 1 when I/O-bound, ≈ 0 when compute-bound).

Not timed: generating the synthetic pairs (written once under ``--work``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.capped_hub import serve_in_child
from bench.synth import PRESETS, write_pair


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_audit(
    base: str, finetune: str, *, device: str, rank: int, endpoint: str | None, threads: int = 0
) -> dict[str, Any]:
    """Run one audit in this process and measure it (called in the child)."""
    import torch

    from lorafid.audit.engine import AuditConfig, audit
    from lorafid.audit.store import Store

    if threads:
        torch.set_num_threads(threads)
    rss_before = current_rss_bytes()
    with tempfile.TemporaryDirectory() as home:
        config = AuditConfig(rank=rank, device=device, endpoint=endpoint, token=False, fresh=True, store=Store(home))
        started = time.perf_counter()
        report = audit(base, finetune, config)
        wall_s = time.perf_counter() - started
    timings = report.timings
    cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and device != "cpu" else None
    return {
        "matrices": len(report.matrices),
        "wall_s": wall_s,
        "elapsed_s": timings.elapsed_s,
        "wait_for_bytes_s": timings.wait_for_bytes_s,
        "compute_s": timings.compute_s,
        "bytes_read": timings.bytes_read,
        "rss_before_audit_bytes": rss_before,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_cuda_bytes": cuda_peak,
        "status": report.status,
    }


def audit_in_child(base: str, finetune: str, args: argparse.Namespace, endpoint: str | None = None) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.throughput", "--child", base, finetune]
    command += ["--device", args.device, "--rank", str(args.rank), "--threads", str(args.threads)]
    if endpoint:
        command += ["--endpoint", endpoint]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"audit child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plain_download(
    endpoint: str, repos: dict[str, str], files: dict[str, list[str]], workers: int = 8
) -> tuple[int, float]:
    """Download every weight file of every repo (resolve -> CDN redirect), discarding the bytes."""

    def fetch(job: tuple[str, str]) -> int:
        repo_id, name = job
        url = f"{endpoint}/{repo_id}/resolve/{repos[repo_id]}/{name}"
        got = 0
        with urllib.request.urlopen(url, timeout=120) as response:  # follows the 302 to the CDN
            while chunk := response.read(2**20):
                got += len(chunk)
        return got

    jobs = [(repo_id, name) for repo_id, names in files.items() for name in names]
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(fetch, jobs))
    return total, time.perf_counter() - started


def ensure_pair(work: Path, preset: str, layers: int) -> tuple[Path, Path]:
    out = work / f"{preset}-{layers}"
    base, finetune = out / "base", out / "finetune"
    if not (finetune / "model.safetensors.index.json").exists():
        print(f"  generating {preset} × {layers} layers in {out} ...", flush=True)
        write_pair(out, PRESETS[preset], layers)
    return base, finetune


def describe(label: str, r: dict[str, Any]) -> str:
    gb = r["bytes_read"] / 1e9
    wait = r["wait_for_bytes_s"] / r["elapsed_s"] if r["elapsed_s"] else 0.0
    line = (
        f"{label:<22} {r['matrices']:>4} matrices {r['wall_s']:>7.2f} s  {r['matrices'] / r['wall_s']:>6.1f} mat/s  "
        f"{gb / r['wall_s']:>6.3f} GB/s  peak RSS {r['peak_rss_bytes'] / 2**20:>6.0f} MiB "
        f"(after imports {r['rss_before_audit_bytes'] / 2**20:.0f})  waits for bytes {wait:>4.0%}"
    )
    if r["peak_cuda_bytes"] is not None:
        line += f"  peak GPU {r['peak_cuda_bytes'] / 2**20:.0f} MiB"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--layers", type=int, nargs="*", default=[4, 32], help="local runs (RSS comparison)")
    parser.add_argument("--hub-layers", type=int, default=4, help="layers of the pair served by the loopback Hub")
    parser.add_argument("--cap-mb-s", type=float, default=25.0, help="Hub bandwidth cap, MB/s (0 = none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads in the audit (0 = torch's default, one per core)"
    )
    parser.add_argument("--work", type=Path, help="where synthetic pairs are written (kept); default: a temp dir")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("BASE", "FINETUNE"), help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(
            json.dumps(
                run_audit(*args.child, device=args.device, rank=args.rank, endpoint=args.endpoint, threads=args.threads)
            )
        )
        return

    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        results: dict[str, Any] = {"preset": args.preset, "device": args.device, "cpus": os.cpu_count(), "local": {}}
        print(f"preset {args.preset} · device {args.device} · {os.cpu_count()} CPUs · rank {args.rank}")
        for layers in args.layers:
            base, finetune = ensure_pair(work, args.preset, layers)
            r = audit_in_child(str(base), str(finetune), args)
            results["local"][layers] = r
            print(describe(f"local, {layers} layers", r), flush=True)
        if len(args.layers) > 1:
            peaks = [results["local"][n]["peak_rss_bytes"] for n in args.layers]
            growth = max(peaks) / min(peaks) - 1
            print(f"peak RSS spread across {args.layers} layers: {growth:+.1%} (target: within 10%)")
            results["rss_spread"] = growth

        if args.hub_layers:
            base, finetune = ensure_pair(work, args.preset, args.hub_layers)
            cap = args.cap_mb_s * 1e6 or None
            with serve_in_child({"bench/base": base, "bench/finetune": finetune}, cap) as hub:
                size, download_s = plain_download(hub.endpoint, hub.repos, hub.files)
                print(
                    f"plain download via Hub, {args.hub_layers} layers: {size / 1e9:.3f} GB in {download_s:.2f} s "
                    f"({size / 1e6 / download_s:.1f} MB/s; cap {args.cap_mb_s:g} MB/s)",
                    flush=True,
                )
                r = audit_in_child("bench/base", "bench/finetune", args, endpoint=hub.endpoint)
            print(describe(f"hub, {args.hub_layers} layers", r))
            ratio = r["wall_s"] / download_s
            print(f"audit wall / plain download: {ratio:.2f}× (target ≤ 1.1× where I/O dominates)")
            results["hub"] = {
                "layers": args.hub_layers,
                "cap_mb_s": args.cap_mb_s,
                "download_bytes": size,
                "download_s": download_s,
                "audit": r,
                "audit_over_download": ratio,
            }
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
