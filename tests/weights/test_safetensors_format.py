"""safetensors_format.py against golden bytes, the reference safetensors library, and hostile headers."""

from __future__ import annotations

import itertools
import json
import math
import string
import struct
import time

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafid.errors import SafetensorsHeaderError, UnsupportedDtypeError
from lorafid.weights import safetensors_format as sf
from tests.fixtures_safetensors import build_safetensors_bytes, entry, layout

# Written by hand from the format, not by any library: N = 144, then the JSON exactly as the
# reference writer emits it (metadata first, tensors sorted by alignment then name, no
# spaces), one space of padding so the data section starts 8-byte aligned, then the data.
GOLDEN = (
    b"\x90\x00\x00\x00\x00\x00\x00\x00"
    b'{"__metadata__":{"format":"pt"},'
    b'"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},'
    b'"b":{"dtype":"F16","shape":[3],"data_offsets":[16,22]}}'
    b" "
    b"\x00\x00\x00\x00\x00\x00\x80\x3f\x00\x00\x00\x40\x00\x00\x40\x40"  # F32 0, 1, 2, 3
    b"\x00\x3c\x00\x40\x00\x42"  # F16 1, 2, 3
)
GOLDEN_TENSORS = {
    "a": torch.arange(4, dtype=torch.float32).reshape(2, 2),
    "b": torch.tensor([1, 2, 3], dtype=torch.float16),
}
COMPARABLE = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def parse(raw: bytes, *, file: str = "model.safetensors", file_size: int | None = -1) -> sf.SafetensorsHeader:
    """Parse a whole file held in memory; file_size defaults to len(raw)."""
    return sf.parse_file_prefix(raw, file=file, file_size=len(raw) if file_size == -1 else file_size)


def header_error(raw: bytes, **kwargs: object) -> str:
    with pytest.raises(SafetensorsHeaderError) as info:
        parse(raw, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


# --- golden bytes -------------------------------------------------------------------------


def test_golden_bytes_match_the_reference_writer(tmp_path):
    assert safetensors.torch.save(GOLDEN_TENSORS, metadata={"format": "pt"}) == GOLDEN
    path = tmp_path / "golden.safetensors"
    safetensors.torch.save_file(GOLDEN_TENSORS, path, metadata={"format": "pt"})
    assert path.read_bytes() == GOLDEN


def test_golden_bytes_parse_to_absolute_offsets():
    header = parse(GOLDEN, file="model-00001-of-00002.safetensors")
    assert header.header_len == 144
    assert header.data_start == 152
    assert header.metadata == {"format": "pt"}
    file = "model-00001-of-00002.safetensors"
    assert header.tensors == {
        "a": sf.TensorInfo(name="a", dtype="F32", shape=(2, 2), file=file, start=152, end=168),
        "b": sf.TensorInfo(name="b", dtype="F16", shape=(3,), file=file, start=168, end=174),
    }
    a, b = header.tensors["a"], header.tensors["b"]
    assert (a.size_bytes, a.numel, a.ndim) == (16, 4, 2)
    assert (b.size_bytes, b.numel, b.ndim) == (6, 3, 1)
    for name, info in header.tensors.items():
        got = torch.frombuffer(bytearray(GOLDEN[info.start : info.end]), dtype=sf.torch_dtype(info.dtype))
        assert torch.equal(got.reshape(info.shape), GOLDEN_TENSORS[name])


def test_golden_bytes_in_two_reads_like_a_remote_source():
    probe = GOLDEN[:16]  # a probe shorter than the header: caller must read 8 + N first
    n = sf.parse_header_length(probe, file="m.safetensors", file_size=len(GOLDEN))
    assert n == 144
    with pytest.raises(SafetensorsHeaderError, match="read the whole header"):
        sf.parse_file_prefix(probe, file="m.safetensors")
    header = sf.parse_header(GOLDEN[8 : 8 + n], file="m.safetensors", header_len=n, file_size=len(GOLDEN))
    assert header == parse(GOLDEN, file="m.safetensors")


def test_scalar_tensor_properties():
    info = sf.TensorInfo(name="s", dtype="F32", shape=(), file="f", start=8, end=12)
    assert (info.numel, info.ndim, info.size_bytes) == (1, 0, 4)


# --- round trips with the reference library -----------------------------------------------

SHAPES = [(), (0,), (1,), (3, 5), (2, 3, 4), (7, 0, 2), (1, 1, 1, 9)]


@pytest.mark.parametrize("code", sorted(COMPARABLE))
def test_round_trip_with_the_reference_library(code):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}.weight": torch.randn(shape, generator=gen).to(COMPARABLE[code]) for i, shape in enumerate(SHAPES)}
    tensors['odd name [x] {y} "q"'] = torch.ones(5, 3, dtype=COMPARABLE[code])
    raw = safetensors.torch.save(tensors, metadata={"k": "v"})
    header = parse(raw)
    assert set(header.tensors) == set(tensors)
    assert [i.start for i in header.tensors.values()] == sorted(i.start for i in header.tensors.values())
    for name, info in header.tensors.items():
        assert (info.dtype, info.shape, info.file) == (code, tuple(tensors[name].shape), "model.safetensors")
        assert info.size_bytes == tensors[name].numel() * tensors[name].element_size()
        if info.numel:
            got = torch.frombuffer(bytearray(raw[info.start : info.end]), dtype=sf.torch_dtype(code))
            assert torch.equal(got.reshape(info.shape), tensors[name])


def test_header_padded_with_many_spaces():
    reference = safetensors.torch.save(GOLDEN_TENSORS)
    n = struct.unpack("<Q", reference[:8])[0]
    padded_json = reference[8 : 8 + n] + b" " * 21
    raw = struct.pack("<Q", len(padded_json)) + padded_json + reference[8 + n :]
    loaded = safetensors.torch.load(raw)  # the reference reader accepts it too
    header = parse(raw)
    assert header.header_len == n + 21
    for name, info in header.tensors.items():
        got = torch.frombuffer(bytearray(raw[info.start : info.end]), dtype=sf.torch_dtype(info.dtype))
        assert torch.equal(got.reshape(info.shape), loaded[name])


def test_brackets_inside_names_and_metadata_do_not_count_as_nesting():
    name = "[" * 50 + '\\"{' * 50
    header, data = layout([(name, "U8", (2,), b"xy")], metadata={"note": "]]]]}}}}" * 20})
    parsed = parse(build_safetensors_bytes(header, data))
    assert list(parsed.tensors) == [name]


def test_gaps_and_trailing_bytes_are_tolerated():
    header = {"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 10, 12)}
    raw = build_safetensors_bytes(header, bytes(20))
    assert [(i.name, i.start - parse(raw).data_start) for i in parse(raw).tensors.values()] == [("a", 0), ("b", 10)]


def test_tensors_are_ordered_by_offset_not_by_json_order():
    header = {"z": entry("U8", [1], 0, 1), "a": entry("U8", [1], 2, 3), "m": entry("U8", [1], 1, 2)}
    assert list(parse(build_safetensors_bytes(header, b"abc")).tensors) == ["z", "m", "a"]


def test_zero_size_tensors_may_share_an_offset():
    header = {"e1": entry("F32", [0], 4, 4), "e2": entry("F32", [0, 3], 4, 4), "w": entry("F32", [2], 0, 8)}
    assert set(parse(build_safetensors_bytes(header, bytes(8))).tensors) == {"e1", "e2", "w"}


def test_null_metadata_is_empty_as_in_the_reference_reader():
    raw = build_safetensors_bytes({"__metadata__": None, "w": entry("U8", [1], 0, 1)}, b"x")
    assert safetensors.deserialize(raw)  # the reference reader accepts it
    assert parse(raw).metadata == {}


def test_sub_byte_dtypes_must_end_on_a_byte_boundary():
    assert parse(build_safetensors_bytes({"w": entry("F4", [2, 2], 0, 2)}, bytes(2))).tensors["w"].size_bytes == 2
    assert parse(build_safetensors_bytes({"w": entry("F6_E2M3", [4], 0, 3)}, bytes(3))).tensors["w"].size_bytes == 3
    message = header_error(build_safetensors_bytes({"w": entry("F4", [3], 0, 2)}, bytes(2)))
    assert "byte boundary" in message  # the reference reader refuses this too


# --- hostile headers ----------------------------------------------------------------------

VALID_ENTRY = entry("F32", [2], 0, 8)

HOSTILE: dict[str, tuple[bytes, str]] = {
    "fewer than 8 bytes": (b"\x10\x00\x00", "fewer than 8"),
    "length zero": ((0).to_bytes(8, "little") + b"{}", "header length is 0"),
    "length past the end": ((1000).to_bytes(8, "little") + b'{"a":1}', "runs past the end of the file"),
    "length over the cap": ((sf.MAX_HEADER_BYTES + 1).to_bytes(8, "little"), "cap"),
    "length 2**64-1": (b"\xff" * 16, "cap"),
    "not UTF-8": (build_safetensors_bytes(b'{"\xff\xfe":1}'), "not UTF-8"),
    "not JSON": (build_safetensors_bytes(b"{this is not json"), "not valid JSON"),
    "JSON list": (build_safetensors_bytes(b"[1, 2, 3]"), "JSON list, not an object"),
    "JSON string": (build_safetensors_bytes(b'"{}"'), "JSON str, not an object"),
    "deep nesting": (build_safetensors_bytes(b"[" * 100_000), "nested deeper than 8"),
    "deep balanced nesting": (build_safetensors_bytes(b"{" + b'"a":' + b"[" * 9 + b"]" * 9 + b"}"), "nested deeper"),
    "mismatched brackets": (build_safetensors_bytes(b'{"a": [1}]'), "not valid JSON"),
    "huge integer": (build_safetensors_bytes(b'{"a": ' + b"9" * 5000 + b"}"), "not valid JSON"),
    "entry not an object": (build_safetensors_bytes({"w": [1, 2]}), "'w': entry is a JSON list"),
    "missing key": (build_safetensors_bytes({"w": {"dtype": "F32", "shape": [2]}}, bytes(8)), "expected"),
    "extra key": (build_safetensors_bytes({"w": {**VALID_ENTRY, "crc": 1}}, bytes(8)), "'crc'"),
    "duplicate tensor": (
        build_safetensors_bytes(
            b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
            b"x",
        ),
        "appears twice",
    ),
    "unknown dtype": (build_safetensors_bytes({"w": entry("Q4_K", [2], 0, 8)}, bytes(8)), "unknown dtype 'Q4_K'"),
    "dtype not a string": (build_safetensors_bytes({"w": entry(7, [2], 0, 8)}, bytes(8)), "unknown dtype 7"),  # type: ignore[arg-type]
    "negative dim": (build_safetensors_bytes({"w": entry("F32", [-2], 0, 8)}, bytes(8)), "non-negative"),
    "float dim": (build_safetensors_bytes({"w": {**VALID_ENTRY, "shape": [2.0]}}, bytes(8)), "non-negative"),
    "bool dim": (build_safetensors_bytes({"w": {**VALID_ENTRY, "shape": [True, 8]}}, bytes(8)), "non-negative"),
    "shape not a list": (build_safetensors_bytes({"w": {**VALID_ENTRY, "shape": "2"}}, bytes(8)), "non-negative"),
    "negative offsets": (build_safetensors_bytes({"w": entry("F32", [2], -8, 0)}, bytes(8)), "negative"),
    "reversed offsets": (build_safetensors_bytes({"w": entry("F32", [2], 8, 0)}, bytes(8)), "reversed"),
    "three offsets": (
        build_safetensors_bytes({"w": {**VALID_ENTRY, "data_offsets": [0, 4, 8]}}, bytes(8)),
        "two integers",
    ),
    "float offsets": (
        build_safetensors_bytes({"w": {**VALID_ENTRY, "data_offsets": [0, 8.0]}}, bytes(8)),
        "two integers",
    ),
    "offsets out of range": (
        build_safetensors_bytes({"w": entry("F32", [2], 0, 8)}, bytes(4)),
        "end past the data (4 bytes)",
    ),
    "overlapping offsets": (
        build_safetensors_bytes({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, bytes(12)),
        "tensor 'b' overlaps tensor 'a'",
    ),
    "nested overlap": (
        build_safetensors_bytes(
            {"big": entry("U8", [10], 0, 10), "x": entry("U8", [2], 2, 4), "y": entry("U8", [2], 6, 8)}, bytes(10)
        ),
        "tensor 'y' overlaps tensor 'big'",
    ),
    "dtype x shape != bytes": (build_safetensors_bytes({"w": entry("BF16", [3], 0, 8)}, bytes(8)), "needs 6 bytes"),
    "absurd shape": (
        build_safetensors_bytes({"w": entry("F32", [2**40, 2**40], 0, 8)}, bytes(8)),
        "larger than the file",
    ),
    "shape past the file": (
        build_safetensors_bytes({"w": entry("F32", [1000], 0, 4000)}, bytes(8)),
        "larger than the file",
    ),
    "metadata not strings": (
        build_safetensors_bytes({"__metadata__": {"step": 3}, "w": VALID_ENTRY}, bytes(8)),
        "__metadata__ is not a map of strings",
    ),
    "metadata a list": (build_safetensors_bytes({"__metadata__": ["a"], "w": VALID_ENTRY}, bytes(8)), "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header_raises_a_useful_error(case):
    raw, expected = HOSTILE[case]
    message = header_error(raw, file="evil.safetensors")
    assert message.startswith("evil.safetensors: ")
    assert expected in message
    assert len(message) < 1000


# lorafid is stricter than the reference reader here: the spec lists exactly three keys per
# entry, and a repeated tensor name would make "which bytes are this tensor" ambiguous.
STRICTER_THAN_REFERENCE = {"extra key", "duplicate tensor"}


@pytest.mark.parametrize("case", sorted(set(HOSTILE) - STRICTER_THAN_REFERENCE))
def test_refused_headers_are_refused_by_the_reference_reader_too(case):
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do
        safetensors.deserialize(HOSTILE[case][0])


@pytest.mark.parametrize("case", sorted(STRICTER_THAN_REFERENCE))
def test_where_lorafid_is_stricter_than_the_reference_reader(case):
    assert safetensors.deserialize(HOSTILE[case][0])


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000,
        b"[" * 50_000 + b"]" * 50_000,
        b'{"' * 50_000,
        b'"' + b'\\"' * 50_000,  # escaped quotes: a string regex would rescan from each one
        b'{"a":' * 9 + b"1" + b"}" * 9,
    ],
    ids=["open", "balanced", "open-quote", "escaped-quotes", "objects"],
)
def test_deep_or_pathological_nesting_is_refused_quickly(payload):
    # would raise RecursionError in json.loads, or take minutes with a backtracking regex
    started = time.perf_counter()
    with pytest.raises(SafetensorsHeaderError, match="not valid JSON"):
        sf.parse_header(payload, file="f", header_len=len(payload))
    assert time.perf_counter() - started < 2.0  # milliseconds in practice


def test_nesting_limit_is_exact():
    at_limit = b"[" * sf.MAX_JSON_DEPTH + b"]" * sf.MAX_JSON_DEPTH  # valid JSON, 8 deep: not an object
    message = header_error(build_safetensors_bytes(at_limit))
    assert "JSON list, not an object" in message
    over = b"[" * (sf.MAX_JSON_DEPTH + 1) + b"]" * (sf.MAX_JSON_DEPTH + 1)
    assert "nested deeper than 8" in header_error(build_safetensors_bytes(over))


def test_absurd_shape_without_a_file_size():
    raw = build_safetensors_bytes({"w": entry("F32", [2**40, 2**40], 0, 8)}, bytes(8))
    assert "larger than the file" in header_error(raw, file_size=None)


def test_a_message_gathers_every_problem():
    header = {
        "ok": entry("U8", [1], 0, 1),
        "layer.0.weight": entry("Q4_K", [2], 1, 3),
        "layer.1.weight": entry("F32", [2], 20, 12),
    }
    message = header_error(build_safetensors_bytes(header, bytes(20)))
    assert "(2 problems)" in message
    assert "'layer.0.weight': unknown dtype" in message
    assert "'layer.1.weight': data_offsets [20, 12] are reversed" in message
    assert "re-upload it, or pick another revision" in message
    assert "'ok'" not in message


def test_a_message_shows_the_first_few_problems_only():
    header = {f"t{i}": entry("XX", [1], i, i + 1) for i in range(40)}
    message = header_error(build_safetensors_bytes(header, bytes(40)))
    assert "(40 problems)" in message and "and 35 more" in message
    assert message.count("unknown dtype") == 5


def test_megabyte_names_are_cut_in_messages():
    header = {"n" * 1_000_000: entry("XX", [1], 0, 1)}
    assert len(header_error(build_safetensors_bytes(header, b"x"))) < 500


def test_header_bytes_must_have_the_declared_length():
    with pytest.raises(SafetensorsHeaderError, match="expected 10"):
        sf.parse_header(b"{}", file="f", header_len=10)


# --- property tests -----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(prefix=st.binary(max_size=40), file_size=st.none() | st.integers(min_value=0, max_value=2**70))
def test_any_prefix_gives_a_length_or_a_header_error(prefix, file_size):
    try:
        n = sf.parse_header_length(prefix, file="f", file_size=file_size)
    except SafetensorsHeaderError:
        return
    assert 0 < n <= sf.MAX_HEADER_BYTES


JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
HEADER_LIKE = st.dictionaries(
    st.sampled_from(["w", "b", "__metadata__"]) | st.text(max_size=4),
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from([*sf.DTYPES, "Q4"]) | JSON_SCALARS,
            "shape": st.lists(st.integers(-2, 2**65), max_size=3) | JSON_VALUES,
            "data_offsets": st.lists(st.integers(-3, 2**65), max_size=3) | JSON_VALUES,
        }
    )
    | JSON_VALUES,
    max_size=4,
)


def parse_or_refuse(header_bytes: bytes, file_size: int | None) -> None:
    try:
        header = sf.parse_header(header_bytes, file="f", header_len=len(header_bytes), file_size=file_size)
    except SafetensorsHeaderError:
        return
    spans = sorted((i.start, i.end) for i in header.tensors.values() if i.size_bytes)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    for info in header.tensors.values():
        assert header.data_start <= info.start <= info.end
        assert info.size_bytes * 8 == info.numel * sf.DTYPES[info.dtype].bits
        assert file_size is None or info.end <= file_size


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_bytes=st.binary(max_size=300), file_size=st.none() | st.integers(0, 10_000))
def test_any_bytes_give_a_header_or_a_header_error(header_bytes, file_size):
    parse_or_refuse(header_bytes, file_size)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=HEADER_LIKE | JSON_VALUES, file_size=st.none() | st.integers(0, 10_000), pad=st.integers(0, 9))
def test_any_json_gives_a_header_or_a_header_error(value, file_size, pad):
    parse_or_refuse(json.dumps(value).encode() + b" " * pad, file_size)


@settings(max_examples=300, deadline=None)
@given(
    specs=st.lists(st.tuples(st.text(max_size=6), st.lists(st.integers(0, 3), max_size=2)), max_size=4),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_valid_files_with_flipped_bytes_give_a_header_or_a_header_error(specs, flips):
    header, data = layout([(name, "U8", tuple(shape), b"x" * math.prod(shape)) for name, shape in specs])
    raw = bytearray(build_safetensors_bytes(header, data))
    for position, value in flips:
        raw[position % len(raw)] = value
    try:
        n = sf.parse_header_length(bytes(raw), file="f", file_size=len(raw))
    except SafetensorsHeaderError:
        return
    parse_or_refuse(bytes(raw[8 : 8 + n]), len(raw))


NAMES = st.text(string.ascii_letters + string.digits + '._[]{}"\\ é', min_size=1, max_size=12).filter(
    lambda name: name != "__metadata__"
)
TENSORS = st.dictionaries(
    NAMES,
    st.tuples(st.sampled_from(sorted(sf.DTYPES)), st.lists(st.integers(0, 5), max_size=3)),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(tensors=TENSORS, metadata=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
def test_valid_generated_headers_round_trip(tensors, metadata):
    specs = []
    for i, (name, (dtype, shape)) in enumerate(tensors.items()):
        nbits = math.prod(shape) * sf.DTYPES[dtype].bits
        if nbits % 8:  # sub-byte tensors must fill whole bytes
            dtype, nbits = "U8", math.prod(shape) * 8
        specs.append((name, dtype, tuple(shape), bytes([i % 256]) * (nbits // 8)))
    header, data = layout(specs, metadata=metadata)
    raw = build_safetensors_bytes(header, data)
    parsed = parse(raw)
    assert parsed.metadata == metadata
    assert parsed.header_len == struct.unpack("<Q", raw[:8])[0]
    offsets = {name: (header[name]["data_offsets"][0], name) for name, *_ in specs}
    assert list(parsed.tensors) == sorted(offsets, key=offsets.__getitem__)  # by offset, then name
    for name, dtype, shape, payload in specs:
        info = parsed.tensors[name]
        assert (info.dtype, info.shape, raw[info.start : info.end]) == (dtype, shape, payload)
    reference = dict(safetensors.deserialize(raw))  # the reference reader agrees on every byte
    for name, info in parsed.tensors.items():
        assert bytes(reference[name]["data"]) == raw[info.start : info.end]
        assert (reference[name]["dtype"], tuple(reference[name]["shape"])) == (info.dtype, info.shape)


# --- dtypes -------------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(COMPARABLE))
def test_torch_dtype_of_comparable_codes(code):
    assert sf.torch_dtype(code) is COMPARABLE[code]
    assert sf.DTYPES[code].comparable
    assert sf.DTYPES[code].torch_name == str(COMPARABLE[code]).removeprefix("torch.")


@pytest.mark.parametrize("code", ["I32", "U8", "F8_E4M3", "F4", "BOOL"])
def test_torch_dtype_refuses_quantized_and_integer_codes(code):
    with pytest.raises(UnsupportedDtypeError, match="unquantized original") as info:
        sf.torch_dtype(code, where="model.safetensors: tensor 'q.qweight'")
    assert str(info.value).startswith(f"model.safetensors: tensor 'q.qweight': dtype {code} ")


def test_torch_dtype_of_an_unknown_code():
    with pytest.raises(SafetensorsHeaderError, match="unknown safetensors dtype 'Q4_K'"):
        sf.torch_dtype("Q4_K")


def test_only_the_four_float_types_are_comparable():
    assert {code for code, spec in sf.DTYPES.items() if spec.comparable} == set(COMPARABLE)
    assert len(sf.DTYPES) == 22
    assert all(code == spec.code for code, spec in sf.DTYPES.items())


@pytest.mark.parametrize("code", sorted(code for code, spec in sf.DTYPES.items() if spec.torch_name))
def test_dtype_table_matches_the_reference_writer(code):
    spec = sf.DTYPES[code]
    torch_type = getattr(torch, spec.torch_name or "", None)
    if torch_type is None:
        pytest.skip(f"this torch has no {spec.torch_name}")
    raw = safetensors.torch.save({"x": torch.zeros(3, 8, dtype=torch_type)})
    info = parse(raw).tensors["x"]
    assert (info.dtype, info.size_bytes * 8) == (code, 24 * spec.bits)


def test_f4_table_entry_matches_the_reference_writer():
    packed = torch.zeros(2, 3, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)  # 2 values per byte
    info = parse(safetensors.torch.save({"x": packed})).tensors["x"]
    assert (info.dtype, info.shape, info.size_bytes) == ("F4", (2, 6), 6)
