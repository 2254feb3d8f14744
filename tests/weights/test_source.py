"""Sources against a loopback Hub (the real huggingface_hub client) and local files.

What is pinned here: revisions resolve to one commit SHA used in every URL; bytes arrive
exactly (every response checked, no whole-shard download, the inclusive-range off-by-one);
every misbehaviour of the server ends in identical bytes or a FetchError, never in wrong
numbers; Hub errors become lorafid errors that say what to do; tokens never leave the Hub.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest
import safetensors.torch
import torch
from huggingface_hub import HfApi, hf_hub_download, set_client_factory
from huggingface_hub.utils._http import default_client_factory

import lorafid
from lorafid import retry
from lorafid.errors import (
    FetchError,
    GatedRepoError,
    InvalidSourceError,
    NotSafetensorsError,
    RepoNotFoundError,
    RevisionNotFoundError,
    SafetensorsHeaderError,
)
from lorafid.retry import RetryPolicy
from lorafid.weights.http_ranges import (
    RangeReader,
    RemoteFile,
    chunk_bounds,
    expected_content_range,
    http_range,
)
from lorafid.weights.safetensors_format import HEADER_PROBE_BYTES
from lorafid.weights.source import (
    HubSource,
    LocalSource,
    Source,
    choose_weight_files,
    open_source,
    parse_source_spec,
)
from tests.hub_server import HubServer

# Tests must not sleep for real backoff: same logic, milliseconds instead of seconds.
FAST = RetryPolicy(max_tries=4, base_wait_s=0.01, max_wait_s=0.05, max_retry_after_s=2.0)
TOKEN = "hf_test_secret_token_value"


def tensors(seed: int = 0, rows: int = 37, cols: int = 53) -> dict[str, torch.Tensor]:
    """Odd sizes so that no tensor or file length is a multiple of any chunk size used."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.mlp.up_proj.weight": torch.randn(rows, cols, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(cols, cols, generator=g),
        "model.layers.1.mlp.up_proj.weight": torch.randn(rows, cols, generator=g).to(torch.float16),
        "model.norm.weight": torch.randn(cols, generator=g),
    }


def st(ts: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return safetensors.torch.save(ts, metadata=metadata)


def sharded(ts: dict[str, torch.Tensor], groups: list[list[str]]) -> dict[str, bytes]:
    """A repo with ``model.safetensors.index.json`` and one shard per group of names."""
    n = len(groups)
    files: dict[str, bytes] = {}
    weight_map: dict[str, str] = {}
    for i, names in enumerate(groups, start=1):
        shard = f"model-{i:05d}-of-{n:05d}.safetensors"
        files[shard] = st({k: ts[k] for k in names})
        weight_map.update(dict.fromkeys(names, shard))
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return files


def open_hub(hub: HubServer, spec: str, **kwargs: Any) -> Source:
    kwargs.setdefault("retry", FAST)
    return open_source(spec, endpoint=hub.endpoint, **kwargs)


def read_all(src: Source) -> dict[str, bytes]:
    """Every tensor's raw bytes, by name, read through the source."""
    out: dict[str, bytes] = {}
    for file in src.weight_files():
        for name, info in src.read_header(file).tensors.items():
            buf = bytearray(info.size_bytes)
            src.read_into(info.file, info.start, info.end, memoryview(buf))
            out[name] = bytes(buf)
    return out


def raw(ts: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """What the bytes must be: the tensors' own little-endian storage."""
    return {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in ts.items()}


def cdn_gets(hub: HubServer) -> list[Any]:
    return hub.requests_matching(origin="cdn", method="GET")


# -- pure helpers --------------------------------------------------------------------------


def test_http_range_is_inclusive_exactly_once() -> None:
    # Regression: HTTP ranges are inclusive; [0, 100) is "bytes=0-99", never "0-100".
    assert http_range(0, 100) == "bytes=0-99"
    assert http_range(8, 9) == "bytes=8-8"
    assert expected_content_range(0, 100, 1000) == "bytes 0-99/1000"
    with pytest.raises(ValueError):
        http_range(5, 5)


def test_chunk_bounds_cover_the_range_exactly() -> None:
    assert chunk_bounds(10, 35, 10) == [(10, 20), (20, 30), (30, 35)]
    assert chunk_bounds(0, 10, 10) == [(0, 10)]
    assert chunk_bounds(3, 3, 10) == []


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["model.safetensors", "model-00001-of-00002.safetensors"], ["model.safetensors"]),
        (["b.safetensors", "a.safetensors", "sub/c.safetensors"], ["a.safetensors", "b.safetensors"]),
        (["consolidated.safetensors", "model-1.safetensors"], ["model-1.safetensors"]),
        (["consolidated.safetensors", "config.json"], ["consolidated.safetensors"]),
    ],
)
def test_file_choice_without_index(names: list[str], expected: list[str]) -> None:
    assert choose_weight_files(names, lambda: b"", where="x", pickle_hint="") == expected


@pytest.mark.parametrize(
    "index",
    [b"not json", b'{"weight_map": {"a": "../../etc/passwd.safetensors"}}', b'{"weight_map": {"a": "x.bin"}}', b"{}"],
)
def test_bad_index_is_refused(index: bytes) -> None:
    with pytest.raises(SafetensorsHeaderError, match="index"):
        choose_weight_files(["model.safetensors.index.json"], lambda: index, where="x", pickle_hint="")


# -- spec parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "revision", "repo_id", "expected_rev"),
    [
        ("org/name", None, "org/name", None),
        ("org/name@v2", None, "org/name", "v2"),
        ("Org-1/Name_2.5@refs/pr/3", None, "Org-1/Name_2.5", "refs/pr/3"),
        ("org/name", "a" * 40, "org/name", "a" * 40),
        ("org/name@main", "main", "org/name", "main"),
    ],
)
def test_hub_specs(spec: str, revision: str | None, repo_id: str, expected_rev: str | None) -> None:
    info = parse_source_spec(spec, revision=revision, allow_local=False)
    assert (info.kind, info.repo_id, info.requested_revision, info.resolved_sha) == ("hub", repo_id, expected_rev, None)


@pytest.mark.parametrize(
    "spec",
    [
        "org/na..me",
        "a/b/c",
        "org//name",
        "/org/name/",
        "org/name?x=1",
        "org/name#frag",
        "org/na%2e%2eme",
        "org/name with space",
        "https://huggingface.co/org/name",
        "huggingface.co/org/name",
        "org/-name",
        "o" * 60 + "/" + "n" * 40,
        "noslash",
        "",
        "org/name@",
        "org/name@a..b",
        "org/name@bad\x00rev",
        "org/name@has space",
        "org/name@-rf",
    ],
)
def test_invalid_specs_are_refused(spec: str) -> None:
    with pytest.raises(InvalidSourceError, match=r"org/name|local path|revision|Revision"):
        open_source(spec, allow_local=False, endpoint="http://127.0.0.1:9")


@pytest.mark.parametrize("spec", ["../x", "./x", "/etc", "~/x", "model.safetensors"])
def test_local_paths_refused_when_not_allowed(spec: str) -> None:
    with pytest.raises(InvalidSourceError, match="Hub repos only"):
        open_source(spec, allow_local=False, endpoint="http://127.0.0.1:9")


def test_local_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(InvalidSourceError, match="no such file"):
        open_source(str(tmp_path / "missing.safetensors"))
    with pytest.raises(InvalidSourceError, match="no such file"):
        open_source("../definitely/not/here")


def test_conflicting_revisions_are_refused() -> None:
    with pytest.raises(InvalidSourceError, match="also given"):
        parse_source_spec("org/name@v1", revision="v2")
    with pytest.raises(InvalidSourceError, match="Hub repos only"):
        parse_source_spec("./x", revision="v2")


# -- hub: resolution, listing, auth -------------------------------------------------------


def test_revision_is_pinned_to_one_sha_used_in_every_url(hub: HubServer) -> None:
    old = hub.add_repo("org/m", {"model.safetensors": st(tensors(1))}, revision="v2")
    hub.add_repo("org/m", {"model.safetensors": st(tensors(0))})
    with open_hub(hub, "org/m@v2") as src:
        assert src.info.resolved_sha == old and src.info.requested_revision == "v2"
        # The branch moves mid-audit: reads must stay on the commit resolved at open.
        new = hub.add_repo("org/m", {"model.safetensors": st(tensors(2))}, revision="v2")
        assert new != old
        assert read_all(src) == raw(tensors(1))
    assert [r.path for r in hub.requests_matching(origin="hub", path_contains="/api/")] == [
        "/api/models/org/m/revision/v2"
    ]
    resolves = hub.requests_matching(origin="hub", path_contains="/resolve/")
    assert resolves and all(f"/resolve/{old}/" in r.path for r in resolves)


def test_default_branch_and_hf_endpoint_read_at_call_time(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = hub.add_repo("org/m", {"model.safetensors": st(tensors())})
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    with open_source("org/m", retry=FAST) as src:
        assert src.info.resolved_sha == sha and src.info.requested_revision is None
        assert src.info.kind == "hub" and src.info.spec == "org/m"
        assert read_all(src) == raw(tensors())


def test_pr_revision_with_slashes(hub: HubServer) -> None:
    sha = hub.add_repo("org/m", {"model.safetensors": st(tensors())}, revision="refs/pr/1")
    with open_hub(hub, "org/m@refs/pr/1") as src:
        assert src.info.resolved_sha == sha


def test_index_json_decides_the_files_and_unaligned_shards_read_by_name(hub: HubServer) -> None:
    ts = tensors(3)
    names = list(ts)
    base = sharded(ts, [names[:1], names[1:]])
    base["stray-old-export.safetensors"] = st({"junk": torch.zeros(3)})  # not in the index: ignored
    hub.add_repo("org/base", base)
    hub.add_repo("org/ft", sharded(ts, [names[:3], names[3:]]))  # shard boundaries differ
    with open_hub(hub, "org/base") as b, open_hub(hub, "org/ft") as f:
        assert b.weight_files() == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert read_all(b) == read_all(f) == raw(ts)
    # The index was read once per repo, straight from the resolve URL: no hf cache writes.
    assert len(hub.requests_matching(method="GET", path_contains="model.safetensors.index.json")) == 2


def test_index_naming_a_missing_shard(hub: HubServer) -> None:
    files = sharded(tensors(), [list(tensors())])
    del files["model-00001-of-00001.safetensors"]
    hub.add_repo("org/m", files)
    with pytest.raises(NotSafetensorsError, match="stale"):
        open_hub(hub, "org/m")


def test_cdn_redirect_keeps_the_token_on_the_hub(hub: HubServer) -> None:
    hub.add_repo("org/m", {"model.safetensors": st(tensors())})
    with open_hub(hub, "org/m", token=TOKEN) as src:
        assert read_all(src) == raw(tensors())
    heads = hub.requests_matching(origin="hub", method="HEAD")
    assert heads and all(r.has_authorization for r in heads)
    assert cdn_gets(hub) and not any(r.has_authorization for r in cdn_gets(hub))
    # One resolve per file, however many reads: the CDN location is cached.
    assert len(heads) == 1
    for r in hub.requests:
        assert TOKEN not in r.path + r.query
    assert all(r.headers.get("accept-encoding") == "identity" for r in cdn_gets(hub))


def test_parallel_chunked_reads_are_byte_exact_and_never_whole_files(hub: HubServer) -> None:
    big = {"w": torch.randn(257, 389), "b": torch.randn(1001).to(torch.bfloat16)}
    data = st(big)
    hub.add_repo("org/m", {"model.safetensors": data})
    chunk = 4093  # prime: no tensor or header size is a multiple of it
    with open_hub(hub, "org/m", chunk_bytes=chunk, max_workers=4) as src:
        header = src.read_header("model.safetensors")
        hub.clear_requests()
        w = header.tensors["w"]
        buf = bytearray(w.size_bytes)
        src.read_into("model.safetensors", w.start, w.end, memoryview(buf))
        assert bytes(buf) == data[w.start : w.end] == raw(big)["w"]
        assert src.bytes_read >= w.size_bytes
    gets = cdn_gets(hub)
    assert len(gets) == math.ceil(w.size_bytes / chunk)
    asked = sorted(tuple(int(x) for x in r.range.removeprefix("bytes=").split("-")) for r in gets)
    # Chunks tile [start, end) exactly: inclusive ends, no gap, no overlap.
    assert asked[0][0] == w.start and asked[-1][1] == w.end - 1
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(asked))
    assert all(r.status == 206 and r.bytes_sent <= chunk for r in gets)


def test_no_request_ever_asks_for_a_whole_shard(hub: HubServer) -> None:
    files = sharded(tensors(), [list(tensors())[:2], list(tensors())[2:]])
    hub.add_repo("org/m", files)
    with open_hub(hub, "org/m", chunk_bytes=1000) as src:
        read_all(src)
    for r in cdn_gets(hub):
        assert r.range is not None and r.status == 206
        start, last = (int(x) for x in r.range.removeprefix("bytes=").split("-"))
        assert last - start + 1 <= 1000
    assert max(r.bytes_sent for r in cdn_gets(hub)) <= 1000


def test_last_byte_and_one_byte_reads(hub: HubServer) -> None:
    data = st(tensors())
    hub.add_repo("org/m", {"model.safetensors": data})
    with open_hub(hub, "org/m") as src:
        src.read_header("model.safetensors")
        hub.clear_requests()
        one = bytearray(1)
        src.read_into("model.safetensors", len(data) - 1, len(data), memoryview(one))
        assert bytes(one) == data[-1:]
        src.read_into("model.safetensors", 5, 5, memoryview(one))  # empty range: no request
    assert [r.range for r in cdn_gets(hub)] == [f"bytes={len(data) - 1}-{len(data) - 1}"]


def test_header_longer_than_the_probe_takes_a_second_read(hub: HubServer) -> None:
    ts = tensors()
    data = st(ts, metadata={"notes": "x" * (HEADER_PROBE_BYTES + 5000)})
    hub.add_repo("org/m", {"model.safetensors": data})
    with open_hub(hub, "org/m") as src:
        header = src.read_header("model.safetensors")
        assert header.header_len > HEADER_PROBE_BYTES and set(header.tensors) == set(ts)
        assert read_all(src) == raw(ts)
    first_two = [r.range for r in cdn_gets(hub)[:2]]
    assert first_two[0] == f"bytes=0-{HEADER_PROBE_BYTES - 1}"
    assert first_two[1] == f"bytes={HEADER_PROBE_BYTES}-{8 + header.header_len - 1}"


def test_concurrent_reads_from_many_threads(hub: HubServer) -> None:
    ts = tensors()
    hub.add_repo("org/m", {"model.safetensors": st(ts)})
    with open_hub(hub, "org/m", chunk_bytes=997, max_workers=3) as src:
        header = src.read_header("model.safetensors")
        results: dict[str, bytes] = {}
        errors: list[BaseException] = []

        def read(name: str) -> None:
            info = header.tensors[name]
            buf = torch.empty(info.size_bytes, dtype=torch.uint8)
            view = memoryview(buf.numpy())  # type: ignore[arg-type]  # an ndarray is a buffer
            try:
                src.read_into(info.file, info.start, info.end, view)
                results[name] = buf.numpy().tobytes()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=read, args=(n,)) for n in ts for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert not errors and results == raw(ts)


def test_reading_a_file_that_is_not_a_weight_file(hub: HubServer) -> None:
    hub.add_repo("org/m", {"model.safetensors": st(tensors()), "config.json": b"{}"})
    with open_hub(hub, "org/m") as src, pytest.raises(FetchError, match="not a weight file"):
        src.read_into("config.json", 0, 2, memoryview(bytearray(2)))


def test_offsets_past_the_end_are_refused_before_any_request(hub: HubServer) -> None:
    data = st(tensors())
    hub.add_repo("org/m", {"model.safetensors": data})
    with open_hub(hub, "org/m") as src, pytest.raises(FetchError, match="outside the file"):
        src.read_into("model.safetensors", len(data) - 4, len(data) + 4, memoryview(bytearray(8)))
    assert not cdn_gets(hub)


def test_corrupt_header_names_the_repo(hub: HubServer) -> None:
    hub.add_repo("org/m", {"model.safetensors": (10**9).to_bytes(8, "little") + b"{}"})
    with open_hub(hub, "org/m") as src, pytest.raises(SafetensorsHeaderError, match="org/m"):
        src.read_header("model.safetensors")


def test_gated_repo_without_token_says_what_to_do(hub: HubServer) -> None:
    hub.add_repo("org/gated", {"model.safetensors": st(tensors())}, gated=True)
    with pytest.raises(GatedRepoError) as err:
        open_hub(hub, "org/gated")
    message = str(err.value)
    assert f"{hub.endpoint}/org/gated" in message and "licence" in message
    assert "--token" in message and "HF_TOKEN" in message


def test_gated_repo_with_token_or_hf_token(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo("org/gated", {"model.safetensors": st(tensors())}, gated=True)
    with open_hub(hub, "org/gated", token=TOKEN) as src:
        assert read_all(src) == raw(tensors())
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # token=None: huggingface_hub's own lookup
    with open_hub(hub, "org/gated") as src:
        assert read_all(src) == raw(tensors())
    assert not any(r.has_authorization for r in cdn_gets(hub))


def test_rejected_token_never_appears_in_the_message(hub: HubServer) -> None:
    hub.valid_tokens = {"hf_the_only_good_one"}
    hub.add_repo("org/m", {"model.safetensors": st(tensors())})
    with pytest.raises(RepoNotFoundError, match="rejected the token") as err:
        open_hub(hub, "org/m", token=TOKEN)
    assert TOKEN not in str(err.value)


def test_missing_and_private_repos(hub: HubServer) -> None:
    with pytest.raises(RepoNotFoundError, match="Check the spelling"):
        open_hub(hub, "org/nope")
    hub.add_repo("org/private", {"model.safetensors": st(tensors())}, private=True)
    with pytest.raises(RepoNotFoundError, match="token"):
        open_hub(hub, "org/private")
    with open_hub(hub, "org/private", token=TOKEN) as src:
        assert src.weight_files() == ["model.safetensors"]


def test_metadata_is_asked_again_after_an_answer_worth_another_try(hub: HubServer) -> None:
    """A 503 or a 429 on the repo's metadata failed the audit before it started; now it is
    asked again, as range reads are. A missing repo is not: one request, at once."""
    hub.add_repo("org/m", {"model.safetensors": st(tensors(1))})
    hub.clear_requests()
    with hub.inject(api_status_sequence=[503, 429]), open_hub(hub, "org/m") as src:
        assert read_all(src) == raw(tensors(1))
    assert len(hub.requests_matching(origin="hub", path_contains="/api/models/org/m")) == 3
    hub.clear_requests()
    with pytest.raises(RepoNotFoundError):
        open_hub(hub, "org/nope")
    assert len(hub.requests_matching(origin="hub", path_contains="/api/")) == 1
    # Spent tries: the last answer, in the words of any Hub error.
    with hub.inject(api_status_sequence=[503, 503, 503]), pytest.raises(FetchError, match="HTTP 503"):
        open_hub(hub, "org/m", retry=RetryPolicy(max_tries=2, base_wait_s=0.001))


def test_missing_revision(hub: HubServer) -> None:
    hub.add_repo("org/m", {"model.safetensors": st(tensors())})
    with pytest.raises(RevisionNotFoundError, match="'v9'"):
        open_hub(hub, "org/m@v9")


def test_pickle_only_repo_is_refused_without_touching_the_pickle(hub: HubServer) -> None:
    hub.add_repo("org/old", {"pytorch_model.bin": b"\x80\x04 not really a pickle", "config.json": b"{}"})
    with pytest.raises(NotSafetensorsError) as err:
        open_hub(hub, "org/old")
    message = str(err.value)
    assert "pytorch_model.bin" in message and "never unpickles" in message and "org/old@refs/pr/N" in message
    assert not hub.requests_matching(path_contains="pytorch_model.bin")


def test_repo_without_weights(hub: HubServer) -> None:
    hub.add_repo("org/empty", {"README.md": b"hi"})
    with pytest.raises(NotSafetensorsError, match="no weights"):
        open_hub(hub, "org/empty")


def test_unreachable_endpoint() -> None:
    with pytest.raises(FetchError, match="HF_ENDPOINT"):
        open_source("org/m", endpoint="http://127.0.0.1:9", retry=FAST)


def test_hub_server_speaks_the_hub_api_to_the_real_client(hub: HubServer, tmp_path: Path) -> None:
    # Other tests (and modules) may use more of huggingface_hub than model_info and HEAD.
    data = st(tensors())
    sha = hub.add_repo("org/m", {"model.safetensors": data, "config.json": b"{}", "sub/extra.txt": b"x"})
    api = HfApi(endpoint=hub.endpoint)
    assert sorted(e.path for e in api.list_repo_tree("org/m")) == ["config.json", "model.safetensors", "sub"]
    assert len(list(api.list_repo_tree("org/m", recursive=True))) == 3
    [info] = api.get_paths_info("org/m", ["model.safetensors"], revision=sha)
    assert info.size == len(data)
    assert api.file_exists("org/m", "config.json") and not api.file_exists("org/m", "nope.json")
    path = hf_hub_download("org/m", "model.safetensors", endpoint=hub.endpoint, cache_dir=tmp_path)
    assert Path(path).read_bytes() == data


# -- hub: faults ---------------------------------------------------------------------------

RECOVERABLE = [
    {"status_sequence": [503, 502, 500]},
    {"rate_limit": 2, "retry_after": "0"},
    {"drop_connection_after_bytes": 100, "times": 2},
    {"drop_connection_after_bytes": 0, "times": 1},
    {"truncate_body": True, "times": 2},
    {"slow_bytes_per_s": 2_000_000},
]
FATAL = [
    ({"ignore_range": True}, "ignored the Range header"),
    ({"wrong_content_range": True}, "Content-Range"),
    ({"status_sequence": [503] * 10}, "after 4 tries"),
    ({"status_sequence": [404]}, "HTTP 404"),
    ({"rate_limit": 10}, "after 4 tries"),
    ({"drop_connection_after_bytes": 10}, "after 4 tries"),
    ({"truncate_body": True}, "after 4 tries"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("faults", RECOVERABLE, ids=lambda f: ",".join(f))
def test_faults_that_recover_give_identical_bytes(hub: HubServer, faults: dict[str, Any]) -> None:
    ts = tensors(5)
    hub.add_repo("org/m", {"model.safetensors": st(ts)})
    with open_hub(hub, "org/m", chunk_bytes=2048, max_workers=2) as src:
        header = src.read_header("model.safetensors")
        with hub.inject(**faults):
            got = {}
            for name, info in header.tensors.items():
                buf = bytearray(info.size_bytes)
                src.read_into(info.file, info.start, info.end, memoryview(buf))
                got[name] = bytes(buf)
    assert got == raw(ts)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("faults", "match"), FATAL, ids=lambda f: ",".join(f) if isinstance(f, dict) else "")
def test_faults_that_persist_raise_fetch_error(hub: HubServer, faults: dict[str, Any], match: str) -> None:
    hub.add_repo("org/m", {"model.safetensors": st(tensors())})
    with open_hub(hub, "org/m") as src:
        with hub.inject(**faults), pytest.raises(FetchError, match=match) as err:
            src.read_header("model.safetensors")
        assert "org/m" in str(err.value) and "model.safetensors" in str(err.value)


@pytest.mark.timeout(30)
def test_ignored_range_is_not_retried(hub: HubServer) -> None:
    hub.add_repo("org/m", {"model.safetensors": st(tensors())})
    with open_hub(hub, "org/m") as src, hub.inject(ignore_range=True), pytest.raises(FetchError):
        src.read_header("model.safetensors")
    assert len(cdn_gets(hub)) == 1


@pytest.mark.timeout(30)
def test_retry_after_is_honoured(hub: HubServer) -> None:
    hub.add_repo("org/m", {"model.safetensors": st(tensors())})
    with open_hub(hub, "org/m") as src, hub.inject(rate_limit=1, retry_after="1"):
        t0 = time.monotonic()
        src.read_header("model.safetensors")
        assert time.monotonic() - t0 >= 0.9


@pytest.mark.timeout(30)
def test_expired_cdn_url_is_resolved_again(hub: HubServer) -> None:
    ts = tensors()
    hub.add_repo("org/m", {"model.safetensors": st(ts)})
    with open_hub(hub, "org/m") as src:
        src.read_header("model.safetensors")
        hub.expire_cdn_urls()
        assert read_all(src) == raw(ts)
    assert [r.status for r in cdn_gets(hub)].count(403) == 1
    assert len(hub.requests_matching(origin="hub", method="HEAD")) == 2


@pytest.mark.timeout(30)
def test_cdn_that_always_refuses_gives_up(hub: HubServer) -> None:
    hub.add_repo("org/m", {"model.safetensors": st(tensors())})
    hub.cdn_url_ttl_s = -60  # every URL is signed already expired
    with open_hub(hub, "org/m") as src, pytest.raises(FetchError, match="403"):
        src.read_header("model.safetensors")
    assert len(hub.requests_matching(origin="hub", method="HEAD")) == 3  # open + 2 re-resolves


# -- local ---------------------------------------------------------------------------------


def test_local_file(tmp_path: Path) -> None:
    ts = tensors()
    path = tmp_path / "one.safetensors"
    path.write_bytes(st(ts))
    with open_source(str(path)) as src:
        assert isinstance(src, LocalSource) and src.info.kind == "local" and src.info.path == str(path)
        assert src.weight_files() == ["one.safetensors"]
        assert read_all(src) == raw(ts)
        assert src.bytes_read > 0 and src.requests_made > 0


def test_local_directory_with_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ts = tensors()
    for name, content in sharded(ts, [list(ts)[:1], list(ts)[1:]]).items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "consolidated.safetensors").write_bytes(st({"x": torch.zeros(1)}))
    monkeypatch.chdir(tmp_path.parent)
    with open_source(f"./{tmp_path.name}") as src:
        assert src.info.path == str(tmp_path)
        assert src.weight_files() == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert read_all(src) == raw(ts)
        with pytest.raises(FetchError, match="not a weight file"):
            src.read_into("consolidated.safetensors", 0, 1, memoryview(bytearray(1)))


def test_local_truncated_file(tmp_path: Path) -> None:
    data = st(tensors())
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with open_source(str(tmp_path)) as src:
        with pytest.raises(SafetensorsHeaderError):  # offsets checked against the file size
            src.read_header("model.safetensors")
        with pytest.raises(FetchError, match="shorter"):
            src.read_into("model.safetensors", len(data) - 20, len(data), memoryview(bytearray(20)))


def test_local_pickle_only_directory(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(NotSafetensorsError, match=r"pytorch_model\.bin"):
        open_source(str(tmp_path))
    with pytest.raises(NotSafetensorsError, match="safetensors"):
        open_source(str(tmp_path / "pytorch_model.bin"))


def test_hub_and_local_agree(hub: HubServer, tmp_path: Path) -> None:
    ts = tensors(7)
    data = st(ts)
    hub.add_repo("org/m", {"model.safetensors": data})
    (tmp_path / "model.safetensors").write_bytes(data)
    with open_hub(hub, "org/m", chunk_bytes=333) as remote, open_source(str(tmp_path)) as local:
        assert isinstance(remote, HubSource)
        assert remote.read_header("model.safetensors").tensors == local.read_header("model.safetensors").tensors
        assert read_all(remote) == read_all(local)


# -- one configured client, named, with logged retries ----------------------------------------


def test_every_request_names_lorafid_and_its_version(hub: HubServer) -> None:
    hub.add_repo("org/m", {"model.safetensors": st(tensors())})
    with open_hub(hub, "org/m") as src:
        read_all(src)
    origins = {r.origin for r in hub.requests}
    assert {"hub", "cdn"} <= origins  # API, resolve and byte requests all seen
    for request in hub.requests:
        assert f"lorafid/{lorafid.__version__}" in request.headers.get("user-agent", ""), request


def test_byte_reads_go_through_huggingface_hubs_configured_client(hub: HubServer) -> None:
    """What users configure (proxies, CA bundles, transports) through huggingface_hub applies to range reads."""
    hub.add_repo("org/m", {"model.safetensors": st(tensors())})
    set_client_factory(lambda: httpx2.Client(headers={"X-Configured-Client": "yes"}, follow_redirects=True))
    try:
        with open_hub(hub, "org/m") as src:
            read_all(src)
    finally:
        set_client_factory(default_client_factory)
    assert cdn_gets(hub) and all(r.headers.get("x-configured-client") == "yes" for r in cdn_gets(hub))


def test_retries_are_logged_not_silent(hub: HubServer, caplog: pytest.LogCaptureFixture) -> None:
    hub.add_repo("org/m", {"model.safetensors": st(tensors())})
    with (
        open_hub(hub, "org/m") as src,
        hub.inject(status_sequence=[503]),
        caplog.at_level(logging.INFO, logger="lorafid"),
    ):
        src.read_header("model.safetensors")
    retries = [r.getMessage() for r in caplog.records if r.name == "lorafid.retry"]
    assert len(retries) == 1
    assert "HTTP 503; retrying in" in retries[0] and "org/m" in retries[0] and "(try 2 of 4)" in retries[0]
    assert TOKEN not in retries[0]


# -- each response check, proven by a server that breaks exactly that rule --------------------

PAYLOAD = bytes(range(256)) * 4


def streamed(status: int, headers: dict[str, str], body: bytes = b"") -> httpx2.Response:
    """A response whose body arrives as a stream, as from a socket (``iter_raw`` reads it)."""
    return httpx2.Response(
        status, headers={**headers, "Content-Length": str(len(body))}, stream=httpx2.ByteStream(body)
    )


def scripted_reader(*responses: httpx2.Response, retry: RetryPolicy = FAST) -> tuple[RangeReader, list[str]]:
    """A reader whose server answers with ``responses`` in order (then the correct 206), by range."""
    queue = list(responses)
    seen: list[str] = []

    def handle(request: httpx2.Request) -> httpx2.Response:
        seen.append(request.headers["Range"])
        if queue:
            return queue.pop(0)
        start, end = (int(x) for x in request.headers["Range"].removeprefix("bytes=").split("-"))
        body = PAYLOAD[start : end + 1]
        return streamed(206, {"Content-Range": f"bytes {start}-{end}/{len(PAYLOAD)}"}, body)

    reader = RangeReader(
        lambda file: RemoteFile("http://cdn.invalid/f", len(PAYLOAD), {}),
        lambda file: f"repo org/m, file {file}",
        retry=retry,
        client=httpx2.Client(transport=httpx2.MockTransport(handle)),
    )
    return reader, seen


def read_range(reader: RangeReader, start: int, end: int) -> bytes:
    buf = bytearray(end - start)
    reader.read_into("f", start, end, memoryview(buf))
    return bytes(buf)


def test_scripted_server_serves_correct_bytes() -> None:
    reader, _ = scripted_reader()
    assert read_range(reader, 10, 300) == PAYLOAD[10:300]


def test_a_compressed_body_is_refused() -> None:
    """Same length, right Content-Range, but Content-Encoding: gzip: the bytes are not the file's."""
    lying = streamed(206, {"Content-Range": "bytes 0-99/1024", "Content-Encoding": "gzip"}, PAYLOAD[:100])
    reader, _ = scripted_reader(lying)
    with pytest.raises(FetchError, match=r"compressed the body \(gzip\)"):
        read_range(reader, 0, 100)


def test_a_body_longer_than_the_range_is_refused() -> None:
    too_long = streamed(206, {"Content-Range": "bytes 0-99/1024"}, PAYLOAD[:110])
    reader, _ = scripted_reader(too_long)
    with pytest.raises(FetchError, match="more bytes than the range holds"):
        read_range(reader, 0, 100)


def test_retry_after_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server asking for an hour is waited on for max_retry_after_s, then read."""
    waits: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", waits.append)
    policy = RetryPolicy(max_tries=3, max_retry_after_s=30.0)
    assert policy.wait_s(1, 3600.0) == 30.0 and policy.wait_s(1, 2.0) == 2.0
    reader, seen = scripted_reader(streamed(429, {"Retry-After": "3600"}), retry=policy)
    assert read_range(reader, 0, 100) == PAYLOAD[:100]
    assert waits == [30.0] and len(seen) == 2
