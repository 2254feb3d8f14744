"""A repo's tokenizer files and chat template cannot hold the server: sizes, time, memory, panics."""

from __future__ import annotations

import copy
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from lorafid.behaviour import chat_template
from lorafid.behaviour.prompts import Prompt
from lorafid.behaviour.tokenizer import ChatEncoder, encode_prompts, encode_text, load_tokenizer
from lorafid.errors import ChatTemplateError, FetchError, TokenizerError
from tests.llama_models import model_family, with_files, write_model

PROMPT = [Prompt("p", "the knight drew his sword")]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = write_model(model_family("llama", 2).full, tmp_path_factory.mktemp("tok") / "m")
    return load_tokenizer(str(folder))


def test_rendering_in_the_child_equals_apply_chat_template(tokenizer: Any) -> None:
    texts = ["hello there", "the knight drew his sword"]
    expected = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]
    assert chat_template.render_user_turns(tokenizer.chat_template, texts, tokenizer.special_tokens_map) == expected
    encoder = ChatEncoder(tokenizer, texts)
    assert encoder(texts[1]) == encode_text(tokenizer, expected[1], special=False)


def test_a_looping_template_is_stopped_at_the_time_limit(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_template, "RENDER_TIMEOUT_S", 3.0)
    tokenizer = _with_template(
        tokenizer, "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    )
    started = time.monotonic()
    with pytest.raises(ChatTemplateError, match="did not finish rendering 1 prompt"):
        encode_prompts(tokenizer, PROMPT, chat=True, max_tokens=64)
    assert time.monotonic() - started < 10


def test_a_template_that_builds_a_huge_text_is_refused(tokenizer: Any) -> None:
    # 50 MB of output: what held a request for 14 minutes and 3.3 GB through transformers' sandbox.
    tokenizer = _with_template(tokenizer, "{{ 'x' * 50000000 }}")
    with pytest.raises(ChatTemplateError, match="longer than 100,000 characters"):
        encode_prompts(tokenizer, PROMPT, chat=True, max_tokens=64)


def test_a_template_that_exhausts_memory_is_refused_quickly(tokenizer: Any) -> None:
    doubling = "{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    started = time.monotonic()
    with pytest.raises(ChatTemplateError, match="memory and time limits"):
        encode_prompts(_with_template(tokenizer, doubling + "{{ ns.s }}"), PROMPT, chat=True, max_tokens=64)
    assert time.monotonic() - started < 15


def test_a_template_over_the_size_limit_is_never_rendered(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("rendered"))
    with pytest.raises(ChatTemplateError, match="is 200,000 characters, above the 100,000"):
        encode_prompts(_with_template(tokenizer, "x" * 200_000), PROMPT, chat=True, max_tokens=64)


def test_a_template_error_is_one_line_of_its_own_words(tokenizer: Any) -> None:
    broken = _with_template(tokenizer, "{{ raise_exception('only system turns here') }}")
    with pytest.raises(ChatTemplateError, match="only system turns here"):
        encode_prompts(broken, PROMPT, chat=True, max_tokens=64)


def test_no_token_reaches_the_renderer(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    real = subprocess.run

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs["env"])
        return real(*args, **kwargs)

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setattr(subprocess, "run", spy)
    encode_prompts(tokenizer, PROMPT, chat=True, max_tokens=64)
    assert seen and "HF_TOKEN" not in seen and "hf_secret" not in json.dumps(seen)


def test_a_pre_tokenizer_regex_that_panics_is_a_clear_error(tmp_path: Path) -> None:
    """onig gives up on a catastrophic regex and tokenizers panics (pyo3's PanicException is a
    BaseException): the check answers with a message instead of leaving the request hanging."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Split(Regex("(a|aa)+$"), "isolated")
    PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(model_family("llama", 2).full.files["model.safetensors"])
    tokenizer = load_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match="failed inside the tokenizers library"):
        encode_prompts(tokenizer, [Prompt("p", "a" * 40 + "b")], chat=False, max_tokens=64)


def test_tokenizer_files_above_the_cap_are_refused_before_they_are_read(tmp_path: Path) -> None:
    family = model_family("llama", 2)
    padded = family.full.files["tokenizer.json"] + b" " * 30_000_000  # 62 MB took 45 s and 1.7 GB to parse
    folder = write_model(with_files(family.full, **{"tokenizer.json": padded}), tmp_path / "big")
    with pytest.raises(FetchError, match=r"tokenizer\.json is 30"):
        load_tokenizer(str(folder))
    config = family.full.files["tokenizer_config.json"]
    folder = write_model(
        with_files(family.full, **{"tokenizer_config.json": config + b" " * 5_000_000}), tmp_path / "c"
    )
    with pytest.raises(FetchError, match=r"tokenizer_config\.json is 5"):
        load_tokenizer(str(folder))


def _with_template(tokenizer: Any, template: str) -> Any:
    """A copy of the module's tokenizer with another chat template."""
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other
