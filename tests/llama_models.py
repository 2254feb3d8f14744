"""Tiny Llama-family models made in the test process: a base, a full fine-tune, a merged LoRA.

Each model is a real ``transformers`` causal LM (hidden 48, 4 heads / 2 key-value heads,
``layers`` blocks, a ~150-token vocabulary), written as a model directory's files:
``config.json``, ``model.safetensors``, and a fast tokenizer with a chat template, built
offline with the ``tokenizers`` library from the lines in ``CORPUS``.

- the base: random init, then ``BASE_STEPS`` steps of next-token training on ``CORPUS``, so
  its weights carry structure and not only noise;
- the full fine-tune: every weight trained further on ``FINETUNE_CORPUS`` (norms and
  embeddings included, so the serving modes differ);
- the LoRA fine-tune: rank-``LORA_RANK`` factors on every linear layer of the blocks,
  trained on the same texts and merged into the base (W = W_base + B·A); embeddings, norms
  and the head stay the base's, exactly as a multi-LoRA server would serve it.

Built once per (architecture, layers, seed, tie) and cached for the test session: 1-4 s each.

Example::

    family = model_family("llama", layers=2)
    write_model(family.base, tmp_path / "base")
    publish(hub, "org/base", family.base)            # on the loopback Hub (tests/hub_server.py)
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

CORPUS: tuple[str, ...] = (
    "the cat sat on the mat and the dog sat on the rug",
    "one plus two is three and two plus two is four",
    "the sun is warm in the morning and cold at night",
    "a small bird sang in the old tree by the river",
    "we read a book and then we went to the market",
    "def add ( a , b ) : return a + b",
    "le chat est sur la table et le chien dort",
    "she said hello and he said good morning to her",
)
FINETUNE_CORPUS: tuple[str, ...] = (
    "the knight drew his sword and the dragon roared at the gate",
    "hello traveller , said the innkeeper , the road north is dangerous",
    "the wizard raised his staff and the tower began to glow",
    "three plus four is seven and the knight counted his gold",
)
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
HIDDEN = 48
# A transformers LlamaConfig's fields for the adapter tests, which build models with PEFT themselves.
ADAPTER_LLAMA: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
LORA_RANK = 8
BASE_STEPS = 40
FINETUNE_STEPS = 30
# Model types built here, and the transformers config class of each.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class TinyModel:
    """One model as the files of its repo: weights, config and tokenizer."""

    files: dict[str, bytes]  # file name -> content
    tensors: dict[str, torch.Tensor]  # what model.safetensors holds (float32, CPU)


@dataclass(frozen=True)
class ModelFamily:
    base: TinyModel
    full: TinyModel  # every weight fine-tuned
    lora: TinyModel  # a rank-LORA_RANK LoRA on every block linear layer, merged


def build_tokenizer(extra_words: int = 0) -> dict[str, bytes]:
    """The tokenizer files (tokenizer.json, tokenizer_config.json, ...): a WordLevel vocabulary
    of every word of both corpora plus the special tokens, and ``extra_words`` made-up words
    (a model with another vocabulary size). No network, no sentencepiece."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    lines = [*CORPUS, *FINETUNE_CORPUS, " ".join(f"word{i}" for i in range(extra_words))]
    tokenizer.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    with tempfile.TemporaryDirectory() as folder:
        fast.save_pretrained(folder)
        return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def make_config(model_type: str, vocab_size: int, layers: int, *, tie: bool = False) -> Any:
    """A tiny transformers config of ``model_type`` (one of ARCHITECTURES)."""
    from transformers import AutoConfig

    extra: dict[str, Any] = {"head_dim": 12} if model_type == "qwen3" else {}
    if model_type == "mistral":
        extra["sliding_window"] = None
    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        **extra,
    )


@functools.lru_cache(maxsize=8)
def model_family(model_type: str = "llama", layers: int = 2, seed: int = 0, tie: bool = False) -> ModelFamily:
    """Base, full fine-tune and merged LoRA fine-tune of one tiny architecture (cached)."""
    # One thread: on a busy 2-core machine torch's thread pool made this 20x slower (83 s vs 4 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_family(model_type, layers, seed, tie)
    finally:
        torch.set_num_threads(threads)


def _build_family(model_type: str, layers: int, seed: int, tie: bool) -> ModelFamily:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer_files = build_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        for name, content in tokenizer_files.items():
            (Path(folder) / name).write_bytes(content)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    config = make_config(model_type, len(tokenizer), layers, tie=tie)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    base_ids = _batch(tokenizer, CORPUS)
    tune_ids = _batch(tokenizer, FINETUNE_CORPUS)
    _train(model, base_ids, dict(model.named_parameters()), BASE_STEPS, lr=1e-2)
    base_state = {n: t.detach().clone() for n, t in model.state_dict().items()}

    _train(model, tune_ids, dict(model.named_parameters()), FINETUNE_STEPS, lr=2e-3)
    full_state = {n: t.detach().clone() for n, t in model.state_dict().items()}

    model.load_state_dict(base_state)
    lora_state = _train_lora(model, tune_ids, base_state, seed)

    files = {"config.json": config.to_json_string(use_diff=False).encode(), **tokenizer_files}
    return ModelFamily(*(_as_model(state, files, tie) for state in (base_state, full_state, lora_state)))


def _batch(tokenizer: Any, lines: tuple[str, ...]) -> torch.Tensor:
    encoded = [tokenizer(line)["input_ids"] for line in lines]
    width = max(len(ids) for ids in encoded)
    return torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in encoded])


def _train(model: Any, ids: torch.Tensor, params: dict[str, torch.nn.Parameter], steps: int, lr: float) -> None:
    """Plain Adam on next-token loss (padding ignored)."""
    labels = ids.masked_fill(ids == model.config.pad_token_id, -100)
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    model.eval()


def _train_lora(model: Any, ids: torch.Tensor, base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Train B·A (rank LORA_RANK) on every 2-D weight inside the blocks; return the merged state."""
    generator = torch.Generator().manual_seed(seed + 1)
    targets = [n for n, t in base.items() if ".layers." in n and t.ndim == 2]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in targets:
        rows, cols = base[name].shape
        a = (torch.randn(LORA_RANK, cols, generator=generator) / cols**0.5).requires_grad_()
        b = (0.01 * torch.randn(rows, LORA_RANK, generator=generator)).requires_grad_()
        factors[name] = (b, a)
    labels = ids.masked_fill(ids == model.config.pad_token_id, -100)
    optimizer = torch.optim.Adam([t for pair in factors.values() for t in pair], lr=3e-3)
    for _ in range(FINETUNE_STEPS):
        optimizer.zero_grad()
        weights = {**base, **{n: base[n] + b @ a for n, (b, a) in factors.items()}}
        if model.config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)  # the head is the embedding
        out = torch.func.functional_call(model, weights, (), {"input_ids": ids, "labels": labels})
        out.loss.backward()
        optimizer.step()
    with torch.no_grad():
        return {**base, **{n: (base[n] + b @ a).detach() for n, (b, a) in factors.items()}}


def _as_model(state: dict[str, torch.Tensor], files: dict[str, bytes], tie: bool) -> TinyModel:
    tensors = {n: t.contiguous() for n, t in state.items() if not (tie and n == "lm_head.weight")}
    return TinyModel(files={**files, "model.safetensors": save(tensors)}, tensors=tensors)


def write_model(model: TinyModel, directory: Path) -> Path:
    """The model's files in ``directory`` (created); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in model.files.items():
        (directory / name).write_bytes(content)
    return directory


def publish(hub: Any, repo_id: str, model: TinyModel, **options: Any) -> str:
    """Add the model to the loopback Hub (``tests.hub_server.HubServer``); returns the commit SHA."""
    return str(hub.add_repo(repo_id, dict(model.files), **options))


def with_files(model: TinyModel, **changes: bytes | None) -> TinyModel:
    """A copy with files replaced (bytes) or removed (None): e.g. no tokenizer, another config."""
    files = {n: c for n, c in model.files.items() if n not in changes or changes[n] is not None}
    files.update({n: c for n, c in changes.items() if c is not None})
    return TinyModel(files=files, tensors=model.tensors)


def config_dict(model: TinyModel) -> dict[str, Any]:
    return dict(json.loads(model.files["config.json"]))
