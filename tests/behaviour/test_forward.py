"""The layer-streamed forward against a plain whole-model ``transformers`` forward.

References are independent of lorafid's math: each variant's weights are built here with a
float64 SVD (``torch.linalg.svd``), loaded into a whole ``AutoModelForCausalLM`` and run
with ``model(input_ids)``. Tolerance: 2e-4 nats on any log-probability (float32 compute,
~100-token vocabulary, 2-4 blocks; the streamed and whole forward of the same weights agree
to 0.0, the rest is the float32 vs float64 construction of Δ_r).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lorafid.audit.pairing import is_embedding
from lorafid.behaviour.forward import ForwardConfig, LayerStream, stream_logprobs
from lorafid.behaviour.variants import BASE, FINETUNE, Variant, served
from lorafid.errors import (
    GatedRepoError,
    LimitExceededError,
    MissingModelFileError,
    UnsupportedArchitectureError,
    VocabularyMismatchError,
)
from tests.llama_models import ARCHITECTURES, build_tokenizer, model_family, publish, with_files, write_model

TOLERANCE = 2e-4
TEXTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 20, 21, 22], [30]]


def reference_weights(
    base: dict[str, torch.Tensor], finetune: dict[str, torch.Tensor], rank: int, keep_extras: bool
) -> dict[str, torch.Tensor]:
    """The served model at ``rank`` by float64 SVD, from the two state dicts."""
    out: dict[str, torch.Tensor] = {}
    for name, b in base.items():
        f = finetune[name]
        if b.ndim == 2 and not is_embedding(name):
            u, s, vh = torch.linalg.svd(f.double() - b.double(), full_matrices=False)
            out[name] = (b.double() + (u[:, :rank] * s[:rank]) @ vh[:rank]).float()
        else:
            out[name] = (f if keep_extras else b).clone()
    return out


def whole_model_logprobs(config_json: bytes, state: dict[str, torch.Tensor], texts: list[list[int]]) -> list[Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    data = json.loads(config_json)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1) for ids in texts]


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    family = model_family("llama", 2)
    root = tmp_path_factory.mktemp("llama")
    return {
        "base": write_model(family.base, root / "base"),
        "full": write_model(family.full, root / "full"),
        "lora": write_model(family.lora, root / "lora"),
    }


def test_streamed_forward_equals_whole_model_for_every_variant(llama_dirs: dict[str, Path]) -> None:
    family = model_family("llama", 2)
    variants = [FINETUNE, BASE, served(3), served(3, keep_extras=True), served(16)]
    streamed = dict(stream_logprobs(str(llama_dirs["base"]), str(llama_dirs["full"]), TEXTS, variants))
    assert sorted(streamed) == [0, 1, 2]
    config = family.full.files["config.json"]
    states = {
        "finetune": family.full.tensors,
        "base": family.base.tensors,
        "rank-3": reference_weights(family.base.tensors, family.full.tensors, 3, False),
        "rank-3+extras": reference_weights(family.base.tensors, family.full.tensors, 3, True),
        "rank-16": reference_weights(family.base.tensors, family.full.tensors, 16, False),
    }
    for name, state in states.items():
        for i, expected in enumerate(whole_model_logprobs(config, state, TEXTS)):
            got = streamed[i][name]
            assert got.dtype == torch.float32 and got.shape == (len(TEXTS[i]), expected.shape[-1])
            assert (got - expected).abs().max().item() < TOLERANCE, (name, i)
    # The variants really differ (the comparison above could not pass by accident).
    assert (streamed[0]["base"] - streamed[0]["finetune"]).abs().max() > 0.1
    assert (streamed[0]["rank-3"] - streamed[0]["rank-3+extras"]).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", [a for a in ARCHITECTURES if a != "llama"])
def test_other_supported_architectures_match_transformers(model_type: str, tmp_path: Path) -> None:
    family = model_family(model_type, 2, tie=model_type == "qwen3")
    base, full = write_model(family.base, tmp_path / "b"), write_model(family.full, tmp_path / "f")
    streamed = dict(stream_logprobs(str(base), str(full), TEXTS[:2], [FINETUNE, served(5, keep_extras=True)]))
    reference = reference_weights(family.base.tensors, family.full.tensors, 5, True)
    for name, state in (("finetune", family.full.tensors), ("rank-5+extras", reference)):
        for i, expected in enumerate(whole_model_logprobs(family.full.files["config.json"], state, TEXTS[:2])):
            assert (streamed[i][name] - expected).abs().max().item() < TOLERANCE, (model_type, name, i)


def test_texts_of_one_length_run_through_a_block_together_with_their_own_results(
    llama_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three 4-token texts and a 2-token one: one block call per length group (not per text), in
    groups of at most ``_GROUP_TOKENS`` positions, and each text's log-probabilities are those
    of the text run alone and of the whole-model reference."""
    from lorafid.behaviour import forward

    assert forward._length_groups([[1] * 3, [1] * 5, [1] * 3, [1] * 3], 6) == [[0, 2], [3], [1]]
    family = model_family("llama", 2)
    texts = [[1, 5, 6, 7], [1, 20, 21, 22], [30, 31], [2, 9, 8, 7]]
    variants = [FINETUNE, served(3)]
    with LayerStream(str(llama_dirs["base"]), str(llama_dirs["full"])) as stream:
        together = dict(stream.logprobs(texts, variants))
        assert stream.stats.block_calls == 2 * 2 * 2  # layers x variants x length groups
    monkeypatch.setattr(forward, "_GROUP_TOKENS", 8)  # two 4-token texts per call at most
    with LayerStream(str(llama_dirs["base"]), str(llama_dirs["full"])) as stream:
        capped = dict(stream.logprobs(texts, variants))
        assert stream.stats.block_calls == 2 * 2 * 3  # the 4-token group split in two
    states = {
        "finetune": family.full.tensors,
        "rank-3": reference_weights(family.base.tensors, family.full.tensors, 3, False),
    }
    for i, ids in enumerate(texts):
        alone = dict(stream_logprobs(str(llama_dirs["base"]), str(llama_dirs["full"]), [ids], variants))[0]
        for name, state in states.items():
            assert torch.allclose(together[i][name], alone[name], rtol=0, atol=1e-6), (name, i)
            assert torch.allclose(capped[i][name], alone[name], rtol=0, atol=1e-6), (name, i)
            expected = whole_model_logprobs(family.full.files["config.json"], state, [ids])[0]
            assert (together[i][name] - expected).abs().max().item() < TOLERANCE, (name, i)


def test_decomposition_time_is_counted_apart_within_compute(llama_dirs: dict[str, Path]) -> None:
    """``ForwardStats.decompose_s``: zero with nothing to decompose, else a part of ``compute_s``."""
    with LayerStream(str(llama_dirs["base"]), str(llama_dirs["full"])) as stream:
        list(stream.logprobs(TEXTS, [FINETUNE, BASE]))
        assert stream.stats.decompose_s == 0.0
        list(stream.logprobs(TEXTS, [FINETUNE, served(3)]))
        assert 0.0 < stream.stats.decompose_s < stream.stats.compute_s


def test_state_dicts_after_a_kept_forward_reuse_its_directions(
    llama_dirs: dict[str, Path], decompositions: list[Any]
) -> None:
    """With ``keep_reads`` the forward keeps each matrix's directions: the pass that builds whole
    models for generation decomposes nothing again, and its weights equal a fresh stream's."""
    variants = [FINETUNE, served(3), served(16, keep_extras=True)]
    with LayerStream(str(llama_dirs["base"]), str(llama_dirs["full"])) as fresh:
        expected = dict(fresh.state_dicts(variants))
    calls = decompositions
    calls.clear()
    with LayerStream(str(llama_dirs["base"]), str(llama_dirs["full"])) as stream:
        stream.keep_reads = True
        list(stream.logprobs(TEXTS, variants))
        assert calls and stream.stats.decompose_s > 0
        calls.clear()
        states = dict(stream.state_dicts(variants))
    assert calls == []  # every direction came from the forward
    assert states.keys() == expected.keys()
    for name, state in states.items():
        assert state.keys() == expected[name].keys()
        for tensor_name, tensor in state.items():
            assert torch.equal(tensor, expected[name][tensor_name]), (name, tensor_name)


def test_each_stage_is_read_while_the_stage_before_runs(
    llama_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the network reading and computing overlap: the next block's tensors are read while this
    block's variants are built and run. A weight hook on block 0 waits (at most 5 s) for a read of
    block 1 to start: with blocks read one after another it never does before block 0 is done. The
    results, the bytes read and the peak held (which counts the block read ahead) are checked too."""
    import threading

    import lorafid.behaviour.forward as forward_module

    block_1_read = threading.Event()
    real_read = forward_module.read_tensor

    def reading(source: Any, info: Any, pin: bool = False) -> torch.Tensor:
        if info.name.startswith("model.layers.1."):
            block_1_read.set()
        return real_read(source, info, pin)

    seen_while_block_0_ran: list[bool] = []

    def waiting(name: str, weight: torch.Tensor) -> torch.Tensor:
        if name.startswith("model.layers.0.") and not seen_while_block_0_ran:
            seen_while_block_0_ran.append(block_1_read.wait(timeout=5))
        return weight

    with LayerStream(str(llama_dirs["base"]), str(llama_dirs["full"])) as stream:
        expected = dict(stream.logprobs(TEXTS, [FINETUNE, served(3)]))
        one_at_a_time = stream.stats
    monkeypatch.setattr(forward_module, "read_tensor", reading)
    hooked = Variant("finetune-hooked", "finetune", weight_hook=waiting)
    with LayerStream(str(llama_dirs["base"]), str(llama_dirs["full"])) as stream:
        got = dict(stream.logprobs(TEXTS, [hooked, served(3)]))
        stats = stream.stats
    assert seen_while_block_0_ran == [True]
    assert stats.bytes_read == one_at_a_time.bytes_read
    for i in expected:
        assert torch.equal(got[i]["finetune-hooked"], expected[i]["finetune"])
        assert torch.equal(got[i]["rank-3"], expected[i]["rank-3"])


def test_a_stream_closed_with_a_read_ahead_in_flight_leaves_no_reader_behind(
    llama_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check stopped while block 1 is being read ahead: closing waits only for the reads already
    running, opens no reader pool again, and leaves no reader thread alive."""
    import threading

    import lorafid.behaviour.forward as forward_module

    reading_block_1, release = threading.Event(), threading.Event()
    real_read = forward_module.read_tensor

    def slow_block_1(source: Any, info: Any, pin: bool = False) -> torch.Tensor:
        if info.name.startswith("model.layers.1."):
            reading_block_1.set()
            release.wait(timeout=10)
        return real_read(source, info, pin)

    monkeypatch.setattr(forward_module, "read_tensor", slow_block_1)
    before = set(threading.enumerate())  # readers of other tests' streams are not this test's
    stream = LayerStream(str(llama_dirs["base"]), str(llama_dirs["full"]))
    events = stream.events(TEXTS, [FINETUNE, served(3)])
    for event in events:  # into block 0: block 1 is being read ahead
        if getattr(event, "stage", "") == "forward":
            break
    assert reading_block_1.wait(timeout=10)
    events.close()
    threading.Timer(0.3, release.set).start()
    stream.close()
    assert stream._readers is None and stream._ahead is None
    readers = [t for t in set(threading.enumerate()) - before if t.name.startswith(("lorafid-forward", "lorafid-read"))]
    for thread in readers:
        thread.join(timeout=5)
    assert [t.name for t in readers if t.is_alive()] == []


def test_weight_hook_sees_every_weight_of_its_variant(llama_dirs: dict[str, Path]) -> None:
    seen: list[str] = []

    def zero_head(name: str, weight: torch.Tensor) -> torch.Tensor:
        seen.append(name)
        return torch.zeros_like(weight) if name == "lm_head.weight" else weight

    hooked = Variant("flat", "finetune", weight_hook=zero_head)
    out = dict(stream_logprobs(str(llama_dirs["base"]), str(llama_dirs["full"]), TEXTS[:1], [FINETUNE, hooked]))
    vocab = out[0]["flat"].shape[-1]
    assert torch.allclose(out[0]["flat"], torch.full_like(out[0]["flat"], -torch.log(torch.tensor(vocab))))
    assert (out[0]["finetune"] - out[0]["flat"]).abs().max() > 0.1  # only the hooked variant changed
    assert set(seen) == set(model_family("llama", 2).full.tensors)


def test_peak_weight_memory_does_not_grow_with_depth(tmp_path: Path) -> None:
    peaks = {}
    for layers in (2, 8):
        family = model_family("llama", layers)
        base, full = (
            write_model(family.base, tmp_path / f"b{layers}"),
            write_model(family.full, tmp_path / f"f{layers}"),
        )
        with LayerStream(str(base), str(full)) as stream:
            for _ in stream.logprobs(TEXTS[:1], [FINETUNE, BASE, served(4)]):
                pass
            peaks[layers] = stream.stats.peak_weight_bytes
            model_bytes = stream.plan().size_bytes
            assert stream.stats.bytes_read == model_bytes  # each model read once, whatever the variants
    assert peaks[2] == peaks[8]
    assert peaks[8] < 0.5 * model_bytes  # far from holding the 8-block pair


def test_hub_sources_and_clear_errors(hub: Any) -> None:
    family = model_family("llama", 2)
    publish(hub, "org/base", family.base)
    publish(hub, "org/tuned", family.full)
    config = ForwardConfig(endpoint=hub.endpoint, allow_local=False)
    out = dict(stream_logprobs("org/base", "org/tuned", TEXTS[:1], [FINETUNE], config))
    assert out[0]["finetune"].shape[0] == len(TEXTS[0])

    publish(hub, "org/gated", family.full, gated=True)
    with pytest.raises(GatedRepoError, match="accept the licence"):
        list(stream_logprobs("org/base", "org/gated", TEXTS[:1], [FINETUNE], config))
    limited = ForwardConfig(endpoint=hub.endpoint, max_model_bytes=1000)
    with pytest.raises(LimitExceededError, match="lorafid behave org/base org/tuned"):
        list(stream_logprobs("org/base", "org/tuned", TEXTS[:1], [FINETUNE], limited))

    publish(hub, "org/noconfig", with_files(family.full, **{"config.json": None}))
    with pytest.raises(MissingModelFileError, match=r"config\.json"):
        list(stream_logprobs("org/base", "org/noconfig", TEXTS[:1], [FINETUNE], config))

    gpt2 = json.dumps({"model_type": "gpt2", "n_layer": 2}).encode()
    publish(hub, "org/gpt2", with_files(family.full, **{"config.json": gpt2}))
    with pytest.raises(UnsupportedArchitectureError, match="llama, mistral, qwen2, qwen3"):
        list(stream_logprobs("org/base", "org/gpt2", TEXTS[:1], [FINETUNE], config))

    other = model_family("llama", 2, seed=1)
    bigger = json.loads(other.base.files["config.json"])
    bigger["vocab_size"] += 1
    grown = {n: t for n, t in other.base.tensors.items()}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        grown[name] = torch.cat([grown[name], torch.zeros(1, grown[name].shape[1])])
    from safetensors.torch import save

    publish(
        hub,
        "org/other-vocab",
        with_files(other.base, **{"config.json": json.dumps(bigger).encode(), "model.safetensors": save(grown)}),
    )
    with pytest.raises(VocabularyMismatchError, match="vocabulary"):
        list(stream_logprobs("org/other-vocab", "org/tuned", TEXTS[:1], [FINETUNE, BASE], config))


def test_bad_inputs_are_refused(llama_dirs: dict[str, Path]) -> None:
    vocab = len(json.loads(build_tokenizer()["tokenizer.json"])["model"]["vocab"])
    specs = (str(llama_dirs["base"]), str(llama_dirs["full"]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        list(stream_logprobs(*specs, [[1, vocab]], [FINETUNE]))
    with pytest.raises(ValueError, match="no tokens"):
        list(stream_logprobs(*specs, [[]], [FINETUNE]))
    with pytest.raises(ValueError, match="unique"):
        list(stream_logprobs(*specs, [[1]], [FINETUNE, Variant("finetune", "base")]))
    with pytest.raises(ValueError, match="rank"):
        Variant("x", "served")


def test_base_with_a_tied_head_serves_its_embedding_as_head(tmp_path: Path) -> None:
    from safetensors.torch import save

    family = model_family("llama", 2)
    tied = {n: t for n, t in family.base.tensors.items() if n != "lm_head.weight"}
    base = write_model(with_files(family.base, **{"model.safetensors": save(tied)}), tmp_path / "tied-base")
    full = write_model(family.full, tmp_path / "full")
    out = dict(stream_logprobs(str(base), str(full), TEXTS[:1], [BASE]))
    state = {**tied, "lm_head.weight": tied["model.embed_tokens.weight"]}
    expected = whole_model_logprobs(family.full.files["config.json"], state, TEXTS[:1])[0]
    assert (out[0]["base"] - expected).abs().max().item() < TOLERANCE


def test_tied_embedding_kept_through_the_blocks_is_counted(tmp_path: Path) -> None:
    family = model_family("qwen3", 2, tie=True)
    base, full = write_model(family.base, tmp_path / "b"), write_model(family.full, tmp_path / "f")
    with LayerStream(str(base), str(full)) as stream:
        for _ in stream.logprobs(TEXTS[:1], [FINETUNE, BASE]):
            pass
        peak = stream.stats.peak_weight_bytes
    embedding = family.full.tensors["model.embed_tokens.weight"].nbytes
    block = sum(t.nbytes for n, t in family.full.tensors.items() if n.startswith("model.layers.0."))
    # During a block: both embeddings (kept for the tied head), the block of both models, one variant's block.
    assert peak >= 2 * embedding + 3 * block


def test_zero_gpu_block_runs_across_a_process_boundary(
    llama_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On ZeroGPU the compute hook runs each block kernel; in a real worker process (arguments
    and results pickled, as ZeroGPU does) the log-probabilities equal the in-process forward's."""
    import multiprocessing
    import sys
    import types
    from concurrent.futures import ProcessPoolExecutor

    from lorafid.behaviour.blocks import block_on_device
    from lorafid.compute import run_kernel, zero_gpu_hook

    assert zero_gpu_hook({}) is None  # off ZeroGPU every block runs in this process
    decorated: list[tuple[str, int]] = []
    calls: list[int] = []
    worker = ProcessPoolExecutor(
        1, multiprocessing.get_context("spawn"), initializer=torch.set_num_threads, initargs=(1,)
    )

    def gpu(duration: int) -> Any:
        def wrap(function: Any) -> Any:
            decorated.append((function.__name__, duration))

            def in_worker(kernel: Any, *args: Any) -> Any:
                assert kernel is block_on_device
                calls.append(args[1])
                return worker.submit(function, kernel, *args).result()  # pickled there and back

            return in_worker

        return wrap

    fake = types.ModuleType("spaces")
    fake.GPU = gpu  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "spaces", fake)
    hook = zero_gpu_hook({"SPACES_ZERO_GPU": "1"})
    assert hook is not None and decorated == [(run_kernel.__name__, 120)]

    specs = (str(llama_dirs["base"]), str(llama_dirs["full"]))
    variants = [FINETUNE, BASE, served(2)]
    with worker:
        remote = dict(stream_logprobs(*specs, TEXTS, variants, ForwardConfig(compute=hook)))
    local = dict(stream_logprobs(*specs, TEXTS, variants))
    assert sorted(calls) == sorted([0, 1] * len(variants))  # 2 blocks × 3 variants, each one call
    for index, by_variant in local.items():
        for name, logprobs in by_variant.items():
            assert torch.equal(remote[index][name], logprobs), (index, name)
    # The returned hidden states are the ones used: a block that hands back its input differs.
    skipped = dict(stream_logprobs(*specs, TEXTS[:1], [FINETUNE], ForwardConfig(compute=identity_block)))
    assert not torch.allclose(skipped[0]["finetune"], local[0]["finetune"], atol=1e-3)


def identity_block(kernel: Any, config: Any, layer: int, weights: Any, hidden: list[torch.Tensor]) -> Any:
    """A hook whose block changes nothing: shows the hook's results replace the in-process ones."""
    return [h.clone() for h in hidden]


def test_ranks_at_or_above_full_rank_are_the_finetune_and_run_once(
    llama_dirs: dict[str, Path], decompositions: list[Any]
) -> None:
    """Full rank 48 (k/v: 24). Rank 24 serves k/v whole and decomposes only the 48-wide matrices;
    ranks ≥ 48 decompose nothing; rank-64+extras IS the fine-tune and rank-100 is rank-48's twin:
    neither runs again, and all match whole-model references."""
    family = model_family("llama", 2)
    variants = [FINETUNE, served(24), served(48), served(64, keep_extras=True), served(100)]
    with LayerStream(str(llama_dirs["base"]), str(llama_dirs["full"])) as stream:
        assert stream.full_rank() == 48
        assert stream.twins(variants) == {"rank-64+extras": "finetune", "rank-100": "rank-48"}
        streamed = dict(stream.logprobs(TEXTS, variants))
        assert stream.stats.variants_run == 3
    asked = [(min(call.shape), call.max_rank) for call in decompositions]
    assert asked and all(rank < k for k, rank in asked)  # k/v (24) served whole, never decomposed
    assert {k for k, _ in asked} == {48}
    states = {
        "rank-24": reference_weights(family.base.tensors, family.full.tensors, 24, False),
        "rank-48": reference_weights(family.base.tensors, family.full.tensors, 48, False),
    }
    for name, state in states.items():
        for i, expected in enumerate(whole_model_logprobs(family.full.files["config.json"], state, TEXTS)):
            assert (streamed[i][name] - expected).abs().max().item() < TOLERANCE, (name, i)
    for i in range(len(TEXTS)):
        assert torch.equal(streamed[i]["rank-64+extras"], streamed[i]["finetune"])
        assert torch.equal(streamed[i]["rank-100"], streamed[i]["rank-48"])
    decompositions.clear()
    with LayerStream(str(llama_dirs["base"]), str(llama_dirs["full"])) as stream:
        list(stream.logprobs(TEXTS[:1], [FINETUNE, served(48)]))
    assert decompositions == []  # every matrix whole: nothing to decompose


def test_hooked_variants_are_never_twins(llama_dirs: dict[str, Path]) -> None:
    def hook(name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight

    with LayerStream(str(llama_dirs["base"]), str(llama_dirs["full"])) as stream:
        hooked = Variant("rank-64@q", "served", rank=64, keep_extras=True, base_hook=hook)
        assert stream.twins([FINETUNE, hooked, Variant("f8", "finetune", weight_hook=hook)]) == {}


def test_each_matrix_is_factored_once_and_each_rank_built_once_for_both_serving_modes(
    llama_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranks 3 and 8 in both serving modes: each decomposed matrix's factors are found once per
    block (not once per variant) and each rank's Δ_r once (both modes share it), with the same
    log-probabilities as one variant at a time. Fails if a variant makes its own factors or product."""
    from lorafid.audit import spectrum as sp

    factored: list[int] = []
    real = sp.Decomposition.factors

    def counted(self: sp.Decomposition, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        factored.append(rank)
        return real(self, rank)

    texts = [[1, 5, 6, 7, 9], [1, 20, 21]]
    variants = [FINETUNE, served(3), served(3, keep_extras=True), served(8), served(8, keep_extras=True)]
    monkeypatch.setattr(sp.Decomposition, "factors", counted)
    with LayerStream(str(llama_dirs["base"]), str(llama_dirs["full"])) as stream:
        together = dict(stream.logprobs(texts, variants))
    assert factored and set(factored) == {8} and len(factored) == 2 * 7  # 2 blocks x 7 matrices, at the top rank
    for variant in variants[1:]:  # each alone: its own factors and product, as before
        with LayerStream(str(llama_dirs["base"]), str(llama_dirs["full"])) as stream:
            alone = dict(stream.logprobs(texts, [FINETUNE, variant]))
        for i in range(len(texts)):
            torch.testing.assert_close(together[i][variant.name], alone[i][variant.name], rtol=1e-5, atol=1e-6)
