"""Published-adapter audit: PEFT adapters, made by the real ``peft`` library in the test, against
the fine-tunes they stand for, on the loopback Hub and from local folders.

References: float64 dense products (X = s·B·A formed explicitly), the seed's 4×4 example, and
PEFT's own ``merge_and_unload``: an adapter merged into its base is, by construction, a
fine-tune that the adapter carries entirely.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load, save
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lorafid.adapters.peft_adapter import (
    AdapterSection,
    adapter_fit,
    audit_adapter,
    factored_is_cheaper,
    parse_config,
    section_of,
)
from lorafid.audit.engine import AuditConfig
from lorafid.audit.report import Report
from lorafid.cli.commands import main
from lorafid.errors import AdapterMismatchError, UnsupportedAdapterError
from tests.hub_server import HubServer
from tests.llama_models import ADAPTER_LLAMA as LLAMA

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "lorafid_home"))


# -- the math against float64 references ---------------------------------------------------


def _reference(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float, transposed: bool) -> dict:
    x = scale * (b.double() @ a.double())
    x = x.T if transposed else x
    d = delta.double()
    energy, adapter_energy = float(d.square().sum()), float(x.square().sum())
    return {
        "energy": energy,
        "adapter_energy": adapter_energy,
        "inner": float((d * x).sum()),
        "residual": float((d - x).square().sum()),
    }


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(("rows", "cols", "rank"), [(300, 200, 4), (40, 24, 20)])
def test_fit_matches_dense_float64_reference(rows: int, cols: int, rank: int, transposed: bool) -> None:
    g = torch.Generator().manual_seed(rows + rank)
    out_f, in_f = (cols, rows) if transposed else (rows, cols)
    b, a = torch.randn(out_f, rank, generator=g), torch.randn(rank, in_f, generator=g)
    near = 0.7 * (b.double() @ a.double())
    delta = ((near.T if transposed else near) + 0.01 * torch.randn(rows, cols, generator=g)).float()
    fit = adapter_fit(delta, b, a, 0.7, transposed=transposed)
    assert fit.method == ("factored" if factored_is_cheaper(out_f, in_f, rank) else "dense")
    want = _reference(delta, b, a, 0.7, transposed)
    for key, value in want.items():
        assert getattr(fit, key) == pytest.approx(value, rel=1e-9, abs=1e-9), key
    assert fit.energy_kept == pytest.approx(1 - want["residual"] / want["energy"], abs=1e-12)


def test_both_methods_agree_on_the_same_inputs() -> None:
    g = torch.Generator().manual_seed(3)
    delta, b, a = torch.randn(64, 48, generator=g), torch.randn(64, 40, generator=g), torch.randn(40, 48, generator=g)
    assert not factored_is_cheaper(64, 48, 40)  # dense here; a 1-row slice of the same is factored
    dense = adapter_fit(delta, b, a, 0.5)
    assert dense.method == "dense"
    parts = [adapter_fit(delta[:, i : i + 1], b, a[:, i : i + 1], 0.5) for i in range(48)]
    assert {p.method for p in parts} == {"dense"}  # column slices stay dense; rank 40 > 1
    tall = adapter_fit(delta, b[:, :2], a[:2], 0.5)
    assert tall.method == "factored"
    assert tall.residual == pytest.approx(_reference(delta, b[:, :2], a[:2], 0.5, False)["residual"], rel=1e-12)
    assert sum(p.residual for p in parts) == pytest.approx(dense.residual, rel=1e-12)


def test_seed_example_rank_one_adapters() -> None:
    delta = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    e1, e2 = torch.eye(4)[:, :1], torch.eye(4)[:, 1:2]
    best = adapter_fit(delta, 4 * e1, e1.T, 1.0)
    assert best.energy_kept == pytest.approx(16 / 30) and best.cosine_distance == pytest.approx(1 - 4 / math.sqrt(30))
    second = adapter_fit(delta, 3 * e2, e2.T, 1.0)
    assert second.energy_kept == pytest.approx(9 / 30)
    worse_than_nothing = adapter_fit(delta, -8 * e1, e1.T, 1.0)  # ‖Δ − X‖² = 144 + 14
    assert worse_than_nothing.energy_kept == pytest.approx(1 - 158 / 30)


def test_factored_is_cheaper_examples() -> None:
    assert factored_is_cheaper(4096, 4096, 16) and factored_is_cheaper(4096, 4096, 55)
    assert not factored_is_cheaper(4096, 4096, 56) and not factored_is_cheaper(4096, 4096, 128)
    assert factored_is_cheaper(14336, 4096, 64)


def test_shape_that_does_not_fit_is_refused() -> None:
    with pytest.raises(AdapterMismatchError, match="cannot make a change of shape"):
        adapter_fit(torch.zeros(8, 6), torch.zeros(6, 2), torch.zeros(2, 8), 1.0)


def test_scale_follows_peft_patterns_and_rslora() -> None:
    s = parse_config({"peft_type": "LORA", "r": 8, "lora_alpha": 16}, "x")
    assert s.scale("model.layers.0.self_attn.q_proj") == 2.0
    rs = parse_config({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": True}, "x")
    assert rs.scale("q_proj") == pytest.approx(16 / math.sqrt(8))
    pat = parse_config(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 2}},
        "x",
    )
    assert pat.rank("model.layers.0.self_attn.q_proj") == 4 and pat.scale("model.layers.0.self_attn.q_proj") == 4.0
    assert pat.scale("model.layers.0.self_attn.v_proj") == 0.25
    assert pat.scale("model.layers.0.self_attn.xq_proj") == 2.0  # a pattern matches whole dotted parts only


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "use_dora": True}, "DoRA"),
        ({"peft_type": "IA3", "target_modules": ["k_proj"]}, "PEFT IA3, not a LoRA"),
        ({"peft_type": "LOHA", "r": 8}, "PEFT LOHA, not a LoRA"),
        ({"peft_type": "LORA", "lora_alpha": 8}, "no usable r"),
    ],
)
def test_unsupported_adapters_are_refused(config: dict, message: str) -> None:
    with pytest.raises(UnsupportedAdapterError, match=message):
        parse_config(config, "org/adapter")


# -- real PEFT adapters ----------------------------------------------------------------------


def _files(model: torch.nn.Module) -> dict[str, bytes]:
    """A model directory's weights as the Hub would serve them (safetensors, contiguous copies)."""
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return {"model.safetensors": save(tensors), "config.json": json.dumps({"model_type": "llama"}).encode()}


def _train_lora(base: torch.nn.Module, config: LoraConfig, vocab: int, seed: int = 0) -> torch.nn.Module:
    """A PEFT model trained for a few steps (B starts at 0, so training is what makes the change)."""
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    tokens = torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(seed))
    for _ in range(4):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def _adapter_files(model: torch.nn.Module, folder: Path) -> dict[str, bytes]:
    model.save_pretrained(folder)
    return {name: (folder / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Base, a rank-8 LoRA trained on it (lora_alpha 16: scale 2), and the merged fine-tune."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA))
    base_files = _files(base)  # copied before PEFT wraps the model
    peft_model = _train_lora(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS), LLAMA["vocab_size"])
    folder = tmp_path_factory.mktemp("adapter")
    adapter_files = _adapter_files(peft_model, folder)
    merged = peft_model.merge_and_unload()
    return {"base": base_files, "adapter": adapter_files, "finetune": _files(merged), "folder": folder}


def test_trained_adapter_on_hub_carries_all_of_its_merged_finetune(hub: HubServer, trained: dict) -> None:
    hub.add_repo("org/base", trained["base"])
    hub.add_repo("org/merged", trained["finetune"])
    adapter_sha = hub.add_repo("org/lora", trained["adapter"])
    report = audit_adapter("org/base", "org/merged", "org/lora", AuditConfig(rank=8, endpoint=hub.endpoint))
    section = section_of(report)
    assert section is not None and section.kind == "published"
    assert section.source["resolved_sha"] == adapter_sha
    assert len(section.matrices) == 2 * len(TARGETS)
    for m in section.matrices:
        assert m.rank == 8 and m.scale == 2.0
        assert m.energy_kept is not None and m.energy_kept > 1 - 1e-9, m.name
        assert m.cosine_distance is not None and m.cosine_distance < 1e-9
        assert m.best_energy_kept > 1 - 1e-6  # Δ is exactly rank 8 (up to float32 rounding of the merge)
    assert section.uncovered == () and section.unchanged_but_adapted == ()
    summary = section.summary()
    assert summary["energy_kept_all"] > 1 - 1e-9 and summary["uncovered_energy_share"] == 0.0
    # Every matrix the adapter does not touch is unchanged in the merged fine-tune.
    assert {m.name for m in report.matrices if m.energy > 0} == {m.name for m in section.matrices}
    again = Report.from_json(report.to_json())
    assert AdapterSection.from_dict(again.adapter or {}) == section


def test_wrong_scale_is_measured_not_hidden(tmp_path: Path, trained: dict) -> None:
    """The same factors with lora_alpha doubled serve 2·Δ: ‖Δ − 2Δ‖ = ‖Δ‖, nothing kept."""
    base, merged, adapter = (tmp_path / n for n in ("base", "merged", "adapter"))
    for folder, files in ((base, trained["base"]), (merged, trained["finetune"]), (adapter, trained["adapter"])):
        folder.mkdir()
        for name, content in files.items():
            (folder / name).write_bytes(content)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = 32
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    section = section_of(audit_adapter(str(base), str(merged), str(adapter), AuditConfig(rank=8)))
    assert section is not None
    for m in section.matrices:
        assert m.energy_kept == pytest.approx(0.0, abs=1e-6) and m.cosine_distance == pytest.approx(0.0, abs=1e-9)
    assert "carries 0% of" in section.sentence()
    assert re.search(r"the best rank-8 adapter would carry (100%|99\.99)", section.sentence())


def _local(tmp_path: Path, *folders: dict[str, bytes]) -> list[str]:
    """Write (base, fine-tune, adapter) files to three local folders; their paths."""
    paths = []
    for name, files in zip(("base", "finetune", "adapter"), folders, strict=True):
        (tmp_path / name).mkdir()
        for file, content in files.items():
            (tmp_path / name / file).write_bytes(content)
        paths.append(str(tmp_path / name))
    return paths


def test_rslora_scale_is_applied(tmp_path: Path) -> None:
    torch.manual_seed(1)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA))
    base_files = _files(base)
    model = _train_lora(base, LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["o_proj"]), 64)
    adapter = _adapter_files(model, tmp_path / "saved")
    paths = _local(tmp_path, base_files, _files(model.merge_and_unload()), adapter)
    section = section_of(audit_adapter(*paths, AuditConfig(rank=4)))
    assert section is not None and len(section.matrices) == 2
    for m in section.matrices:
        assert m.scale == pytest.approx(8 / 2)  # alpha / sqrt(r), not alpha / r = 2
        assert m.energy_kept is not None and m.energy_kept > 1 - 1e-9


def test_fan_in_fan_out_gpt2_conv1d(tmp_path: Path) -> None:
    """GPT-2 stores c_attn as in × out (Conv1D): PEFT's change is (s·B·A)ᵀ."""
    torch.manual_seed(2)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    base_files = _files(base)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    model = _train_lora(base, config, 64)
    adapter = _adapter_files(model, tmp_path / "saved")
    assert json.loads(adapter["adapter_config.json"])["fan_in_fan_out"] is True
    paths = _local(tmp_path, base_files, _files(model.merge_and_unload()), adapter)
    section = section_of(audit_adapter(*paths, AuditConfig(rank=4)))
    assert section is not None and len(section.matrices) == 2
    for m in section.matrices:
        assert m.shape == (32, 96)  # stored in × out
        assert m.energy_kept is not None and m.energy_kept > 1 - 1e-9


def test_uncovered_and_extra_matrices_are_listed(tmp_path: Path, trained: dict) -> None:
    """The fine-tune also changes an o_proj the adapter leaves out; the adapter also changes a
    gate_proj the fine-tune left as it was."""
    merged = load(trained["finetune"]["model.safetensors"])
    extra = "model.layers.1.self_attn.o_proj.weight"
    merged[extra] = merged[extra] + 0.01
    factors = load(trained["adapter"]["adapter_model.safetensors"])
    g = torch.Generator().manual_seed(5)
    factors["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"] = torch.randn(8, 32, generator=g)
    factors["base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"] = torch.randn(48, 8, generator=g)
    adapter = {**trained["adapter"], "adapter_model.safetensors": save(factors)}
    paths = _local(tmp_path, trained["base"], {"model.safetensors": save(merged)}, adapter)
    section = section_of(audit_adapter(*paths, AuditConfig(rank=8)))
    assert section is not None
    assert [n for n, _ in section.uncovered] == [extra]
    assert section.uncovered[0][1] == pytest.approx(0.01**2 * 32 * 32, rel=1e-3)
    assert [n for n, _ in section.unchanged_but_adapted] == ["model.layers.0.mlp.gate_proj.weight"]
    gate = next(m for m in section.matrices if m.name == "model.layers.0.mlp.gate_proj.weight")
    assert gate.energy_kept is None and gate.adapter_energy > 0
    assert section.summary()["uncovered_energy_share"] > 0
    assert "leaves out 1 changed matrices" in section.sentence()
    assert "changes 1 matrices the fine-tune did not" in section.sentence()


def test_adapter_of_another_base_is_refused(tmp_path: Path, trained: dict, capsys: pytest.CaptureFixture[str]) -> None:
    wider = _files(LlamaForCausalLM(LlamaConfig(**{**LLAMA, "hidden_size": 48, "intermediate_size": 64})))
    paths = _local(tmp_path, wider, wider, trained["adapter"])
    with pytest.raises(AdapterMismatchError, match=r"does not fit these models .*made for another base model"):
        audit_adapter(*paths, AuditConfig(rank=8))
    assert main(["audit", paths[0], paths[1], "--adapter", paths[2], "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorafid: error: The adapter") and err.count("\n") == 1


def test_dora_adapter_folder_is_refused(tmp_path: Path, trained: dict) -> None:
    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM(LlamaConfig(**LLAMA)), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    )
    dora = _adapter_files(model, tmp_path / "saved")
    paths = _local(tmp_path, trained["base"], trained["finetune"], dora)
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        audit_adapter(*paths, AuditConfig(rank=4))


def test_cli_audit_with_adapter_writes_the_section(
    hub: HubServer,
    trained: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub.add_repo("org/base", trained["base"])
    hub.add_repo("org/merged", trained["finetune"])
    hub.add_repo("org/lora", trained["adapter"])
    out = tmp_path / "report.json"
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    assert main(["audit", "org/base", "org/merged", "--adapter", "org/lora", "--rank", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "The adapter (rank 8) carries 100" in printed
    assert "of the change of the 6 matrices it touches; no rank-8 adapter could carry more." in printed
    data = json.loads(out.read_text())
    assert data["adapter"]["summary"]["matrices"] == 6 and data["adapter"]["source"]["repo_id"] == "org/lora"


def test_adapter_curve_marks_the_adapter_next_to_the_optimum(tmp_path: Path, trained: dict) -> None:
    from lorafid.web import plots

    config = json.loads(trained["adapter"]["adapter_config.json"])
    config["lora_alpha"] = 32  # the factors served at twice their scale: ‖Δ − 2Δ‖ = ‖Δ‖, all lost
    adapter = {**trained["adapter"], "adapter_config.json": json.dumps(config).encode()}
    report = audit_adapter(*_local(tmp_path, trained["base"], trained["finetune"], adapter), AuditConfig(rank=8))
    figure = plots.adapter_curve(report)
    line, marker = figure.data
    assert line.name == "best adapter of each rank" and marker.name == "this adapter"
    assert list(marker.x) == [8] and marker.y[0] == pytest.approx(1.0, abs=1e-6)
    best = dict(zip(line.x, line.y, strict=True))
    assert best[1] > best[4] > 0.0  # the optimum falls with rank; Δ is rank 8, so it reaches ~0 there
    assert 8 not in best or best[8] < 1e-6
    assert "the best rank-8 adapter would carry" in figure.layout.title.text


def test_dashboard_compares_a_published_adapter(hub: HubServer, trained: dict, tmp_path: Path) -> None:
    from gradio_client import Client

    from lorafid.web.config import AppConfig
    from tests.web.test_app import serve

    hub.add_repo("org/base", trained["base"])
    hub.add_repo("org/merged", trained["finetune"])
    hub.add_repo("org/lora", trained["adapter"])
    config = AppConfig(endpoint=hub.endpoint, store_home=tmp_path / "home", examples_dir=tmp_path / "ex", device="cpu")
    with serve(config) as url:
        client = Client(url, verbose=False)
        summary, plot = client.predict(
            "org/base", "org/merged", "", "", "org/lora", "", 8, "", api_name="/adapter_audit"
        )
        text = summary.replace("\\", "")  # the Markdown escapes of md_text
        assert "The adapter (rank 8) carries 100" in text and "no rank-8 adapter could carry more" in text
        assert "this adapter" in json.dumps(plot)
        with pytest.raises(Exception, match="not a PEFT adapter"):
            client.predict("org/base", "org/merged", "", "", "org/base", "", 8, "", api_name="/adapter_audit")


def test_layout_follows_the_weight_when_the_config_says_otherwise(tmp_path: Path) -> None:
    """PEFT treats GPT-2's Conv1D as fan_in_fan_out whatever the config says; the shapes tell."""
    torch.manual_seed(2)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4))
    base_files = _files(base)
    model = _train_lora(base, LoraConfig(r=2, lora_alpha=2, target_modules=["c_fc"], fan_in_fan_out=True), 64)
    adapter = _adapter_files(model, tmp_path / "saved")
    config = json.loads(adapter["adapter_config.json"])
    config["fan_in_fan_out"] = False  # as if a tool had dropped the flag
    adapter["adapter_config.json"] = json.dumps(config).encode()
    paths = _local(tmp_path, base_files, _files(model.merge_and_unload()), adapter)
    section = section_of(audit_adapter(*paths, AuditConfig(rank=2)))
    assert section is not None and [m.shape for m in section.matrices] == [(32, 128)]
    assert section.matrices[0].energy_kept is not None and section.matrices[0].energy_kept > 1 - 1e-9


def test_the_adapter_audit_runs_its_math_through_the_compute_hook(tmp_path: Path, trained: dict) -> None:
    """On ZeroGPU the adapter audit's math must reach the GPU hook: every matrix is one kernel call
    through ``AuditConfig.compute`` (arguments and results pickled, as a worker process gets them),
    covered ones the adapter-fit kernel, and the section is the one computed in-process."""
    import pickle

    from lorafid.adapters.peft_adapter import adapter_fit_kernel
    from lorafid.audit.engine import spectrum_kernel

    paths = _local(tmp_path, trained["base"], trained["finetune"], trained["adapter"])
    kernels: list[str] = []

    def across_processes(kernel: Any, *args: Any) -> Any:
        kernels.append(kernel.__name__)
        return pickle.loads(pickle.dumps(kernel(*pickle.loads(pickle.dumps(args)))))

    hooked = audit_adapter(*paths, AuditConfig(rank=8, compute=across_processes))
    local = audit_adapter(*paths, AuditConfig(rank=8, device="cpu"))
    section = section_of(hooked)
    assert section is not None and section == section_of(local)
    assert kernels.count(adapter_fit_kernel.__name__) == len(section.matrices) > 0
    assert len(kernels) == len(hooked.matrices)  # every matrix, covered or not, through the hook
    assert set(kernels) <= {adapter_fit_kernel.__name__, spectrum_kernel.__name__}
