"""Build safetensors bytes by hand, for golden and hostile-header tests.

Nothing here validates: the point is to write files the parser must refuse as easily as
files it must accept. Layout follows the format: 8-byte little-endian header length N,
N bytes of JSON, then the data section.

Example:
    header, data = layout([("w", "F32", (2,), b"\\0" * 8)])
    raw = build_safetensors_bytes(header, data)
    # raw[:8] == (56).to_bytes(8, "little"): 54 bytes of JSON + 2 spaces of padding;
    # tensor "w" sits at absolute bytes [64, 72)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

# (name, safetensors dtype code, shape, raw little-endian bytes)
TensorSpec = tuple[str, str, tuple[int, ...], bytes]


def header_json(header: Mapping[str, Any] | str | bytes) -> bytes:
    """Serialize a header the way the reference writer does: compact JSON, no spaces.

    A str or bytes header is taken as is, so tests can feed malformed JSON.
    """
    if isinstance(header, bytes):
        return header
    if isinstance(header, str):
        return header.encode()
    return json.dumps(header, separators=(",", ":")).encode()


def build_safetensors_bytes(
    header: Mapping[str, Any] | str | bytes,
    data: bytes = b"",
    *,
    header_len_override: int | None = None,
    pad: bool = True,
) -> bytes:
    """Return ``N (u64 LE) + header JSON + data``.

    Args:
        header: a header dict (serialized compactly), or raw JSON as str/bytes.
        data: the data section, appended unchanged.
        header_len_override: write this N instead of the true one (for hostile tests).
        pad: pad the JSON with spaces to a multiple of 8 bytes, as the reference writer
            does so that the data section starts 8-byte aligned.
    """
    raw = header_json(header)
    if pad:
        raw += b" " * (-len(raw) % 8)
    n = len(raw) if header_len_override is None else header_len_override
    return n.to_bytes(8, "little") + raw + data


def layout(tensors: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None) -> tuple[dict[str, Any], bytes]:
    """Place tensors back to back in the given order: returns (header dict, data bytes).

    Example: [("a", "F16", (2,), b"1234"), ("b", "U8", (1,), b"x")]
    -> ({"a": {..., "data_offsets": [0, 4]}, "b": {..., "data_offsets": [4, 5]}}, b"1234x")
    """
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    chunks: list[bytes] = []
    offset = 0
    for name, dtype, shape, raw in tensors:
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    return header, b"".join(chunks)


def entry(dtype: str, shape: Iterable[int], begin: int, end: int) -> dict[str, Any]:
    """One tensor entry of a header, e.g. ``entry("F32", [2], 0, 8)``."""
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
