"""What a visitor types is never published as typed: model names are one plain line."""

from __future__ import annotations

import pytest

from lorafid.sharing.policy import model_name_refusal, probe_refusal


@pytest.mark.parametrize(
    "name", ["org/Model-7B", "accounts/x/models/llama-v3p1-8b", "llama3:8b", "anthropic.model-v2:1", "gpt-4o@2024"]
)
def test_real_model_names_may_be_published(name: str) -> None:
    assert model_name_refusal(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "tiny\nServes the original weights.",  # a second line imitating another verdict
        "tiny\r",
        "<b>tiny</b>",
        "[tiny](https://evil.example)",
        "tiny model",
        "tiny\x1b[2J",
        "x" * 129,
        "",
        "-flag",
        None,
    ],
)
def test_other_names_are_refused(name: object) -> None:
    assert "one plain line" in str(model_name_refusal(name))


def test_a_check_with_such_a_name_is_not_published_before_any_hub_call() -> None:
    document = {"status": "complete", "verdict": {"sentence": "x"}, "model": "tiny\nServes the original weights."}
    # No endpoint is reachable here: the name is refused before the repos are looked up.
    assert "one plain line" in str(probe_refusal(document, endpoint="http://127.0.0.1:9"))
