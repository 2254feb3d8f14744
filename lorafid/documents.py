"""The one boundary where a versioned lorafid document (JSON) is read back into typed records.

Every document (``lorafid.report/1``, ``lorafid.behaviour/1``, ``lorafid.probe/1``) is decoded by
its ``from_dict`` through ``decode_document``: the schema is checked first, and a missing or
mistyped field becomes one ``ReportFormatError`` that names it and says what to do, never a
KeyError or TypeError traceback from deep inside a decoder.

Not here: the documents' layouts (``audit.report``, ``behaviour.report``, ``providers.probe_report``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from lorafid.errors import ReportFormatError

T = TypeVar("T")


def decode_document(data: Any, schema: str, what: str, remedy: str, decode: Callable[[dict[str, Any]], T]) -> T:
    """``decode(data)`` if ``data`` is a document of ``schema``; else one clear ``ReportFormatError``.

    Example: ``decode_document({"schema": "x/1"}, "lorafid.probe/1", "provider check", "Run it
    again.", ...)`` raises "Not a lorafid provider check (schema 'x/1', expected 'lorafid.probe/1')...".
    """
    found = data.get("schema") if isinstance(data, dict) else None
    if found != schema:
        raise ReportFormatError(
            f"Not a lorafid {what} (schema {found!r}, expected {schema!r}); "
            "was it written by another tool or a newer lorafid?"
        )
    try:
        return decode(data)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise ReportFormatError(f"The {what} is incomplete or damaged ({detail}). {remedy}") from e
