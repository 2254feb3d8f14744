"""The rules for small values users type: Hub repo IDs, commit SHAs, and rank lists.

One rule each, used by every reader of them (sources, the registry, the CLI, the
dashboard, batch catalogues), so a value the CLI accepts is one the dashboard accepts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lorafid.errors import LorafidError

_SEGMENT = r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_])?"
_REPO_ID_RE = re.compile(rf"{_SEGMENT}/{_SEGMENT}")
MAX_REPO_ID = 96  # the Hub's limit on "org/name"
_COMMIT_SHA_RE = re.compile(r"[0-9a-f]{40}")
_SHORT_SHA_RE = re.compile(r"[0-9a-f]{7,40}")
_RANK_SEPARATORS = re.compile(r"[\s;|,]+")


def is_repo_id(text: str) -> bool:
    """``org/name`` as the Hub allows it: letters, digits, ``_ . -``, no ``..``/``--``, at most 96 characters."""
    return (
        len(text) <= MAX_REPO_ID and _REPO_ID_RE.fullmatch(text) is not None and ".." not in text and "--" not in text
    )


def is_commit_sha(text: str) -> bool:
    """A full 40-hex commit SHA (what permalinks and published records carry)."""
    return _COMMIT_SHA_RE.fullmatch(text) is not None


def looks_like_short_sha(text: str) -> bool:
    """7 to 40 lowercase hex digits: a revision that may be a (short) commit SHA."""
    return _SHORT_SHA_RE.fullmatch(text) is not None


class InvalidRanksError(LorafidError, ValueError):
    """A rank list that is not 1 or more distinct positive whole numbers within the limits."""


def parse_ranks(
    value: str | int | Sequence[int | str] | None,
    *,
    max_count: int | None = None,
    max_rank: int | None = None,
    what: str = "ranks",
) -> tuple[int, ...]:
    """``"16,64 256"`` or ``[16, 64]`` or ``16`` -> ``(16, 64, 256)``, in the order given.

    Separators are commas, spaces, ``;`` or ``|``. Every rank is a positive whole number
    written as one ("16", not "16.0" or "1e2"), none repeats, and there are at most
    ``max_count`` of them, none above ``max_rank``.

    Raises:
        InvalidRanksError: with a sentence naming what to type instead.
    """
    example = "e.g. 16,64,256"
    if value is None:
        items: list[int | str] = []
    elif isinstance(value, str):
        items = [part for part in _RANK_SEPARATORS.split(value.strip()) if part]
    elif isinstance(value, int):
        items = [value]
    else:
        items = list(value)
    if not items:
        raise InvalidRanksError(f"Give at least one of the {what}, {example}.")
    ranks: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | str) or not str(item).strip().isdigit():
            raise InvalidRanksError(f"{item!r} in the {what} is not a positive whole number ({example}).")
        rank = int(item)
        if rank < 1:
            raise InvalidRanksError(f"{item!r} in the {what} is not a positive whole number ({example}).")
        if max_rank is not None and rank > max_rank:
            raise InvalidRanksError(f"Rank {rank} is above the largest allowed here ({max_rank}).")
        if rank in ranks:
            raise InvalidRanksError(f"Rank {rank} appears twice in the {what}; give each once.")
        ranks.append(rank)
    if max_count is not None and len(ranks) > max_count:
        raise InvalidRanksError(f"Give at most {max_count} {what}; got {len(ranks)}.")
    return tuple(ranks)
