"""A provider's own error text is never kept, and the words say what to do: a closed port, a
wrong model name. Servers on 127.0.0.1 only (or a transport in memory), a few requests each."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx2
import pytest

from lorafid.errors import ChannelUnsupportedError, ProviderError
from lorafid.progress import run_to_end
from lorafid.providers.openai_api import CHANNELS, OpenAIClient, RequestBudget, describe_status
from lorafid.providers.probe import Probe, ProbeConfig, collect
from lorafid.retry import RetryPolicy

SECRET = "sk-live-SECRET at /v1/private-path?key=abc"
FAST = RetryPolicy(max_tries=2, base_wait_s=0.001, max_wait_s=0.01)


def _client(status: int, message: str = SECRET) -> OpenAIClient:
    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, json={"error": {"message": message, "code": status}})

    return OpenAIClient(
        "http://127.0.0.1:9/v1", "sk-key", budget=RequestBudget(20), retry=FAST, transport=httpx2.MockTransport(answer)
    )


@pytest.mark.parametrize("status", [400, 404, 415, 422, 500, 503])
def test_a_providers_error_text_is_never_kept(status: int) -> None:
    errors: list[str] = []
    with _client(status, SECRET if status != 500 else f"invalid request {SECRET}") as client:
        try:
            collection = collect(client, "m", ["one", "two"], lambda t: [1], None, tokens=None, channels=CHANNELS)  # type: ignore[arg-type]
            errors += [json.dumps(collection.channels_tried), str(collection.error)]
        except ProviderError as e:  # 503 on every try: the probe stops, with the status only
            errors.append(str(e))
        try:
            client.post("/completions", {"model": "m"})
        except ProviderError as e:
            errors.append(str(e))
    assert errors and not any("SECRET" in e or "private-path" in e for e in errors)
    if status != 503:  # refused, not retried
        assert f"refused: {describe_status(status)}" in errors[0]


def test_a_status_is_described_in_fixed_words() -> None:
    assert describe_status(400) == "HTTP 400 (bad request: the endpoint does not accept this request)"
    assert describe_status(418) == "HTTP 418 (client error)"
    with _client(400) as client, pytest.raises(ChannelUnsupportedError) as refused:
        client.post("/completions", {"model": "m"})
    assert str(refused.value) == describe_status(400)


def test_a_closed_port_says_connection_refused() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    budget = RequestBudget(20)
    client = OpenAIClient(f"http://127.0.0.1:{port}/v1/x", None, budget=budget)
    with client, pytest.raises(ProviderError, match="connection refused: check the URL") as refused:
        client.post("/completions", {"model": "m"})
    assert "--concurrency" not in str(refused.value) and "/v1/x" not in str(refused.value)
    assert budget.used == 1  # not retried: nothing listens there


def test_a_wrong_model_name_says_the_endpoint_does_not_serve_it(hub: Any, pair: tuple[str, str], serve: Any) -> None:
    server = serve("finetune")
    config = ProbeConfig(
        server.url,
        "org/no-such-model",
        ranks=(4,),
        hub_token=False,
        hub_endpoint=hub.endpoint,
        retry=FAST,
        quantized=(),
    )
    probe = Probe(*pair, ["the knight drew his sword"], {"name": "test", "version": "1"}, config)
    with pytest.raises(ProviderError, match="does not serve model 'org/no-such-model'"):
        run_to_end(probe)
    assert len(server.requests) == 1  # the first answer said so: no other channel was tried


def test_a_host_that_does_not_resolve_says_so() -> None:
    def unknown(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("[Errno -2] Name or service not known", request=request)

    client = OpenAIClient(
        "http://provider.invalid/v1", None, budget=RequestBudget(5), transport=httpx2.MockTransport(unknown)
    )
    with client, pytest.raises(ProviderError, match=r"provider\.invalid: no such host: check the URL"):
        client.post("/completions", {"model": "m"})
