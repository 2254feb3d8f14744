"""ZeroGPU: the per-matrix spectrum as the one ``@spaces.GPU`` function, on such a Space.

Only the short compute step (CPU tensors in, plain numbers out) is decorated; the audit's
streaming of weights stays outside it. Off ZeroGPU ``zero_gpu_compute`` returns None and
the audit picks its device itself; ``spaces`` is imported only on a Space.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch

from lorafid.audit.spectrum import DeltaSpectrum, delta_spectrum

ZERO_GPU_DURATION_S = 120  # a GPU lease per matrix: one 28672×8192 spectrum takes a few seconds


def zero_gpu_compute(
    env: Mapping[str, str] | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], DeltaSpectrum] | None:
    """On a ZeroGPU Space, the per-matrix spectrum as the one ``@spaces.GPU`` function; else None.

    ZeroGPU lends a GPU only inside decorated calls, so the audit's streaming stays outside
    and only this short function (CPU tensors in, plain numbers out) holds the GPU. Detected
    by ``SPACES_ZERO_GPU``, which ZeroGPU hardware sets; elsewhere the audit picks its device
    itself (``AuditConfig.device``).
    """
    env = os.environ if env is None else env
    if "SPACES_ZERO_GPU" not in env:
        return None
    import spaces  # only on Spaces; never a requirement elsewhere

    @spaces.GPU(duration=ZERO_GPU_DURATION_S)
    def spectrum_on_gpu(base: torch.Tensor, finetune: torch.Tensor) -> DeltaSpectrum:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return delta_spectrum(base.to(device), finetune.to(device))

    return spectrum_on_gpu
