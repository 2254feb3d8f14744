"""Base tensor ↔ fine-tune tensor, by name: what gets audited, and why the rest does not.

Input: the tensor records of both models (from their safetensors headers; shards need not
align). Output: a ``PairingPlan`` of 2-D matrix pairs to audit, 1-D pairs whose delta a
LoRA cannot carry, and every other tensor with the reason it is skipped.

Rules, in order:
- names are matched exactly first; names left over are matched after stripping the one
  wrapper prefix learned from the two name sets (``learn_prefixes``): a checkpoint saved
  under a head class or wrapper has every name prefixed ("bert.", "roberta.", "gpt_neox.",
  "model.decoder.", "module." from DDP, "_orig_mod." from ``torch.compile``, nested ones
  like "module._orig_mod."), on either side, or one wrapper replaced by another. The
  prefixes are recorded in the plan (and the report); two prefixes that explain equally
  many names are refused (``AmbiguousPairingError``), never guessed;
- embeddings and ``lm_head`` are skipped unless asked for (a multi-LoRA server cannot
  carry them); when included, only the shared vocabulary rows are compared;
- a shape mismatch, a dtype lorafid cannot diff exactly, or a tensor on one side only is
  listed with its reason.

No I/O and no math here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from lorafid.errors import AmbiguousPairingError, NoCommonTensorsError, UnsupportedDtypeError
from lorafid.weights.safetensors_format import DTYPES, TensorInfo

WRAPPER_PREFIXES: tuple[str, ...] = (
    "base_model.model.",  # a PEFT model saved with merged weights
    "model.language_model.",  # multimodal wrappers (Llava-style, Gemma 3)
    "language_model.model.",
    "language_model.",
    "transformer.",
    "model.",
)
"""Common wrapper prefixes, longest first: only to name the module of a tensor outside the
blocks (``classify``). Pairing learns its prefixes from the names themselves."""

MAX_PREFIX_SEGMENTS = 6  # "module._orig_mod.base_model.model.model.decoder.": deeper nesting is not seen
_GENERIC_SUFFIX_PAIRS = 16  # a suffix shared by more name pairs than this ("dense.weight") identifies nothing

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block)\.(\d+)\.")
_EMBEDDING = re.compile(r"(embed|wte|wpe|lm_head|output\.weight$|word_embeddings)")


@dataclass(frozen=True)
class MatrixPair:
    """One weight present in both models, to audit (2-D) or to measure as lost (1-D)."""

    name: str  # the fine-tune's name (what users see in their checkpoint)
    base: TensorInfo
    finetune: TensorInfo
    layer: int | None  # transformer block index, None outside the blocks
    module: str  # e.g. "mlp.down_proj", "self_attn.q_proj", "embed_tokens"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.finetune.shape

    @property
    def size_bytes(self) -> int:
        """Bytes to read for this pair, both sides."""
        return self.base.size_bytes + self.finetune.size_bytes


@dataclass(frozen=True)
class SkippedTensor:
    """A tensor that is not audited, and why (``reason`` is a stable code)."""

    name: str
    reason: str  # one of SKIP_REASONS
    detail: str  # a sentence for humans
    base_shape: tuple[int, ...] | None = None
    finetune_shape: tuple[int, ...] | None = None


SKIP_REASONS: dict[str, str] = {
    "embedding": "embedding or lm_head: not carried by multi-LoRA serving (pass --include-embeddings to measure it)",
    "not_2d": "not a matrix: a LoRA cannot carry it (its delta is measured separately)",
    "shape_mismatch": "shapes differ between the two models",
    "only_in_base": "present in the base model only",
    "only_in_finetune": "present in the fine-tuned model only",
    "unsupported_dtype": "dtype cannot be compared exactly (quantized or scaled format)",
    "filtered": "excluded by --include/--exclude",
    "non_finite": "NaN or Inf in the weights: flagged, no spectrum computed",
}


@dataclass(frozen=True)
class PairingPlan:
    """What an audit will read: matrix pairs, 1-D pairs, and the skipped rest."""

    matrices: tuple[MatrixPair, ...]
    vectors: tuple[MatrixPair, ...]  # 1-D (norms, biases): whole delta lost under a LoRA
    skipped: tuple[SkippedTensor, ...]
    base_prefix: str = ""  # learned wrapper prefix of base names paired after stripping it
    finetune_prefix: str = ""  # the same for the fine-tune's names

    @property
    def size_bytes(self) -> int:
        return sum(p.size_bytes for p in (*self.matrices, *self.vectors))


def classify(name: str) -> tuple[int | None, str]:
    """(layer index, module) of a weight name.

    Example: "model.layers.12.mlp.down_proj.weight" -> (12, "mlp.down_proj");
    "model.embed_tokens.weight" -> (None, "embed_tokens").
    """
    stem = name.removesuffix(".weight")
    match = _LAYER.search(stem)
    if match:
        return int(match.group(1)), stem[match.end() :]
    for prefix in WRAPPER_PREFIXES:
        if stem.startswith(prefix):
            return None, stem[len(prefix) :]
    return None, stem


def is_embedding(name: str) -> bool:
    """Token embeddings and output heads, which vLLM-style multi-LoRA cannot serve."""
    return bool(_EMBEDDING.search(name))


def match_names(base_names: Iterable[str], finetune_names: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of (base name, fine-tune name): exact matches, then matches under the learned prefixes.

    Example: base {"model.layers.0.w"}, fine-tune {"layers.0.w"} -> [("model.layers.0.w", "layers.0.w")].
    """
    return _match(set(base_names), set(finetune_names))[0]


def learn_prefixes(base_names: Iterable[str], finetune_names: Iterable[str]) -> tuple[str, str]:
    """The (base prefix, fine-tune prefix) whose removal makes the most leftover names match.

    Names already equal on both sides are not considered. A candidate is every split of a
    name at a dot (up to ``MAX_PREFIX_SEGMENTS`` leading segments) whose rest still has a
    dot ("mlp.weight", never "weight" alone); the two prefixes of a candidate never end in
    the same segment ("bert.encoder." / "encoder." is "bert." / "").
    The candidate that pairs the most names wins; ("", "") when nothing pairs.

    Example: base {"embeddings.w", "encoder.layer.0.q"}, fine-tune {"bert.embeddings.w",
    "bert.encoder.layer.0.q", "cls.dense.w"} -> ("", "bert.").

    Raises:
        AmbiguousPairingError: two candidates pair equally many names (base {"model.x",
            "transformer.x"} against fine-tune {"x"}).
    """
    base, finetune = set(base_names), set(finetune_names)
    by_rest_base = _splits(base - finetune)
    by_rest_finetune = _splits(finetune - base)
    support: dict[tuple[str, str], int] = {}
    for rest in by_rest_base.keys() & by_rest_finetune.keys():
        base_prefixes, finetune_prefixes = by_rest_base[rest], by_rest_finetune[rest]
        if "." not in rest or len(base_prefixes) * len(finetune_prefixes) > _GENERIC_SUFFIX_PAIRS:
            continue  # "weight" alone, or a suffix many names share, says nothing about a wrapper
        for b in base_prefixes:
            for f in finetune_prefixes:
                if b != f and not (b and f and b.split(".")[-2] == f.split(".")[-2]):
                    support[(b, f)] = support.get((b, f), 0) + 1
    if not support:
        return "", ""
    ranked = sorted(support.items(), key=lambda item: (-item[1], item[0]))  # ties in a stable order
    (best, count) = ranked[0]
    if len(ranked) > 1 and ranked[1][1] == count:
        tied = [pair for pair, n in ranked if n == count][:3]
        shown = "; ".join(f"base {b or '(none)'!r} / fine-tune {f or '(none)'!r}" for b, f in tied)
        raise AmbiguousPairingError(
            f"The tensor names of the two models match under more than one wrapper prefix, {count} name(s) "
            f"each ({shown}): lorafid will not guess which tensors correspond. Audit checkpoints saved "
            "with the same model class, or with --include a pattern that selects one of them."
        )
    return best


def _splits(names: Iterable[str]) -> dict[str, list[str]]:
    """rest -> prefixes: every name split at each of its first dots (and unsplit, prefix "")."""
    out: dict[str, list[str]] = {}
    for name in names:
        out.setdefault(name, []).append("")
        parts = name.split(".")
        for k in range(1, min(MAX_PREFIX_SEGMENTS, len(parts) - 1) + 1):
            out.setdefault(".".join(parts[k:]), []).append(".".join(parts[:k]) + ".")
    return out


def _match(base: set[str], finetune: set[str]) -> tuple[list[tuple[str, str]], tuple[str, str]]:
    """(pairs, learned prefixes): exact matches first, then the leftovers under the learned prefixes."""
    pairs = [(n, n) for n in sorted(base & finetune)]
    base_prefix, finetune_prefix = learn_prefixes(base, finetune)
    if base_prefix or finetune_prefix:
        left = finetune - base
        for name in sorted(base - finetune):
            if name.startswith(base_prefix):
                other = finetune_prefix + name[len(base_prefix) :]
                if other in left:
                    pairs.append((name, other))
    return pairs, (base_prefix, finetune_prefix)


def plan_pairs(
    base: Mapping[str, TensorInfo],
    finetune: Mapping[str, TensorInfo],
    *,
    include_embeddings: bool = False,
    include: str | None = None,
    exclude: str | None = None,
) -> PairingPlan:
    """Decide, for every tensor of both models, whether and how it is audited.

    Args:
        base, finetune: tensor name -> record, across all shards of each model.
        include_embeddings: audit embeddings / lm_head too, over the shared vocabulary rows.
        include, exclude: regular expressions on the fine-tune's tensor names.

    Raises:
        UnsupportedDtypeError: no pair is comparable because of dtypes (a quantized model).
        NoCommonTensorsError: no matrix is shared by both models.
    """
    include_re = re.compile(include) if include else None
    exclude_re = re.compile(exclude) if exclude else None
    matrices: list[MatrixPair] = []
    vectors: list[MatrixPair] = []
    skipped: list[SkippedTensor] = []
    pairs, (base_prefix, finetune_prefix) = _match(set(base), set(finetune))
    paired_base = {b for b, _ in pairs}
    paired_finetune = {f for _, f in pairs}
    skipped += [_skip(n, "only_in_base", base=base[n]) for n in sorted(base.keys() - paired_base)]
    skipped += [_skip(n, "only_in_finetune", finetune=finetune[n]) for n in sorted(finetune.keys() - paired_finetune)]

    for base_name, name in pairs:
        b, f = base[base_name], finetune[name]
        if (include_re and not include_re.search(name)) or (exclude_re and exclude_re.search(name)):
            skipped.append(_skip(name, "filtered", base=b, finetune=f))
            continue
        dtype_problem = _dtype_problem(b, f)
        if dtype_problem:
            skipped.append(_skip(name, dtype_problem, base=b, finetune=f))
            continue
        layer, module = classify(name)
        embedding = is_embedding(name)
        if embedding and not include_embeddings:
            skipped.append(_skip(name, "embedding", base=b, finetune=f))
            continue
        if embedding and len(b.shape) == 2 and b.shape[1:] == f.shape[1:] and b.shape[0] != f.shape[0]:
            b, f = _shared_rows(b, f)  # a vocabulary grown by added tokens: compare shared rows
        if b.shape != f.shape:
            skipped.append(_skip(name, "shape_mismatch", base=b, finetune=f))
            continue
        pair = MatrixPair(name=name, base=b, finetune=f, layer=layer, module=module)
        if len(f.shape) == 2:
            matrices.append(pair)
        elif len(f.shape) == 1:
            vectors.append(pair)
        else:
            skipped.append(_skip(name, "not_2d", base=b, finetune=f))

    if not matrices:
        unsupported = sorted({s.detail for s in skipped if s.reason == "unsupported_dtype"})
        if unsupported:
            raise UnsupportedDtypeError(
                "No weight matrix can be compared exactly: "
                + "; ".join(unsupported[:3])
                + ". lorafid compares float16/bfloat16/float32/float64 checkpoints; quantized formats "
                "(GPTQ/AWQ int packs, bitsandbytes, FP8 with scales) are refused. Audit the unquantized original."
            )
        raise NoCommonTensorsError(
            f"The two models share no comparable weight matrix ({len(base)} tensors in the base, "
            f"{len(finetune)} in the fine-tune, {len(pairs)} names in common). Check that the fine-tune "
            "was made from this base model (same architecture and size)."
        )
    return PairingPlan(
        matrices=tuple(matrices),
        vectors=tuple(vectors),
        skipped=tuple(skipped),
        base_prefix=base_prefix,
        finetune_prefix=finetune_prefix,
    )


def _dtype_problem(base: TensorInfo, finetune: TensorInfo) -> str | None:
    """Mixed float dtypes (bf16 base, fp32 fine-tune) are fine: Δ is taken in float32."""
    if DTYPES[base.dtype].comparable and DTYPES[finetune.dtype].comparable:
        return None
    return "unsupported_dtype"


def _shared_rows(base: TensorInfo, finetune: TensorInfo) -> tuple[TensorInfo, TensorInfo]:
    """Trim both embeddings to their common first rows (row-major: a prefix of the bytes)."""
    rows = min(base.shape[0], finetune.shape[0])
    return _first_rows(base, rows), _first_rows(finetune, rows)


def _first_rows(info: TensorInfo, rows: int) -> TensorInfo:
    row_bytes = info.size_bytes // info.shape[0]
    return replace(info, shape=(rows, *info.shape[1:]), end=info.start + rows * row_bytes)


def _skip(
    name: str, reason: str, *, base: TensorInfo | None = None, finetune: TensorInfo | None = None
) -> SkippedTensor:
    detail = SKIP_REASONS[reason]
    if reason == "unsupported_dtype":
        dtypes = sorted({t.dtype for t in (base, finetune) if t is not None})
        detail = f"{name}: dtype {'/'.join(dtypes)} cannot be compared exactly"
    elif reason == "shape_mismatch" and base and finetune:
        detail = f"shape {list(base.shape)} in the base, {list(finetune.shape)} in the fine-tune"
    return SkippedTensor(
        name=name,
        reason=reason,
        detail=detail,
        base_shape=base.shape if base else None,
        finetune_shape=finetune.shape if finetune else None,
    )
