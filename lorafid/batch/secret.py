"""The Hub token of a batch, held for its tasks by a small actor on the driver's node.

Ray writes runtime environments (environment variables included) to ``runtime_env_agent.log``
on every node, keeps task arguments in task specs, and may spill object-store objects to
files under its temp directory when memory runs short. A value that only ever travels
as a small actor-call argument or return value does none of that: Ray sends such values
inline over its RPCs and keeps them in the memory of the processes involved. So the driver
hands the token to this actor once (``set``), and each task asks for it (``get``) and keeps it
in its audit's config, in memory only.

Kept apart from the tasks so that the actor's process imports nothing but this (no torch).
"""

from __future__ import annotations


class SecretHolder:
    """A Ray actor holding one string; ``repr`` never shows it."""

    def __init__(self) -> None:
        self._value: str | None = None

    def set(self, value: str) -> None:
        self._value = value

    def get(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "SecretHolder(...)"
