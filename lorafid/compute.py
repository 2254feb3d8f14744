"""The compute seam: one hook shape for where lorafid's math runs.

Every piece of heavy math (a matrix's spectrum, an extraction's factors, an adapter's fit, one
block of the layer-streamed forward) is a *kernel*: a module-level function that takes CPU
tensors and plain values, returns new CPU tensors or plain numbers, changes none of its
arguments, and takes a keyword ``device`` (None: the best device where it runs). A
``ComputeHook`` is called as ``hook(kernel, *args)`` and returns ``kernel(*args)``, run wherever
the hook chooses. The audit, the extraction, the adapter audit, the behaviour check and the
provider check all take the same hook (``compute=``).

Why one shape: on a ZeroGPU Space a GPU exists only inside a function decorated with
``@spaces.GPU``, run in a worker process that pickles arguments and results. Decorating
``run_kernel`` once (``zero_gpu_hook``) lends the GPU to every kernel, for the kernel only, never
while bytes stream in; kernels are picklable by name and pure, so nothing is lost in transit.

Not here: the kernels themselves (``audit.spectrum``, ``behaviour.forward``, ``adapters``).

Example::

    hook = zero_gpu_hook() or run_kernel          # same call either way
    spectrum = hook(spectrum_kernel, base, finetune)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import torch

T = TypeVar("T")

# A GPU lease per kernel call: one 28672×8192 spectrum takes a few seconds on a GPU, an 8B
# block over 64 short prompts about 1 s; the lease is what ZeroGPU reserves, not what it bills.
ZERO_GPU_DURATION_S = 120


class ComputeHook(Protocol):
    """``hook(kernel, *args)`` runs ``kernel(*args)`` somewhere and returns its result."""

    def __call__(self, kernel: Callable[..., T], /, *args: Any) -> T: ...


def run_kernel(kernel: Callable[..., T], /, *args: Any) -> T:
    """The plain hook: run the kernel here, on its best device. Module-level, so it pickles."""
    return kernel(*args)


def kernel_device(device: str | torch.device | None) -> torch.device:
    """The device a kernel computes on: the one given, else the first CUDA device where there
    is one (a ZeroGPU worker has one; the Space's own process does not), else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def zero_gpu_hook(env: Mapping[str, str] | None = None) -> ComputeHook | None:
    """On a ZeroGPU Space, ``run_kernel`` decorated with ``@spaces.GPU``; elsewhere None.

    Detected by ``SPACES_ZERO_GPU``, which ZeroGPU hardware sets; elsewhere each job picks its
    device itself (``device="auto"``). ``spaces`` is imported only on such a Space.
    """
    env = os.environ if env is None else env
    if "SPACES_ZERO_GPU" not in env:
        return None
    import spaces  # only on Spaces; never a requirement elsewhere

    hook: ComputeHook = spaces.GPU(duration=ZERO_GPU_DURATION_S)(run_kernel)
    return hook
