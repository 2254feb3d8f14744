"""Timing on a shared machine: methods interleaved and repeated, medians and spreads, ratios per round.

A load burst on a shared host lands on whichever method runs at that moment. Timing each
method once, one after the other, lets a burst reach one side only; here each round runs
every method once (the order reversed every other round, so neither always goes first),
and a ratio is taken within each round, where both sides met about the same load.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def timed(function: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """(the value, wall seconds), synchronising a CUDA device before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    value = function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - started


def interleaved(
    methods: Mapping[str, Callable[[], T]], repeats: int, device: torch.device | None = None
) -> tuple[dict[str, list[float]], dict[str, T]]:
    """Seconds of each method per round (``repeats`` rounds) and each method's last value."""
    device = device or torch.device("cpu")
    names = list(methods)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    values: dict[str, T] = {}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            values[name], took = timed(methods[name], device)
            seconds[name].append(took)
    return seconds, values


def ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ratios: ``numerator[i] / denominator[i]``."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def spread(values: Sequence[float], unit: str = "") -> str:
    """``median [min, max]``, e.g. ``1.31x [0.61, 1.38]``."""
    return f"{statistics.median(values):.3g}{unit} [{min(values):.3g}, {max(values):.3g}]"
