"""Behaviour check: how far the served extraction's next-token distributions are from the fine-tune's.

Tokenizes prompt texts with the fine-tune's tokenizer, runs the layer-streamed forward
(``forward``) for the fine-tune F, its base and the served variants, and scores every
variant against F, teacher-forced on the texts.

Not here: reading weights or running blocks (``forward``), the linear algebra (``spectrum``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from lorafid.errors import MissingModelFileError
from lorafid.source import open_source

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
) -> Any:
    """The fast tokenizer of a Hub repo or local directory, from its ``tokenizer.json`` fetched whole.

    Only ``tokenizer.json`` and the small text files beside it (``TOKENIZER_SIDE_FILES``) are
    read, at the same pinned commit as the weights; SentencePiece ``tokenizer.model`` files
    and anything pickled are never loaded, and no code from the repo runs.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` (its chat template included, if any).

    Raises:
        MissingModelFileError: the repo has no ``tokenizer.json``.
        The sources' errors: RepoNotFoundError, GatedRepoError, InvalidSourceError, ...
    """
    from transformers import PreTrainedTokenizerFast

    with open_source(spec, revision=revision, token=token, endpoint=endpoint, allow_local=allow_local) as source:
        files = {TOKENIZER_FILE: source.read_small_file(TOKENIZER_FILE, MAX_TOKENIZER_BYTES)}
        if files[TOKENIZER_FILE] is None:
            raise MissingModelFileError(
                f"{source.describe()} has no {TOKENIZER_FILE}; the behaviour check tokenizes with the fine-tune's "
                "fast tokenizer (tokenizer.json) and never loads SentencePiece or pickled tokenizers. Use a "
                "revision that has it, or save one with transformers' AutoTokenizer(...).save_pretrained."
            )
        files.update({name: source.read_small_file(name, MAX_TOKENIZER_BYTES) for name in TOKENIZER_SIDE_FILES})
    with tempfile.TemporaryDirectory(prefix="lorafid-tokenizer-") as folder:
        for name, content in files.items():
            if content is not None:
                (Path(folder) / name).write_bytes(content)
        return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
