"""The variants' decomposition: float32 ``eigh`` refined in float64 against the float64 ``eigh``.

    python -m bench.decompose                                        # k = 1024 and 2048, ranks 64 and 256
    python -m bench.decompose --shapes 14336x4096 --ranks 64,512 --repeats 2
    python -m bench.decompose --device cuda --shapes 28672x8192 --ranks 64,512   # GPU (to fill)

What the behaviour check, the provider check and ``lorafid extract`` run per matrix:
``spectrum.decompose(base, finetune, r)`` (spectrum + top-r directions), as it is now and as it
was at ``--rev`` (default e14ec2b: one float64 ``eigh`` with all eigenvectors), on the same bf16
pair, interleaved and repeated (``bench.timing``). For each shape and rank: seconds of both
(median [min, max] over rounds), the speed-up per round, which solver the current code took,
and the largest relative error of the served weight W_base + Δ_r against a float64 SVD's at
ranks 1, r/4 and r (the bar is 1e-6), for both versions. Also the audit's own per-matrix
cost (``delta_spectrum``: float32 eigenvalues only), for scale.
"""

from __future__ import annotations

import argparse

import torch

from bench.before_after import load_revision
from bench.synth import matrix_pair, parse_shape
from bench.timing import interleaved, ratios, spread
from lorafid.audit import spectrum as current


def served_error(base: torch.Tensor, decomposition: object, reference: tuple[torch.Tensor, ...], rank: int) -> float:
    """Largest ‖W_served − W_ref‖ / ‖W_ref‖ over ranks 1, rank/4, rank (W_ref from the float64 SVD)."""
    u, s, vh = reference
    worst = 0.0
    for r in sorted({1, max(1, rank // 4), rank}):
        want = base.double() + (u[:, :r] * s[:r]) @ vh[:r]
        got = (base.float() + decomposition.truncated(r)).double()  # type: ignore[attr-defined]
        worst = max(worst, float((got - want).norm() / want.norm()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x1024,2048x2048", help="comma-separated ROWSxCOLS")
    parser.add_argument("--ranks", default="64,256", help="comma-separated top ranks (a variant set's largest)")
    parser.add_argument("--rev", default="e14ec2b", help="the commit to compare against (default e14ec2b)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 SVD reference (large shapes)")
    args = parser.parse_args()
    device = torch.device(args.device)
    before = load_revision(args.rev, "lorafid/audit/spectrum.py")
    threads = torch.get_num_threads()
    print(f"device {device} · threads {threads} · {args.repeats} interleaved rounds · before = {args.rev}")
    for i, shape in enumerate(parse_shape(s) for s in args.shapes.split(",")):
        base, finetune = (t.to(device) for t in matrix_pair(shape, seed=i))
        reference = None
        if not args.no_check:
            reference = torch.linalg.svd(finetune.double() - base.double(), full_matrices=False)
        for rank in (int(r) for r in args.ranks.split(",")):
            pair = (base, finetune)
            seconds, values = interleaved(
                {
                    "before": lambda r=rank, p=pair: before.decompose(*p, r),
                    "now": lambda r=rank, p=pair: current.decompose(*p, r),
                    "audit": lambda p=pair: current.delta_spectrum(*p),
                },
                args.repeats,
                device,
            )
            speedup = spread(ratios(seconds["before"], seconds["now"]), "x")
            line = (
                f"{shape[0]}x{shape[1]} r={rank}: before {spread(seconds['before'], ' s')} · now "
                f"{spread(seconds['now'], ' s')} ({values['now'][1].solver}) · speed-up {speedup}"
                f" · now / audit {spread(ratios(seconds['now'], seconds['audit']), 'x')}"
            )
            if reference is not None:
                errors = [served_error(base, values[k][1], reference, rank) for k in ("before", "now")]
                line += f" · served-weight error before {errors[0]:.1e}, now {errors[1]:.1e} (bar 1e-6)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
