"""``lorafid extract --push-to-hub``: an adapter of a gated, private or local fine-tune goes to a
private repo (``--public`` to override), and no written file holds a path of this machine."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from lorafid.adapters.extract import ExtractConfig, extract
from lorafid.cli.commands import main
from tests.hub_server import HubServer
from tests.models import model_pair, shard_files, write_dir

WRITTEN = ("adapter_config.json", "lorafid-report.json", "README.md")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "lorafid_home"))


@pytest.fixture(scope="module")
def pair() -> tuple[dict, dict]:
    base, tuned = model_pair(layers=1, dtype=torch.float32, seed=3)
    return shard_files(base, 1), shard_files(tuned, 1)


def test_no_local_path_is_written_into_the_adapter(pair: tuple[dict, dict], tmp_path: Path) -> None:
    base = write_dir(pair[0], tmp_path / "models" / "my-base")
    tuned = write_dir(pair[1], tmp_path / "models" / "my-tune")
    out = tmp_path / "out" / "adapter"
    extract(str(base), str(tuned), out, ExtractConfig(rank=8))
    for name in WRITTEN:
        text = (out / name).read_text()
        assert str(tmp_path) not in text and "/models/" not in text, name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "my-base"  # the folder's name: PEFT reads it as a hint only
    report = json.loads((out / "lorafid-report.json").read_text())
    assert report["finetune"]["spec"] == "my-tune" and report["finetune"]["path"] is None


@pytest.mark.parametrize(
    ("gated", "options", "private", "said"),
    [
        (True, [], True, "org/tuned is gated: creating user/adapter as a private repo (pass --public"),
        (True, ["--public"], False, ""),
        (False, [], False, ""),
        (False, ["--private"], True, ""),
    ],
)
def test_the_adapter_of_a_gated_finetune_is_pushed_private(
    hub: HubServer,
    pair: tuple[dict, dict],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    gated: bool,
    options: list[str],
    private: bool,
    said: str,
) -> None:
    hub.add_repo("org/base", pair[0])
    hub.add_repo("org/tuned", pair[1], gated=gated)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # the loopback Hub speaks LFS
    args = ["extract", "org/base", "org/tuned", "--rank", "2", "--out", str(tmp_path / "a"), "--token", "hf_w"]
    assert main([*args, "--push-to-hub", "user/adapter", "--quiet", *options]) == 0
    assert hub._repos["user/adapter"].private is private
    err = capsys.readouterr().err
    assert (said in err) if said else "private repo" not in err


def test_a_private_adapter_is_never_pushed_into_an_existing_public_repo(
    hub: HubServer, pair: tuple[dict, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_repo("org/base", pair[0])
    hub.add_repo("org/tuned", pair[1], private=True)
    hub.add_repo("user/adapter", {"README.md": b"public"})
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    args = ["extract", "org/base", "org/tuned", "--rank", "2", "--out", str(tmp_path / "a"), "--token", "hf_w"]
    assert main([*args, "--push-to-hub", "user/adapter", "--quiet"]) == 1
    assert not any(r.method == "POST" and "/commit/" in r.path for r in hub.requests)
