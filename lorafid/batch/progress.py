"""The progress board of a batch: a Ray actor that tasks tell how many bytes they have read.

Kept apart from the tasks so that the actor's process imports nothing but this (no torch):
on a busy machine that saves seconds at the start of every batch.
"""

from __future__ import annotations


class ProgressBoard:
    """A Ray actor holding the latest (bytes done, bytes total) of every running task.

    Keys are (pair index, chunk): chunk -1 is the pair's report task. Updates are sent
    without waiting, so the last ones of a task may arrive after its result: the driver
    counts a finished pair from its result, and the board only for pairs still running.
    """

    def __init__(self) -> None:
        self._bytes: dict[tuple[int, int], tuple[int, int]] = {}

    def update(self, key: tuple[int, int], done: int, total: int) -> None:
        self._bytes[key] = (done, total)

    def snapshot(self) -> dict[tuple[int, int], tuple[int, int]]:
        return dict(self._bytes)
