"""Read log-probabilities of fixed texts from an OpenAI-compatible endpoint, politely.

Three ways ("channels") to read them, as servers offer them, best first:

``completions-echo``
    ``POST {endpoint}/completions`` with ``echo: true, max_tokens: 0, logprobs: k`` (what
    lm-evaluation-harness sends to score a text). The answer's ``choices[0].logprobs`` has, per
    prompt token, ``tokens[i]`` (text), ``token_logprobs[i]`` (``null`` for the first token, which
    has no context) and ``top_logprobs[i]`` (``{token text: logprob}``, the k most likely next
    tokens plus the prompt's own, ``null`` for the first), and ``text_offset[i]``.
``prompt-logprobs``
    vLLM's extension: ``prompt_logprobs: k`` (and ``return_token_ids: true``) on the same
    endpoint; ``choices[0].prompt_logprobs`` is ``[null, {"<token id>": {"logprob", "rank",
    "decoded_token"}}, ...]``, the prompt token first in each map, with token ids, not texts.
``chat-top-logprobs``
    ``POST {endpoint}/chat/completions`` with ``temperature: 0, logprobs: true,
    top_logprobs: k``: a greedy continuation of the text as a user turn, whose
    ``choices[0].logprobs.content[j]`` gives ``token``, ``logprob`` and ``top_logprobs`` (a list
    of ``{token, logprob, bytes}``). The caller scores that continuation locally.

Politeness: every attempt (first tries, retries, redirects) draws from one ``RequestBudget``
fixed before anything is sent; ``RateLimiter`` spaces request starts; 429 and 5xx answers and
dropped connections are retried with bounded exponential backoff (``Retry-After`` honoured).
Redirects are followed only for 307/308 (they keep the POST), at most 3, each target checked
by the ``NetPolicy``; the key is dropped when a redirect leaves the endpoint's origin.

The API key goes only into the ``Authorization`` header: never into messages, logs, reprs.
Nor does a provider's own error text go anywhere (it may echo the key or the URL's path, and
messages end up in stored and published checks): an error says the status code and a fixed
description (``describe_status``). The text is only read to tell a model the endpoint does not
serve (said with the name the user gave) from a request it refuses.

Not here: which texts to send, tokenizers, any comparison (``lorafid.providers.probe``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx2

from lorafid import __version__
from lorafid.errors import ChannelUnsupportedError, LimitExceededError, ProviderError
from lorafid.providers.netguard import GuardedTransport, NetPolicy
from lorafid.retry import RetryPolicy, Transient, retry_after_s, with_retries

log = logging.getLogger(__name__)

ECHO = "completions-echo"
PROMPT_LOGPROBS = "prompt-logprobs"
CHAT = "chat-top-logprobs"
CHANNELS: tuple[str, ...] = (ECHO, PROMPT_LOGPROBS, CHAT)
"""Every channel, in the order they are tried."""

MAX_RESPONSE_BYTES = 32 * 2**20  # a 2,000-token echo with 20 alternatives is ~1 MB of JSON
MAX_REDIRECTS = 3
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
# llama-cpp-python answers a request its schema refuses with 500 "validation error".
_PERMANENT_500 = re.compile(r"not supported|unsupported|not implemented|not allowed|invalid|validation error", re.I)
# connect 10 s; read 120 s: a loaded provider can take a minute on a long prompt.
_TIMEOUT = httpx2.Timeout(connect=10.0, read=120.0, write=30.0, pool=120.0)


@dataclass(frozen=True)
class Alternative:
    """One of the provider's most likely tokens at a position."""

    token: str  # the provider's text for it ("token_id:N" when it speaks in ids)
    token_id: int | None  # known when the channel gives ids
    logprob: float


@dataclass(frozen=True)
class Position:
    """One token as the provider scored it: the token, its log-probability, the alternatives.

    ``logprob`` is None where the provider gives none (the first token of a prompt).
    """

    token: str
    token_id: int | None
    logprob: float | None
    top: tuple[Alternative, ...]


@dataclass(frozen=True)
class ProviderAnswer:
    """What one request gave: the scored positions of the prompt (or of the continuation)."""

    channel: str
    positions: tuple[Position, ...]
    text: str  # the continuation's text (chat), or the echoed prompt (completions)
    prompt_tokens: int | None = None  # the provider's own count (``usage.prompt_tokens``), where given


class RequestBudget:
    """A hard cap on HTTP attempts, shared by every thread; ``take()`` before each one."""

    def __init__(self, max_requests: int) -> None:
        self.max_requests = max_requests
        self.used = 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.used >= self.max_requests:
                raise LimitExceededError(
                    f"The probe used all {self.max_requests} requests it announced; it keeps what it got. "
                    "Raise --max-retries or lower --concurrency if the endpoint is rate limiting."
                )
            self.used += 1


class RateLimiter:
    """Spaces request starts at least ``1 / rate_per_s`` seconds apart, across threads.

    Example: at 2 per second, four requests asked for at once start at 0, 0.5, 1.0 and 1.5 s.
    """

    def __init__(
        self,
        rate_per_s: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._interval_s = 1.0 / rate_per_s if rate_per_s else 0.0
        self._next_s = -math.inf
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self._interval_s:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next_s)
            self._next_s = start + self._interval_s
        if start > now:
            self._sleep(start - now)


class OpenAIClient:
    """POSTs JSON to one OpenAI-compatible endpoint (e.g. ``https://api.example.com/v1``).

    Thread-safe. ``transport`` replaces the HTTP transport (tests); under a restricted
    ``policy`` the default transport checks every connection's address.
    """

    def __init__(
        self,
        endpoint: str,
        api_key: str | None,
        *,
        budget: RequestBudget,
        policy: NetPolicy | None = None,
        rate: RateLimiter | None = None,
        retry: RetryPolicy | None = None,
        transport: httpx2.BaseTransport | None = None,
    ) -> None:
        self.policy = policy or NetPolicy.open()
        self.policy.check_url(endpoint)
        self.endpoint = endpoint.rstrip("/")
        self.budget, self.rate, self.retry = budget, rate or RateLimiter(None), retry or RetryPolicy()
        self._key = api_key
        if transport is None and self.policy.restricted:
            transport = GuardedTransport(self.policy)
        self._client = httpx2.Client(
            timeout=_TIMEOUT,
            follow_redirects=False,
            trust_env=not self.policy.restricted,
            transport=transport,
            headers={"User-Agent": f"lorafid/{__version__}", "Accept-Encoding": "identity"},
        )

    def __repr__(self) -> str:
        return f"OpenAIClient({self.endpoint!r})"  # never the key

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, channel: str, model: str, text: str, *, top_k: int, max_new_tokens: int) -> ProviderAnswer:
        """One request on ``channel`` for ``text``; the parsed positions.

        Raises: ``ChannelUnsupportedError`` when the endpoint rejects the request (4xx other
        than 401/403/429) or answers without the fields the channel needs; ``ProviderError``
        for other failures after retries; ``LimitExceededError`` when the budget is spent.
        """
        if channel == ECHO:
            return parse_echo(self.post("/completions", _prompt_body(channel, model, text, top_k)), channel)
        if channel == PROMPT_LOGPROBS:
            return parse_prompt_logprobs(self.post("/completions", _prompt_body(channel, model, text, top_k)))
        if channel == CHAT:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": max_new_tokens,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": top_k,
            }
            return parse_chat(self.post("/chat/completions", body))
        raise ValueError(f"unknown channel {channel!r}")

    def read_many(self, channel: str, model: str, texts: Sequence[str], *, top_k: int) -> list[ProviderAnswer]:
        """One request for several prompts (a ``prompt`` array) on ``echo`` or ``prompt_logprobs``.

        Tried once, without retries: an endpoint that refuses arrays (or answers another number
        of choices) raises ``ChannelUnsupportedError`` having cost one request, and the caller
        goes on one prompt at a time.
        """
        if channel not in (ECHO, PROMPT_LOGPROBS):
            raise ValueError(f"prompt arrays apply to {ECHO} and {PROMPT_LOGPROBS}, not {channel!r}")
        body = _prompt_body(channel, model, list(texts), top_k)
        try:
            payload = self.post("/completions", body, retry=RetryPolicy(max_tries=1))
        except ProviderError as e:
            if isinstance(e, ChannelUnsupportedError):
                raise
            raise ChannelUnsupportedError(f"prompt arrays failed ({e})") from None
        choices = payload.get("choices")
        if not isinstance(choices, list) or len(choices) != len(texts):
            count = len(choices) if isinstance(choices, list) else 0
            raise ChannelUnsupportedError(f"the answer has {count} choices for {len(texts)} prompts")
        ordered = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
        parse = parse_echo if channel == ECHO else parse_prompt_logprobs
        # usage counts every prompt together: the BOS check falls back to the echoed tokens.
        return [parse({"choices": [choice]}) for choice in ordered]

    def post(self, path: str, body: Mapping[str, Any], *, retry: RetryPolicy | None = None) -> dict[str, Any]:
        """POST ``body`` as JSON to ``endpoint + path``, retrying transient failures
        (under ``retry`` instead of the client's policy where given)."""
        url = self.endpoint + path

        def give_up(tries: int, last: Transient) -> ProviderError:
            return ProviderError(
                f"{_host(url)} kept failing ({last}) after {tries} tries; try again later (the command line's "
                "--concurrency and --rate lower the pace)."
            )

        return with_retries(
            lambda: self._post_following(url, body, str(body.get("model", ""))),
            retry or self.retry,
            what=f"{_host(url)} {path}",
            give_up=give_up,
        )

    def _post_following(self, url: str, body: Mapping[str, Any], model: str = "") -> dict[str, Any]:
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            self.budget.take()
            self.rate.wait()
            headers = {"Content-Type": "application/json"}
            if self._key and _origin(url) == origin:
                headers["Authorization"] = f"Bearer {self._key}"
            try:
                with self._client.stream("POST", url, content=json.dumps(body).encode(), headers=headers) as response:
                    status = response.status_code
                    if status in (307, 308) and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        self.policy.check_url(url)
                        continue
                    raw = _read_capped(response)
            except (httpx2.TransportError, _TooLarge) as e:
                if isinstance(e, _TooLarge):
                    raise ProviderError(f"{_host(url)} answered more than {MAX_RESPONSE_BYTES} bytes.") from None
                if isinstance(e, httpx2.ConnectError):  # nothing listens there: retrying will not help
                    unknown = any(w in str(e) for w in ("Name or service", "nodename", "getaddrinfo", "resolve"))
                    why = "no such host" if unknown else "connection refused"
                    raise ProviderError(
                        f"{_shown(url)}: {why}: check the URL (host and port) and that the server runs."
                    ) from None
                raise Transient(type(e).__name__) from None
            return _decode(status, raw, url, response.headers.get("retry-after"), model)
        raise ProviderError(f"{_host(url)} redirected more than {MAX_REDIRECTS} times.")


# -- response shapes -------------------------------------------------------------------------


def parse_echo(payload: Mapping[str, Any], channel: str = ECHO) -> ProviderAnswer:
    """``choices[0].logprobs`` of a completions answer with ``echo`` as positions."""
    choice = _first_choice(payload)
    lp = choice.get("logprobs")
    if not isinstance(lp, dict) or not isinstance(lp.get("tokens"), list):
        raise ChannelUnsupportedError("the completions answer has no logprobs.tokens (echo not supported)")
    tokens, values, tops = lp["tokens"], lp.get("token_logprobs"), lp.get("top_logprobs")
    if not isinstance(values, list) or not isinstance(tops, list) or not len(tokens) == len(values) == len(tops):
        raise ChannelUnsupportedError("logprobs.tokens, token_logprobs and top_logprobs differ in length")
    positions = []
    for token, value, top in zip(tokens, values, tops, strict=True):
        alternatives = tuple(
            Alternative(str(t), _id_of(str(t)), _float(v)) for t, v in (top.items() if isinstance(top, dict) else ())
        )
        positions.append(
            Position(str(token), _id_of(str(token)), None if value is None else _float(value), alternatives)
        )
    usage = payload.get("usage")
    counted = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    prompt_tokens = counted if isinstance(counted, int) and not isinstance(counted, bool) else None
    return ProviderAnswer(channel, tuple(positions), str(choice.get("text", "")), prompt_tokens)


def parse_prompt_logprobs(payload: Mapping[str, Any]) -> ProviderAnswer:
    """vLLM's ``choices[0].prompt_logprobs`` (token ids as keys) as positions."""
    choice = _first_choice(payload)
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list) or not entries:
        raise ChannelUnsupportedError("the completions answer has no prompt_logprobs")
    ids = choice.get("prompt_token_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) != len(entries)):
        raise ChannelUnsupportedError("prompt_token_ids and prompt_logprobs differ in length")
    positions = []
    for i, entry in enumerate(entries):
        if entry is None:
            token_id = int(ids[i]) if ids is not None else None
            positions.append(Position(f"token_id:{token_id}", token_id, None, ()))
            continue
        if not isinstance(entry, dict) or not entry:
            raise ChannelUnsupportedError(f"prompt_logprobs[{i}] is not a map of token ids")
        alternatives = tuple(
            Alternative(str(v.get("decoded_token", k)), int(k), _float(v["logprob"])) for k, v in entry.items()
        )
        # vLLM puts the prompt's own token first in each map; prompt_token_ids says it outright.
        token_id = int(ids[i]) if ids is not None else alternatives[0].token_id
        own = next((a for a in alternatives if a.token_id == token_id), None)
        if own is None:
            raise ChannelUnsupportedError(f"prompt_logprobs[{i}] lacks the prompt's own token")
        positions.append(Position(own.token, token_id, own.logprob, alternatives))
    return ProviderAnswer(PROMPT_LOGPROBS, tuple(positions), "")


def parse_chat(payload: Mapping[str, Any]) -> ProviderAnswer:
    """``choices[0].logprobs.content`` of a chat answer as positions of the continuation."""
    choice = _first_choice(payload)
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, dict) else None
    if not isinstance(content, list):
        raise ChannelUnsupportedError("the chat answer has no logprobs.content (top_logprobs not supported)")
    positions = []
    for item in content:
        top = item.get("top_logprobs") or []
        alternatives = tuple(Alternative(str(a["token"]), _id_of(str(a["token"])), _float(a["logprob"])) for a in top)
        token = str(item["token"])
        positions.append(Position(token, _id_of(token), _float(item["logprob"]), alternatives))
    message = choice.get("message") or {}
    return ProviderAnswer(CHAT, tuple(positions), str(message.get("content") or ""))


# -- plumbing --------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


def _prompt_body(channel: str, model: str, prompt: str | list[str], top_k: int) -> dict[str, Any]:
    """A ``/completions`` request scoring ``prompt`` (one text, or an array) on echo or prompt_logprobs."""
    # max_tokens 1, not 0: llama.cpp's server reads 0 as "until the context is full".
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    if channel == ECHO:
        body.update(echo=True, logprobs=top_k)
    else:
        body.update(prompt_logprobs=top_k, return_token_ids=True)
    return body


def _read_capped(response: httpx2.Response) -> bytes:
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


STATUS_WORDS: dict[int, str] = {
    400: "bad request: the endpoint does not accept this request",
    404: "not found: the endpoint has no such path or model",
    405: "method not allowed",
    408: "request timeout",
    409: "conflict",
    413: "request too large",
    415: "unsupported media type",
    422: "unprocessable request: the endpoint does not accept these parameters",
    500: "server error: the endpoint does not support this request",
    501: "not implemented",
}
"""The fixed words said of a status; a provider's own error text is never kept (it may echo secrets)."""
# A provider saying the model is unknown (vLLM: "The model `x` does not exist.", OpenAI:
# "model_not_found"): read to choose the words, never repeated.
_UNKNOWN_MODEL = re.compile(
    r"model_not_found|(unknown|no such|invalid|unsupported) model|model\b[^.]{0,120}\b"
    r"(does not exist|doesn't exist|not found|not exist|is not available|is not served|is not supported)",
    re.I,
)


def describe_status(status: int) -> str:
    """``HTTP 404 (not found: ...)``: the status and fixed words, never the provider's text."""
    return f"HTTP {status} ({STATUS_WORDS.get(status, 'client error' if status < 500 else 'server error')})"


def _decode(status: int, raw: bytes, url: str, retry_after: str | None, model: str = "") -> dict[str, Any]:
    if status in _RETRY_STATUS:
        message = _server_message(raw)
        # A server error that names something unsupported will say the same on every try
        # (llama.cpp: "logprobs is not supported for models created with logits_all=False").
        if status == 500 and _PERMANENT_500.search(message):
            raise ChannelUnsupportedError(describe_status(500))
        raise Transient(f"HTTP {status}", retry_after_s(retry_after))
    if status in (401, 403):
        raise ProviderError(
            f"{_host(url)} refused the API key (HTTP {status}); check --api-key-env names a variable holding it."
        )
    if status in (400, 404, 422) and model and _UNKNOWN_MODEL.search(_server_message(raw)):
        raise ProviderError(
            f"The endpoint does not serve model {model[:100]!r} (HTTP {status}): check the model name it lists "
            "(GET /v1/models)."
        )
    if status >= 400:
        raise ChannelUnsupportedError(describe_status(status))
    if status != 200:
        raise ProviderError(f"{_host(url)} answered HTTP {status}, expected 200.")
    try:
        payload = json.loads(raw)
    except ValueError:
        raise ProviderError(f"{_host(url)} answered something that is not JSON.") from None
    if not isinstance(payload, dict):
        raise ProviderError(f"{_host(url)} answered JSON that is not an object.")
    return payload


def _server_message(raw: bytes) -> str:
    """The error text a server sent (OpenAI: {"error": {"message"}}; vLLM: {"message"}), shortened,
    with its ``code`` / ``type``: for classifying only, never to be shown or stored."""
    try:
        payload = json.loads(raw)
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        text = error.get("message", error) if isinstance(error, dict) else error
        if isinstance(error, dict):
            text = f"{text} {error.get('code', '')} {error.get('type', '')}"
    except ValueError:
        text = raw.decode("utf-8", "replace")
    return str(text)[:400]


def _first_choice(payload: Mapping[str, Any]) -> dict[str, Any]:
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ChannelUnsupportedError("the answer has no choices")
    return choices[0]


def _id_of(token: str) -> int | None:
    """The id in vLLM's ``token_id:N`` form (``return_tokens_as_token_ids``), else None."""
    if token.startswith("token_id:") and token[9:].isdigit():
        return int(token[9:])
    return None


def _float(value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ChannelUnsupportedError("a log-probability in the answer is not a number")  # its text is not kept
    return float(value)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port


def _host(url: str) -> str:
    return urlsplit(url).hostname or "the endpoint"


def _shown(url: str) -> str:
    """scheme://host:port of a URL, for messages: never its path, query or user info."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}"
