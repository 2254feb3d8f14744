"""The fine-tune's tokenizer, read safely, and prompts turned into token ids.

Only ``tokenizer.json`` and a few small text files beside it are read, at the weights' pinned
commit; SentencePiece models and pickles are never loaded and no code from a repo runs.

Bounded for a public server: ``tokenizer.json`` above ``MAX_TOKENIZER_BYTES`` and side files
above ``MAX_SIDE_FILE_BYTES`` are refused from their size, before they are fetched (a
``FetchError`` naming the file); a Rust panic inside
the tokenizers library (a pre-tokenizer regex past its backtracking limit raises pyo3's
``PanicException``, a ``BaseException`` that nothing else would catch) becomes a
``TokenizerError``; chat templates render in a bounded child process (``chat_template``).

Not here: the prompt texts (``behaviour.prompts``), running models (``forward``).
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lorafid.behaviour.chat_template import render_user_turns
from lorafid.behaviour.prompts import Prompt
from lorafid.errors import LorafidError, MissingModelFileError, TokenizerError
from lorafid.weights.source import Source, open_source

TOKENIZER_FILE = "tokenizer.json"
# Small text files a fast tokenizer reads besides tokenizer.json; nothing executable, no pickles.
TOKENIZER_SIDE_FILES: tuple[str, ...] = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Parsing is slow and memory-hungry: a 62 MB tokenizer.json took 45 s and 1.7 GB; a 20 MB BPE one
# (498k tokens and merges) loads in ~10 s with a peak of ~0.6 GB (measured on 2 busy CPU cores).
# The families the check runs have 7-10 MB ones (Qwen2.5's 152k tokens: 7 MB, Llama 3's 128k:
# 9 MB): 20 MB leaves them room and bounds what one visitor's repo can cost.
MAX_TOKENIZER_BYTES = 20 * 2**20
MAX_SIDE_FILE_BYTES = 4 * 2**20  # tokenizer_config.json lists added tokens: ~1 MB for 256k of them


def load_tokenizer(
    spec: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    allow_local: bool = True,
    source: Source | None = None,
) -> Any:
    """The fast tokenizer of a Hub repo or local directory, from its ``tokenizer.json`` fetched whole.

    ``source``: the repo already opened (the forward's), read instead of opening it again.

    Only ``tokenizer.json`` and the small text files beside it (``TOKENIZER_SIDE_FILES``) are
    read, at the same pinned commit as the weights; SentencePiece ``tokenizer.model`` files
    and anything pickled are never loaded, and no code from the repo runs.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` (its chat template included, if any).

    Raises:
        MissingModelFileError: the repo has no ``tokenizer.json``.
        The sources' errors: RepoNotFoundError, GatedRepoError, InvalidSourceError, ...
    """
    from lorafid.behaviour.architecture import require_transformers

    require_transformers()
    from transformers import PreTrainedTokenizerFast

    if source is not None:
        files = _tokenizer_files(source)
    else:
        with open_source(spec, revision=revision, token=token, endpoint=endpoint, allow_local=allow_local) as opened:
            files = _tokenizer_files(opened)
            source = opened
    where = source.describe()
    with tempfile.TemporaryDirectory(prefix="lorafid-tokenizer-") as folder:
        for name, content in files.items():
            if content is not None:
                (Path(folder) / name).write_bytes(content)
        with rust_panics(where):
            return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)


@contextlib.contextmanager
def rust_panics(where: str) -> Iterator[None]:
    """Turn a panic inside the tokenizers library (pyo3's ``PanicException``, a ``BaseException``)
    into a ``TokenizerError``; every other exception, KeyboardInterrupt included, passes."""
    try:
        yield
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise TokenizerError(
            f"The tokenizer of {where} failed inside the tokenizers library ({str(e).splitlines()[0][:160]}); its "
            "pre-tokenizer cannot read this text. Use a repo whose tokenizer.json works with transformers."
        ) from None


def encode_text(tokenizer: Any, text: str, *, special: bool = True) -> list[int]:
    """The token ids of ``text`` (with the tokenizer's own special tokens when ``special``); a
    Rust panic is a ``TokenizerError``."""
    with rust_panics("the fine-tune"):
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def chat_turns(tokenizer: Any, texts: Sequence[str]) -> list[str]:
    """Each text as one user turn through the tokenizer's chat template, assistant turn opened,
    rendered under ``chat_template``'s limits."""
    template = tokenizer.get_chat_template()
    return render_user_turns(template, texts, dict(tokenizer.special_tokens_map))


class ChatEncoder:
    """Token ids of a text as one user turn in the chat template, for a fixed set of texts:
    all are rendered in one bounded child process on the first call (thread-safe)."""

    def __init__(self, tokenizer: Any, texts: Sequence[str]) -> None:
        self._tokenizer, self._texts = tokenizer, list(texts)
        self._ids: dict[str, list[int]] | None = None
        self._lock = threading.Lock()

    def __call__(self, text: str) -> list[int]:
        with self._lock:
            if self._ids is None:
                wanted = list(dict.fromkeys([*self._texts, text]))
                rendered = chat_turns(self._tokenizer, wanted)
                self._ids = {
                    t: encode_text(self._tokenizer, r, special=False) for t, r in zip(wanted, rendered, strict=True)
                }
            if text not in self._ids:
                self._ids[text] = encode_text(self._tokenizer, chat_turns(self._tokenizer, [text])[0], special=False)
            return self._ids[text]


def _tokenizer_files(source: Source) -> dict[str, bytes | None]:
    files = {TOKENIZER_FILE: source.read_small_file(TOKENIZER_FILE, MAX_TOKENIZER_BYTES)}
    if files[TOKENIZER_FILE] is None:
        raise MissingModelFileError(
            f"{source.describe()} has no {TOKENIZER_FILE}; the behaviour check tokenizes with the fine-tune's "
            "fast tokenizer (tokenizer.json) and never loads SentencePiece or pickled tokenizers. Use a "
            "revision that has it, or save one with transformers' AutoTokenizer(...).save_pretrained."
        )
    files.update({name: source.read_small_file(name, MAX_SIDE_FILE_BYTES) for name in TOKENIZER_SIDE_FILES})
    return files


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], *, chat: bool, max_tokens: int) -> list[list[int]]:
    """Token ids of each prompt: plain (with the tokenizer's own special tokens), or as one user
    turn through the fine-tune's chat template with the assistant's turn opened. Longer texts
    are cut to ``max_tokens``.

    Raises:
        LorafidError: ``chat`` asked of a tokenizer without a chat template; a text with no tokens.
    """
    if chat and not getattr(tokenizer, "chat_template", None):
        raise LorafidError(
            "The fine-tune's tokenizer has no chat template; run without --chat-template (plain text) "
            "or use a repo whose tokenizer_config.json or chat_template.jinja defines one."
        )
    texts = chat_turns(tokenizer, [p.text for p in prompts]) if chat else [p.text for p in prompts]
    out = []
    for prompt, text in zip(prompts, texts, strict=True):
        ids = encode_text(tokenizer, text, special=not chat)  # a chat template writes its own special tokens
        if not ids:
            raise LorafidError(f"Prompt {prompt.id} has no tokens with this tokenizer.")
        out.append(list(ids[:max_tokens]))
    return out
