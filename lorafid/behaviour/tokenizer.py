"""The fine-tune's tokenizer, read safely, and prompts turned into token ids.

Only ``tokenizer.json`` and a few small text files beside it are read, at the weights' pinned
commit; SentencePiece models and pickles are never loaded and no code from a repo runs.

Not here: the prompt texts (``behaviour.prompts``), running models (``forward``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorafid.behaviour.prompts import Prompt
from lorafid.errors import LorafidError, MissingModelFileError
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
MAX_TOKENIZER_BYTES = 64 * 2**20  # the largest tokenizer.json on the Hub (Gemma 3) is ~33 MB


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
    from lorafid.behaviour.forward import require_transformers

    require_transformers()
    from transformers import PreTrainedTokenizerFast

    if source is not None:
        files = _tokenizer_files(source)
    else:
        with open_source(spec, revision=revision, token=token, endpoint=endpoint, allow_local=allow_local) as opened:
            files = _tokenizer_files(opened)
    with tempfile.TemporaryDirectory(prefix="lorafid-tokenizer-") as folder:
        for name, content in files.items():
            if content is not None:
                (Path(folder) / name).write_bytes(content)
        return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)


def _tokenizer_files(source: Source) -> dict[str, bytes | None]:
    files = {TOKENIZER_FILE: source.read_small_file(TOKENIZER_FILE, MAX_TOKENIZER_BYTES)}
    if files[TOKENIZER_FILE] is None:
        raise MissingModelFileError(
            f"{source.describe()} has no {TOKENIZER_FILE}; the behaviour check tokenizes with the fine-tune's "
            "fast tokenizer (tokenizer.json) and never loads SentencePiece or pickled tokenizers. Use a "
            "revision that has it, or save one with transformers' AutoTokenizer(...).save_pretrained."
        )
    files.update({name: source.read_small_file(name, MAX_TOKENIZER_BYTES) for name in TOKENIZER_SIDE_FILES})
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
    out = []
    for prompt in prompts:
        if chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt.text}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt.text)["input_ids"]
        if not ids:
            raise LorafidError(f"Prompt {prompt.id} has no tokens with this tokenizer.")
        out.append(list(ids[:max_tokens]))
    return out
