"""Provider probe: distances, verdicts, the OpenAI-compatible client, the SSRF rules, end to end.

Every request goes to 127.0.0.1 (``tests/openai_server.py``, the loopback Hub) or nowhere:
the public-deployment rules are tested with injected resolvers and an in-process transport.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest
import torch

from lorafid.errors import (
    ChannelUnsupportedError,
    LimitExceededError,
    ProviderError,
    TokenMismatchError,
    UnsafeEndpointError,
)
from lorafid.progress import run_to_end
from lorafid.providers.evidence import BASE, FINETUNE, FINETUNE_8BIT, PromptScore, candidate_names, coarse_kl, summarise
from lorafid.providers.netguard import GuardedTransport, NetPolicy, VisitorBudget, is_public_address
from lorafid.providers.openai_api import (
    CHAT,
    ECHO,
    PROMPT_LOGPROBS,
    OpenAIClient,
    RequestBudget,
    parse_chat,
    parse_echo,
    parse_prompt_logprobs,
)
from lorafid.providers.probe import plan_probe
from lorafid.providers.quantize import int8_rows as round_to_8_bits
from lorafid.retry import RetryPolicy

FAST_RETRY = RetryPolicy(max_tries=4, base_wait_s=0.001, max_wait_s=0.01)
PUBLIC_IP = "93.184.216.34"  # only ever returned by injected resolvers: never connected to


# -- distances -----------------------------------------------------------------------------


def test_coarse_kl_worked_example() -> None:
    # S = {a}: p_a = 0.5, q_a = 0.25 -> 0.5 ln 2 + 0.5 ln(0.5 / 0.75)
    kl = coarse_kl(np.log([[0.5]]), np.log([[0.25]]))
    assert kl[0] == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), abs=1e-12)
    assert kl[0] == pytest.approx(0.1438, abs=1e-4)


def test_coarse_kl_is_the_full_kl_on_the_whole_vocabulary_and_a_lower_bound_on_a_part() -> None:
    generator = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(6, 50, generator=generator, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.randn(6, 50, generator=generator, dtype=torch.float64), -1)
    full = (p.exp() * (p - q)).sum(-1).numpy()
    assert np.allclose(coarse_kl(p.numpy(), q.numpy()), full, atol=1e-12)
    top = p.topk(5, dim=-1).indices
    part = coarse_kl(p.gather(1, top).numpy(), q.gather(1, top).numpy())
    assert np.all(part <= full + 1e-12) and np.all(part > 0)
    # an alternative the provider listed without a usable id joins "the rest"
    hidden = p.gather(1, top).numpy().copy()
    hidden[:, 4] = np.nan
    assert np.all(coarse_kl(hidden, q.gather(1, top).numpy()) <= part + 1e-12)


def test_round_to_8_bits_per_row() -> None:
    w = torch.tensor([[0.5, -1.0, 0.26], [0.0, 0.0, 0.0]])
    rounded = round_to_8_bits("model.layers.0.mlp.up_proj.weight", w)
    assert rounded[0, 2].item() == pytest.approx(round(0.26 * 127) / 127, abs=1e-7)
    assert rounded[0, 1].item() == -1.0 and torch.equal(rounded[1], w[1])
    assert torch.equal(round_to_8_bits("model.embed_tokens.weight", w), w)  # embeddings stay
    assert torch.equal(round_to_8_bits("model.layers.0.input_layernorm.weight", w[0]), w[0])


def _scores(distances: dict[str, list[float]], tokens: int = 10) -> list[PromptScore]:
    prompts = len(next(iter(distances.values())))
    return [
        PromptScore(
            i,
            tokens,
            {n: d[i] * tokens for n, d in distances.items()},
            dict.fromkeys(distances, tokens),
            dict.fromkeys(distances, 0.0),
        )
        for i in range(prompts)
    ]


def _local(names: list[str], spacing: float, tokens: float) -> dict[str, dict[str, float]]:
    """Candidates on a line, ``spacing`` nats per token apart per step (fine-tune, ranks, base),
    with the 8-bit reference a tenth of a step from the fine-tune (summed over ``tokens``)."""
    place = {n: spacing * i for i, n in enumerate(n for n in names if n != FINETUNE_8BIT)}
    place[FINETUNE_8BIT] = spacing / 10
    return {a: {b: abs(place[a] - place[b]) * tokens for b in names} for a in names}


def test_verdict_names_the_rank_and_the_grid_ranks_around_it() -> None:
    names = candidate_names([16, 32, 64, 128])
    path = [FINETUNE, "rank-128", "rank-64", "rank-32", "rank-16", BASE]
    rng = np.random.default_rng(1)
    distances: dict[str, list[float]] = {}
    for name in names:
        rank_like = name.removesuffix("+extras")
        steps = abs(path.index(rank_like) - path.index("rank-64")) if rank_like in path else 2
        base = 0.05 * steps + (0.02 if name.endswith("+extras") else 0.0) + (0.01 if name == FINETUNE_8BIT else 0)
        distances[name] = list(base + 1e-4 * rng.random(8))
    order = [FINETUNE, FINETUNE_8BIT, *[n for n in names if n.startswith("rank-")], BASE]
    results, verdict = summarise(_scores(distances), _local(order, 0.05, 80), [16, 32, 64, 128])
    assert verdict.closest == "rank-64" and verdict.matches
    assert verdict.rank_range == (32, 128)
    assert verdict.sentence.startswith("Closest to a rank-64 extraction (between 32 and 128)")
    assert "base's embeddings" in verdict.sentence
    assert results["rank-32"].ruled_out and not results["rank-64"].ruled_out
    low, high = results["rank-64"].interval
    assert low <= results["rank-64"].distance <= high


def test_verdict_is_no_stronger_than_the_evidence() -> None:
    names = candidate_names([16, 64])
    order = [FINETUNE, FINETUNE_8BIT, "rank-64", "rank-64+extras", "rank-16", "rank-16+extras", BASE]
    # far from everything: matches none
    far = {n: [3.0 + 0.01 * i for i in range(8)] for n in names}
    _, verdict = summarise(_scores(far), _local(order, 0.05, 80), [16, 64])
    assert not verdict.matches and verdict.sentence.startswith("Matches none of these")
    # rank-64 and rank-16 within noise of each other: both held, the range spans them
    noisy = {n: [1.0] * 8 for n in names}
    rng = np.random.default_rng(0)
    noisy["rank-64"] = list(0.01 + 0.02 * rng.random(8))
    noisy["rank-16"] = list(0.01 + 0.02 * rng.random(8))
    _, verdict = summarise(_scores(noisy), _local(order, 0.05, 80), [16, 64])
    assert set(verdict.consistent) == {"rank-64", "rank-16"}
    assert verdict.rank_range == (None, None)  # no grid rank below 16 or above 64 left to bound it
    assert "any rank on the grid" in verdict.sentence
    # the original weights, with 8-bit rounding indistinguishable
    exact = {n: [0.5] * 8 for n in names}
    exact[FINETUNE] = [1e-9] * 8
    exact[FINETUNE_8BIT] = [2e-5] * 8
    _, verdict = summarise(_scores(exact), _local(order, 0.05, 80), [16, 64])
    assert verdict.sentence.startswith("Serves the original weights.") and "8-bit rounding" in verdict.sentence
    # too few prompts for any verdict
    _, verdict = summarise(_scores({n: v[:3] for n, v in exact.items()}), _local(order, 0.05, 30), [16, 64])
    assert verdict.sentence.startswith("Too few prompts")


def test_prompt_sets_are_named_and_versioned(tmp_path: Path) -> None:
    from lorafid.providers.probe import probe_prompts

    texts, info = probe_prompts(None)
    assert len(texts) >= 24 and info == {"name": "builtin", "version": "builtin-v1"}
    path = tmp_path / "mine.jsonl"
    path.write_text('{"text": "first text"}\n{"text": "second"}\n')
    texts, info = probe_prompts(path)
    assert texts == ["first text", "second"] and info["name"] == "mine.jsonl" and len(info["version"]) == 12
    path.write_text('{"text": "first text"}\n{"text": "changed"}\n')
    assert probe_prompts(path)[1]["version"] != info["version"]


def test_stored_probe_documents_round_trip(tmp_path: Path) -> None:
    from lorafid.audit.store import Store

    store = Store(tmp_path)
    document = {"schema": "lorafid.probe/1", "verdict": {"closest": "rank-64"}}
    key = store.put_document("probe", document)
    assert store.load_document("probe", key) == document and store.put_document("probe", document) == key
    assert store.load_document("behaviour", key) is None and store.load_document("probe", "0" * 16) is None


def test_a_quantized_provider_is_not_taken_for_an_extraction() -> None:
    names = candidate_names([16, 64])
    order = [FINETUNE, FINETUNE_8BIT, "rank-64", "rank-64+extras", "rank-16", "rank-16+extras", BASE]
    quantized = {n: [0.5 + 0.01 * i for i in range(8)] for n in names}
    quantized[FINETUNE_8BIT] = [1e-6] * 8
    quantized[FINETUNE] = [0.02 + 0.001 * i for i in range(8)]
    _, verdict = summarise(_scores(quantized), _local(order, 0.05, 80), [16, 64])
    assert verdict.closest == FINETUNE_8BIT and verdict.rank_range is None
    assert verdict.sentence.startswith("Serves the original weights, quantized")


def test_plan_counts_the_fallback_tries_and_retries() -> None:
    plan = plan_probe([5, 7, 9], max_new_tokens=16, max_retries=4)
    assert (plan.prompts, plan.prompt_tokens, plan.requests, plan.max_requests) == (3, 21, 5, 9)
    assert "3 requests" in plan.describe() and "never more than 9" in plan.describe()


# -- response shapes -----------------------------------------------------------------------

# As vLLM answers POST /v1/completions {"prompt": "the cat sat", "echo": true, "max_tokens": 0,
# "logprobs": 1} (completion/serving.py: _create_completion_logprobs; own token first).
ECHO_ANSWER = {
    "object": "text_completion",
    "choices": [
        {
            "index": 0,
            "text": "the cat sat",
            "logprobs": {
                "text_offset": [0, 3, 7],
                "token_logprobs": [None, -2.5, -0.25],
                "tokens": ["the", " cat", " sat"],
                "top_logprobs": [None, {" cat": -2.5, " dog": -0.5}, {" sat": -0.25}],
            },
            "finish_reason": "length",
            "prompt_logprobs": [
                None,
                {"3797": {"logprob": -2.5, "rank": 3, "decoded_token": " cat"}, "5679": {"logprob": -0.5, "rank": 1}},
                {"7731": {"logprob": -0.25, "rank": 1, "decoded_token": " sat"}},
            ],
        }
    ],
}
CHAT_ANSWER = {
    "choices": [
        {
            "message": {"role": "assistant", "content": "Hi"},
            "logprobs": {
                "content": [
                    {
                        "token": "Hi",
                        "logprob": -0.1,
                        "bytes": [72, 105],
                        "top_logprobs": [
                            {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
                            {"token": "Hello", "logprob": -2.4, "bytes": None},
                        ],
                    }
                ]
            },
        }
    ]
}


def test_parse_the_three_response_shapes() -> None:
    echo = parse_echo(ECHO_ANSWER)
    assert [p.token for p in echo.positions] == ["the", " cat", " sat"]
    assert echo.positions[0].logprob is None and echo.positions[0].top == ()
    assert [(a.token, a.logprob) for a in echo.positions[1].top] == [(" cat", -2.5), (" dog", -0.5)]
    prompt = parse_prompt_logprobs(ECHO_ANSWER)
    assert [p.token_id for p in prompt.positions] == [None, 3797, 7731]
    assert prompt.positions[1].logprob == -2.5 and prompt.positions[1].top[1].token_id == 5679
    chat = parse_chat(CHAT_ANSWER)
    assert chat.text == "Hi" and chat.positions[0].top[1].token == "Hello"
    no_echo = {"choices": [{"text": " and", "logprobs": None}]}
    with pytest.raises(ChannelUnsupportedError):
        parse_echo(no_echo)
    with pytest.raises(ChannelUnsupportedError):
        parse_prompt_logprobs(no_echo)


# -- the client: retries, budget, key ---------------------------------------------------------


class _Scripted:
    """An in-process transport answering from a script; records every request (no sockets)."""

    def __init__(self, answers: list[tuple[int, dict[str, str], dict[str, Any]]]) -> None:
        self.answers, self.seen = list(answers), []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.seen.append(request)
        status, headers, body = self.answers.pop(0)
        return httpx2.Response(status, headers=headers, json=body)


def test_retries_429_and_5xx_with_backoff_then_succeeds() -> None:
    script = _Scripted([(429, {"Retry-After": "0"}, {}), (503, {}, {}), (200, {}, CHAT_ANSWER)])
    client = OpenAIClient(
        "https://api.test/v1", "sk-x", budget=RequestBudget(5), retry=FAST_RETRY, transport=httpx2.MockTransport(script)
    )
    answer = client.read(CHAT, "m", "hi", top_k=2, max_new_tokens=1)
    assert answer.text == "Hi" and len(script.seen) == 3 and client.budget.used == 3
    assert all(r.headers["Authorization"] == "Bearer sk-x" for r in script.seen)
    assert "sk-x" not in repr(client)


def test_budget_is_a_hard_cap_and_key_errors_do_not_show_the_key() -> None:
    script = _Scripted([(503, {}, {})] * 3)
    client = OpenAIClient(
        "https://api.test/v1",
        "sk-secret",
        budget=RequestBudget(2),
        retry=FAST_RETRY,
        transport=httpx2.MockTransport(script),
    )
    with pytest.raises(LimitExceededError):
        client.read(CHAT, "m", "hi", top_k=2, max_new_tokens=1)
    assert len(script.seen) == 2
    denied = OpenAIClient(
        "https://api.test/v1",
        "sk-secret",
        budget=RequestBudget(2),
        transport=httpx2.MockTransport(_Scripted([(401, {}, {"error": {"message": "bad key sk-secret"}})])),
    )
    with pytest.raises(ProviderError) as error:
        denied.read(ECHO, "m", "hi", top_k=2, max_new_tokens=1)
    assert "sk-secret" not in str(error.value) and "api-key-env" in str(error.value)


def test_rate_limit_spaces_request_starts() -> None:
    from lorafid.providers.openai_api import RateLimiter

    slept: list[float] = []
    limiter = RateLimiter(2.0, clock=lambda: 10.0, sleep=slept.append)  # four requests asked for at once
    for _ in range(4):
        limiter.wait()
    assert slept == [0.5, 1.0, 1.5]
    RateLimiter(None, clock=lambda: 0.0, sleep=slept.append).wait()
    assert len(slept) == 3


def test_a_redirect_to_another_origin_does_not_get_the_key() -> None:
    script = _Scripted([(307, {"Location": "https://mirror.test/v1/chat/completions"}, {}), (200, {}, CHAT_ANSWER)])
    policy = NetPolicy.public(_resolver({"api.test": [PUBLIC_IP], "mirror.test": [PUBLIC_IP]}))
    client = OpenAIClient(
        "https://api.test/v1", "sk-x", budget=RequestBudget(5), policy=policy, transport=httpx2.MockTransport(script)
    )
    assert client.read(CHAT, "m", "hi", top_k=2, max_new_tokens=1).text == "Hi"
    assert [r.url.host for r in script.seen] == ["api.test", "mirror.test"]
    assert script.seen[0].headers["Authorization"] == "Bearer sk-x" and "Authorization" not in script.seen[1].headers
    assert client.budget.used == 2  # the redirect counted as a request


# -- public-deployment rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00:ec2::254", False),  # AWS IPv6 metadata
        ("::ffff:10.0.0.1", False),  # IPv4-mapped private
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("224.0.0.1", False),
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public_address(address) is public


def _resolver(table: dict[str, list[str]]) -> Any:
    return lambda host, port: table[host]


def test_public_rules_refuse_http_loopback_and_private_names() -> None:
    policy = NetPolicy.public(
        _resolver({"api.test": [PUBLIC_IP], "intranet.test": ["10.0.0.8"], "mixed.test": [PUBLIC_IP, "127.0.0.1"]})
    )
    policy.check_url("https://api.test/v1")
    for url in (
        "http://api.test/v1",  # not https
        "https://127.0.0.1:8000/v1",
        "https://[::1]/v1",
        "https://intranet.test/v1",
        "https://mixed.test/v1",  # one private address is enough to refuse
        "https://169.254.169.254/latest/meta-data",
        "file:///etc/passwd",
    ):
        with pytest.raises(UnsafeEndpointError):
            policy.check_url(url)
    NetPolicy.open().check_url("http://127.0.0.1:8000/v1")  # a private deployment / the CLI


def test_public_rules_refuse_a_redirect_to_a_private_address() -> None:
    policy = NetPolicy.public(_resolver({"api.test": [PUBLIC_IP], "inside.test": ["192.168.0.5"]}))
    for target in ("https://inside.test/v1/completions", "http://169.254.169.254/latest", "https://127.0.0.1/x"):
        script = _Scripted([(307, {"Location": target}, {})])
        client = OpenAIClient(
            "https://api.test/v1",
            "sk-x",
            budget=RequestBudget(5),
            policy=policy,
            transport=httpx2.MockTransport(script),
        )
        with pytest.raises(UnsafeEndpointError):
            client.read(ECHO, "m", "hi", top_k=1, max_new_tokens=1)
        assert [r.url.host for r in script.seen] == ["api.test"]  # the redirect was never followed


def test_public_rules_check_the_address_each_connection_uses() -> None:
    # DNS rebinding: public when the URL is checked, loopback when the connection opens.
    answers = iter([[PUBLIC_IP], ["127.0.0.1"]])
    policy = NetPolicy.public(lambda host, port: next(answers))
    client = OpenAIClient("https://rebind.test/v1", None, budget=RequestBudget(1), policy=policy)
    assert isinstance(client._client._transport, GuardedTransport)
    with pytest.raises(UnsafeEndpointError):
        client.read(ECHO, "m", "hi", top_k=1, max_new_tokens=1)


def test_visitor_budget() -> None:
    now = [0.0]
    budget = VisitorBudget(100, 3600, clock=lambda: now[0])
    budget.take("a", 40)
    budget.take("a", 40)
    with pytest.raises(LimitExceededError):
        budget.take("a", 40)
    budget.take("b", 100)
    now[0] = 3601.0
    budget.take("a", 100)


# -- against the loopback OpenAI-compatible server --------------------------------------------


def test_token_check_tolerates_a_missing_bos_and_refuses_other_tokens(tiny_tokenizer: Any) -> None:
    from lorafid.providers.logprob_channel import TokenMap, align_prompt
    from lorafid.providers.openai_api import Alternative, Position, ProviderAnswer

    tokenizer = tiny_tokenizer
    tokens = TokenMap(tokenizer)
    words = ["the", "knight", "drew", "his", "sword"]
    ids = [tokenizer.bos_token_id, *tokenizer(" ".join(words))["input_ids"]]  # as a BOS-adding tokenizer would
    positions = [Position(words[0], None, None, ())]
    positions += [
        Position(w, None, -1.0, (Alternative(w, None, -1.0), Alternative("dragon", None, -2.0))) for w in words[1:]
    ]
    observation = align_prompt(0, ProviderAnswer(ECHO, tuple(positions), ""), ids, tokens)
    assert observation.ids == tuple(ids[1:]) and observation.scored == (1, 2, 3, 4)
    assert observation.alternative_ids[0] == (ids[2], tokenizer.convert_tokens_to_ids("dragon"))
    positions[2] = Position("dragon", None, -1.0, ())
    with pytest.raises(TokenMismatchError, match="token 2: the provider has 'dragon'"):
        align_prompt(0, ProviderAnswer(ECHO, tuple(positions), ""), ids, tokens)


def test_chat_tokens_that_name_no_id_are_recovered_from_the_text(tiny_tokenizer: Any) -> None:
    from lorafid.providers.logprob_channel import TokenMap, align_chat
    from lorafid.providers.openai_api import Alternative, Position, ProviderAnswer

    tokens = TokenMap(tiny_tokenizer)
    words = ["the", "knight", "drew"]
    ids = tiny_tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    shown = ["the", "kn\ufffd", "drew", ""]  # a piece shown as U+FFFD, then the stop token as ""
    positions = tuple(Position(w, None, -0.5, (Alternative(w, None, -0.5),)) for w in shown)
    observation = align_chat(0, ProviderAnswer(CHAT, positions, "the knight drew"), [1, 2], tokens)
    assert observation.ids == (1, 2, *ids, tiny_tokenizer.eos_token_id)
    assert observation.scored == (2, 3, 4, 5)
    misspelt = (positions[0], Position("knigth", None, -0.5, ()), *positions[2:])  # no such token, nor U+FFFD
    with pytest.raises(TokenMismatchError, match="generated token 1: 'knigth'"):
        align_chat(0, ProviderAnswer(CHAT, misspelt, "the knight drew"), [1, 2], tokens)
    with pytest.raises(TokenMismatchError, match="generated token 1"):  # the text says something else
        align_chat(0, ProviderAnswer(CHAT, positions, "the knight drew his sword"), [1, 2], tokens)


def test_server_shapes_agree_with_each_other(serve: Any) -> None:
    server = serve("finetune")
    client = OpenAIClient(server.url, None, budget=RequestBudget(3))
    echo = client.read(ECHO, "tiny-served", "the knight drew his sword", top_k=3, max_new_tokens=1)
    ids = client.read(PROMPT_LOGPROBS, "tiny-served", "the knight drew his sword", top_k=3, max_new_tokens=1)
    # The echo asks max_tokens 1 (0 means "until the context is full" to llama.cpp's server),
    # so, as vLLM does, it ends with the one generated token after the prompt.
    assert len(echo.positions) == len(ids.positions) + 1 and echo.prompt_tokens == len(ids.positions)
    assert [p.logprob for p in echo.positions[:-1]] == [p.logprob for p in ids.positions]
    assert [server.tokenizer.decode([p.token_id]) for p in ids.positions] == [p.token for p in echo.positions[:-1]]
    body = json.dumps([r.body for r in server.requests])
    assert '"echo": true' in body and '"max_tokens": 1' in body


# -- the whole probe, end to end ------------------------------------------------------------

RANKS = (4, 8, 16, 32)


def _texts(server: Any, count: int = 8) -> list[str]:
    from tests.openai_server import vocabulary_prompts

    return list(vocabulary_prompts(server.tokenizer, count))


def _prompt_file(server: Any, folder: Path, count: int) -> Path:
    """A ``--prompts`` file of ``count`` texts in the served model's words."""
    path = folder / "prompts.txt"
    path.write_text("\n".join(_texts(server, count)) + "\n")
    return path


def _probe(hub: Any, pair: tuple[str, str], server: Any, texts: list[str] | None = None, **options: Any) -> Any:
    from lorafid.providers.probe import Probe, ProbeConfig

    settings: dict[str, Any] = {"ranks": RANKS, "top_k": 5, "hub_token": False, "hub_endpoint": hub.endpoint}
    settings.update(options)
    config = ProbeConfig(server.url, "tiny-served", retry=FAST_RETRY, **settings)
    return Probe(*pair, texts or _texts(server), {"name": "test", "version": "1"}, config)


@pytest.mark.parametrize(
    ("mode", "closest", "opening", "rank_range"),
    [
        ("finetune", FINETUNE, "Serves the original weights.", None),
        ("rank-8", "rank-8", "Closest to a rank-8 extraction (between 4 and 16); served as a multi-LoRA", (4, 16)),
        (
            "rank-8+extras",
            "rank-8+extras",
            "Closest to a rank-8 extraction (between 4 and 16); served with the fine-tune's",
            (4, 16),
        ),
        ("base", BASE, "Serves the base model", None),
        # 8-bit rounding moves this tiny model by less than the noise floor: named, not mistaken for a rank
        ("finetune-8bit", FINETUNE_8BIT, "Serves the original weights.", None),
    ],
)
def test_probe_names_the_served_mode(
    hub: Any, pair: tuple[str, str], serve: Any, mode: str, closest: str, opening: str, rank_range: Any
) -> None:
    server = serve(mode)
    probe = _probe(hub, pair, server)
    plan = probe.plan()
    report = run_to_end(probe)
    assert report.verdict.closest == closest and report.verdict.matches
    assert report.verdict.sentence.startswith(opening), report.verdict.sentence
    assert report.verdict.rank_range == rank_range
    assert report.candidates[closest].distance < 1e-6  # the engine and the server's forward agree
    assert report.method == ECHO and report.status == "complete"
    assert len(server.requests) == report.requests["sent"] == plan.prompts <= plan.requests


def test_a_rank_between_the_grid_ranks_lands_in_the_interval(hub: Any, pair: tuple[str, str], serve: Any) -> None:
    report = run_to_end(_probe(hub, pair, serve("rank-12")))
    lower, upper = report.verdict.rank_range
    assert report.verdict.closest in ("rank-8", "rank-16") and lower < 12 < upper


def test_another_model_matches_none(hub: Any, pair: tuple[str, str], serve: Any, family: Any) -> None:
    # A different fine-tune of the same base (a merged rank-8 LoRA trained on the same texts).
    report = run_to_end(_probe(hub, pair, serve(tensors=family.lora.tensors)))
    assert not report.verdict.matches and report.verdict.sentence.startswith("Matches none of these")


def test_echo_refused_falls_back_to_chat(hub: Any, pair: tuple[str, str], serve: Any) -> None:
    server = serve("rank-8", reject_echo=True, vllm_extensions=False)
    probe = _probe(hub, pair, server, max_new_tokens=12)
    plan = probe.plan()
    report = run_to_end(probe)
    assert report.method == CHAT
    assert [t["channel"] for t in report.channels_tried] == [ECHO, PROMPT_LOGPROBS, CHAT]
    assert report.channels_tried[0]["outcome"].startswith("refused: HTTP 400")
    assert len(server.requests) == report.requests["sent"] == plan.requests  # the two refused tries were announced
    assert report.verdict.closest == "rank-8" and report.verdict.rank_range == (4, 16)
    assert sum(row["tokens"] for row in report.prompts) == 8 * 12  # every generated token scored locally


def test_vllm_prompt_logprobs_when_echo_is_refused(hub: Any, pair: tuple[str, str], serve: Any) -> None:
    server = serve("base", reject_echo=True)
    report = run_to_end(_probe(hub, pair, server))
    assert report.method == PROMPT_LOGPROBS and report.verdict.closest == BASE
    assert server.requests[1].body["prompt_logprobs"] == 5 and server.requests[1].body["return_token_ids"]


def test_other_tokens_are_a_clear_error(hub: Any, pair: tuple[str, str], serve: Any) -> None:
    with pytest.raises(TokenMismatchError, match="does not serve this tokenizer"):
        run_to_end(_probe(hub, pair, serve("finetune", token_shift=1)))


def test_a_provider_failing_midway_leaves_a_partial_report(hub: Any, pair: tuple[str, str], serve: Any) -> None:
    server = serve("rank-8", fail_after=5)
    report = run_to_end(_probe(hub, pair, server, concurrency=1, max_retries=3))
    assert report.status == "partial" and len(report.prompts) == 5
    assert report.requests["sent"] <= report.requests["max"] and report.failed_prompts
    assert report.verdict.closest == "rank-8"  # the five prompts it got still tell


def test_the_key_goes_only_into_the_header(
    hub: Any, pair: tuple[str, str], serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve("finetune")
    texts = _texts(server, 5)
    with caplog.at_level("DEBUG"):
        report = run_to_end(_probe(hub, pair, server, texts, api_key="sk-do-not-store-42"))
    assert all(r.authorization == "Bearer sk-do-not-store-42" for r in server.requests)
    text = report.to_json()
    assert "sk-do-not-store-42" not in text and "sk-do-not-store-42" not in caplog.text
    document = json.loads(text)
    assert document["schema"] == "lorafid.probe/1" and document["endpoint_host"] == "127.0.0.1"
    assert "/v1" not in json.dumps(document["endpoint_host"])
    from huggingface_hub import HfApi

    for role, repo in (("base", pair[0]), ("finetune", pair[1])):
        assert document[role]["sha"] == HfApi(endpoint=hub.endpoint).model_info(repo).sha
    for name in ("finetune", "base", "rank-8", "rank-8+extras", "finetune-8bit"):
        assert {"distance", "interval", "top1_agreement"} <= set(document["candidates"][name])
    assert {"verdict", "method", "model", "prompt_set"} <= set(document)


def test_cli_probe(
    hub: Any, pair: tuple[str, str], serve: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from lorafid.cli.commands import main

    server = serve("rank-16")
    prompts = _prompt_file(server, tmp_path, 6)
    out = tmp_path / "probe.json"
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("PROVIDER_KEY", "sk-cli-secret")
    code = main(
        [
            "probe",
            "--endpoint",
            server.url,
            "--model",
            "tiny-served",
            *pair,
            "--ranks",
            "4,8,16,32",
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--api-key-env",
            "PROVIDER_KEY",
            "--top-logprobs",
            "5",
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "The probe sends 6 prompts" in captured.err  # announced before sending
    assert captured.out.startswith("Closest to a rank-16 extraction (between 8 and 32)")
    document = json.loads(out.read_text())
    assert document["prompt_set"]["name"] == "prompts.txt" and len(document["prompt_set"]["version"]) == 12
    assert "sk-cli-secret" not in out.read_text() + captured.out + captured.err


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # gradio's own pandas use
def test_dashboard_tab_refuses_private_endpoints_on_public_servers_and_runs_on_private_ones(
    hub: Any, pair: tuple[str, str], serve: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    import gradio as gr
    from gradio_client import Client

    import lorafid.providers.probe
    from lorafid.audit.store import Store
    from lorafid.web.config import AppConfig
    from tests.web.test_app import serve as serve_app

    server = serve("rank-8")
    texts = _texts(server)
    monkeypatch.setattr(
        lorafid.providers.probe, "probe_prompts", lambda path: (texts, {"name": "test", "version": "1"})
    )
    monkeypatch.setenv("LORAFID_HOME", str(tmp_path / "home"))
    config = AppConfig(endpoint=hub.endpoint, store_home=tmp_path / "home", examples_dir=tmp_path, device="cpu")
    arguments = ["tiny-served", "sk-app-secret", *pair, "4,8,16,32", "auto", None, ["int4-g128"]]
    app = importlib.import_module("lorafid.web.app")
    public = app.Dashboard(config)  # a public deployment: the default
    for endpoint, reason in ((server.url, "only calls https"), ("https://127.0.0.1:1/v1", "not a public address")):
        with pytest.raises(gr.Error, match=reason):
            next(public.run_probe(endpoint, *arguments, request=None))
    assert server.requests == []  # nothing was sent
    monkeypatch.setenv("LORAFID_PROBE_ANY_ENDPOINT", "1")  # a private deployment
    with serve_app(config) as url:
        status, verdict, _, table, _, download, link = Client(url, verbose=False).predict(
            server.url, *arguments, api_name="/run_probe"
        )
    assert "Closest to a rank\\-8 extraction" in verdict and "?probe=" in link and "requests sent" in status
    assert table["data"][0][0] == "rank-8"
    assert json.loads(Path(download).read_text())["schema"] == "lorafid.probe/1"
    assert all(r.authorization == "Bearer sk-app-secret" for r in server.requests)
    key = link.split("?probe=")[1].rstrip(")")
    stored = Store(tmp_path / "home").load_document("probe", key)
    assert stored is not None and stored["verdict"]["closest"] == "rank-8"
    assert "sk-app-secret" not in json.dumps(stored) and "/v1" not in json.dumps(stored)
    # the permalink opens the stored check for anyone, with the fields filled in
    viewer = app.Dashboard(config)
    viewer.build()
    shown = viewer.open_probe_link(f"?probe={key}", None)
    assert shown[viewer.probe_verdict] == verdict and shown[viewer.probe_finetune] == pair[1]
    assert shown[viewer.tabs].selected == "provider-check" and shown[viewer.probe_ranks] == "4,8,16,32"
    assert json.loads(Path(shown[viewer.probe_file]).read_text()) == stored
    assert viewer.probe_verdict not in viewer.open_probe_link("?probe=../../etc", None)


def test_cli_probe_that_loses_the_provider_midway_keeps_a_partial_report(
    hub: Any, pair: tuple[str, str], serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from lorafid.cli.commands import main

    server = serve("rank-8", fail_after=6)
    prompts = _prompt_file(server, tmp_path, 8)
    out = tmp_path / "probe.json"
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    arguments = ["--model", "tiny-served", *pair, "--ranks", "4,8,16,32", "--prompts", str(prompts)]
    options = ["--out", str(out), "--concurrency", "1", "--max-retries", "1", "--quiet"]
    code = main(["probe", "--endpoint", server.url, *arguments, *options])
    assert code == 1 and "the probe is partial (2 of 8 prompts missing" in capsys.readouterr().err
    document = json.loads(out.read_text())
    assert document["status"] == "partial" and len(document["prompts"]) == 6
    # six answers, then the two failing prompts tried twice each (--max-retries 1 bounds one request's
    # retries too), within the announced cap: 8 prompts + 2 channel tries + 1 retry
    assert document["requests"]["sent"] == 10 == len(server.requests) and document["requests"]["max"] == 11


def test_no_scored_alternatives_is_a_clear_error_not_a_division_by_zero() -> None:
    names = candidate_names([16])
    empty = [
        PromptScore(i, 0, dict.fromkeys(names, 0.0), dict.fromkeys(names, 0), dict.fromkeys(names, 0.0))
        for i in range(6)
    ]
    with pytest.raises(ProviderError, match="nothing to compare"):
        summarise(empty, {a: dict.fromkeys(names, 0.0) for a in names}, [16])
    with pytest.raises(ProviderError, match="nothing to compare"):
        summarise([], {}, [16])


def _two_candidates(rank_excess: list[float], tolerance_tokens: float = 0.0) -> Any:
    """finetune (the closest, 0.01 nats/token everywhere) and rank-16 at 0.01 + excess per prompt."""
    names = candidate_names([16])
    distances = {
        FINETUNE: [0.01] * len(rank_excess),
        FINETUNE_8BIT: [0.02] * len(rank_excess),
        "rank-16": [0.01 + e for e in rank_excess],
        "rank-16+extras": [1.0] * len(rank_excess),
        BASE: [3.0] * len(rank_excess),
    }
    local = {a: dict.fromkeys(names, 800.0) for a in names}
    local[FINETUNE][FINETUNE_8BIT] = tolerance_tokens  # the 8-bit reference's own distance, summed
    return summarise(_scores(distances), local, [16])


def test_a_candidate_is_ruled_out_only_when_the_bootstraps_lower_bound_clears_the_tolerance() -> None:
    """Fails if the rule reads the median (or the mean) of the paired bootstrap instead of its 2.5% bound."""
    # the excess over the closest: large on most prompts, at or below zero on three of eight
    excess = [0.004, 0.0035, 0.0038, 0.0042, 0.004, -0.003, -0.003, 0.0]
    results, _ = _two_candidates(excess)
    mean_excess = sum(excess) / len(excess)
    assert mean_excess > 1e-4 and sorted(excess)[4] > 1e-4  # the mean and the median clear the 1e-4 tolerance
    assert not results["rank-16"].ruled_out  # but the lower bound does not
    results, _ = _two_candidates([0.004] * 8)
    assert results["rank-16"].ruled_out


def test_the_8bit_references_distance_widens_the_tolerance() -> None:
    """Fails if the tolerance ignores the 8-bit reference's own distance from the fine-tune."""
    results, verdict = _two_candidates([0.004] * 8)
    assert results["rank-16"].ruled_out and verdict.tolerance == pytest.approx(1e-4)
    # 8 prompts × 10 tokens: a reference 0.005 nats/token from the fine-tune makes 0.004 indistinguishable
    results, verdict = _two_candidates([0.004] * 8, tolerance_tokens=0.005 * 80)
    assert verdict.tolerance == pytest.approx(0.005) and not results["rank-16"].ruled_out


@pytest.mark.parametrize("arrays", [True, False])
def test_a_request_budget_packs_the_logprob_channel_where_prompt_arrays_work(
    hub: Any, pair: tuple[str, str], serve: Any, arrays: bool
) -> None:
    from tests.openai_server import vocabulary_prompts

    server = serve("rank-8", prompt_arrays=arrays)
    texts = list(vocabulary_prompts(server.tokenizer, 36))
    probe = _probe(hub, pair, server, texts, max_requests=6, max_retries=0)
    plan = probe.plan()
    assert plan.max_requests == 6 and "8 prompts per request" in plan.describe()
    report = run_to_end(probe)
    assert report.requests["sent"] == len(server.requests) <= 6
    assert report.status == "complete" and report.verdict.closest == "rank-8"
    scored = len(report.prompts)
    five = _probe(hub, pair, serve("rank-8", prompt_arrays=arrays), texts, max_requests=5, max_retries=0)
    assert "prompts per request" not in five.plan().describe()  # 5: a refusal would leave too few
    if arrays:  # one prompt finds the channel, then five arrays hold the other 35
        assert scored == 36 and report.requests["prompts_unsent"] == 0
        assert isinstance(server.requests[1].body["prompt"], list)
    else:  # the first array is refused (one request), then one prompt per request: 5, enough for a verdict
        assert scored == 5 and report.requests["prompts_unsent"] == 31 and report.verdict.matches
        assert any("prompt arrays refused" in t["outcome"] for t in report.channels_tried)


def test_an_extraction_served_on_a_quantized_base_is_its_own_candidate(
    hub: Any, pair: tuple[str, str], serve: Any
) -> None:
    """A LoRA provider whose base is fp8 computes fp8(W_base) + B·A: named as the rank-8 extraction on an
    fp8 base, never as the original, and closer than the plain rank-8 candidate."""
    report = run_to_end(_probe(hub, pair, serve("rank-8@fp8"), quantized=("base:fp8",)))
    assert report.verdict.closest == "rank-8@fp8", report.verdict.sentence
    assert report.candidates["rank-8@fp8"].distance < 1e-6 < report.candidates["rank-8"].distance
    assert report.verdict.sentence.startswith("Closest to a rank-8 extraction")
    assert report.candidates["rank-8@fp8"].rank == 8


def test_a_probe_document_round_trips_and_damage_is_one_clear_error(
    hub: Any, pair: tuple[str, str], serve: Any
) -> None:
    """``ProbeReport.from_dict`` is the one boundary for stored, downloaded and published checks:
    the JSON reads back to the same document; a foreign or damaged one is a ReportFormatError
    naming the field (never a KeyError or TypeError)."""
    import json

    from lorafid.errors import ReportFormatError
    from lorafid.providers.probe_report import ProbeReport

    loaded = json.loads(run_to_end(_probe(hub, pair, serve("rank-12"))).to_json())
    again = ProbeReport.from_dict(loaded)
    assert json.loads(again.to_json()) == loaded and again.verdict is not None and again.verdict.rank_range is not None
    with pytest.raises(ReportFormatError, match="Not a lorafid provider check"):
        ProbeReport.from_dict({**loaded, "schema": "lorafid.report/1"})
    broken = json.loads(json.dumps(loaded))
    del broken["candidates"]["rank-8"]["distance"]
    with pytest.raises(ReportFormatError, match=r"missing field 'candidates\.rank-8\.distance'"):
        ProbeReport.from_dict(broken)
    with pytest.raises(ReportFormatError, match="missing field 'verdict'"):
        ProbeReport.from_dict({k: v for k, v in loaded.items() if k != "verdict"})


def test_a_probe_reports_progress_as_every_job_does(hub: Any, pair: tuple[str, str], serve: Any) -> None:
    """``Probe.run()`` yields ``lorafid.progress.Progress``: every provider answer (from the
    request threads), then every prompt scored locally; ``report()`` only once it has finished."""
    from lorafid.errors import LorafidError
    from lorafid.progress import Progress

    probe = _probe(hub, pair, serve("rank-12"))
    steps = probe.run()
    first = next(steps)
    assert isinstance(first, Progress) and first.stage == "provider" and first.done == 1
    with pytest.raises(LorafidError, match="has not finished"):
        probe.report()
    rest = [first, *steps]
    stages = [s.stage for s in rest]
    assert stages == sorted(stages, key=["provider", "local"].index)  # every answer before any scoring
    provider = [s for s in rest if s.stage == "provider"]
    local = [s for s in rest if s.stage == "local"]
    assert [s.done for s in provider] == list(range(1, len(provider) + 1)) and provider[-1].total == len(provider)
    assert local and local[-1].done == local[-1].total == len(probe.report().prompts)


def test_grid_within_the_full_rank_and_the_notes_at_its_edges() -> None:
    from lorafid.providers.evidence import grid_notes, grid_within

    assert grid_within((16, 32, 64, 128), 48) == ((16, 32), (64, 128))
    assert grid_within((64, 128), 48) == ((48,), (64, 128))
    assert grid_within((32, 16), None) == ((16, 32), ())
    low = grid_notes("rank-16+extras", (16, 32), (), 48)
    assert "lowest rank checked (16)" in low and "--ranks 4,8,16." in low
    high = grid_notes("rank-32", (16, 32), (64,), 48)
    assert "Ranks 64 are at or above the model's full rank (48)" in high
    assert "highest rank checked (32)" in high and "--ranks 32,48." in high
    assert grid_notes("rank-64", (16, 32, 64), (), None).endswith("--ranks 64,128,256.")
    assert grid_notes("rank-16", (8, 16, 32), (), 48) == ""  # inside the grid: nothing to add
    assert grid_notes(FINETUNE, (8, 16), (), 48) == ""


def test_a_rank_below_the_grid_is_flagged_and_ranks_beyond_full_rank_are_not_run(
    hub: Any, pair: tuple[str, str], serve: Any
) -> None:
    """A server of rank 8 checked with ranks 16-128 on a model of full rank 48: the closest is rank 16
    at the grid's edge, which the verdict says, with ranks to try; 64 and 128 are the fine-tune
    itself, neither candidates nor run. The fine-tune is opened twice (the plan, with its config
    and tokenizer; the forward), not three times."""
    hub.clear_requests()
    report = run_to_end(_probe(hub, pair, serve("rank-8"), ranks=(16, 32, 64, 128)))
    assert len(hub.requests_matching(method="GET", path_contains=f"/api/models/{pair[1]}")) == 2
    assert report.verdict.closest == "rank-16"
    assert "lowest rank checked (16)" in report.verdict.sentence and "--ranks 4,8,16" in report.verdict.sentence
    assert "Ranks 64, 128 are at or above the model's full rank (48)" in report.verdict.sentence
    assert not any(name.startswith(("rank-64", "rank-128")) for name in report.candidates)
    assert report.settings["ranks"] == [16, 32, 64, 128] and report.settings["ranks_run"] == [16, 32]
    assert report.settings["full_rank"] == 48


# -- a coarse grid, refined around the evidence ------------------------------------------------


def _place(name: str) -> tuple[float, float]:
    """A candidate on a plane: along the path (originals 0, ranks high to low 1..6, base 7) and
    across the serving modes (the extras' mode nearer the fine-tune, the multi-LoRA one the base)."""
    from lorafid.providers.evidence import is_original, parse_candidate

    if is_original(name):
        return (0.1 * [FINETUNE, FINETUNE_8BIT, "finetune-int4-g128"].index(name), 1.0)
    if name == BASE:
        return (7.0, 0.0)
    rank, keep = parse_candidate(name)
    assert rank is not None
    return (1.0 + [512, 256, 128, 64, 32, 16].index(rank), 1.0 if keep else 0.0)


def _search(served: str, ranks: Any, quantized: Any) -> tuple[list[str], str]:
    """The refined grid's passes against a provider serving ``served``, on ``_place``'s plane."""
    from lorafid.providers.refine import coarse_names, still_needed

    scored = coarse_names(ranks, quantized)
    while True:
        x, y = _place(served)
        distance = {n: abs(_place(n)[0] - x) + 0.5 * abs(_place(n)[1] - y) for n in scored}
        closest = min(scored, key=lambda n: distance[n])
        toward = min((FINETUNE, BASE), key=lambda n: abs(_place(n)[0] - x) + 0.5 * abs(_place(n)[1] - y))
        todo = still_needed(closest, [closest], scored, ranks, quantized, toward)
        if not todo:
            return scored, closest
        scored = [*scored, *todo]


def test_the_default_check_scores_about_eight_of_sixteen_candidates_and_finds_the_served_one() -> None:
    """Fails if the first pass grows (e.g. every other rank in both serving modes) or a pass scores
    more than the search needs (both of a rank's neighbours where the nearer end says which way to
    go): for the default ranks and candidates, whichever candidate a provider serves (on a plane
    where distances grow away from it), the passes find it, with its whole neighbourhood scored,
    in 8 forwards on average and 10 at most."""
    from lorafid.providers.probe import DEFAULT_QUANTIZED, DEFAULT_RANKS
    from lorafid.providers.refine import coarse_names, neighbourhood

    every = candidate_names(DEFAULT_RANKS, DEFAULT_QUANTIZED)
    assert len(every) == 16
    first = [FINETUNE, FINETUNE_8BIT, "rank-64", "rank-64+extras", BASE]
    assert coarse_names(DEFAULT_RANKS, DEFAULT_QUANTIZED) == first
    counts = []
    for served in every:
        scored, closest = _search(served, DEFAULT_RANKS, DEFAULT_QUANTIZED)
        assert closest == served and len(scored) == len(set(scored)), (served, scored)
        assert set(neighbourhood(served, DEFAULT_RANKS, DEFAULT_QUANTIZED)) <= set(scored)
        counts.append(len(scored))
    assert max(counts) <= 10 and sum(counts) <= 8 * len(counts), counts
    assert _search("rank-32", DEFAULT_RANKS, DEFAULT_QUANTIZED)[0] == [*first, "rank-32", "rank-16", "rank-32+extras"]
    assert neighbourhood("rank-16", (4, 8, 16, 32)) == ["rank-32", "rank-16+extras", "rank-8"]
    assert neighbourhood(BASE, (4, 8, 16, 32)) == ["rank-4", "rank-4+extras"]
    assert set(neighbourhood(FINETUNE, (4, 8, 16, 32), ("int4-g128",))) == {
        FINETUNE_8BIT,
        "finetune-int4-g128",
        "rank-32",
        "rank-32+extras",
    }


@pytest.mark.parametrize("mode", ["rank-8", "rank-8+extras", "rank-12", "rank-16", "rank-64", "finetune", "base"])
def test_the_refined_grid_gives_the_full_grids_verdict_at_fewer_forwards(
    hub: Any, pair: tuple[str, str], serve: Any, mode: str
) -> None:
    """The same verdict (sentence up to the note on what was scored, closest, rank interval,
    candidates held) and the same distances as scoring every candidate, on the loopback servers;
    the default check (one quantized copy besides the 8-bit reference) runs at most 8 of the
    full grid's 12 forwards. Fails if the passes score a candidate differently (the reads kept
    between them, merged results) or stop before the verdict's neighbours are scored."""
    server = serve(mode)
    texts = _texts(server)
    full = run_to_end(_probe(hub, pair, server, texts, full_grid=True))
    refined = run_to_end(_probe(hub, pair, server, texts))
    assert full.settings["forward_equivalents"] == len(full.candidates) == 12 and full.settings["passes"] == 1
    assert refined.settings["forward_equivalents"] == len(refined.candidates) <= 8
    # the pair is small: its weights are kept between the passes, so each model is read once
    assert refined.settings["passes"] > 1
    assert refined.settings["weight_bytes_read"] == full.settings["weight_bytes_read"] > 0
    assert refined.settings["candidates_scored"] == list(refined.candidates)
    assert set(refined.settings["candidates_not_scored"]) == set(full.candidates) - set(refined.candidates)
    same = ("closest", "matches", "consistent", "rank_range")
    assert {k: getattr(refined.verdict, k) for k in same} == {k: getattr(full.verdict, k) for k in same}
    assert refined.verdict.sentence.startswith(full.verdict.sentence)
    assert f"Scored {len(refined.candidates)} of 12 candidates" in refined.verdict.sentence
    for name, candidate in refined.candidates.items():
        assert candidate.distance == pytest.approx(full.candidates[name].distance, rel=1e-6, abs=1e-9)
        assert candidate.ruled_out == full.candidates[name].ruled_out


def test_a_pair_too_large_to_keep_between_passes_is_scored_in_one_pass_and_read_once(
    hub: Any, pair: tuple[str, str], serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where both models' weights cannot be kept between passes (a real model), the whole grid is
    scored in one pass: each model is read once, never once per pass. Fails if the refined grid
    runs anyway (it would read the weights again for every pass)."""
    import lorafid.providers.passes as passes_module

    server = serve("rank-12")
    texts = _texts(server)
    full = run_to_end(_probe(hub, pair, server, texts, full_grid=True))
    monkeypatch.setattr(passes_module, "KEEP_READS_BYTES", 1)  # this pair now counts as too large to keep
    large = run_to_end(_probe(hub, pair, server, texts))
    assert large.settings["passes"] == 1 and large.settings["candidates_not_scored"] == []
    assert large.settings["weight_bytes_read"] == full.settings["weight_bytes_read"] > 0
    assert large.verdict is not None and full.verdict is not None
    assert large.verdict.sentence == full.verdict.sentence


@pytest.mark.parametrize("channel", [None, "completions-text"])
def test_a_model_named_with_its_revision_is_checked_at_the_commit_the_plan_resolved(
    hub: Any, pair: tuple[str, str], serve: Any, channel: str | None
) -> None:
    """``org/base@main`` failed once the plan had pinned the commit: the scoring pass opened the
    spec with its own @main and the pinned SHA ("names revision 'main' but … was also given")."""
    server = serve("rank-8")
    options: dict[str, Any] = {"channel": channel, "max_requests": 2} if channel else {}
    probe = _probe(hub, (pair[0] + "@main", pair[1]), server, **options)
    report = run_to_end(probe)
    assert report.verdict is not None and report.status == "complete"
    assert report.base["revision"] == "main" and len(report.base["sha"]) == 40


def test_a_large_local_pair_is_refined_reading_its_files_again_and_decomposing_once(
    hub: Any,
    pair: tuple[str, str],
    family: Any,
    serve: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    decompositions: list[Any],
) -> None:
    """Models too large to keep between passes but read from local files: the refined grid runs
    anyway, each pass reads the files again (the disk, not the network), and the Δ directions of
    the first pass (up to the grid's largest rank) serve every later one: no matrix is
    decomposed twice. The verdict and distances are the full grid's. Fails if such a pair is
    scored in one pass (the Hub rule applied to local files) or a later pass decomposes again."""
    import lorafid.providers.passes as passes_module
    from tests.llama_models import write_model

    local = (str(write_model(family.base, tmp_path / "base")), str(write_model(family.full, tmp_path / "full")))
    server = serve("rank-12")
    texts = _texts(server)
    full = run_to_end(_probe(hub, local, server, texts, full_grid=True))
    monkeypatch.setattr(passes_module, "KEEP_READS_BYTES", 1)  # too large to keep the weights
    decompositions.clear()
    refined = run_to_end(_probe(hub, local, server, texts))
    passes = refined.settings["passes"]
    assert passes > 1 and refined.settings["forward_equivalents"] < full.settings["forward_equivalents"]
    assert refined.settings["weight_bytes_read"] == passes * full.settings["weight_bytes_read"]
    carried = 7 * 2  # q, k, v, o, gate, up, down in each of the 2 blocks
    assert len(decompositions) == carried, decompositions  # the first pass only, at the grid's largest rank
    same = ("closest", "matches", "consistent", "rank_range")
    assert {k: getattr(refined.verdict, k) for k in same} == {k: getattr(full.verdict, k) for k in same}
    for name, candidate in refined.candidates.items():
        assert candidate.distance == pytest.approx(full.candidates[name].distance, rel=1e-6, abs=1e-9)

    # The same pair from the Hub, or local directions too large to keep: one pass, read once.
    monkeypatch.setattr(passes_module, "KEEP_DIRECTIONS_BYTES", 1)
    one_pass = run_to_end(_probe(hub, local, server, texts))
    assert one_pass.settings["passes"] == 1
    assert one_pass.settings["weight_bytes_read"] == full.settings["weight_bytes_read"]


def test_a_second_probe_of_a_pair_takes_its_directions_from_the_cache_with_the_same_verdict(
    hub: Any, pair: tuple[str, str], serve: Any, tmp_path: Path, decompositions: list[Any]
) -> None:
    """With a direction cache, a second probe of the pair (another provider, another day) decomposes
    no matrix: every direction comes from the first probe's entries, and the verdict and distances
    are the first's. Fails if the probe does not hand its cache to the forward."""
    from lorafid.behaviour.direction_cache import DirectionCache

    server = serve("rank-12")
    texts = _texts(server)
    cache = DirectionCache(tmp_path / "directions")
    first = run_to_end(_probe(hub, pair, server, texts, direction_cache=cache))
    carried = 7 * 2  # q, k, v, o, gate, up, down in each of the 2 blocks
    assert first.settings["matrices_from_direction_cache"] == 0
    assert len(list(cache.directory.glob("*.safetensors"))) == carried
    decompositions.clear()
    second = run_to_end(_probe(hub, pair, server, texts, direction_cache=cache))
    assert decompositions == [] and second.settings["matrices_from_direction_cache"] == carried
    same = ("closest", "matches", "consistent", "rank_range", "sentence")
    assert {k: getattr(second.verdict, k) for k in same} == {k: getattr(first.verdict, k) for k in same}
    for name, candidate in second.candidates.items():
        assert candidate.distance == first.candidates[name].distance


def test_an_interruption_after_the_first_pass_keeps_the_candidates_scored_and_says_so(
    hub: Any, pair: tuple[str, str], serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped while scoring the second pass: the report keeps every prompt of the first (the
    coarse grid), is partial, and names no unscored candidate as scored, held or ruled out."""
    import lorafid.providers.probe as probe_module
    from lorafid.providers.refine import coarse_names

    calls = []
    scoring = probe_module.score_candidates

    def stopped_in_the_second_pass(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["names"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        yield from scoring(*args, **kwargs)

    monkeypatch.setattr(probe_module, "score_candidates", stopped_in_the_second_pass)
    report = run_to_end(_probe(hub, pair, serve("rank-16")))
    first = coarse_names(RANKS, ("int4-g128",))
    assert len(calls) == 2 and list(calls[0]) == first and report.settings["passes"] == 1
    assert report.status == "partial" and report.error == "interrupted while scoring the candidates"
    assert list(report.candidates) == report.settings["candidates_scored"] == first and len(report.prompts) == 8
    assert set(report.verdict.consistent) <= set(first)
    assert "not scored" in report.verdict.sentence and "rank-16" in report.settings["candidates_not_scored"]


def test_cli_probe_full_grid_scores_every_candidate_in_one_pass(
    hub: Any, pair: tuple[str, str], serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """``--full-grid`` keeps the one-pass check (fails if the flag does not reach the probe)."""
    from lorafid.cli.commands import main

    server = serve("rank-16")
    prompts = _prompt_file(server, tmp_path, 6)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    arguments = ["--model", "tiny-served", *pair, "--ranks", "4,8,16,32", "--prompts", str(prompts), "--quiet"]
    documents = []
    for extra in ([], ["--full-grid"]):
        out = tmp_path / f"probe{len(extra)}.json"
        assert main(["probe", "--endpoint", server.url, *arguments, "--out", str(out), *extra]) == 0
        documents.append(json.loads(out.read_text())["settings"])
    refined, full = documents
    assert full["forward_equivalents"] == 12 and full["passes"] == 1 and full["candidates_not_scored"] == []
    assert refined["forward_equivalents"] <= 8 and refined["passes"] > 1 and refined["candidates_not_scored"]
    assert "a coarse grid first" in capsys.readouterr().err
