"""The audit engine end to end: local and Hub sources, references, resume, flags."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load, save

from lorafid.audit import spectrum as sp
from lorafid.audit.engine import Audit, AuditConfig, audit, resolve_device
from lorafid.audit.store import Store
from lorafid.errors import FetchError, LimitExceededError, LorafidError
from lorafid.weights.safetensors_format import SafetensorsHeader
from lorafid.weights.source import LocalSource
from tests.audit.test_spectrum import reference_metrics
from tests.hub_server import HubServer
from tests.models import model_pair, shard_files, write_dir


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "home")


def local_pair(tmp_path: Path, dtype: torch.dtype = torch.bfloat16, **kw: object) -> tuple[str, str, dict, dict]:
    base, finetune = model_pair(dtype=dtype, **kw)  # type: ignore[arg-type]
    base_dir = write_dir(shard_files(base, shards=2), tmp_path / "base")
    finetune_dir = write_dir(shard_files(finetune, shards=3, offset=1), tmp_path / "finetune")
    return str(base_dir), str(finetune_dir), base, finetune


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_local_sharded_audit_matches_float64_reference(tmp_path: Path, store: Store, dtype: torch.dtype) -> None:
    base_dir, finetune_dir, base, finetune = local_pair(tmp_path, dtype)
    report = audit(base_dir, finetune_dir, AuditConfig(rank=4, device="cpu", store=store))
    assert report.status == "complete" and not report.pending
    assert len(report.matrices) == 8  # 2 layers × 4 modules
    for m in report.matrices:
        for rank in (1, 4, 16):
            want = reference_metrics(base[m.name], finetune[m.name], rank)
            got = m.metrics(rank)
            assert got.energy_retained == pytest.approx(want["energy_retained"], abs=1e-5)
            assert got.cosine_distance == pytest.approx(want["cosine_distance"], abs=1e-5)
    vectors = {v.name: v for v in report.vectors}
    norm = "model.layers.0.input_layernorm.weight"
    expected = float(((finetune[norm].double() - base[norm].double()) ** 2).sum())
    assert vectors[norm].energy == pytest.approx(expected)
    assert {s.name: s.reason for s in report.skipped} == {"model.embed_tokens.weight": "embedding"}
    assert report.settings.numerics["method"] == "gram-eigvalsh"
    assert report.settings.device == "cpu"
    assert len(report.finetune.files) == 3 and len(report.base.files) == 2


def test_exactly_low_rank_fine_tune_keeps_everything_at_its_rank(tmp_path: Path, store: Store) -> None:
    base_dir, finetune_dir, _, _ = local_pair(tmp_path, torch.float32, low_rank=4)
    report = audit(base_dir, finetune_dir, AuditConfig(rank=4, device="cpu", store=store))
    for m in report.matrices:
        assert m.metrics(4).energy_retained == pytest.approx(1.0, abs=1e-5)
        assert m.rank_for_energy["0.99"] <= 4


def test_hub_audit_pins_shas_and_reads_only_ranges(hub: HubServer, tmp_path: Path, store: Store) -> None:
    base, finetune = model_pair()
    base_sha = hub.add_repo("org/base", shard_files(base, shards=2))
    finetune_sha = hub.add_repo("org/finetune", shard_files(finetune, shards=3, offset=1), revision="v2")
    config = AuditConfig(rank=4, device="cpu", endpoint=hub.endpoint, store=store)
    report = audit("org/base", "org/finetune@v2", config)
    assert (report.base.resolved_sha, report.finetune.resolved_sha) == (base_sha, finetune_sha)
    assert report.finetune.requested_revision == "v2"
    cdn = [r for r in hub.requests if r.origin == "cdn"]
    assert cdn and all(r.headers.get("range") for r in cdn)  # never a whole-file GET
    weight_resolves = [r for r in hub.requests if "/resolve/" in r.path and r.path.endswith(".safetensors")]
    assert all(base_sha in r.path or finetune_sha in r.path for r in weight_resolves)
    # Same numbers as the local audit of the same bytes.
    local = audit(
        str(write_dir(shard_files(base, 2), tmp_path / "b")),
        str(write_dir(shard_files(finetune, 3, 1), tmp_path / "f")),
        AuditConfig(rank=4, device="cpu", store=store),
    )
    assert [m.metrics(4) for m in report.matrices] == [m.metrics(4) for m in local.matrices]


def test_server_that_ignores_range_gives_an_error_never_numbers(hub: HubServer, store: Store) -> None:
    base, finetune = model_pair()
    hub.add_repo("org/base", shard_files(base, 1))
    hub.add_repo("org/finetune", shard_files(finetune, 1))
    config = AuditConfig(rank=4, device="cpu", endpoint=hub.endpoint, store=store)
    with hub.inject(ignore_range=True), pytest.raises(FetchError, match="Range"):
        audit("org/base", "org/finetune", config)


def test_stopped_audit_keeps_results_and_resumes_with_only_the_missing(tmp_path: Path, store: Store) -> None:
    base_dir, finetune_dir, _, _ = local_pair(tmp_path)
    config = AuditConfig(rank=4, device="cpu", store=store)
    with Audit(base_dir, finetune_dir, config) as job:
        steps = job.run()
        for _ in range(3):
            next(steps)
        steps.close()  # a Stop button / Ctrl-C
        partial = job.report()
    assert partial.status == "partial"
    assert len(partial.matrices) == 3 and len(partial.pending) == 5
    with Audit(base_dir, finetune_dir, config) as job:
        progress = list(job.run())
        resumed = job.report()
    assert sum(p.from_store for p in progress) == 3  # the first three were not recomputed
    assert resumed.status == "complete"
    fresh = audit(base_dir, finetune_dir, AuditConfig(rank=4, device="cpu", store=Store(tmp_path / "other")))
    assert resumed.matrices == fresh.matrices
    assert resumed.to_dict()["summary"] == fresh.to_dict()["summary"]
    # The store gives the same report back, complete, with spectra.
    stored = store.load_report(store.find(base_dir, finetune_dir) or "")
    assert stored is not None and stored.status == "complete" and stored.has_spectra()
    assert stored.matrices == fresh.matrices


def test_fresh_ignores_stored_results(tmp_path: Path, store: Store) -> None:
    base_dir, finetune_dir, _, _ = local_pair(tmp_path)
    audit(base_dir, finetune_dir, AuditConfig(rank=4, device="cpu", store=store))
    with Audit(base_dir, finetune_dir, AuditConfig(rank=4, device="cpu", store=store, fresh=True)) as job:
        assert not any(p.from_store for p in job.run())


def test_non_finite_matrix_is_flagged_and_the_rest_finishes(tmp_path: Path, store: Store) -> None:
    base, finetune = model_pair(dtype=torch.float32)
    finetune["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    base_dir = write_dir(shard_files(base, 1), tmp_path / "b")
    finetune_dir = write_dir(shard_files(finetune, 1), tmp_path / "f")
    report = audit(str(base_dir), str(finetune_dir), AuditConfig(rank=4, device="cpu", store=store))
    assert len(report.matrices) == 7
    flagged = [s for s in report.skipped if s.reason == "non_finite"]
    assert [s.name for s in flagged] == ["model.layers.1.mlp.up_proj.weight"]
    assert report.status == "complete"


def test_model_size_limit(tmp_path: Path, store: Store) -> None:
    base_dir, finetune_dir, _, _ = local_pair(tmp_path)
    with pytest.raises(LimitExceededError, match="above this server's limit"):
        audit(base_dir, finetune_dir, AuditConfig(device="cpu", store=store, max_model_bytes=1000))


def test_local_paths_refused_when_not_allowed(tmp_path: Path, store: Store) -> None:
    base_dir, finetune_dir, _, _ = local_pair(tmp_path)
    with pytest.raises(LorafidError):
        audit(base_dir, finetune_dir, AuditConfig(device="cpu", store=store, allow_local=False))


def test_device_choice() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(LorafidError, match="auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(LorafidError, match="--device cpu"):
            resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(tmp_path: Path, store: Store) -> None:
    base_dir, finetune_dir, _, _ = local_pair(tmp_path)
    cpu = audit(base_dir, finetune_dir, AuditConfig(rank=4, device="cpu", store=store, fresh=True))
    gpu = audit(base_dir, finetune_dir, AuditConfig(rank=4, device="cuda", store=store, fresh=True))
    assert gpu.settings.device.startswith("cuda")
    for a, b in zip(cpu.matrices, gpu.matrices, strict=True):
        for rank in (1, 4, 16):
            assert a.metrics(rank).energy_retained == pytest.approx(b.metrics(rank).energy_retained, abs=1e-5)


def test_spectrum_reference_helper_is_independent() -> None:
    """Guard: the reference used above is the float64 SVD, not lorafid's own code path."""
    base, finetune = torch.zeros(3, 3), torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    assert reference_metrics(base, finetune, 1)["energy_retained"] == pytest.approx(9 / 14)
    assert sp.metrics_at_rank(sp.delta_spectrum(base, finetune), 1).energy_retained == pytest.approx(9 / 14)


def test_compute_hook_gets_cpu_tensors_and_gives_the_same_numbers(tmp_path: Path, store: Store) -> None:
    """The ZeroGPU path: the compute hook runs each pair's kernel, given CPU tensors, once."""
    base_dir, finetune_dir, _, _ = local_pair(tmp_path)
    seen: list[tuple[str, tuple[int, ...]]] = []

    def compute(kernel: Any, base: torch.Tensor, finetune: torch.Tensor) -> sp.DeltaSpectrum:
        seen.append((base.device.type, tuple(base.shape)))
        return kernel(base, finetune)

    hooked = audit(base_dir, finetune_dir, AuditConfig(rank=4, device="cpu", store=store, compute=compute))
    plain = audit(base_dir, finetune_dir, AuditConfig(rank=4, device="cpu", store=Store(tmp_path / "plain")))
    assert len(seen) == len(hooked.matrices) == 8
    assert {device for device, _ in seen} == {"cpu"}
    assert hooked.matrices == plain.matrices


def test_tensor_in_two_shards_is_an_error_naming_both(tmp_path: Path, store: Store) -> None:
    base, finetune = model_pair(dtype=torch.float32)
    base_dir = write_dir(shard_files(base, shards=1), tmp_path / "base")
    files = shard_files(finetune, shards=2)
    del files["model.safetensors.index.json"]  # the file list is then every shard in the folder
    name = "model.layers.0.mlp.down_proj.weight"
    files["model-00002-of-00002.safetensors"] = save(
        {**load(files["model-00002-of-00002.safetensors"]), name: finetune[name]}
    )
    finetune_dir = write_dir(files, tmp_path / "finetune")
    with pytest.raises(LorafidError, match=rf"{name} appears in both model-00001-of-00002.safetensors and model-00002"):
        audit(str(base_dir), str(finetune_dir), AuditConfig(rank=4, device="cpu", store=store))


def test_headers_of_all_shards_of_both_models_are_read_concurrently(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 70B pair has ~60 shards: reading their headers one round trip after another costs seconds."""
    base, finetune = model_pair(dtype=torch.float32)
    base_dir = write_dir(shard_files(base, shards=3), tmp_path / "base")
    finetune_dir = write_dir(shard_files(finetune, shards=3, offset=1), tmp_path / "finetune")
    all_in_flight = threading.Barrier(6, timeout=10)  # broken (an error) unless 3 + 3 reads overlap
    read_header = LocalSource.read_header

    def read_header_when_all_started(
        self: LocalSource, file: str, max_header_bytes: int | None = None
    ) -> SafetensorsHeader:
        all_in_flight.wait()
        return read_header(self, file, max_header_bytes)

    monkeypatch.setattr(LocalSource, "read_header", read_header_when_all_started)
    report = audit(str(base_dir), str(finetune_dir), AuditConfig(rank=4, device="cpu", store=store))
    assert report.status == "complete" and len(report.matrices) == 8
