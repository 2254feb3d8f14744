"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import huggingface_hub.constants
import pytest

from tests.hub_server import HubServer

# -- Home ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def own_home(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Nothing a test runs writes into the user's own lorafid home (the store, the direction cache),
    and no test sees what an earlier one left there. A test may set LORAFID_HOME itself after this."""
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path_factory.mktemp("lorafid_home")))


# -- Decompositions ------------------------------------------------------------------------


class Decomposed(NamedTuple):
    shape: tuple[int, ...]  # of Δ
    max_rank: int


@pytest.fixture
def decompositions(monkeypatch: pytest.MonkeyPatch) -> list[Decomposed]:
    """Every ``spectrum.decompose`` call the test makes, in order (the real one still runs)."""
    from lorafid.audit import spectrum

    calls: list[Decomposed] = []
    decompose = spectrum.decompose

    def recorded(base: Any, finetune: Any, max_rank: int) -> Any:
        calls.append(Decomposed(tuple(base.shape), max_rank))
        return decompose(base, finetune, max_rank)

    monkeypatch.setattr(spectrum, "decompose", recorded)
    return calls


# -- Hub server ----------------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A started loopback Hub + CDN (see ``tests/hub_server.py``), stopped after the test.

    The machine's own Hub token and endpoint are hidden, so what the server receives depends
    only on the test: no token unless the test passes one or sets HF_TOKEN.
    """
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    no_login = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(Path(no_login) / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(Path(no_login) / "stored_tokens"))
    server = HubServer().start()
    try:
        yield server
    finally:
        server.stop()
