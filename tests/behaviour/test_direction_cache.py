"""Directions of Δ kept on disk between runs (``behaviour.direction_cache``): a pair decomposed once.

A second forward of the same pair decomposes nothing and gives bit-identical log-probabilities;
an entry serves lower ranks and is replaced for higher ones; a damaged entry is deleted and
decomposed again; the directory stays under its cap; the key changes with any byte, shape or
dtype; the CLI says when an earlier check's directions were used and ``--no-direction-cache``
turns them off.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from lorafid.behaviour.direction_cache import CachedDirections, DirectionCache, cap_gigabytes
from lorafid.behaviour.forward import ForwardConfig, LayerStream
from lorafid.behaviour.variants import BASE, FINETUNE, served
from lorafid.cli.commands import main
from lorafid.errors import LorafidError
from tests.llama_models import model_family, write_model

TEXTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 20, 21, 22], [30]]
VARIANTS = [FINETUNE, BASE, served(3), served(16, keep_extras=True)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    family = model_family("llama", 2)
    root = tmp_path_factory.mktemp("cached-pair")
    return write_model(family.base, root / "base"), write_model(family.full, root / "full")


def run(pair: tuple[Path, Path], cache: DirectionCache | None, variants: list[Any] = VARIANTS) -> tuple[Any, Any]:
    """Log-probabilities of every text and variant, and the forward's stats."""
    with LayerStream(str(pair[0]), str(pair[1]), ForwardConfig(device="cpu", direction_cache=cache)) as stream:
        out = dict(stream.logprobs(TEXTS, variants))
        return out, stream.stats


def entries(cache: DirectionCache) -> list[Path]:
    return sorted(cache.directory.glob("*.safetensors"))


def test_a_second_forward_of_a_pair_decomposes_nothing_and_gives_the_same_numbers(
    pair: tuple[Path, Path], tmp_path: Path, decompositions: list[Any]
) -> None:
    uncached, _ = run(pair, None)
    matrices = len(decompositions)
    assert matrices > 0
    cache = DirectionCache(tmp_path / "directions")
    decompositions.clear()
    first, stats = run(pair, cache)
    assert len(decompositions) == matrices and stats.directions_cached == 0
    assert len(entries(cache)) == matrices  # one entry per decomposed matrix
    decompositions.clear()
    second, stats = run(pair, cache)
    assert decompositions == [] and stats.directions_cached == matrices and stats.decompose_s == 0
    for results in (first, second):
        for text, by_variant in uncached.items():
            for name, logprobs in by_variant.items():
                assert torch.equal(results[text][name], logprobs), (text, name)


def test_an_entry_serves_lower_ranks_and_is_replaced_for_higher_ones(
    pair: tuple[Path, Path], tmp_path: Path, decompositions: list[Any]
) -> None:
    cache = DirectionCache(tmp_path / "directions")
    run(pair, cache, [FINETUNE, served(8)])
    assert {call.max_rank for call in decompositions} == {8}
    decompositions.clear()
    _, stats = run(pair, cache, [FINETUNE, served(4)])  # rank 4 is within the 8 kept
    assert decompositions == [] and stats.directions_cached > 0
    reference, _ = run(pair, None, [FINETUNE, served(12)])
    decompositions.clear()
    higher, stats = run(pair, cache, [FINETUNE, served(12)])  # more than kept: decomposed again
    assert {call.max_rank for call in decompositions} == {12} and stats.directions_cached == 0
    for name in ("rank-12",):
        assert all(torch.equal(higher[t][name], reference[t][name]) for t in reference)
    decompositions.clear()
    run(pair, cache, [FINETUNE, served(12)])
    assert decompositions == []  # the entries now hold 12 directions


def test_a_damaged_entry_is_deleted_and_decomposed_again(
    pair: tuple[Path, Path], tmp_path: Path, decompositions: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    cache = DirectionCache(tmp_path / "directions")
    reference, _ = run(pair, cache)
    matrices = len(decompositions)
    garbled, truncated, skewed, *_ = entries(cache)
    garbled.write_bytes(b"not a safetensors file")
    truncated.write_bytes(truncated.read_bytes()[:-40])
    # A well-formed file whose directions are no longer orthonormal (a flipped exponent, say).
    from safetensors.torch import load_file, save_file

    vectors = load_file(str(skewed))["vectors"]
    vectors[0, 0] *= 1024
    save_file({"vectors": vectors}, str(skewed), metadata={"format": "lorafid-directions-1", "side": "right"})
    decompositions.clear()
    with caplog.at_level(logging.WARNING, logger="lorafid.behaviour.direction_cache"):
        again, stats = run(pair, cache)
    assert len(decompositions) == 3 and stats.directions_cached == matrices - 3
    assert sum("is damaged" in r.getMessage() for r in caplog.records) == 3
    assert "not orthonormal" in caplog.text
    assert all(torch.equal(again[t][n], reference[t][n]) for t in reference for n in reference[t])
    assert len(entries(cache)) == matrices  # the three written again


def test_each_forward_counts_its_own_cached_matrices_and_a_cache_too_small_for_the_pair_says_so(
    pair: tuple[Path, Path], tmp_path: Path, decompositions: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    cache = DirectionCache(tmp_path / "directions")
    with LayerStream(str(pair[0]), str(pair[1]), ForwardConfig(device="cpu", direction_cache=cache)) as stream:
        list(stream.logprobs(TEXTS, VARIANTS))
        assert stream.stats.directions_cached == 0
        list(stream.logprobs(TEXTS, VARIANTS))  # nothing kept in the stream: the entries serve it
        assert stream.stats.directions_cached == len(decompositions) > 0
        needed = stream.direction_bytes(16)
    assert "more than the direction cache" not in caplog.text
    small = DirectionCache(tmp_path / "small", cap_bytes=needed // 2)
    with caplog.at_level(logging.WARNING, logger="lorafid.behaviour.direction_cache"):
        run(pair, small)
    assert f"take {needed / 1e9:.1f} GB, more than the direction cache's" in caplog.text
    assert "Set LORAFID_DIRECTION_CACHE_GB=1 or more" in caplog.text
    assert small.size_bytes() <= small.cap_bytes


def test_the_directory_stays_under_its_cap_dropping_the_least_recently_used(tmp_path: Path) -> None:
    entry_bytes = 64 * 8 * 4
    cache = DirectionCache(tmp_path / "directions", cap_bytes=3 * entry_bytes + 3 * 200)  # three, with headers
    vectors = torch.linalg.qr(torch.randn(64, 8))[0]
    keys = [DirectionCache.key(torch.full((64, 64), float(i)), torch.zeros(64, 64)) for i in range(5)]
    for key in keys[:3]:
        cache.store(key, CachedDirections(vectors, "right", "float64"))
    assert cache.load(keys[0], 8, 64, "right") is not None  # read: now the most recently used
    import os
    import time

    for i, key in enumerate(keys[:3]):  # mtimes one second apart, the read one newest
        stamp = time.time() - 10 + (5 if i == 0 else i)
        os.utime(cache.directory / f"{key}.safetensors", (stamp, stamp))
    cache.store(keys[3], CachedDirections(vectors, "right", "float64"))
    assert cache.size_bytes() <= cache.cap_bytes
    assert [cache.load(k, 8, 64, "right") is not None for k in keys[:4]] == [True, False, True, True]
    small = DirectionCache(tmp_path / "small", cap_bytes=entry_bytes // 2)
    small.store(keys[4], CachedDirections(vectors, "right", "float64"))  # larger than the whole cap
    assert small.size_bytes() == 0


def test_an_entry_is_used_only_for_its_side_length_and_rank(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = DirectionCache(tmp_path / "directions")
    key = DirectionCache.key(torch.ones(6, 4), torch.zeros(6, 4))
    cache.store(key, CachedDirections(torch.eye(4)[:, :2], "right", "float32-refined"))
    found = cache.load(key, 2, 4, "right")
    assert found is not None and found.solver == "float32-refined" and torch.equal(found.vectors, torch.eye(4)[:, :2])
    assert cache.load(key, 3, 4, "right") is None  # only 2 kept
    assert cache.load(key, 2, 6, "right") is None and cache.load(key, 2, 4, "left") is None
    evicted = DirectionCache.key(torch.ones(6, 4), torch.full((6, 4), 2.0))
    cache.store(evicted, CachedDirections(torch.eye(4)[:, :2], "right", "float64"))
    path = cache.directory / f"{evicted}.safetensors"
    real_read = DirectionCache._read

    def deleted_first(at: Path) -> CachedDirections:  # another check evicts it between the two steps
        at.unlink()
        return real_read(at)

    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.WARNING):
        patch.setattr(DirectionCache, "_read", staticmethod(deleted_first))
        assert cache.load(evicted, 2, 4, "right") is None and not path.exists()
    assert "damaged" not in caplog.text  # gone, not damaged
    unchanged = DirectionCache.key(torch.ones(6, 4), torch.ones(6, 4))
    cache.store(unchanged, CachedDirections(torch.zeros(4, 0), "right", "float64"))  # Δ = 0: no directions
    found = cache.load(unchanged, 3, 4, "right")
    assert found is not None and found.vectors.shape == (4, 0)  # any rank: Δ_r = 0


def test_the_key_changes_with_any_byte_shape_or_dtype() -> None:
    base = torch.randn(8, 6, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    tuned = base.clone()
    key = DirectionCache.key(base, tuned)
    assert DirectionCache.key(base.clone(), tuned.clone()) == key and len(key) == 64
    nudged = tuned.clone()
    nudged.view(torch.int16)[7, 5] ^= 1  # one bit of the last element
    assert DirectionCache.key(base, nudged) != key
    assert DirectionCache.key(tuned, base.reshape(6, 8)) != key  # same bytes, another shape
    assert DirectionCache.key(base.view(torch.float16), tuned.view(torch.float16)) != key  # same bytes, another dtype
    assert DirectionCache.key(tuned, base) == key  # equal tensors: equal bytes
    assert DirectionCache.key(base, torch.zeros_like(base)) != DirectionCache.key(torch.zeros_like(base), base)


def test_a_cache_that_cannot_be_written_never_stops_a_check(
    pair: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = DirectionCache(blocker / "directions")  # its parent is a file: every write fails
    reference, _ = run(pair, None)
    with caplog.at_level(logging.WARNING, logger="lorafid.behaviour.direction_cache"):
        out, stats = run(pair, cache)
    assert "could not keep an entry" in caplog.text and stats.directions_cached == 0
    assert all(torch.equal(out[t][n], reference[t][n]) for t in reference for n in reference[t])


def test_the_cap_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cap_gigabytes(None) == cap_gigabytes(" ") == 4.0 and cap_gigabytes("0.5") == 0.5
    for bad in ("four", "-1", "inf", "nan"):
        with pytest.raises(LorafidError, match=r"LORAFID_DIRECTION_CACHE_GB=.* is not a size: give the cache's size"):
            cap_gigabytes(bad)
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path))
    monkeypatch.setenv("LORAFID_DIRECTION_CACHE_GB", "0")
    assert DirectionCache.from_environment() is None
    monkeypatch.setenv("LORAFID_DIRECTION_CACHE_GB", "2")
    cache = DirectionCache.from_environment()
    assert cache is not None and cache.directory == tmp_path / "directions" and cache.cap_bytes == 2_000_000_000


def test_behave_says_when_an_earlier_check_of_the_pair_left_its_directions(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the knight drew his sword\n", encoding="utf-8")
    out = tmp_path / "behaviour.json"
    argv = ["behave", str(pair[0]), str(pair[1]), "--ranks", "4,8", "--max-tokens", "6", "--prompts", str(prompts)]
    argv += ["--continuation-tokens", "0", "--device", "cpu", "--threads", "1", "--out", str(out)]

    def behave(*extra: str) -> tuple[dict[str, Any], str]:
        assert main([*argv, *extra]) == 0
        return json.loads(out.read_text()), capsys.readouterr().err

    first, err = behave("--quiet")
    assert first["stats"]["matrices_from_direction_cache"] == 0 and "earlier check" not in err
    assert list((tmp_path / "home" / "directions").glob("*.safetensors"))
    second, err = behave()  # not --quiet: the line is printed
    cached = second["stats"]["matrices_from_direction_cache"]
    assert cached > 0 and second["stats"]["decompose_s"] == 0
    assert f"the directions of {cached} matrices came from an earlier check of this pair" in err
    assert second["variants"] == first["variants"]  # the same numbers
    third, err = behave("--no-direction-cache", "--quiet")
    assert third["stats"]["matrices_from_direction_cache"] == 0 and third["stats"]["decompose_s"] > 0
    assert third["variants"] == first["variants"]
