"""Extraction time per matrix: lorafid's factors against a full SVD of the same Δ (mergekit's way).

    python -m bench.extract                                          # 2-core CPU, 4096x14336, rank 64
    python -m bench.extract --device cuda --shapes 4096x14336,8192x28672 --rank 64 128

Both sides start from the same bf16 (base, fine-tune) tensors already on the device and end
with the rank-r factors (B, A) on it, in float32:

- lorafid: ``spectrum.decompose`` (Δ in float32, float32 Gram matrix of the smaller side,
  one float64 ``eigh``) and ``Decomposition.factors(r)``: the decomposition ``lorafid
  extract`` runs per matrix, which yields the full spectrum (every rank's loss) as well.
  (The extraction then also measures the stored factors against Δ, ``adapter.adapter_fit``:
  2·m·n·r more multiply-adds in float64, not timed here.)
- baseline: what ``mergekit-extract-lora`` runs per matrix: ``torch.linalg.svd(Δ.float(),
  full_matrices=False)`` and the factors ``U_r·sqrt(S_r)``, ``sqrt(S_r)·V_rᵀ``.

Each is timed alone (synchronised on CUDA) after a warm-up matrix, in wall seconds and, on
CPU, in CPU seconds of this process (all its threads): on a shared machine the wall clock
counts other people's work, the CPU time does not. Printed per shape: both times, their
ratio, and how far apart the two rank-r truncations are (‖Δ_r − Δ'_r‖/‖Δ'_r‖, in float64)
with the energy each keeps, so the speed is not bought with accuracy.
The matrices are ``bench.synth`` pairs: bf16 weights with a decaying-spectrum Δ.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import torch

from bench.synth import matrix_pair, parse_shape
from bench.timing import timed
from lorafid.audit import spectrum as sp

T = TypeVar("T")


def lorafid_factors(base: torch.Tensor, finetune: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B·A = Δ_r, from one decomposition (as ``lorafid extract`` computes them)."""
    _, decomposition = sp.decompose(base, finetune, rank)
    return decomposition.factors(rank)


def svd_factors(base: torch.Tensor, finetune: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mergekit-extract-lora's per-matrix work: full SVD of Δ in float32, split sqrt(S)."""
    with sp.exact_matmul():
        delta = finetune.float() - base.float()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        root = s[:rank].sqrt()
        return u[:, :rank] * root, root[:, None] * vh[:rank]


def cpu_timed(function: Callable[[], T], device: torch.device) -> tuple[T, float, float]:
    """(result, wall seconds, CPU seconds of this process) of one call."""
    started = time.process_time()
    result, wall = timed(function, device)
    return result, wall, time.process_time() - started


def agreement(
    base: torch.Tensor,
    finetune: torch.Tensor,
    ours: tuple[torch.Tensor, torch.Tensor],
    theirs: tuple[torch.Tensor, torch.Tensor],
) -> tuple[float, float, float]:
    """(relative distance of the two truncations, energy kept by ours, energy kept by theirs), float64."""
    delta = finetune.double() - base.double()
    ours_r = ours[0].double() @ ours[1].double()
    theirs_r = theirs[0].double() @ theirs[1].double()
    energy = float(delta.square().sum())
    kept = [1.0 - float((delta - t).square().sum()) / energy for t in (ours_r, theirs_r)]
    distance = math.sqrt(float((ours_r - theirs_r).square().sum()) / float(theirs_r.square().sum()))
    return distance, kept[0], kept[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x14336", help="comma-separated ROWSxCOLS (default: 4096x14336)")
    parser.add_argument("--rank", type=int, nargs="+", default=[64])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # as lorafid does; the baseline gets the same
    warm = [t.to(device) for t in matrix_pair((512, 512), seed=1)]
    lorafid_factors(*warm, 8)
    svd_factors(*warm, 8)
    print(f"device {device} · {torch.get_num_threads()} CPU threads · compute only, per matrix")
    header = (
        "shape",
        "rank",
        "lorafid s",
        "full SVD s",
        "speedup",
        "CPU s (ours / SVD)",
        "Δ_r apart",
        "kept (ours / SVD)",
    )
    print("{:>12} {:>5} {:>10} {:>11} {:>8} {:>19} {:>10} {:>22}".format(*header))
    total = [0.0, 0.0, 0.0, 0.0]
    for seed, text in enumerate(args.shapes.split(",")):
        shape = parse_shape(text)
        base, finetune = (t.to(device) for t in matrix_pair(shape, seed=seed))
        for rank in args.rank:
            ours, ours_s, ours_cpu = cpu_timed(partial(lorafid_factors, base, finetune, rank), device)
            theirs, svd_s, svd_cpu = cpu_timed(partial(svd_factors, base, finetune, rank), device)
            total = [a + b for a, b in zip(total, (ours_s, svd_s, ours_cpu, svd_cpu), strict=True)]
            distance, kept_ours, kept_svd = agreement(base, finetune, ours, theirs)
            print(
                f"{text:>12} {rank:>5} {ours_s:>10.2f} {svd_s:>11.2f} {svd_s / ours_s:>7.1f}x "
                f"{ours_cpu:>8.1f} / {svd_cpu:>8.1f} {distance:>10.1e} {kept_ours:>10.7f} / {kept_svd:.7f}",
                flush=True,
            )
    print(
        f"total: lorafid {total[0]:.2f} s, full SVD {total[1]:.2f} s, {total[1] / total[0]:.1f}x; "
        f"CPU {total[2]:.1f} s vs {total[3]:.1f} s, {total[3] / max(total[2], 1e-9):.1f}x"
    )


if __name__ == "__main__":
    main()
