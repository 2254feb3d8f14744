"""Compute-only seconds per transformer layer, and the projection to a whole model.

    python -m bench.layer_time --preset llama8b                  # CPU
    python -m bench.layer_time --preset llama70b --device cuda   # GPU: 80 layers projected

One layer's weight pairs (``bench.synth`` shapes, bf16) are made in memory and moved to the
device first; then each matrix's ``delta_spectrum`` is timed alone (synchronised on CUDA),
which is the audit's math with no bytes to wait for. A warm-up matrix first takes the
one-off costs (CUDA context, cuSOLVER handles) out of the figures. Peak GPU memory is
printed on CUDA. The projection multiplies by the preset's real layer count.
"""

from __future__ import annotations

import argparse

import torch

from bench.synth import PRESETS, matrix_pair
from bench.timing import timed
from lorafid.audit.spectrum import delta_spectrum

LAYERS = {"tiny": 2, "small": 24, "llama8b": 32, "nemo12b": 40, "llama70b": 80}


def time_matrix(base: torch.Tensor, finetune: torch.Tensor) -> float:
    """Seconds for one matrix's spectrum, synchronised on CUDA."""
    return timed(lambda: delta_spectrum(base, finetune), base.device)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama8b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, help="layer count to project to (default: the real model's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    layers = args.layers or LAYERS[args.preset]
    torch.backends.cuda.matmul.allow_tf32 = False  # as the audit does

    warm = matrix_pair((512, 512), seed=1)
    time_matrix(*(t.to(device) for t in warm))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print(f"{args.preset} · device {device} · {torch.get_num_threads()} CPU threads · compute only")
    total = 0.0
    for seed, (module, shape) in enumerate(preset.modules.items()):
        base, finetune = (t.to(device) for t in matrix_pair(shape, seed=seed))
        seconds = time_matrix(base, finetune)
        total += seconds
        print(f"  {module:<18} {shape[0]:>6}x{shape[1]:<6} {seconds:8.2f} s", flush=True)
        del base, finetune
    print(f"one layer: {total:.2f} s; {layers} layers: {total * layers / 60:.1f} min ({total * layers / 3600:.2f} h)")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
