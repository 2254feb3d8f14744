"""Fixtures of the provider tests: the tiny model family, the loopback Hub with the pair, and
OpenAI-compatible loopback servers serving any candidate's weights."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch


@pytest.fixture(scope="module")
def family() -> Any:
    pytest.importorskip("transformers")
    from tests.llama_models import model_family

    return model_family("llama", layers=2)


@pytest.fixture
def serve(family: Any) -> Iterator[Any]:
    from tests.openai_server import OpenAIServer, served_weights

    servers: list[OpenAIServer] = []

    def start(mode: str = "finetune", tensors: dict[str, torch.Tensor] | None = None, **options: Any) -> OpenAIServer:
        weights = tensors if tensors is not None else served_weights(family.base.tensors, family.full.tensors, mode)
        server = OpenAIServer(family.full.files, weights, **options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def tiny_tokenizer(family: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tokenizer")
    for name, content in family.full.files.items():
        (folder / name).write_bytes(content)
    return PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny matrices: on a loaded 2-core machine torch's second thread makes each one 100x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def pair(hub: Any, family: Any) -> tuple[str, str]:
    from tests.llama_models import publish

    publish(hub, "org/base", family.base)
    publish(hub, "org/finetune", family.full)
    return "org/base", "org/finetune"
