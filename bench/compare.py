"""lorafid's spectrum against the seed post's method, side by side, on the same matrices.

    python -m bench.compare --shapes 4096x14336 --rank 64             # 2-core CPU: ~1 min
    python -m bench.compare --device cuda --shapes 8192x28672 --rank 64

The post's method (its ``compare.py``, in torch): a full SVD with U and V of Δ in float32,
rebuild Δ_r = R·L at the rank, then ``mean((Δ − Δ_r)²)`` and ``1 − cos(Δ, Δ_r)``. lorafid:
``spectrum.delta_spectrum`` (float32 Gram, float32 eigenvalues checked) and ``metrics_at_rank``.
Both start from the same bf16 tensors already on the device and end with numbers on the
host, so the ratio is compute only. The two run interleaved, ``--repeats`` rounds per shape
(``bench.timing``: a load burst on a shared host then reaches both); prints seconds and the
speed-up per round as median [min, max], per shape and over all shapes, and the largest
disagreement in cosine distance (the bar is 1e-5).

One difference from the post's script is deliberate: it subtracted in bf16 before casting
(``(fft - base).astype(float32)``), which rounds Δ once more; both methods here take Δ in
float32, so that any disagreement is the methods', not the inputs'.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

import torch

from bench.synth import matrix_pair, parse_shape
from bench.timing import interleaved, ratios, spread
from lorafid.audit import spectrum as sp


@dataclass(frozen=True)
class ShapeResult:
    shape: tuple[int, int]
    post_s: list[float]  # one per round
    lorafid_s: list[float]
    speedups: list[float]  # post / lorafid within each round
    cosine_distance_post: float
    cosine_distance_lorafid: float
    cosine_abs_diff: float
    mse_rel_diff: float


def post_method(base: torch.Tensor, finetune: torch.Tensor, rank: int) -> tuple[float, float]:
    """(mse, cosine_distance) the way the seed post computed them: full SVD, rebuild, compare."""
    with sp.exact_matmul():
        delta = finetune.float() - base.float()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        lossy = (u[:, :r] * root) @ (root[:, None] * vh[:r])
        mse = float(((delta - lossy) ** 2).mean())
        # float64 sums: torch's float32 dot and norm on CPU drift by up to 1% at 58M elements,
        # which would be the reference's error, not a disagreement between the methods.
        dot = float((delta * lossy).sum(dtype=torch.float64))
        norms_sq = float(delta.square().sum(dtype=torch.float64)) * float(lossy.square().sum(dtype=torch.float64))
        cosine = dot / math.sqrt(norms_sq)
    return mse, 1.0 - cosine


def lorafid_method(base: torch.Tensor, finetune: torch.Tensor, rank: int) -> tuple[float, float]:
    metrics = sp.metrics_at_rank(sp.delta_spectrum(base, finetune), rank)
    return metrics.mse, metrics.cosine_distance


def compare_shape(shape: tuple[int, int], rank: int, device: torch.device, seed: int, repeats: int) -> ShapeResult:
    """Both methods on one pair, interleaved ``repeats`` times (``bench.timing``)."""
    base, finetune = (t.to(device) for t in matrix_pair(shape, seed))
    if device.type == "cuda":  # first-call costs (cuSOLVER handles, kernels) are not the method's
        lorafid_method(base[:256, :256], finetune[:256, :256], rank)
        post_method(base[:256, :256], finetune[:256, :256], rank)
    seconds, values = interleaved(
        {
            "post": lambda: post_method(base, finetune, rank),
            "lorafid": lambda: lorafid_method(base, finetune, rank),
        },
        repeats,
        device,
    )
    (post_mse, post_cos), (ours_mse, ours_cos) = values["post"], values["lorafid"]
    return ShapeResult(
        shape=shape,
        post_s=seconds["post"],
        lorafid_s=seconds["lorafid"],
        speedups=ratios(seconds["post"], seconds["lorafid"]),
        cosine_distance_post=post_cos,
        cosine_distance_lorafid=ours_cos,
        cosine_abs_diff=abs(post_cos - ours_cos),
        mse_rel_diff=abs(post_mse - ours_mse) / post_mse if post_mse else 0.0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1024x4096,4096x4096,4096x14336", help="comma-separated ROWSxCOLS")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both methods, interleaved (default 3)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    print(
        f"device {device} · threads {torch.get_num_threads()} · rank {args.rank} · {args.repeats} interleaved rounds"
        f" · torch {torch.__version__}; seconds and speed-ups as median [min, max]"
    )
    results = []
    for i, shape in enumerate(shapes):
        result = compare_shape(shape, args.rank, device, seed=i, repeats=args.repeats)
        results.append(result)
        print(
            f"{result.shape[0]:>6}x{result.shape[1]:<6} post {spread(result.post_s, ' s')} · lorafid "
            f"{spread(result.lorafid_s, ' s')} · speed-up {spread(result.speedups, 'x')} · |Δ cos dist| "
            f"{result.cosine_abs_diff:.1e} · rel Δ mse {result.mse_rel_diff:.1e}"
        )
    totals = ratios([sum(r.post_s[i] for r in results) for i in range(args.repeats)],
                    [sum(r.lorafid_s[i] for r in results) for i in range(args.repeats)])  # fmt: skip
    worst = max(r.cosine_abs_diff for r in results)
    print(f"all shapes: speed-up {spread(totals, 'x')}")
    print(f"largest cosine-distance disagreement: {worst:.1e} ({'within' if worst <= 1e-5 else 'ABOVE'} the 1e-5 bar)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "rank": args.rank, "results": [asdict(r) for r in results]}, f, indent=1)


if __name__ == "__main__":
    main()
