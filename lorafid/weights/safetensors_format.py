"""Safetensors headers: bytes in, validated tensor records out.

The format (huggingface/safetensors, "Format" in its README):

    8 bytes   N: unsigned 64-bit little-endian, the length of the header
    N bytes   UTF-8 JSON object, possibly padded with trailing spaces:
              {name: {"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]},
               "__metadata__": {str: str}}          # "__metadata__" is optional
    rest      the data section; offsets are relative to its first byte, so a tensor
              occupies the absolute byte range [8 + N + begin, 8 + N + end)

Example: N = 64 and ``{"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}``
-> ``TensorInfo(name="w", dtype="BF16", shape=(2, 3), file=..., start=72, end=84)``.

Pure: no file, network or tensor data is touched here (``source.py`` fetches the bytes).
Headers come from the network, so every field is checked before anyone uses it: size caps,
bounds, overlaps, dtype x shape x byte length; all problems are reported in one message.
Unlike the reference reader it tolerates gaps between tensors and bytes after the last
one (neither changes what any tensor's bytes are), and a ``null`` ``__metadata__``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorafid.errors import SafetensorsHeaderError, UnsupportedDtypeError

if TYPE_CHECKING:
    import torch

HEADER_PROBE_BYTES: int = 100_000  # first ranged read; real headers are 10-300 kB
MAX_HEADER_BYTES: int = 100_000_000  # same cap as the safetensors library
# A valid header nests 3 deep ({name: {"shape": [...]}}). Capping at 8 keeps json.loads
# far below Python's recursion limit (~1000) on hostile input like 100000 "[".
MAX_JSON_DEPTH: int = 8
# A server's cap on tensors per model also caps its headers, from the 8-byte length alone, so a
# 95 MB header of 850k tensors is refused before it is fetched or parsed. Measured entries:
# the smallest valid one, '"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},', is 52 bytes;
# a 100k-tensor MoE's longest, 'model.layers.60.mlp.experts.255.gate_proj.weight' in BF16 at
# 12-digit offsets, is 131. 256 bytes a tensor leaves real names twice that room.
HEADER_BYTES_PER_TENSOR: int = 256
HEADER_METADATA_BYTES: int = 1_000_000  # __metadata__: free-form strings, kilobytes in practice
_MAX_U64 = 2**64 - 1  # the reference reader parses sizes and offsets as u64
_SHOWN_PROBLEMS = 5
_ENTRY_KEYS = ("data_offsets", "dtype", "shape")
_WHAT_TO_DO = "The file is corrupt or not a safetensors file: re-upload it, or pick another revision."


@dataclass(frozen=True)
class DtypeSpec:
    """One safetensors dtype code and what lorafid can do with it."""

    code: str  # safetensors code, e.g. "BF16"
    bits: int  # bits per element; sub-byte types pack densely
    torch_name: str | None  # e.g. "bfloat16"; None if torch has no one-element equivalent
    comparable: bool  # True only for F64, F32, F16, BF16: dtypes lorafid diffs exactly


DTYPES: dict[str, DtypeSpec] = {
    spec.code: spec
    for spec in (
        DtypeSpec("BOOL", 8, "bool", False),
        DtypeSpec("U8", 8, "uint8", False),
        DtypeSpec("I8", 8, "int8", False),
        DtypeSpec("I16", 16, "int16", False),
        DtypeSpec("U16", 16, "uint16", False),  # U16/U32/U64 in torch >= 2.3 only
        DtypeSpec("F16", 16, "float16", True),
        DtypeSpec("BF16", 16, "bfloat16", True),
        DtypeSpec("I32", 32, "int32", False),
        DtypeSpec("U32", 32, "uint32", False),
        DtypeSpec("F32", 32, "float32", True),
        DtypeSpec("F64", 64, "float64", True),
        DtypeSpec("I64", 64, "int64", False),
        DtypeSpec("U64", 64, "uint64", False),
        DtypeSpec("F8_E4M3", 8, "float8_e4m3fn", False),  # float8_* in torch >= 2.1
        DtypeSpec("F8_E5M2", 8, "float8_e5m2", False),
        # Later additions (FNUZ FP8, OCP MX types, complex): older readers reject them.
        # With the codes above, this is the dtype enum of safetensors 0.8.
        DtypeSpec("F8_E4M3FNUZ", 8, "float8_e4m3fnuz", False),
        DtypeSpec("F8_E5M2FNUZ", 8, "float8_e5m2fnuz", False),
        DtypeSpec("F8_E8M0", 8, "float8_e8m0fnu", False),  # MX block scales
        DtypeSpec("F6_E2M3", 6, None, False),
        DtypeSpec("F6_E3M2", 6, None, False),
        DtypeSpec("F4", 4, None, False),  # torch.float4_e2m1fn_x2 packs 2 per element
        DtypeSpec("C64", 64, "complex64", False),
    )
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``file`` bytes [start, end), absolute offsets."""

    name: str
    dtype: str  # safetensors code, a key of DTYPES
    shape: tuple[int, ...]
    file: str  # file name within its source, e.g. "model-00001-of-00002.safetensors"
    start: int  # absolute: 8 + N + data_offsets[0]
    end: int  # absolute, exclusive

    @property
    def size_bytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)  # 1 for a scalar, shape ()

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors ordered by start offset, and the free-form metadata."""

    file: str
    header_len: int  # N
    tensors: dict[str, TensorInfo]  # tensor name -> info
    metadata: dict[str, str]  # "__metadata__", empty if absent

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def header_cap(max_tensors: int | None) -> int:
    """The longest header a model within ``max_tensors`` tensors needs (never above MAX_HEADER_BYTES).

    >>> header_cap(200_000)  # the public app's default tensor limit
    52200000
    >>> header_cap(None) == MAX_HEADER_BYTES
    True
    """
    if max_tensors is None:
        return MAX_HEADER_BYTES
    return min(MAX_HEADER_BYTES, max_tensors * HEADER_BYTES_PER_TENSOR + HEADER_METADATA_BYTES)


def parse_header_length(prefix: bytes, *, file: str, file_size: int | None = None) -> int:
    """Read N from the first 8 bytes of a file and check it is plausible.

    Raises:
        SafetensorsHeaderError: fewer than 8 bytes, N == 0, N > MAX_HEADER_BYTES, or
            8 + N past the end of a file of known ``file_size``.
    """
    if len(prefix) < 8:
        raise _error(file, [f"the file starts with {len(prefix)} bytes, fewer than 8"])
    header_len = int.from_bytes(prefix[:8], "little")
    _check_header_len(header_len, file=file, file_size=file_size)
    return header_len


def parse_header(header_bytes: bytes, *, file: str, header_len: int, file_size: int | None = None) -> SafetensorsHeader:
    """Parse and validate the N JSON bytes of a header (``file[8 : 8 + N]``).

    ``file_size``, when known, also bounds every tensor to the file.

    Raises:
        SafetensorsHeaderError: naming ``file``, the first few offending tensors, and what
            to do. Every problem found is gathered into that one message.
    """
    _check_header_len(header_len, file=file, file_size=file_size)
    if len(header_bytes) != header_len:
        raise _error(file, [f"got {len(header_bytes)} header bytes, expected {header_len}"])
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _error(file, [f"the header is not UTF-8 ({e.reason} at byte {e.start})"]) from e
    if not _nesting_within(header_bytes, MAX_JSON_DEPTH):
        raise _error(
            file, [f"the header is not valid JSON (brackets unbalanced or nested deeper than {MAX_JSON_DEPTH})"]
        )
    problems: list[str] = []

    def keep_duplicates_visible(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                problems.append(f"key {_show(key)} appears twice")
            obj[key] = value
        return obj

    try:
        tree = json.loads(text, object_pairs_hook=keep_duplicates_visible)
    except json.JSONDecodeError as e:
        raise _error(file, [f"the header is not valid JSON ({e.msg} at byte {e.pos})"]) from e
    except ValueError as e:  # Python refuses ints of more than 4300 digits
        raise _error(file, ["the header is not valid JSON (an integer too long to be a size)"]) from e
    if not isinstance(tree, dict):
        raise _error(file, [f"the header is a JSON {type(tree).__name__}, not an object"])
    data_len = None if file_size is None else file_size - 8 - header_len
    metadata = tree.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        problems.append("__metadata__ is not a map of strings to strings")
    infos = [_check_entry(n, e, file, header_len, data_len, problems) for n, e in tree.items()]
    valid = sorted((i for i in infos if i is not None), key=lambda i: (i.start, i.name))
    last: TensorInfo | None = None  # of the tensors so far, the one that ends last
    for info in valid:
        if last is not None and info.start < last.end and info.size_bytes > 0:
            problems.append(f"tensor {_show(info.name)} overlaps tensor {_show(last.name)}")
        if last is None or info.end > last.end:
            last = info
    if problems:
        raise _error(file, problems)
    tensors = {info.name: info for info in valid}
    return SafetensorsHeader(file, header_len, tensors, metadata)


def parse_file_prefix(prefix: bytes, *, file: str, file_size: int | None = None) -> SafetensorsHeader:
    """Parse a header from the first bytes of a file; ``prefix`` must hold at least 8 + N.

    Callers holding only HEADER_PROBE_BYTES read N with parse_header_length, fetch the
    rest, then call this.
    """
    header_len = parse_header_length(prefix, file=file, file_size=file_size)
    if len(prefix) < 8 + header_len:
        raise SafetensorsHeaderError(
            f"{file}: the header needs bytes [0, {8 + header_len}) but only "
            f"{len(prefix)} were given; read the whole header before parsing it."
        )
    return parse_header(prefix[8 : 8 + header_len], file=file, header_len=header_len, file_size=file_size)


def torch_dtype(code: str, *, where: str = "") -> torch.dtype:
    """The torch dtype of a comparable safetensors code, e.g. "BF16" -> torch.bfloat16.

    ``where`` (e.g. "model.safetensors: tensor 'lm_head.weight'") prefixes error messages.

    Raises:
        UnsupportedDtypeError: the code is not F16, BF16, F32 or F64.
        SafetensorsHeaderError: the code is not a safetensors dtype at all.
    """
    prefix = f"{where}: " if where else ""
    spec = DTYPES.get(code)
    if spec is None:
        raise SafetensorsHeaderError(f"{prefix}unknown safetensors dtype {_show(code)}.")
    if not spec.comparable or spec.torch_name is None:
        raise UnsupportedDtypeError(
            f"{prefix}dtype {code} cannot be compared exactly. lorafid compares float16, "
            "bfloat16, float32 and float64 checkpoints only: quantized formats (GPTQ/AWQ "
            "int packs, bitsandbytes U8, FP8 with scales) store codes whose meaning depends "
            "on per-model scales, so their difference is not the fine-tune's change. "
            "Use the unquantized original of both models."
        )
    import torch  # lazy: parsing headers must not pay for importing torch

    dtype: torch.dtype = getattr(torch, spec.torch_name)
    return dtype


# Bracket depth is measured on a skeleton of the header: escapes dropped, then every byte
# but []{}" deleted, openers mapped to "(" and closers to ")". Only C-speed bytes methods
# touch the whole input, so a hostile 100 MB header costs about a second, not a regex
# backtracking storm (an escaped-quote run made a string regex take minutes).
_TO_PARENS = bytes.maketrans(b"[{]}", b"(())")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_CHUNK_BYTES = 1 << 20  # bounds the list that split() builds on a run of quotes


def _nesting_within(header_bytes: bytes, depth: int) -> bool:
    """True if the brackets outside JSON strings balance and nest at most ``depth`` levels.

    Mismatched kinds ("[}") pass here and fail in json.loads; what matters is that the
    parser never recurses deeper than ``depth``. Each pass deletes every innermost pair,
    so a balanced skeleton empties in exactly max-depth passes.
    Example: '{"a[": [[1], []]}' -> skeleton '("("(()()))' -> outside strings "((()()))"
    -> one pass per level: "(())" -> "()" -> "": depth 3, within 8.
    """
    skeleton = header_bytes.replace(b"\\\\", b"").replace(b'\\"', b"").translate(_TO_PARENS, _NOT_STRUCTURE)
    outside: list[bytes] = []
    in_string = False
    for start in range(0, len(skeleton), _CHUNK_BYTES):
        parts = skeleton[start : start + _CHUNK_BYTES].split(b'"')
        outside.append(b"".join(parts[int(in_string) :: 2]))
        in_string ^= len(parts) % 2 == 0  # an odd number of quotes in this chunk
    brackets = b"".join(outside)
    for _ in range(depth):
        shorter = brackets.replace(b"()", b"")
        if len(shorter) == len(brackets):
            break  # empty, or unbalanced: nothing left to pair
        brackets = shorter
    return not brackets


def _check_entry(
    name: str,
    entry: Any,
    file: str,
    header_len: int,
    data_len: int | None,
    problems: list[str],
) -> TensorInfo | None:
    """Validate one tensor entry; append each problem found and return None if any."""
    where = f"tensor {_show(name)}"
    if not isinstance(entry, dict):
        problems.append(f"{where}: entry is a JSON {type(entry).__name__}, not an object")
        return None
    if sorted(entry) != list(_ENTRY_KEYS):
        problems.append(f"{where}: keys {sorted(entry)}, expected {list(_ENTRY_KEYS)}")
        return None
    n_before = len(problems)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    spec = DTYPES.get(dtype) if isinstance(dtype, str) else None
    if spec is None:
        problems.append(f"{where}: unknown dtype {_show(dtype)}")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= _MAX_U64 for d in shape):
        problems.append(f"{where}: shape {_show(shape)} is not a list of non-negative ints")
        shape = None
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        problems.append(f"{where}: data_offsets {_show(offsets)} is not two integers")
        offsets = None
    elif min(offsets) < 0:
        problems.append(f"{where}: data_offsets {offsets} are negative")
        offsets = None
    elif offsets[0] > offsets[1]:
        problems.append(f"{where}: data_offsets {offsets} are reversed (begin > end)")
        offsets = None
    elif data_len is not None and offsets[1] > data_len:
        problems.append(f"{where}: data_offsets {offsets} end past the data ({data_len} bytes)")
    elif offsets[1] > _MAX_U64:
        problems.append(f"{where}: data_offsets {offsets} exceed 2**64")
    if spec is not None and shape is not None:
        numel = 0 if 0 in shape else 1
        for d in shape:  # stop early: 10**6 dims of 2**63 would make a huge int
            numel *= d
            if numel > _MAX_U64:
                break
        nbits = numel * spec.bits
        if numel > _MAX_U64 or nbits > 8 * (_MAX_U64 if data_len is None else data_len):
            problems.append(f"{where}: shape {_show(shape)} of {dtype} is larger than the file")
        elif nbits % 8:
            problems.append(f"{where}: {numel} x {dtype} does not end on a byte boundary")
        elif offsets is not None and offsets[1] - offsets[0] != nbits // 8:
            problems.append(
                f"{where}: shape {_show(shape)} of {dtype} needs {nbits // 8} bytes, "
                f"data_offsets {offsets} hold {offsets[1] - offsets[0]}"
            )
    if len(problems) > n_before or offsets is None or shape is None:
        return None
    data_start = 8 + header_len
    return TensorInfo(name, dtype, tuple(shape), file, data_start + offsets[0], data_start + offsets[1])


def _check_header_len(header_len: int, *, file: str, file_size: int | None) -> None:
    if header_len <= 0:
        raise _error(file, [f"header length is {header_len}"])
    if header_len > MAX_HEADER_BYTES:
        raise _error(file, [f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte cap"])
    if file_size is not None and 8 + header_len > file_size:
        raise _error(file, [f"header length {header_len} runs past the end of the file ({file_size} bytes)"])


def _is_int(value: Any) -> bool:
    return type(value) is int  # JSON true/false parse as bool, a subclass of int


def _show(value: Any, limit: int = 60) -> str:
    """repr() capped in length: hostile headers hold megabyte names and shapes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error(file: str, problems: list[str]) -> SafetensorsHeaderError:
    shown = "; ".join(problems[:_SHOWN_PROBLEMS])
    if len(problems) > _SHOWN_PROBLEMS:
        shown += f"; and {len(problems) - _SHOWN_PROBLEMS} more"
    count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
    return SafetensorsHeaderError(f"{file}: invalid safetensors header ({count}): {shown}. {_WHAT_TO_DO}")
