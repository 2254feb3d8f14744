"""A repo's config.json and headers are bounded before the skeleton is built or a tensor is read."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from lorafid.behaviour import architecture, forward, model_plan
from lorafid.behaviour.check import BehaviourCheck, BehaviourConfig
from lorafid.behaviour.forward import ForwardConfig, LayerStream
from lorafid.behaviour.variants import FINETUNE
from lorafid.errors import LimitExceededError
from tests.llama_models import config_dict, model_family, with_files, write_model


@pytest.fixture(scope="module")
def family() -> Any:
    return model_family("llama", 2)


@pytest.fixture
def nothing_built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records (and refuses) building the meta skeleton or reading a header or a tensor."""
    calls: list[str] = []

    def refuse(what: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(what)
            raise AssertionError(f"{what} ran before the limits refused the model")

        return call

    monkeypatch.setattr(architecture, "meta_skeleton", refuse("skeleton"))  # the architecture's own calls
    monkeypatch.setattr(forward, "meta_skeleton", refuse("skeleton"))
    monkeypatch.setattr(forward, "read_tensor", refuse("read_tensor"))
    return calls


def _pair(family: Any, tmp_path: Path, **config: Any) -> tuple[str, str]:
    changed = config_dict(family.full) | config
    tuned = with_files(family.full, **{"config.json": json.dumps(changed).encode()})
    return str(write_model(family.base, tmp_path / "base")), str(write_model(tuned, tmp_path / "tuned"))


# The values the review tried (8,000 layers took 74 s and 0.7 GB to build; the head_dim 51.5 GB).
HUGE = {
    "num_hidden_layers": 8_000,
    "head_dim": 1_000_000,
    "vocab_size": 50_000_000,
    "hidden_size": 1_000_000,
    "intermediate_size": 10_000_000,
}


@pytest.mark.parametrize(("field", "value"), HUGE.items())
def test_a_huge_config_field_is_refused_by_name_before_anything_is_built(
    family: Any, tmp_path: Path, nothing_built: list[str], monkeypatch: pytest.MonkeyPatch, field: str, value: int
) -> None:
    read_headers: list[int] = []
    monkeypatch.setattr(model_plan, "tensor_indexes", lambda *a, **k: read_headers.append(1))
    base, tuned = _pair(family, tmp_path, **{field: value})
    with LayerStream(base, tuned) as stream, pytest.raises(LimitExceededError, match=rf"{field} is {value:,}, above"):
        stream.plan()
    assert nothing_built == [] and read_headers == []  # refused from config.json alone


def test_a_config_field_that_is_not_a_whole_number_is_refused(family: Any, tmp_path: Path) -> None:
    base, tuned = _pair(family, tmp_path, num_hidden_layers="2")
    with LayerStream(base, tuned) as stream, pytest.raises(LimitExceededError, match="num_hidden_layers is '2', not"):
        stream.plan()


def test_more_layers_in_the_config_than_in_the_weights_is_refused_before_the_skeleton(
    family: Any, tmp_path: Path, nothing_built: list[str]
) -> None:
    base, tuned = _pair(family, tmp_path, num_hidden_layers=400)  # within the field's limit, not these weights'
    with LayerStream(base, tuned) as stream, pytest.raises(LimitExceededError, match="400 but the weights hold 2"):
        stream.plan()
    assert nothing_built == []


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"max_model_bytes": 10_000}, r"would read 0\.0 GB, above this server's limit"),
        ({"max_tensors": 5}, "lists 2[0-9] tensors, above this server's limit of 5"),
        ({"max_tensor_bytes": 1_000}, r"takes 0\.00 GB, above this server's per-tensor limit"),
    ],
)
def test_server_limits_apply_to_the_forward_from_the_headers(
    family: Any, tmp_path: Path, nothing_built: list[str], limits: dict[str, int], message: str
) -> None:
    base, tuned = _pair(family, tmp_path)
    with (
        LayerStream(base, tuned, ForwardConfig(device="cpu", **limits)) as stream,
        pytest.raises(LimitExceededError, match=message),
    ):
        stream.plan()
    assert nothing_built == []


def test_a_tensor_limit_caps_the_header_length_before_it_is_fetched(
    family: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorafid.weights.safetensors_format import header_cap

    asked: list[int | None] = []
    real = model_plan.tensor_indexes

    def indexes(*sources: Any, max_header_bytes: int | None = None) -> Any:
        asked.append(max_header_bytes)
        return real(*sources, max_header_bytes=max_header_bytes)

    monkeypatch.setattr(model_plan, "tensor_indexes", indexes)
    base, tuned = _pair(family, tmp_path)
    with LayerStream(base, tuned, ForwardConfig(device="cpu", max_tensors=50)) as stream:
        stream.plan()
    assert asked == [header_cap(50)]


def test_a_check_past_its_deadline_stops_with_the_servers_words(family: Any, tmp_path: Path) -> None:
    base, tuned = _pair(family, tmp_path)
    config = ForwardConfig(device="cpu", deadline=time.monotonic() - 1)
    with LayerStream(base, tuned, config) as stream, pytest.raises(LimitExceededError, match="time limit per check"):
        list(stream.logprobs([[1, 5, 6]], [FINETUNE]))
    check = BehaviourCheck(base, tuned, BehaviourConfig(ranks=(4,), device="cpu", deadline=time.monotonic() - 1))
    with pytest.raises(LimitExceededError, match="LORAFID_MAX_AUDIT_MINUTES"):
        list(check.run())
