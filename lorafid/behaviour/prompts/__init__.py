"""Prompt sets: the built-in texts (``builtin.jsonl`` beside this file, versioned by
``PROMPT_SET``) and a user's prompt file.

Not here: tokenizing them (``behaviour.tokenizer``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lorafid.errors import LorafidError

PROMPT_SET = "builtin-v1"  # the built-in set's version: change it whenever its texts change
MAX_PROMPTS = 1000
MAX_PROMPT_FILE_BYTES = 8 * 2**20


@dataclass(frozen=True)
class Prompt:
    """One text to score."""

    id: str  # "chat-00", or "line-3" for a user's file
    text: str
    category: str = ""  # chat, roleplay, instruction, code, arithmetic, language
    language: str = ""  # en, fr, de, es


def builtin_prompts() -> list[Prompt]:
    """The built-in set (``PROMPT_SET``): 36 short texts written for lorafid, in six kinds and four languages."""
    raw = resources.files("lorafid.behaviour.prompts").joinpath("builtin.jsonl").read_text(encoding="utf-8")
    return [Prompt(**json.loads(line)) for line in raw.splitlines() if line.strip()]


def read_prompts(path: str | Path) -> list[Prompt]:
    """A user's prompt file: JSONL with a ``text`` field per line, or plain text, one prompt per line.

    A file whose every non-empty line is a JSON object is read as JSONL; otherwise each non-empty
    line is a prompt (write "\\n" inside JSONL strings for multi-line prompts).

    Raises:
        LorafidError: unreadable, empty, too large, or JSONL lines without a string ``text``.
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
            raise LorafidError(f"{path} is larger than {MAX_PROMPT_FILE_BYTES // 2**20} MB; keep prompt files short.")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise LorafidError(f"Cannot read the prompt file {path}: {e}. Give a UTF-8 text or JSONL file.") from e
    if not lines:
        raise LorafidError(f"The prompt file {path} has no prompts: write one text per line, or JSONL with 'text'.")
    if len(lines) > MAX_PROMPTS:
        raise LorafidError(f"The prompt file {path} has {len(lines)} prompts; at most {MAX_PROMPTS} are scored.")
    records = [_json_object(line) for line in lines]
    if all(r is not None for r in records):
        prompts = []
        for number, record in enumerate(records, 1):
            assert record is not None
            text = record.get("text")
            if not isinstance(text, str) or not text.strip():
                raise LorafidError(f"{path}, line {number}: a JSONL prompt needs a non-empty string field 'text'.")
            prompts.append(Prompt(str(record.get("id", f"line-{number}")), text, str(record.get("category", ""))))
        return prompts
    return [Prompt(f"line-{number}", line) for number, line in enumerate(lines, 1)]


def _json_object(line: str) -> dict[str, Any] | None:
    if not line.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
