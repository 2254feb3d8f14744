"""The variants' hidden states through a block matrix: one product per variant, or one batched product.

    OMP_NUM_THREADS=1 python -m bench.variant_matmul                  # CPU, 4 variants
    python -m bench.variant_matmul --device cuda                        # GPU (unmeasured)

The layer-streamed forward runs each variant's hidden states through each block matrix with its
own product (``functional_call`` per variant). The alternative the cost issue named: stack the
variants' weights and hidden states and take one ``bmm``. Same flops; it pays only if one large
call beats several smaller ones. For each matrix shape and number of token rows (a group of texts
of one length), interleaved and repeated (``bench.timing``): ``separate`` (``F.linear`` per
variant), ``bmm`` (weights already stacked, as if each variant's weights were built straight into
one buffer) and ``bmm+stack`` (stacking them per block, as the forward would have to today).
Printed: the speed-up of each batched form over ``separate`` (above 1: batching is faster).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from bench.timing import interleaved, ratios, spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--shapes", default="2816x1024,1024x1024", help="comma-separated OUTxIN")
    parser.add_argument("--rows", default="16,64,256,1024", help="token rows per call")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"{args.device} · {torch.get_num_threads()} threads · {args.variants} variants · {args.repeats} rounds")
    for shape in args.shapes.split(","):
        out, inner = (int(n) for n in shape.split("x"))
        weights = [torch.randn(out, inner, device=device) for _ in range(args.variants)]
        for rows in (int(n) for n in args.rows.split(",")):
            hidden = [torch.randn(rows, inner, device=device) for _ in range(args.variants)]
            seconds, _ = interleaved(methods(weights, hidden), args.repeats, device)
            print(
                f"{shape} · {rows} rows: separate {spread(seconds['separate'], ' s')} · speed-up of bmm "
                f"{spread(ratios(seconds['separate'], seconds['bmm']), 'x')}, of bmm+stack "
                f"{spread(ratios(seconds['separate'], seconds['bmm+stack']), 'x')}"
            )


def methods(weights: list[torch.Tensor], hidden: list[torch.Tensor]) -> dict[str, Callable[[], object]]:
    """The three ways to run every variant's rows through its own matrix."""
    stacked_weights = torch.stack([w.T for w in weights])
    stacked_hidden = torch.stack(hidden)
    return {
        "separate": lambda: [torch.nn.functional.linear(x, w) for x, w in zip(hidden, weights, strict=True)],
        "bmm": lambda: torch.bmm(stacked_hidden, stacked_weights),
        "bmm+stack": lambda: torch.bmm(torch.stack(hidden), torch.stack([w.T for w in weights])),
    }


if __name__ == "__main__":
    main()
