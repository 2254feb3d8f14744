"""Time ``delta_spectrum`` of an earlier commit against the working tree's, in one process.

    python -m bench.before_after --rev b009564 --shape 14336x4096

The earlier ``lorafid/spectrum.py`` is read with ``git show REV:lorafid/spectrum.py`` and
loaded as a separate module; both versions run alternately on the same bf16 pair (so a
busy neighbour slows both alike), and the script checks that they give the same spectrum.
It needs a git checkout; the old module must import only what the current tree has.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from bench.synth import parse_shape
from bench.timing import timed
from lorafid.audit import spectrum as current

ROOT = Path(__file__).resolve().parents[1]


def load_revision(rev: str, path: str = "lorafid/spectrum.py") -> ModuleType:
    """The module at ``path`` as it was at ``rev``, named ``<file stem>_at_<rev>``."""
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True)
    source = shown.stdout
    name = f"{Path(path).stem}_at_{rev}"
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded  # dataclasses look their module up while the class is built
    spec.loader.exec_module(loaded)
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the earlier commit (or tag, branch)")
    parser.add_argument("--shape", type=parse_shape, default=(14336, 4096), help="ROWSxCOLS (default 14336x4096)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    before = load_revision(args.rev)
    torch.manual_seed(0)
    base = torch.randn(*args.shape).to(torch.bfloat16)
    finetune = (base.float() + 0.01 * torch.randn(*args.shape)).to(torch.bfloat16)
    times: dict[str, list[float]] = {"before": [], "after": []}
    results = {}
    for _ in range(args.runs):
        for label, module in (("before", before), ("after", current)):
            results[label], seconds = timed(functools.partial(module.delta_spectrum, base, finetune), base.device)
            times[label].append(seconds)
    print(f"delta_spectrum {args.shape[0]}x{args.shape[1]} bf16, {torch.get_num_threads()} threads")
    for label, runs in times.items():
        print(f"  {label:<7} {', '.join(f'{t:.2f} s' for t in runs)}  (best {min(runs):.2f} s)")
    print(f"  speed-up (best/best): {min(times['before']) / min(times['after']):.2f}x")
    old, new = results["before"], results["after"]
    gap = float(np.max(np.abs(np.asarray(old.sigma_sq) - np.asarray(new.sigma_sq)))) / max(old.energy, 1e-300)
    exact = float(base.double().square().sum()), float(finetune.double().square().sum())
    print(f"  max |σ² before − after| / E: {gap:.1e}; E {old.energy:.6g} vs {new.energy:.6g}")
    for label, r in results.items():
        rel = (r.base_norm_sq / exact[0] - 1, r.finetune_norm_sq / exact[1] - 1)
        print(f"  {label}: ‖W_base‖², ‖W_ft‖² relative error vs float64: {rel[0]:+.1e}, {rel[1]:+.1e}")


if __name__ == "__main__":
    main()
