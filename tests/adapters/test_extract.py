"""``lorafid extract``: the adapter written is what PEFT loads, and merging it gives W_base + Δ_r.

References: a float64 ``torch.linalg.svd`` truncation of each Δ, and the real ``peft`` library
(``PeftModel.from_pretrained`` + ``merge_and_unload``) on a tiny ``transformers`` Llama.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save
from transformers import LlamaConfig, LlamaForCausalLM

from lorafid.adapters.extract import STAGING_DIR, ExtractConfig, Extraction, extract, push_to_hub, vllm_warnings
from lorafid.adapters.peft_adapter import audit_adapter, section_of
from lorafid.audit import spectrum
from lorafid.audit.engine import AuditConfig
from lorafid.audit.report import Report
from lorafid.cli.commands import main
from lorafid.errors import LorafidError
from tests.hub_server import HubServer
from tests.llama_models import ADAPTER_LLAMA as LLAMA
from tests.models import model_pair, shard_files, write_dir


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "lorafid_home"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama base and a full fine-tune of it (float32, decaying spectra, norms and embeddings changed)."""
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA))
    finetune = LlamaForCausalLM(LlamaConfig(**LLAMA))
    finetune.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in finetune.named_parameters():
            decay = torch.arange(1, p.shape[-1] + 1, dtype=torch.float32) ** -0.8
            p += 0.01 * torch.randn(p.shape, generator=g) * decay
    base.save_pretrained(root / "base")
    finetune.save_pretrained(root / "finetune")
    weights = {n: t.clone() for n, t in load_file(str(root / "finetune" / "model.safetensors")).items()}
    return {"base": root / "base", "finetune": root / "finetune", "weights": weights, "base_weights": base.state_dict()}


def _truncation(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_peft_merge_equals_base_plus_exact_truncation(llama: dict, tmp_path: Path) -> None:
    rank = 4
    config = ExtractConfig(rank=rank, dtype="float32", audit=AuditConfig(device="cpu"))
    result = extract(str(llama["base"]), str(llama["finetune"]), tmp_path / "out", config)
    out = result.out
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorafid-report.json",
    ]  # the staging folder is gone
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == rank and written["lora_alpha"] == rank
    assert written["modules_to_save"] is None and written["use_dora"] is False and written["bias"] == "none"
    assert written["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 14 and not any("embed" in k or "norm" in k for k in keys)

    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama["base"]), out).merge_and_unload()
    merged_weights = merged.state_dict()
    report = Report.from_json((out / "lorafid-report.json").read_text())
    section = report.adapter or {}
    for m in report.matrices:
        base_w = llama["base_weights"][m.name].double()
        delta = llama["weights"][m.name].double() - base_w
        want = base_w + _truncation(delta, rank)
        assert (merged_weights[m.name].double() - want).abs().max() < 1e-6, m.name
        # Its residual is what the audit predicted at this rank.
        residual = (merged_weights[m.name].double() - llama["weights"][m.name].double()).square().sum()
        assert float(residual / delta.square().sum()) == pytest.approx(1 - m.energy_retained(rank), abs=1e-6)
        fit = next(a for a in section["matrices"] if a["name"] == m.name)
        assert fit["energy_kept"] == pytest.approx(m.energy_retained(rank), abs=1e-6)
        assert fit["best_delta_rel_error"] == pytest.approx(float(residual / delta.square().sum()) ** 0.5, abs=1e-6)
    # What a LoRA does not carry stays the base's: norms and embeddings.
    name = "model.layers.0.input_layernorm.weight"
    assert torch.equal(merged_weights[name], llama["base_weights"][name])
    assert report.settings.rank == rank and section["kind"] == "extracted"


def test_default_dtype_padding_and_vllm_rank_warning(tmp_path: Path) -> None:
    """bf16 fine-tune: bf16 factors; rank 24 above k_proj's k = 16 (not above the largest k, 32,
    which extract refuses): zero padding, exact anyway."""
    base, finetune = model_pair(layers=1, dtype=torch.bfloat16)
    base_dir = write_dir(shard_files(base, 1), tmp_path / "base")
    finetune_dir = write_dir(shard_files(finetune, 2), tmp_path / "finetune")
    with pytest.warns(UserWarning, match="--max-lora-rank 32"):
        result = extract(str(base_dir), str(finetune_dir), tmp_path / "out", ExtractConfig(rank=24))
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    assert a.dtype == torch.bfloat16 and a.shape == (24, 32) and b.shape == (16, 24)
    assert torch.count_nonzero(a[16:]) == 0 and torch.count_nonzero(b[:, 16:]) == 0
    name = "model.layers.0.self_attn.k_proj.weight"
    delta = finetune[name].double() - base[name].double()
    served = b.double() @ a.double()
    # Full rank: only the bf16 rounding of the factors is lost, and the section measures exactly that.
    lost = float((delta - served).square().sum() / delta.square().sum())
    fit = next(m for m in (result.report.adapter or {})["matrices"] if m["name"] == name)
    assert fit["energy_kept"] == pytest.approx(1 - lost, abs=1e-9)
    assert 0 < lost < 1e-3 and fit["best_energy_kept"] == 1.0


def test_vllm_warnings() -> None:
    assert vllm_warnings(64, ()) == []
    assert "--max-lora-rank 64" in vllm_warnings(48, ())[0]
    assert "vLLM will refuse" in vllm_warnings(1024, ())[0]
    assert "refuses adapters with modules_to_save" in vllm_warnings(8, ("lm_head",))[0]


def test_modules_to_save_are_the_finetunes_tensors(llama: dict, tmp_path: Path) -> None:
    config = ExtractConfig(rank=2, dtype="float32", modules_to_save=("embed_tokens", "lm_head", "norm"))
    with pytest.warns(UserWarning, match="modules_to_save"):
        extract(str(llama["base"]), str(llama["finetune"]), tmp_path / "out", config)
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["modules_to_save"] == ["embed_tokens", "lm_head", "norm"]
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama["base"]), tmp_path / "out")
    weights = merged.merge_and_unload().state_dict()
    # PEFT matches a plain suffix: "norm" is model.norm and every input_/post_attention_layernorm.
    copied = [n for n in weights if "embed" in n or "lm_head" in n or n.endswith("norm.weight")]
    assert len(copied) == 2 + 1 + 2 * 2
    for name in copied:
        assert torch.equal(weights[name], llama["weights"][name]), name
    assert not torch.equal(weights[copied[0]], llama["base_weights"][copied[0]])
    with pytest.raises(LorafidError, match="No tensor of the fine-tune belongs to module"):
        extract(
            str(llama["base"]),
            str(llama["finetune"]),
            tmp_path / "again",
            ExtractConfig(rank=2, modules_to_save=("nothing",)),
        )


def test_interrupted_extraction_resumes_with_the_missing_matrices(
    llama: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ExtractConfig(rank=3, dtype="float32")
    out = tmp_path / "out"
    with Extraction(str(llama["base"]), str(llama["finetune"]), out, config) as job:
        steps = job.run()
        for _ in range(5):
            next(steps)
        steps.close()  # Ctrl-C, a stopped job
    assert len(list((out / STAGING_DIR / "factors").glob("*.safetensors"))) == 5
    calls: list[tuple[int, ...]] = []
    decompose = spectrum.decompose

    def counting(base: torch.Tensor, finetune: torch.Tensor, max_rank: int):  # type: ignore[no-untyped-def]
        calls.append(tuple(base.shape))
        return decompose(base, finetune, max_rank)

    monkeypatch.setattr(spectrum, "decompose", counting)
    extract(str(llama["base"]), str(llama["finetune"]), out, config)
    monkeypatch.setattr(spectrum, "decompose", decompose)
    assert len(calls) == 14 - 5
    fresh = extract(str(llama["base"]), str(llama["finetune"]), tmp_path / "fresh", config)
    resumed = load_file(str(out / "adapter_model.safetensors"))
    again = load_file(str(fresh.out / "adapter_model.safetensors"))
    assert resumed.keys() == again.keys()
    for key in again:
        assert torch.equal(resumed[key], again[key]), key


def test_another_rank_discards_staged_factors(llama: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Extraction(str(llama["base"]), str(llama["finetune"]), out, ExtractConfig(rank=3)) as job:
        steps = job.run()
        next(steps)
        steps.close()
    result = extract(str(llama["base"]), str(llama["finetune"]), out, ExtractConfig(rank=5))
    tensors = load_file(str(result.out / "adapter_model.safetensors"))
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {5}


def test_unchanged_matrices_get_no_factors_and_full_module_names(tmp_path: Path) -> None:
    base, finetune = model_pair(layers=2, dtype=torch.float32)
    for name in list(finetune):
        if "layers.1.self_attn.q_proj" not in name and finetune[name].ndim == 2:
            finetune[name] = base[name].clone()
    base_dir = write_dir(shard_files(base, 1), tmp_path / "base")
    finetune_dir = write_dir(shard_files(finetune, 1), tmp_path / "finetune")
    result = extract(str(base_dir), str(finetune_dir), tmp_path / "out", ExtractConfig(rank=8))
    assert result.matrices == 1
    # Leaf "q_proj" would make PEFT wrap layer 0's q_proj too, whose factors are not there.
    assert result.target_modules == ("model.layers.1.self_attn.q_proj",)
    keys = set(load_file(str(tmp_path / "out" / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.model.layers.1.self_attn.q_proj.lora_{h}.weight" for h in "AB"}


def test_identical_models_have_no_adapter(tmp_path: Path) -> None:
    base, _ = model_pair(layers=1)
    directory = write_dir(shard_files(base, 1), tmp_path / "base")
    with pytest.raises(LorafidError, match="changes no matrix"):
        extract(str(directory), str(directory), tmp_path / "out", ExtractConfig(rank=4))


def test_cli_extract_from_hub_writes_card_and_pinned_config(
    hub: HubServer, llama: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {
        side: {p.name: p.read_bytes() for p in llama[side].iterdir() if p.suffix in (".safetensors", ".json")}
        for side in ("base", "finetune")
    }
    base_sha = hub.add_repo("org/base", files["base"])
    finetune_sha = hub.add_repo("org/finetune", files["finetune"])
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    out = tmp_path / "adapter"
    assert main(["extract", "org/base", "org/finetune", "--rank", "16", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("wrote a rank-16 PEFT LoRA of 14 matrices to")
    assert "no rank-16 adapter could carry more" in printed.out
    assert "warning" not in printed.err  # 16 is a vLLM rank
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == "org/base" and written["revision"] == base_sha
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: org/base\nlibrary_name: peft\n")
    assert base_sha in card and finetune_sha in card and "Rank-16 LoRA extracted from org/finetune" in card
    assert "--max-lora-rank 16" in card
    report = Report.from_json((out / "lorafid-report.json").read_text())
    assert report.finetune.resolved_sha == finetune_sha and report.status == "complete"
    assert f"{report.summary().overall.energy_retained:.0%}"[:-1] in card


def test_push_to_hub_uploads_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The upload itself is huggingface_hub's; checked here: which repo, which files, the token passed."""
    calls: list[tuple[str, dict]] = []

    class RecordingApi:
        def __init__(self, endpoint: str | None = None, token: str | None = None) -> None:
            calls.append(("init", {"endpoint": endpoint, "token": token}))

        def model_info(self, repo_id: str) -> object:  # asked before a private push: the repo is new
            import httpx
            from huggingface_hub.errors import RepositoryNotFoundError

            response = httpx.Response(404, request=httpx.Request("GET", f"http://hub/api/models/{repo_id}"))
            raise RepositoryNotFoundError(f"{repo_id} not found", response=response)

        def create_repo(self, repo_id: str, **kwargs: object) -> None:
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self, **kwargs: object) -> object:
            calls.append(("upload_folder", kwargs))
            return type("Commit", (), {"commit_url": "https://hub/org/adapter/commit/abc"})()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    url = push_to_hub(tmp_path, "org/adapter", token="hf_secret", endpoint="http://hub", private=True)
    assert url == "https://hub/org/adapter/commit/abc"
    assert calls[0] == ("init", {"endpoint": "http://hub", "token": "hf_secret"})
    assert calls[1] == ("create_repo", {"repo_id": "org/adapter", "exist_ok": True, "private": True})
    upload = calls[2][1]
    assert upload["folder_path"] == str(tmp_path) and upload["repo_id"] == "org/adapter"
    assert set(upload["allow_patterns"]) == {  # type: ignore[arg-type]
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorafid-report.json",
        "README.md",
    }


def test_streamed_writer_reads_back_with_the_reference_reader(tmp_path: Path) -> None:
    """A safetensors file written by the streamed writer reads back with the reference reader."""
    base, finetune = model_pair(layers=1, dtype=torch.float16)
    base_dir = write_dir({"model.safetensors": save(base)}, tmp_path / "base")
    finetune_dir = write_dir({"model.safetensors": save(finetune)}, tmp_path / "finetune")
    extract(
        str(base_dir), str(finetune_dir), tmp_path / "out", ExtractConfig(rank=2, modules_to_save=("input_layernorm",))
    )
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        norm = f.get_tensor("base_model.model.model.layers.0.input_layernorm.weight")
        lora_a = f.get_tensor("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight")
    assert torch.equal(norm, finetune["model.layers.0.input_layernorm.weight"])
    assert lora_a.dtype == torch.float16 and lora_a.shape == (2, 32)


def test_bench_extract_agrees_with_the_full_svd(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The benchmark's two methods give the same truncation (no timing is checked)."""
    from bench import extract as bench_extract

    monkeypatch.setattr("sys.argv", ["extract", "--shapes", "96x160,160x96", "--rank", "8"])
    bench_extract.main()
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith(("96x", "160x"))]
    assert [r[0] for r in rows] == ["96x160", "160x96"]
    for row in rows:
        assert float(row[8]) < 1e-4  # the two rank-8 truncations, relative distance
        assert float(row[9]) == pytest.approx(float(row[11]), abs=1e-6)  # energy kept, ours / SVD's


def test_push_to_the_loopback_hub_then_audit_the_published_adapter(
    hub: HubServer, llama: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Extract, push with the real huggingface_hub client, then audit what the Hub serves: it is
    the optimum of its rank (it was extracted as such)."""
    files = {
        side: {p.name: p.read_bytes() for p in llama[side].iterdir() if p.suffix in (".safetensors", ".json")}
        for side in ("base", "finetune")
    }
    hub.add_repo("org/base", files["base"])
    hub.add_repo("org/finetune", files["finetune"])
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # the loopback Hub speaks LFS
    out = tmp_path / "adapter"
    args = ["extract", "org/base", "org/finetune", "--rank", "8", "--out", str(out), "--dtype", "float32"]
    assert main([*args, "--push-to-hub", "user/extracted", "--token", "hf_write_token", "--quiet"]) == 0
    assert "hf_write_token" not in capsys.readouterr().out
    pushed = [r for r in hub.requests if r.method == "POST" and "/commit/" in r.path]
    assert pushed and all(r.has_authorization for r in pushed)
    for file in ("adapter_config.json", "adapter_model.safetensors", "README.md", "lorafid-report.json"):
        assert "hf_write_token" not in (out / file).read_text(errors="replace")
    section = section_of(audit_adapter("org/base", "org/finetune", "user/extracted", AuditConfig(rank=8)))
    assert section is not None and section.kind == "published" and len(section.matrices) == 14
    for m in section.matrices:
        assert m.energy_kept == pytest.approx(m.best_energy_kept, abs=1e-6), m.name


def test_extraction_math_runs_through_the_compute_hook(llama: dict, tmp_path: Path) -> None:
    """The extraction's factors come from one kernel per changed matrix run through the compute
    hook (arguments and results pickled, as a ZeroGPU worker gets them): the same adapter bytes."""
    import pickle

    from lorafid.adapters.extract import extraction_kernel

    calls: list[str] = []

    def across_processes(kernel: Any, *args: Any) -> Any:
        calls.append(kernel.__name__)
        return pickle.loads(pickle.dumps(kernel(*pickle.loads(pickle.dumps(args)))))

    hooked = ExtractConfig(rank=4, dtype="float32", audit=AuditConfig(compute=across_processes))
    local = ExtractConfig(rank=4, dtype="float32", audit=AuditConfig(device="cpu"))
    a = extract(str(llama["base"]), str(llama["finetune"]), tmp_path / "hooked", hooked).out
    b = extract(str(llama["base"]), str(llama["finetune"]), tmp_path / "local", local).out
    assert calls and set(calls) == {extraction_kernel.__name__}
    with (
        safe_open(str(a / "adapter_model.safetensors"), "pt") as x,
        safe_open(str(b / "adapter_model.safetensors"), "pt") as y,
    ):
        assert sorted(x.keys()) == sorted(y.keys())
        for key in x.keys():  # noqa: SIM118 (safe_open has no __iter__)
            assert torch.equal(x.get_tensor(key), y.get_tensor(key)), key
