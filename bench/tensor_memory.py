"""Peak memory of auditing one matrix pair, per tensor size: what ``LORAFID_MAX_TENSOR_GB`` bounds.

    python -m bench.tensor_memory                       # 2-core CPU: ~1 min, needs ~3 GB free
    python -m bench.tensor_memory --rows 2048 --cols 8192 32768 65536

Each size runs in a fresh process: a base/fine-tune pair with one bf16 matrix of that size is
written to a temporary folder and audited through ``lorafid.audit.engine`` (the same read → Δ →
spectrum path the app takes), and the process's peak resident memory is compared with a
baseline process that imports the same modules and audits a tiny pair. Prints, per size,
the tensor's storage bytes, the extra peak, and their ratio. The smaller side is kept at
``--rows`` so the eigendecomposition stays quick; the ratio is what carries over to a 70B
model's 28672 × 8192 matrices.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

_CHILD = """
import json, resource, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from lorafid.audit.engine import Audit, AuditConfig
from lorafid.audit.store import Store
rows, cols, folder = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
g = torch.Generator().manual_seed(0)
for side, scale in (("base", 0.0), ("tuned", 1e-2)):
    w = torch.randn(rows, cols, generator=g).mul_(0.05).add_(scale).to(torch.bfloat16)
    (folder / side).mkdir()
    save_file({"model.layers.0.mlp.down_proj.weight": w}, str(folder / side / "model.safetensors"))
    del w
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
config = AuditConfig(rank=64, device="cpu", store=Store(folder / "store"))
with Audit(str(folder / "base"), str(folder / "tuned"), config) as job:
    for _ in job.run():
        pass
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"start_kib": start, "peak_kib": peak}))
"""


def measure(rows: int, cols: int) -> dict[str, int]:
    """Peak RSS (KiB) of a fresh process auditing one rows × cols bf16 pair."""
    with tempfile.TemporaryDirectory(prefix="lorafid-memory-") as folder:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(rows), str(cols), folder], capture_output=True, text=True, check=True
        )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, nargs="+", default=[8192, 32768, 65536])
    args = parser.parse_args()
    baseline = measure(8, 8)["peak_kib"]
    print(f"baseline peak (tiny pair): {baseline / 1024:.0f} MiB")
    print(f"{'shape':>14} {'tensor MB':>10} {'extra peak MB':>14} {'peak / tensor':>14}")
    for cols in args.cols:
        tensor_bytes = args.rows * cols * 2
        extra_bytes = (measure(args.rows, cols)["peak_kib"] - baseline) * 1024
        print(
            f"{args.rows:>6}x{cols:<7} {tensor_bytes / 1e6:>10.0f} {extra_bytes / 1e6:>14.0f} "
            f"{extra_bytes / tensor_bytes:>14.1f}"
        )


if __name__ == "__main__":
    main()
