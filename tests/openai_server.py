"""An OpenAI-compatible server on 127.0.0.1 serving a tiny causal LM, for offline probe tests.

It answers as vLLM does (``vllm/entrypoints/openai/completion/serving.py`` and
``chat_completion/serving.py``):

- ``POST /v1/completions`` with ``echo: true, max_tokens: 0, logprobs: k``: the prompt's
  tokens in ``choices[0].logprobs`` (``tokens``, ``token_logprobs`` with ``null`` first,
  ``top_logprobs`` with the prompt's own token first then the top k, ``null`` first,
  ``text_offset``), and the same numbers as ``prompt_logprobs``;
- ``prompt_logprobs: k`` (vLLM's extension): ``choices[0].prompt_logprobs`` =
  ``[null, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]``, plus ``prompt_token_ids``
  when ``return_token_ids`` is true;
- ``POST /v1/chat/completions`` with ``logprobs: true, top_logprobs: k``: a greedy
  continuation of the chat-templated messages, ``choices[0].logprobs.content[j]`` =
  ``{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}``.

The numbers come from a plain whole-model ``transformers`` forward of the served weights
(``served_weights`` builds them with ``lorafid.audit.spectrum.decompose`` for a rank-r extraction,
or rounds them to 8 bits here, independently of ``lorafid.providers.probe``): a reference that shares
nothing with the layer-streamed engine the probe uses.

``OpenAIServer(reject_echo=True)`` answers ``echo`` with 400 as chat-only providers do;
``vllm_extensions=False`` ignores ``prompt_logprobs`` and ``return_token_ids`` (OpenAI's own API);
``chat_only=True`` answers 404 on ``/v1/completions``; ``status_sequence`` sends those
statuses first (with ``Retry-After: 0``), ``fail_after=N`` answers 503 to every request after
the N-th (a provider going down mid-probe); ``token_shift`` reports every token id shifted by
that much (a server with another vocabulary). Every request is recorded in ``requests``.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lorafid.audit.pairing import is_embedding
from lorafid.audit.spectrum import decompose


def served_weights(
    base: dict[str, torch.Tensor], finetune: dict[str, torch.Tensor], mode: str
) -> dict[str, torch.Tensor]:
    """The weights a provider in ``mode`` runs: "finetune", "base", "finetune-8bit",
    "rank-R" (a multi-LoRA server: base + Δ_R on each block matrix, the rest the base's) or
    "rank-R+extras" (the rest the fine-tune's)."""
    if mode == "finetune":
        return dict(finetune)
    if mode == "base":
        return dict(base)
    if mode == "finetune-8bit":
        return {n: _int8_rows(t) if t.ndim == 2 and ".layers." in n else t for n, t in finetune.items()}
    mode, _, base_quantization = mode.partition("@")  # "rank-8@fp8": the LoRA on an fp8 base
    keep = mode.endswith("+extras")
    rank = int(mode.removeprefix("rank-").removesuffix("+extras"))
    out = {}
    for name, weight in finetune.items():
        if weight.ndim == 2 and not is_embedding(name):
            _, decomposition = decompose(base[name], weight, rank)
            served_base = _fp8_tensor(base[name]) if base_quantization == "fp8" and ".layers." in name else base[name]
            out[name] = served_base + decomposition.truncated(rank)
        else:
            out[name] = weight if keep else base[name]
    return out


def _fp8_tensor(w: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 with one scale for the tensor (448 is e4m3's largest finite value)."""
    scale = w.abs().max() / 448.0
    return (w / scale).to(torch.float8_e4m3fn).to(w.dtype) * scale


def _int8_rows(w: torch.Tensor) -> torch.Tensor:
    step = w.abs().max(dim=1, keepdim=True).values / 127.0
    step[step == 0] = 1.0
    return torch.round(w / step) * step


@dataclass
class Recorded:
    path: str
    body: dict[str, Any]
    authorization: str | None


@dataclass
class _Options:
    reject_echo: bool = False
    chat_only: bool = False
    vllm_extensions: bool = True
    status_sequence: list[int] = field(default_factory=list)
    token_shift: int = 0
    fail_after: int | None = None
    no_logprobs: bool = False
    prompt_arrays: bool = True
    accept_n: bool = True
    sampler_override: dict[str, Any] = field(default_factory=dict)


class OpenAIServer:
    """Serves ``model_name`` with weights ``tensors`` of a model whose repo files are ``files``."""

    def __init__(
        self,
        files: dict[str, bytes],
        tensors: dict[str, torch.Tensor],
        *,
        model_name: str = "tiny-served",
        reject_echo: bool = False,
        chat_only: bool = False,
        vllm_extensions: bool = True,
        status_sequence: list[int] | None = None,
        token_shift: int = 0,
        fail_after: int | None = None,
        no_logprobs: bool = False,
        prompt_arrays: bool = True,
        accept_n: bool = True,
        sampler_override: dict[str, Any] | None = None,
    ) -> None:
        self.model_name = model_name
        self.options = _Options(
            reject_echo,
            chat_only,
            vllm_extensions,
            list(status_sequence or []),
            token_shift,
            fail_after,
            no_logprobs,
            prompt_arrays,
            accept_n,
            dict(sampler_override or {}),
        )
        self.requests: list[Recorded] = []
        self.tokenizer = _tokenizer(files)
        self.model = causal_lm(files, tensors)
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> OpenAIServer:
        handler = type("Handler", (_Handler,), {"app": self})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the model -------------------------------------------------------------------------

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), vocab) next-token log-probabilities, float32: one whole-model forward."""
        logits = self.model(input_ids=torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    def piece(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id + self.options.token_shift]))

    def top(self, row: torch.Tensor, k: int, own: int | None) -> list[tuple[int, float]]:
        """(id, logprob): the position's own token first (as vLLM lists it), then the top k."""
        values, ids = row.topk(k)
        pairs = [(int(i), float(v)) for i, v in zip(ids, values, strict=True)]
        if own is None:
            return pairs
        return [(own, float(row[own]))] + [p for p in pairs if p[0] != own]

    # -- the API ---------------------------------------------------------------------------

    def completions(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.options.chat_only:
            return 404, {"error": {"message": "Not Found", "type": "NotFoundError", "code": 404}}
        if body.get("echo") and self.options.reject_echo:
            return 400, {"error": {"message": "echo is not supported with logprobs", "code": 400}}
        if self.options.no_logprobs and any(body.get(k) is not None for k in ("echo", "logprobs", "prompt_logprobs")):
            return 400, {"error": {"message": "Unsupported parameter: logprobs, echo, prompt_logprobs", "code": 400}}
        if isinstance(body["prompt"], list) and len(body["prompt"]) > 1 and not self.options.prompt_arrays:
            return 400, {"error": {"message": "prompt must be a string", "code": 400}}
        if not body.get("echo") and body.get("prompt_logprobs") is None:
            return self.generate(body)
        if isinstance(body["prompt"], list):  # vLLM: one choice per prompt, in order
            choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            for i, text in enumerate(body["prompt"]):
                status, answer = self.completions({**body, "prompt": text})
                if status != 200:
                    return status, answer
                choices.append({**answer["choices"][0], "index": i})
                usage = {k: usage[k] + answer["usage"][k] for k in usage}
            return 200, {"id": "cmpl-3", "object": "text_completion", "model": self.model_name, "choices": choices,
                         "usage": usage}  # fmt: skip
        ids = self.tokenizer(str(body["prompt"]))["input_ids"]
        rows = self.logprobs(ids)
        k_prompt = (body.get("prompt_logprobs") if self.options.vllm_extensions else None) or (
            body.get("logprobs") if body.get("echo") else None
        )
        prompt_lp: list[dict[str, Any] | None] | None = None
        if k_prompt is not None:
            prompt_lp = [None]
            for t in range(1, len(ids)):
                top = self.top(rows[t - 1], int(k_prompt), ids[t])
                prompt_lp.append(
                    {
                        str(i + self.options.token_shift): {"logprob": v, "rank": r + 1, "decoded_token": self.piece(i)}
                        for r, (i, v) in enumerate(top)
                    }
                )
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "stop_reason": None}
        if body.get("echo"):
            tokens = [self.piece(i) for i in ids]
            tops: list[dict[str, float] | None] = [None]
            values: list[float | None] = [None]
            for t in range(1, len(ids)):
                top = self.top(rows[t - 1], int(body.get("logprobs") or 0), ids[t])
                tops.append({self.piece(i): v for i, v in top})
                values.append(float(rows[t - 1, ids[t]]))
            if int(body.get("max_tokens") or 0) >= 1:  # vLLM echoes the prompt, then the generated token
                generated = int(rows[-1].argmax())
                tokens.append(self.piece(generated))
                tops.append(
                    {self.piece(i): v for i, v in self.top(rows[-1], int(body.get("logprobs") or 0), generated)}
                )
                values.append(float(rows[-1, generated]))
            offsets = [sum(len(x) for x in tokens[:i]) for i in range(len(tokens))]
            choice["text"] = self.tokenizer.decode(ids)
            choice["logprobs"] = {
                "text_offset": offsets,
                "token_logprobs": values,
                "tokens": tokens,
                "top_logprobs": tops,
            }
        else:
            next_id = int(rows[-1].argmax())
            choice["text"] = self.piece(next_id)
            choice["logprobs"] = None
        if self.options.vllm_extensions:
            choice["prompt_logprobs"] = prompt_lp
        if body.get("return_token_ids") and self.options.vllm_extensions:
            choice["prompt_token_ids"] = [i + self.options.token_shift for i in ids]
        usage = {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
        return 200, {
            "id": "cmpl-1",
            "object": "text_completion",
            "model": self.model_name,
            "choices": [choice],
            "usage": usage,
        }

    @torch.no_grad()
    def generate(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Sampled continuations by ``transformers``' own ``generate`` (an independent sampler),
        one per prompt of a ``prompt`` array and per ``n``; ``sampler_override`` takes precedence
        over the request's settings, as a provider's per-key overrides do."""
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        n = max(1, int(body.get("n") or 1)) if self.options.accept_n else 1
        settings = {**body, **self.options.sampler_override}
        temperature = float(settings.get("temperature", 1.0))
        top_k = int(settings.get("top_k", -1))
        options: dict[str, Any] = {
            "do_sample": temperature > 0,
            "max_new_tokens": int(body.get("max_tokens") or 16),
            "eos_token_id": self.tokenizer.eos_token_id,
            "pad_token_id": self.tokenizer.pad_token_id,
            "repetition_penalty": float(settings.get("repetition_penalty", settings.get("repeat_penalty", 1.0))),
        }
        if temperature > 0:
            options.update(
                temperature=temperature,
                top_k=top_k if top_k > 0 else 0,
                top_p=float(settings.get("top_p", 1.0)),
                min_p=float(settings.get("min_p", 0.0)) or None,
            )
        choices, completion_tokens = [], 0
        for i, text in enumerate(prompts):
            ids = torch.tensor([self.tokenizer(str(text))["input_ids"]])
            for j in range(n):
                torch.manual_seed(int(body.get("seed") or 0) * 1000 + i * n + j)
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **options)[0, ids.shape[1] :]
                generated = [int(t) for t in out]
                stopped = bool(generated) and generated[-1] == self.tokenizer.eos_token_id
                completion_tokens += len(generated)
                choices.append(
                    {
                        "index": i * n + j,
                        # vLLM's default: special tokens are left out of the text unless asked for
                        "text": self.tokenizer.decode(
                            generated[:-1] if stopped else generated,
                            skip_special_tokens=bool(body.get("skip_special_tokens", True)),
                        ),
                        "finish_reason": "stop" if stopped else "length",
                        "logprobs": None,
                    }
                )
        return 200, {
            "id": "cmpl-2",
            "object": "text_completion",
            "model": self.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": 0, "completion_tokens": completion_tokens, "total_tokens": completion_tokens},
        }

    def chat(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.options.no_logprobs and (body.get("logprobs") or body.get("top_logprobs") is not None):
            return 400, {"error": {"message": "Unsupported parameter: logprobs, top_logprobs", "code": 400}}
        encoded = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
        ids = list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)
        k = int(body.get("top_logprobs") or 0)
        content = []
        generated: list[int] = []
        for _ in range(int(body.get("max_tokens") or 16)):
            row = self.logprobs(ids + generated)[-1]
            token = int(row.argmax())
            top = self.top(row, k, None)
            piece = self.piece(token)
            content.append(
                {
                    "token": piece,
                    "logprob": float(row[token]),
                    "bytes": list(piece.encode()),
                    "top_logprobs": [
                        {"token": self.piece(i), "logprob": v, "bytes": list(self.piece(i).encode())} for i, v in top
                    ],
                }
            )
            generated.append(token)
            if token == self.tokenizer.eos_token_id:
                break
        message = {"role": "assistant", "content": self.tokenizer.decode(generated)}
        choice = {"index": 0, "message": message, "logprobs": {"content": content}, "finish_reason": "length"}
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": len(generated),
            "total_tokens": len(ids) + len(generated),
        }
        return 200, {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": self.model_name,
            "choices": [choice],
            "usage": usage,
        }


class _Handler(http.server.BaseHTTPRequestHandler):
    app: OpenAIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        app = self.app
        with app._lock:
            app.requests.append(Recorded(self.path, body, self.headers.get("Authorization")))
            status = app.options.status_sequence.pop(0) if app.options.status_sequence else None
            if app.options.fail_after is not None and len(app.requests) > app.options.fail_after:
                status = 503
        if status is not None:
            self._send(status, {"error": {"message": f"injected {status}"}}, {"Retry-After": "0"})
            return
        if body.get("model") != app.model_name:
            self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
            return
        with app._lock:  # one forward at a time: torch on 2 cores gains nothing from more
            if self.path == "/v1/completions":
                answer = app.completions(body)
            elif self.path == "/v1/chat/completions":
                answer = app.chat(body)
            else:
                answer = (404, {"error": {"message": "Not Found"}})
        self._send(*answer)

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _tokenizer(files: dict[str, bytes]) -> Any:
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        for name, content in files.items():
            if name != "model.safetensors":
                (Path(folder) / name).write_bytes(content)
        return AutoTokenizer.from_pretrained(folder)


def causal_lm(files: dict[str, bytes], tensors: dict[str, torch.Tensor]) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(files["config.json"]))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise ValueError(f"weights do not fit the config: missing {missing}, unexpected {unexpected}")
    return model


def vocabulary_prompts(tokenizer: Any, count: int, words: int = 12, seed: int = 0) -> Iterator[str]:
    """Texts of known words in new orders (no ``<unk>``), so that models differ on them."""
    vocab = sorted(w for w in tokenizer.get_vocab() if not w.startswith("<"))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        picks = torch.randint(0, len(vocab), (words,), generator=generator)
        yield " ".join(vocab[int(i)] for i in picks)
