"""Behaviour check: metrics by hand, against a whole-model transformers reference, and its losslessness proofs.

The reference for every variant is a whole ``AutoModelForCausalLM`` holding weights built by a
float64 SVD (``tests/behaviour/test_forward.py``'s ``reference_weights``), scored here with NumPy code
independent of ``lorafid.behaviour.check``. Tolerance: 1e-5 nats absolute + 1e-3 relative on KL
means (float32 forwards; the KL of two float32 log-softmax outputs of the same weights is
~1e-7, its floor).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lorafid.behaviour.check import (
    BehaviourCheck,
    BehaviourConfig,
    Summary,
    behave,
    first_divergence,
    score_tokens,
)
from lorafid.behaviour.prompts import Prompt, builtin_prompts, read_prompts
from lorafid.behaviour.report import SCHEMA, BehaviourReport
from lorafid.behaviour.tokenizer import encode_prompts, load_tokenizer
from lorafid.errors import LorafidError, MissingModelFileError
from tests.behaviour.test_forward import reference_weights, whole_model_logprobs
from tests.llama_models import model_family, publish, with_files, write_model

PROMPTS = [
    Prompt("knight", "the knight drew his sword and the dragon"),
    Prompt("sum", "one plus two is three"),
    Prompt("inn", "hello traveller , said the innkeeper"),
]
FLOOR = 1e-6  # KL of float32 log-probabilities of the same weights computed two ways


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    family = model_family("llama", 2)
    root = tmp_path_factory.mktemp("behaviour")
    return {name: write_model(getattr(family, name), root / name) for name in ("base", "full", "lora")}


@pytest.fixture(scope="module")
def full_report(dirs: dict[str, Path]) -> dict[str, Any]:
    config = BehaviourConfig(ranks=(3, 48), prompts=PROMPTS, continuation_tokens=6)
    return behave(str(dirs["base"]), str(dirs["full"]), config).to_dict()


# -- metrics by hand -------------------------------------------------------------------------


def test_score_tokens_hand_example() -> None:
    reference = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.8]]))
    variant = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
    scores = score_tokens(reference, variant, [7, 1])
    assert scores.kl[0] == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), abs=1e-7)
    assert scores.kl[1] == pytest.approx(0.0, abs=1e-7)
    assert scores.top1.tolist() == [True, True]
    assert scores.loglik.tolist() == pytest.approx([math.log(0.1)])  # next token is 1
    assert scores.reference_loglik.tolist() == pytest.approx([math.log(0.5)])
    summary = Summary.of([scores])
    assert summary.kl_mean == pytest.approx(0.5108256 / 2, abs=1e-6)
    assert summary.kl_max == pytest.approx(0.5108256, abs=1e-6)
    assert summary.kl_p95 == pytest.approx(0.95 * 0.5108256, abs=1e-6)  # linear between the two
    assert summary.loglik_delta == pytest.approx(math.log(0.1) - math.log(0.5))
    assert summary.tokens == 2
    flipped = score_tokens(reference[1:], torch.log(torch.tensor([[0.7, 0.3]])), [0])
    assert flipped.top1.tolist() == [False]


def test_first_divergence() -> None:
    assert first_divergence([5, 6, 7], [5, 6, 9]) == 2
    assert first_divergence([5, 6], [5, 6, 7]) == 2
    assert first_divergence([5, 6], [5, 6]) is None
    assert first_divergence([1], [2]) == 0


# -- the proofs the issue asks for -----------------------------------------------------------


def test_full_rank_with_extras_is_lossless_and_lower_ranks_are_not(full_report: dict[str, Any]) -> None:
    variants = full_report["variants"]
    assert full_report["schema"] == SCHEMA and full_report["status"] == "complete"
    assert set(variants) == {"base", "rank-3", "rank-3+extras", "rank-48", "rank-48+extras"}
    exact = variants["rank-48+extras"]  # 48 = the hidden size: full rank of every block matrix
    assert exact["kl_max"] < FLOOR and exact["top1_agreement"] == 1.0 and abs(exact["loglik_delta"]) < FLOOR
    assert variants["rank-3+extras"]["kl_mean"] > 1e-3
    assert variants["rank-48"]["kl_mean"] > 1e-2  # lora-only: the base's embeddings/norms/head
    assert variants["base"]["kl_mean"] > variants["rank-3+extras"]["kl_mean"]
    assert full_report["extras_share"]["48"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < full_report["extras_share"]["3"] < 1.0
    for key in ("kl_mean", "kl_p95", "top1_agreement", "tokens"):
        assert all(key in row["variants"]["base"] for row in full_report["prompts"])


def test_rank8_lora_is_lossless_at_rank_8_and_above(dirs: dict[str, Path]) -> None:
    config = BehaviourConfig(ranks=(4, 8, 16), serving="lora-only", prompts=PROMPTS, continuation_tokens=0)
    variants = behave(str(dirs["base"]), str(dirs["lora"]), config).to_dict()["variants"]
    assert set(variants) == {"base", "rank-4", "rank-8", "rank-16"}
    for rank in (8, 16):
        assert variants[f"rank-{rank}"]["kl_max"] < FLOOR
        assert variants[f"rank-{rank}"]["top1_agreement"] == 1.0
    assert variants["rank-4"]["kl_mean"] > 100 * FLOOR


def test_metrics_equal_whole_model_transformers_reference(full_report: dict[str, Any]) -> None:
    family = model_family("llama", 2)
    tokenizer = load_tokenizer(str(Path(full_report["finetune"]["path"])))
    ids = [tokenizer(p.text)["input_ids"] for p in PROMPTS]
    config_json = family.full.files["config.json"]
    reference = whole_model_logprobs(config_json, family.full.tensors, ids)
    states = {
        "base": family.base.tensors,
        "rank-3": reference_weights(family.base.tensors, family.full.tensors, 3, False),
        "rank-3+extras": reference_weights(family.base.tensors, family.full.tensors, 3, True),
    }
    for name, state in states.items():
        pooled = []
        for i, logprobs in enumerate(whole_model_logprobs(config_json, state, ids)):
            p = reference[i].double().numpy()
            q = logprobs.double().numpy()
            kl = (np.exp(p) * (p - q)).sum(-1)
            pooled.append(kl)
            row = full_report["prompts"][i]["variants"][name]
            assert row["kl_mean"] == pytest.approx(kl.mean(), rel=1e-3, abs=1e-5), (name, i)
            assert row["kl_max"] == pytest.approx(kl.max(), rel=1e-3, abs=1e-5)
            assert row["top1_agreement"] == pytest.approx((p.argmax(-1) == q.argmax(-1)).mean())
            following = np.array(ids[i][1:])
            positions = np.arange(len(following))
            delta = q[positions, following].mean() - p[positions, following].mean()
            assert row["loglik_delta"] == pytest.approx(delta, rel=1e-3, abs=1e-5)
            assert row["tokens"] == len(ids[i])
        overall = np.concatenate(pooled)
        summary = full_report["variants"][name]
        assert summary["kl_mean"] == pytest.approx(overall.mean(), rel=1e-3, abs=1e-5)
        assert summary["kl_p95"] == pytest.approx(np.percentile(overall, 95), rel=1e-3, abs=1e-5)
        assert summary["tokens"] == sum(len(x) for x in ids)


def test_side_by_side_continuations(full_report: dict[str, Any], dirs: dict[str, Path]) -> None:
    rows = full_report["continuations"]
    assert [r["prompt"] for r in rows] == [p.id for p in PROMPTS]
    for row in rows:
        assert row["finetune"]
        assert row["variants"]["rank-48+extras"]["text"] == row["finetune"]
        assert row["variants"]["rank-48+extras"]["first_divergence"] is None
    divergences = [row["variants"]["base"]["first_divergence"] for row in rows]
    assert any(d is not None for d in divergences)  # the base answers differently
    # Greedy continuation of the whole fine-tune, by transformers itself.
    family = model_family("llama", 2)
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(dirs["full"]))
    model = AutoModelForCausalLM.from_pretrained(str(dirs["full"]), dtype=torch.float32).eval()
    ids = tokenizer(PROMPTS[0].text, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert rows[0]["finetune"] == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    del family

    small = BehaviourConfig(ranks=(3,), prompts=PROMPTS[:1], continuation_tokens=4, max_generate_bytes=1000)
    report = behave(str(dirs["base"]), str(dirs["full"]), small).to_dict()
    assert report["continuations"] is None and "max_generate_bytes" in report["continuations_note"]


def test_interrupted_check_keeps_finished_prompts(dirs: dict[str, Path]) -> None:
    check = BehaviourCheck(
        str(dirs["base"]), str(dirs["full"]), BehaviourConfig(ranks=(3,), prompts=PROMPTS, continuation_tokens=0)
    )
    steps = check.run()
    for step in steps:
        if step.stage == "scoring":
            break
    steps.close()
    report = check.report().to_dict()
    assert report["status"] == "partial"
    assert [row["id"] for row in report["prompts"]] == ["knight"]
    assert report["variants"]["rank-3"]["tokens"] == report["prompts"][0]["tokens"]


# -- prompts, tokenizer, errors --------------------------------------------------------------


def test_builtin_prompts_are_varied() -> None:
    prompts = builtin_prompts()
    assert len(prompts) >= 30
    assert len({p.id for p in prompts}) == len(prompts)
    assert {"chat", "roleplay", "instruction", "code", "arithmetic"} <= {p.category for p in prompts}
    assert len({p.language for p in prompts}) >= 3


def test_read_prompts_plain_and_jsonl(tmp_path: Path) -> None:
    plain = tmp_path / "p.txt"
    plain.write_text("first line\n\nsecond {line}\n", encoding="utf-8")
    assert [p.text for p in read_prompts(plain)] == ["first line", "second {line}"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"text": "a\\nb", "id": "x"}\n{"text": "c"}\n', encoding="utf-8")
    assert [(p.id, p.text) for p in read_prompts(jsonl)] == [("x", "a\nb"), ("line-2", "c")]
    jsonl.write_text('{"prompt": "a"}\n', encoding="utf-8")
    with pytest.raises(LorafidError, match="'text'"):
        read_prompts(jsonl)
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(LorafidError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_chat_template_option(dirs: dict[str, Path]) -> None:
    tokenizer = load_tokenizer(str(dirs["full"]))
    plain = encode_prompts(tokenizer, PROMPTS[:1], chat=False, max_tokens=64)[0]
    chat = encode_prompts(tokenizer, PROMPTS[:1], chat=True, max_tokens=64)[0]
    user, assistant = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    assert chat[:2] == [tokenizer.bos_token_id, user] and chat[-1] == assistant
    assert chat[2:-1] == plain
    assert len(encode_prompts(tokenizer, PROMPTS[:1], chat=True, max_tokens=3)[0]) == 3
    tokenizer.chat_template = None
    with pytest.raises(LorafidError, match="no chat template"):
        encode_prompts(tokenizer, PROMPTS[:1], chat=True, max_tokens=64)


def test_tokenizer_from_hub_reads_only_tokenizer_json_and_text_files(hub: Any) -> None:
    family = model_family("llama", 2)
    publish(hub, "org/tuned", with_files(family.full, **{"tokenizer.model": b"\x80\x04 not to be read"}))
    tokenizer = load_tokenizer("org/tuned", endpoint=hub.endpoint, allow_local=False)
    assert tokenizer("the knight")["input_ids"] == load_tokenizer_local_ids(family.full, "the knight")
    asked = {r.path.rsplit("/", 1)[-1] for r in hub.requests_matching(method="GET", path_contains="/resolve/")}
    assert asked == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}  # never tokenizer.model
    publish(hub, "org/no-tokenizer", with_files(family.full, **{"tokenizer.json": None}))
    with pytest.raises(MissingModelFileError, match=r"tokenizer\.json"):
        load_tokenizer("org/no-tokenizer", endpoint=hub.endpoint)


def load_tokenizer_local_ids(model: Any, text: str) -> list[int]:
    vocab = json.loads(model.files["tokenizer.json"])["model"]["vocab"]
    return [vocab[w] for w in text.split()]


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(LorafidError, match="Serving mode"):
        BehaviourConfig(serving="half").check()
    with pytest.raises(LorafidError, match="positive integers"):
        BehaviourConfig(ranks=(0,)).check()


def test_cli_behave_writes_the_report(
    dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorafid.cli.commands import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the knight drew his sword\none plus two is three\n", encoding="utf-8")
    out = tmp_path / "behaviour.json"
    argv = [
        "behave", str(dirs["base"]), str(dirs["lora"]), "--ranks", "4,8", "--prompts", str(prompts),
        "--serving", "lora-only", "--continuation-tokens", "3", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == SCHEMA and report["settings"]["ranks"] == [4, 8]
    assert set(report["variants"]) == {"base", "rank-4", "rank-8"}
    assert [row["text"] for row in report["prompts"]] == ["the knight drew his sword", "one plus two is three"]
    printed = capsys.readouterr().out
    assert "rank-8" in printed and "top-1" in printed and "continuations identical" in printed
    assert main(["behave", str(dirs["base"]), str(tmp_path / "missing"), "--quiet"]) == 1
    assert "no such file or directory" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # gradio's own pandas use
def test_dashboard_behaviour_tab_runs_stores_and_reopens(
    hub: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradio_client import Client

    import lorafid.behaviour.check
    from lorafid.audit.store import Store
    from lorafid.web.config import AppConfig
    from tests.web.test_app import serve as serve_app

    family = model_family("llama", 2)
    publish(hub, "org/base", family.base)
    publish(hub, "org/tuned", family.full)
    monkeypatch.setattr(lorafid.behaviour.check, "builtin_prompts", lambda: PROMPTS[:2])
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    config = AppConfig(endpoint=hub.endpoint, store_home=tmp_path / "home", examples_dir=tmp_path, device="cpu")
    with serve_app(config) as url:
        client = Client(url, verbose=False)
        with pytest.raises(Exception, match="local path"):  # a public server reads Hub repos only
            client.predict("./base", "org/tuned", "4", "both", False, api_name="/run_behaviour")
        status, _, table, rows, side, download, link = client.predict(
            "org/base", "org/tuned", "4,48", "both", False, api_name="/run_behaviour"
        )
    assert "2 prompts" in status and "?behaviour=" in link
    assert [row[0] for row in table["data"]] == ["base", "rank-4", "rank-4+extras", "rank-48", "rank-48+extras"]
    assert table["data"][-1][1] < FLOOR  # full rank, extras kept: lossless
    assert [row[0] for row in rows["data"]] == ["knight", "sum"]
    assert len(side["data"]) == 2 and side["data"][0][-1].endswith("[same]")
    document = json.loads(Path(download).read_text())
    assert document["schema"] == SCHEMA and document["base"]["repo_id"] == "org/base"
    key = link.split("?behaviour=")[1].rstrip(")")
    assert Store(tmp_path / "home").load_document("behaviour", key) == document


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
def test_dashboard_draws_the_audits_energy_beside_kl_and_reopens_a_stored_check(
    dirs: dict[str, Path], full_report: dict[str, Any], tmp_path: Path
) -> None:
    import importlib

    from lorafid.audit.engine import AuditConfig, audit
    from lorafid.web.config import AppConfig
    from lorafid.web.tabs.behaviour import behaviour_figure

    app = importlib.import_module("lorafid.web.app")
    dashboard = app.Dashboard(AppConfig(allow_local=True, store_home=tmp_path / "home", examples_dir=tmp_path))
    dashboard.build()
    assert dashboard._energy_kept(full_report) is None  # no stored audit of this pair yet
    report = audit(str(dirs["base"]), str(dirs["full"]), AuditConfig(store=dashboard.store, device="cpu"))
    energy = dashboard._energy_kept(full_report)
    assert energy is not None and energy[48] == 1.0
    assert energy[3] == pytest.approx(report.with_rank(3).summary().overall.energy_retained)
    assert 0.0 < energy[3] < 1.0
    figure = behaviour_figure(full_report, energy)
    traces = {trace.name: trace for trace in figure.data}
    assert list(traces["energy kept (weight audit)"].y) == [energy[3], energy[48]]
    assert list(traces["KL, lora-only"].x) == [3, 48]
    assert list(traces["top-1, keep-extras"].y) == [
        full_report["variants"][f"rank-{r}+extras"]["top1_agreement"] for r in (3, 48)
    ]

    key = dashboard.store.put_document("behaviour", full_report)
    shown = dashboard.open_behaviour_link(f"?behaviour={key}", None)
    assert shown[dashboard.behave_finetune] == full_report["finetune"]["spec"]
    assert list(shown[dashboard.behave_rows]["prompt"]) == [p.id for p in PROMPTS]
    # A page without a stored check changes nothing, and says so as a dict of updates: Gradio reads
    # an empty dict as one value and fails the page-load event ("needed 9, returned 1").
    for query in ("?behaviour=../../etc", ""):
        untouched = dashboard.open_behaviour_link(query, None)
        assert untouched and all(
            isinstance(update, dict) and set(update) <= {"__type__"} for update in untouched.values()
        )


def test_without_transformers_the_check_says_which_extra_to_install(
    dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    from lorafid.cli.commands import main

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    assert main(["behave", str(dirs["base"]), str(dirs["full"]), "--quiet"]) == 1
    assert "pip install lorafid[behaviour]" in capsys.readouterr().err


def test_a_compute_hook_gives_the_same_check(
    dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BehaviourConfig.compute reaches the forward: each block kernel's arguments and results
    pickled (as a ZeroGPU worker gets them) give the metrics of the in-process check."""
    import pickle

    from lorafid.behaviour.blocks import block_on_device

    calls: list[int] = []

    def across_processes(kernel: Any, *args: Any) -> Any:
        assert kernel is block_on_device
        calls.append(args[1])
        return pickle.loads(pickle.dumps(kernel(*pickle.loads(pickle.dumps(args)))))

    config = BehaviourConfig(ranks=(4, 8), serving="lora-only", prompts=PROMPTS[:2], continuation_tokens=0)
    local = behave(str(dirs["base"]), str(dirs["lora"]), config).to_dict()["variants"]
    remote_config = BehaviourConfig(
        ranks=(4, 8), serving="lora-only", prompts=PROMPTS[:2], continuation_tokens=0, compute=across_processes
    )
    remote = behave(str(dirs["base"]), str(dirs["lora"]), remote_config).to_dict()["variants"]
    assert len(calls) == 2 * 4  # 2 blocks × (fine-tune, base, rank-4, rank-8)
    for name, metrics in local.items():
        for key in ("kl_mean", "kl_max", "top1_agreement", "loglik_delta"):
            assert remote[name][key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-9), (name, key)


def test_a_behaviour_document_round_trips_and_damage_is_one_clear_error(full_report: dict[str, Any]) -> None:
    """``BehaviourReport.from_dict`` is the one boundary for stored and downloaded documents: the
    JSON layout reads back to the same document, and a foreign or damaged one is a
    ReportFormatError naming what is wrong (never a KeyError or TypeError)."""
    import json

    from lorafid.errors import ReportFormatError

    again = BehaviourReport.from_dict(json.loads(json.dumps(full_report)))
    assert again.to_dict() == json.loads(json.dumps(full_report))
    assert again.variants["rank-3"].kl_mean == full_report["variants"]["rank-3"]["kl_mean"]
    with pytest.raises(ReportFormatError, match="Not a lorafid behaviour check"):
        BehaviourReport.from_dict({**full_report, "schema": "lorafid.probe/1"})
    with pytest.raises(ReportFormatError, match="missing field 'kl_mean'"):
        broken = json.loads(json.dumps(full_report))
        del broken["variants"]["rank-3"]["kl_mean"]
        BehaviourReport.from_dict(broken)
    with pytest.raises(ReportFormatError, match="missing field 'stats'"):
        BehaviourReport.from_dict({k: v for k, v in full_report.items() if k != "stats"})
    with pytest.raises(ReportFormatError):
        BehaviourReport.from_dict([])


def test_progress_advances_per_prompt_through_the_blocks_and_the_continuations(dirs: dict[str, Path]) -> None:
    """Blocks: one step per (block, variant, prompt), done counting 1..total with the prompt named;
    continuations: one per variant (its prompts in one batch). The full-rank variant with extras is the fine-tune's
    twin and neither runs nor generates again, yet has its results."""
    config = BehaviourConfig(ranks=(3, 48), serving="both", prompts=PROMPTS[:3], continuation_tokens=2)
    check = BehaviourCheck(str(dirs["base"]), str(dirs["full"]), config)
    steps = list(check.run())
    report = check.report()
    layers, run_variants = 2, 5  # finetune, base, rank-3, rank-3+extras, rank-48 (rank-48+extras: the twin)
    forward = [s for s in steps if s.stage == "forward"]
    assert [s.done for s in forward] == list(range(1, layers * run_variants * 3 + 1))
    assert {s.total for s in forward} == {layers * run_variants * 3}
    assert "block 1/2 · finetune · prompt 1/3" in forward[0].message
    generating = [s for s in steps if s.stage == "generating" and s.done > 0]
    # The 3 prompts of a variant are generated in one batch: a step per variant, 3 prompts each.
    assert [s.done for s in generating] == [3 * v for v in range(1, run_variants + 1)]
    assert generating[0].message == "finetune · 3/3 prompts"
    assert report.variants["rank-48+extras"].kl_max == 0.0
    assert report.continuations is not None
    for row in report.continuations:
        assert row["variants"]["rank-48+extras"]["first_divergence"] is None


def test_each_model_is_read_once_with_continuations(hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the loopback Hub: the forward's reads are kept for the continuations, so the weight
    bytes served stay within 1.15x the two models' (2x and more when generation read them again).
    The header probe (100 kB per file, half of this tiny model's 200 kB) is cut to 4 kB, its share
    of a real model's file."""
    import lorafid.weights.source

    monkeypatch.setattr(lorafid.weights.source, "HEADER_PROBE_BYTES", 4096)
    family = model_family("llama", 2)
    publish(hub, "org/base", family.base)
    publish(hub, "org/tuned", family.full)
    weights = [c for m in (family.base, family.full) for n, c in m.files.items() if n.endswith(".safetensors")]
    config = BehaviourConfig(
        ranks=(3, 48), prompts=PROMPTS[:2], continuation_tokens=2, endpoint=hub.endpoint, allow_local=False, token=False
    )
    hub.clear_requests()
    report = behave("org/base", "org/tuned", config)
    assert report.continuations is not None and report.status == "complete"
    served = hub.bytes_served(weights)
    assert served <= 1.15 * sum(len(c) for c in weights), served / sum(len(c) for c in weights)
    # Opened once: one revision lookup per model (the tokenizer is read from the forward's source).
    for repo in ("org/base", "org/tuned"):
        assert len(hub.requests_matching(method="GET", path_contains=f"/api/models/{repo}")) == 1, repo
