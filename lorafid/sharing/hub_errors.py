"""Words for what went wrong talking to the Hub, shared by the registry's reader, writer and
publishing rules: which exceptions mean "the network or the Hub failed" (``NETWORK_ERRORS``),
a one-line reason from one (``reason``), and a cut for echoed text (``cut``).
"""

from __future__ import annotations

import httpx2
from huggingface_hub.errors import (
    HfHubHTTPError,
)

NETWORK_ERRORS = (HfHubHTTPError, httpx2.HTTPError, OSError, ValueError)
"""What a Hub call raises when the network or the Hub fails (not a refusal of ours)."""


def reason(error: Exception) -> str:
    """A short reason from a Hub or network error: its first line, cut."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return cut(text, 200)


def cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
