"""Next-token log-probabilities of a fine-tune, its base and served variants, one layer at a time.

A decoder-only model is embeddings → N identical blocks → final norm → head. The architecture
comes from the fine-tune's ``config.json`` through ``transformers``, built on the meta device
(``accelerate.init_empty_weights``): it holds no weights. Then, for each block i, the block's
tensors of both models are read from the same range-read sources as the audit, every
variant's weights for that block are made from them, the hidden states of every text and
every variant go through it, and the tensors are dropped once block i has run; block i + 1 is
read while block i runs (on a thread of its own: over the network reading and computing overlap
instead of adding up). One read of each model serves every variant; the Δ of each matrix is decomposed once
(``spectrum.decompose``) for all asked ranks below its full rank (at or above it, a served
matrix is the fine-tune's own), and a variant whose weights equal another's (a rank at or above
the model's full rank: ``LayerStream.twins``) is not run again. Peak memory ≈ the two models'
tensors of one block and of the next (or of the embedding / head, whichever is larger) + one
variant's block + activations; with ``keep_reads`` (for generation after the forward) every tensor read is kept,
and each matrix's directions, so that ``state_dicts`` neither reads nor decomposes again.

Variants (``variants.Variant``: the fine-tune, the base, a served extraction at rank r) and how
each one's weights are built from the tensors read (``variants.VariantWeights``) are in
``variants``; opening and checking the pair (``ModelPlan``) in ``model_plan``; here the tensors
are read, and the blocks run.

Blocks run through ``torch.func.functional_call`` on the meta skeleton: the module never owns
a real tensor, so nothing has to be freed from it and two variants cannot mix weights. The
rotary embedding is rebuilt on the real device from the config (its buffers stay on meta
under ``init_empty_weights``); masks come from ``transformers.masking_utils``, built once per
text length. Texts of one length go through a block in one call (a batch of at most
``_GROUP_TOKENS`` positions): no padding, so every row is its text's own math and results do
not depend on how texts are grouped beyond float rounding of the larger matmul.

Supported: ``SUPPORTED_MODEL_TYPES`` (Llama, Mistral, Qwen2, Qwen3 as ``transformers``
implements them). Not here: tokenization and metrics (``behaviour``), generation with a KV
cache (``build_model`` gives a whole model for that, when it fits).

Example::

    variants = [FINETUNE, BASE, served(64)]  # from lorafid.behaviour.variants
    for index, logprobs in stream_logprobs("org/base", "org/tuned", [[1, 15, 27]], variants):
        logprobs["rank-64"]  # (3, vocab) float32, log-softmax of the next-token logits
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from lorafid.audit import spectrum as sp
from lorafid.audit.engine import resolve_device
from lorafid.behaviour.architecture import (
    block_masks,
    layer_types,
    meta_skeleton,
    require_transformers,
    rotary_embedding,
)
from lorafid.behaviour.blocks import block_on_device
from lorafid.behaviour.direction_cache import DirectionCache
from lorafid.behaviour.model_plan import ModelPlan, carried_info, check_pair
from lorafid.behaviour.variants import Variant, VariantWeights
from lorafid.compute import ComputeHook
from lorafid.errors import (
    LimitExceededError,
    LorafidError,
)
from lorafid.progress import Progress
from lorafid.weights.safetensors_format import TensorInfo
from lorafid.weights.source import Source, open_source
from lorafid.weights.tensors import read_tensor

_READERS = 8  # tensors of one block read in parallel (each a range request on the Hub)
# Most token positions in one block call (texts of one length run together): bounds the call's
# activations (the MLP's intermediate states, attention scores) to a few hundred MB at 8B sizes.
_GROUP_TOKENS = 4096


@dataclass(frozen=True)
class ForwardProgress(Progress):
    """A step of a streamed forward (``lorafid.progress``): ``stage`` "reading" with ``done`` of
    ``total`` stages (1 = embeddings, N+2 = head), or "forward" with ``done`` of ``total``
    (block, variant, text) runs, after each text of each variant through each block."""

    bytes_read: int = 0  # weight bytes read so far, both models


@dataclass(frozen=True)
class ForwardConfig:
    """How to run a streamed forward. Defaults suit a laptop."""

    device: str = "auto"  # "auto" = first CUDA device if present, else "cpu"
    # Used for requests only, never stored; None: huggingface_hub's lookup, False: no token.
    token: str | bool | None = field(default=None, repr=False)
    endpoint: str | None = None  # Hub URL; None = HF_ENDPOINT or huggingface.co
    base_revision: str | None = None  # overrides "@rev" in the base spec
    finetune_revision: str | None = None
    allow_local: bool = True  # the public app turns this off
    dtype: torch.dtype = torch.float32  # compute dtype of weights and activations
    max_model_bytes: int | None = None  # refuse pairs whose weights (both models) exceed this
    max_tensor_bytes: int | None = None  # refuse a tensor larger than this (a server's LORAFID_MAX_TENSOR_GB)
    max_tensors: int | None = None  # refuse models listing more tensors (also caps header length)
    deadline: float | None = None  # time.monotonic() after which the forward stops with LimitExceededError
    # Where each block runs (``lorafid.compute``): None runs it here, in place, on ``device``.
    # With a hook, each variant's block is ``block_on_device`` (a pure kernel: its block weights
    # and hidden states in, new hidden states out), e.g. in a ZeroGPU worker (``zero_gpu_hook``).
    compute: ComputeHook | None = field(default=None, repr=False)
    # Directions of Δ kept on disk between runs (``direction_cache``); None decomposes every run.
    direction_cache: DirectionCache | None = field(default=None, repr=False)


@dataclass
class ForwardStats:
    """What a streamed forward cost; filled in as it runs."""

    bytes_read: int = 0  # weight bytes read, both models (headers and config files not counted)
    tokens: int = 0  # token positions run, per variant
    layers: int = 0
    peak_weight_bytes: int = 0  # most tensor bytes held at once (read, derived and variant weights)
    elapsed_s: float = 0.0
    compute_s: float = 0.0
    decompose_s: float = 0.0  # of compute_s: finding the served ranks' directions (``spectrum.decompose``)
    directions_cached: int = 0  # matrices whose directions came from ``ForwardConfig.direction_cache``
    variants_run: int = 0  # variants whose blocks ran; a twin of another (``LayerStream.twins``) is not run again
    block_calls: int = 0  # block runs: one per (block, variant, group of texts of one length)


class LayerStream:
    """Both models of a pair, opened for streamed forwards. Use as a context manager."""

    def __init__(self, base: str, finetune: str, config: ForwardConfig | None = None) -> None:
        require_transformers()
        self.config = config or ForwardConfig()
        self.device = resolve_device(self.config.device)
        self.stats = ForwardStats()
        self._specs = (base, finetune)
        self._sources: tuple[Source, Source] | None = None
        self._plan: ModelPlan | None = None
        self._held: dict[str, int] = {}  # what is materialised now, by purpose: bytes
        self._readers: ThreadPoolExecutor | None = None
        self._ahead: ThreadPoolExecutor | None = None  # reads the next stage's tensors (``_read_ahead``)
        # Set before a forward whose weights ``state_dicts`` will want next (generation when the
        # models fit): every tensor read is kept, so that each model is read once in all.
        self.keep_reads = False
        self._kept: dict[str, dict[str, torch.Tensor]] = {"base": {}, "finetune": {}}
        # With ``keep_reads``, each decomposed matrix's directions too (k × max rank, no Δ): the
        # pass of ``state_dicts`` rebuilds Δ from the kept reads instead of decomposing again.
        self._weights = VariantWeights(
            self.device,
            self.config.dtype,
            self._hold,
            self._add_decompose_time,
            self.config.direction_cache,
            self._add_cached_directions,
        )
        # Set before passes that read the weights again (models too large to keep, read from local
        # files): the directions alone are kept, so no later pass decomposes again. With
        # ``direction_rank``, every matrix is decomposed up to that rank in the first pass, the
        # largest a later pass may ask for.
        self.keep_directions = False
        self.direction_rank: int | None = None

    def __enter__(self) -> LayerStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # A read ahead may be in flight (a stopped check): its queued tensor reads are cancelled and
        # only those already running are waited for, as before there was a read ahead.
        if self._ahead is not None:
            self._ahead.shutdown(wait=False, cancel_futures=True)
            self._ahead = None
        if self._readers is not None:
            self._readers.shutdown(wait=True, cancel_futures=True)
            self._readers = None
        if self._sources:
            for source in self._sources:
                source.close()

    @property
    def sources(self) -> tuple[Source, Source]:
        """(base, fine-tune) sources, after ``plan()``."""
        self.plan()
        assert self._sources is not None
        return self._sources

    def plan(self) -> ModelPlan:
        """Open both sources, read headers and the config, check the pair (``model_plan.check_pair``). Idempotent.

        Raises:
            MissingModelFileError, UnsupportedArchitectureError, VocabularyMismatchError,
            LimitExceededError, and the sources' errors (gated, not found, ...).
        """
        if self._plan is not None:
            return self._plan
        cfg = self.config
        self._sources = tuple(  # type: ignore[assignment]
            open_source(spec, revision=rev, token=cfg.token, endpoint=cfg.endpoint, allow_local=cfg.allow_local)
            for spec, rev in zip(self._specs, (cfg.base_revision, cfg.finetune_revision), strict=True)
        )
        self._plan = check_pair(
            self._specs,
            self.sources_unchecked(),
            max_tensors=cfg.max_tensors,
            max_tensor_bytes=cfg.max_tensor_bytes,
            max_model_bytes=cfg.max_model_bytes,
        )
        return self._plan

    def sources_unchecked(self) -> tuple[Source, Source]:
        if self._sources is None:
            raise LorafidError("The models are not opened yet; call plan() first.")
        return self._sources

    def full_rank(self) -> int:
        """The model's full rank: the largest k = min(m, n) of the block matrices a LoRA carries.

        A served rank at or above it keeps every matrix whole (``Decomposition.truncated``)."""
        plan = self.plan()
        return max(
            (min(info.shape) for name, info in plan.finetune_tensors.items() if carried_info(name, info)), default=0
        )

    def twins(self, variants: Sequence[Variant]) -> dict[str, str]:
        """{variant name: the name of an earlier variant with the very same weights} for variants
        not worth running twice: a served rank at or above the model's full rank is W_base + Δ =
        W_ft in every block, so with the fine-tune's extras it IS the fine-tune, and with the
        base's it equals every other such rank. Variants with a weight or base hook are never twins.

        Example: full rank 48, variants finetune, rank-64+extras, rank-64, rank-512 ->
        {"rank-64+extras": "finetune", "rank-512": "rank-64"}.
        """
        full = self.full_rank()
        first: dict[tuple[str, ...], str] = {}
        twins: dict[str, str] = {}
        for variant in variants:
            key: tuple[str, ...] = (variant.name,)
            if variant.weight_hook is None and variant.base_hook is None:
                if variant.kind == "finetune":
                    key = ("finetune",)
                elif variant.kind == "served" and variant.rank is not None and variant.rank >= full:
                    key = ("finetune",) if variant.keep_extras else ("whole blocks, base extras",)
            if key in first:
                twins[variant.name] = first[key]
            else:
                first[key] = variant.name
        return twins

    def logprobs(
        self, token_ids: Sequence[Sequence[int]], variants: Sequence[Variant]
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """See ``stream_logprobs``."""
        for event in self.events(token_ids, variants):
            if not isinstance(event, ForwardProgress):
                yield event

    def events(
        self, token_ids: Sequence[Sequence[int]], variants: Sequence[Variant]
    ) -> Iterator[ForwardProgress | tuple[int, dict[str, torch.Tensor]]]:
        """As ``logprobs``, with a ``ForwardProgress`` after each stage (for live progress).

        A variant that is another's twin (``twins``) is not run: its results are the other's."""
        plan = self.plan()
        texts = _check_inputs(token_ids, variants, plan.config.vocab_size)
        twins = self.twins(variants)
        variants = [v for v in variants if v.name not in twins]
        started = time.perf_counter()
        self.stats = ForwardStats(
            tokens=sum(len(ids) for ids in texts), layers=plan.config.num_hidden_layers, variants_run=len(variants)
        )
        self._warn_if_the_cache_is_too_small(variants)
        skeleton = meta_skeleton(plan.config)
        layers = plan.config.num_hidden_layers
        stages = layers + 2
        device, dtype = self.device, self.config.dtype

        # Texts of one length run through each block together (``_length_groups``): one call per
        # group instead of one per text, no padding, so every row is the text's own batch-1 math.
        groups = _length_groups(texts, _GROUP_TOKENS)
        where = {i: (g, row) for g, group in enumerate(groups) for row, i in enumerate(group)}

        # Each stage's tensors are read while the stage before runs (``_read_ahead``): over the
        # network, reading and computing overlap instead of adding up.
        head = "model.embed_tokens.weight" if plan.head_is_embedding else "lm_head.weight"
        norm = "model.norm.weight"
        stage_names = [
            *({n for n in plan.finetune_tensors if n.startswith(f"model.layers.{layer}.")} for layer in range(layers)),
            {norm} if plan.head_is_embedding else {norm, head},
        ]

        # Stage 1: embeddings -> hidden states of every (variant, group of texts).
        embed = "model.embed_tokens.weight"
        raw = self._read({embed}, variants)
        ahead = self._read_ahead(stage_names[0], variants)
        hidden: dict[str, list[torch.Tensor]] = {}

        def embed_all(raw: dict[str, dict[str, torch.Tensor]] = raw) -> None:
            ids = [torch.tensor([texts[i] for i in group], dtype=torch.long, device=device) for group in groups]
            for variant in variants:
                weight = self._weights.extra(variant, embed, raw)
                hidden[variant.name] = [weight[i] for i in ids]
                del weight

        self._compute(embed_all)
        tied_embedding = raw if plan.head_is_embedding else None
        del raw
        yield self._report(1, stages, started)

        units = layers * len(variants) * len(texts)  # (block, variant, text) runs, for per-prompt progress
        rotary = rotary_embedding(skeleton, plan.config, device, dtype)
        # Positions, rotary tables and masks depend on a group's length only: built once per group.
        positions = [torch.arange(len(texts[group[0]]), device=device).unsqueeze(0) for group in groups]
        first = hidden[variants[0].name]
        with torch.no_grad():
            rope = [rotary(first[g], positions[g]) for g in range(len(groups))]
        masks = [block_masks(plan.config, first[g], positions[g]) for g in range(len(groups))]
        kinds = layer_types(plan.config)

        # Stages 2..N+1: one block at a time, every variant through it.
        for layer in range(layers):
            prefix = f"model.layers.{layer}."
            raw = self._accept(*ahead.result())
            ahead = self._read_ahead(stage_names[layer + 1], variants)
            if tied_embedding is not None:  # held through the blocks, for the head: counted too
                self._hold("tied embedding", [t for tensors in tied_embedding.values() for t in tensors.values()])
            block = skeleton.model.layers[layer]
            building = self._block_weights(variants, raw, prefix)
            for done_variants in range(len(variants)):
                variant, weights = self._next_weights(building)
                if self.config.compute is not None:  # a pure kernel: its results replace ours
                    hidden[variant.name] = self.config.compute(
                        block_on_device, plan.config, layer, weights, hidden[variant.name]
                    )
                    self.stats.block_calls += len(groups)
                    del weights
                    unit = (layer * len(variants) + done_variants + 1) * len(texts)
                    yield self._progress(unit, units, started, f"block {layer + 1}/{layers} · {variant.name}")
                    continue
                done_texts = 0
                for g, group in enumerate(groups):

                    def run_group(
                        g: int = g,
                        variant: Variant = variant,
                        weights: Any = weights,
                        block: Any = block,
                        layer: int = layer,
                    ) -> None:
                        out = torch.func.functional_call(
                            block,
                            weights,
                            (hidden[variant.name][g],),
                            {
                                "attention_mask": masks[g][kinds[layer]],
                                "position_ids": positions[g],
                                "position_embeddings": rope[g],
                            },
                        )
                        hidden[variant.name][g] = out[0] if isinstance(out, tuple) else out

                    self._compute(run_group)
                    self.stats.block_calls += 1
                    for i in group:  # progress per prompt, as before the grouping
                        done_texts += 1
                        unit = (layer * len(variants) + done_variants) * len(texts) + done_texts
                        where_ = f"block {layer + 1}/{layers} · {variant.name} · prompt {i + 1}/{len(texts)}"
                        yield self._progress(unit, units, started, where_)
                del weights
            building.close()
            del raw
            self._held.clear()

        # Stage N+2: final norm and head, text by text, all variants at once.
        raw = self._accept(*ahead.result())
        if tied_embedding is not None:  # kept from stage 1: read once
            for side, tensors in tied_embedding.items():
                raw[side].update(tensors)
        del tied_embedding
        finals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def prepare_head(raw: dict[str, dict[str, torch.Tensor]] = raw) -> None:
            shared: dict[tuple[str, str], torch.Tensor] = {}
            for variant in variants:
                finals[variant.name] = (
                    self._weights.extra(variant, norm, raw, shared),
                    self._weights.extra(variant, head, raw, shared),
                )
            self._hold("head", list({id(t): t for pair in finals.values() for t in pair}.values()))

        self._compute(prepare_head)
        del raw
        final_norm = skeleton.model.norm
        left = [len(group) for group in groups]  # texts of each group still to run through the head
        yield self._report(stages, stages, started)
        for i in range(len(texts)):
            out: dict[str, torch.Tensor] = {}
            g, row = where[i]

            def run_head(g: int = g, row: int = row, out: dict[str, torch.Tensor] = out) -> None:
                for variant in variants:
                    norm_weight, head_weight = finals[variant.name]
                    text = hidden[variant.name][g][row : row + 1]
                    h = torch.func.functional_call(final_norm, {"weight": norm_weight}, (text,))
                    logits = (h[0] @ head_weight.T).to(torch.float32)
                    out[variant.name] = torch.log_softmax(logits, dim=-1).cpu()
                    if left[g] == 1:  # the group's last text is done: drop its activations
                        hidden[variant.name][g] = text.new_zeros(0)  # not a view: frees the group

            self._compute(run_head)
            left[g] -= 1
            for twin, same in twins.items():
                out[twin] = out[same]
            self.stats.elapsed_s = time.perf_counter() - started
            yield i, out

    def state_dicts(self, variants: Sequence[Variant]) -> Iterator[tuple[Variant, dict[str, torch.Tensor]]]:
        """Each variant's whole state dict (model parameter names, compute dtype, on the device).

        For generation when the model fits: all variants are built in one pass over the blocks
        (each model read once), so memory is (variants + 2) whole models. The caller checks
        that it fits (``ModelPlan.size_bytes``) before asking.
        """
        plan = self.plan()
        states: dict[str, dict[str, torch.Tensor]] = {v.name: {} for v in variants}
        outside = {n for n in plan.finetune_tensors if not n.startswith("model.layers.")}
        with torch.no_grad(), sp.exact_matmul():
            raw = self._read(outside, variants)
            for variant in variants:
                for name in outside:
                    states[variant.name][name] = self._weights.extra(variant, name, raw)
            del raw
            for layer in range(plan.config.num_hidden_layers):
                prefix = f"model.layers.{layer}."
                raw = self._read({n for n in plan.finetune_tensors if n.startswith(prefix)}, variants)
                for variant, weights in self._block_weights(variants, raw, prefix):
                    states[variant.name].update({prefix + n: t for n, t in weights.items()})
                del raw
        self.keep_reads = False
        self._kept = {"base": {}, "finetune": {}}  # every variant is built: the reads are done with
        self._weights.kept.clear()
        for variant in variants:
            yield variant, states.pop(variant.name)

    # -- internals ---------------------------------------------------------------------

    def _compute(self, fn: Callable[[], None]) -> None:
        started = time.perf_counter()
        with torch.no_grad(), sp.exact_matmul():
            fn()
        self.stats.compute_s += time.perf_counter() - started

    def _next_weights(
        self, building: Generator[tuple[Variant, dict[str, torch.Tensor]], None, None]
    ) -> tuple[Variant, dict[str, torch.Tensor]]:
        """The next variant's block weights from ``_block_weights``, their building timed as compute."""
        started = time.perf_counter()
        with torch.no_grad(), sp.exact_matmul():
            item = next(building)
        self.stats.compute_s += time.perf_counter() - started
        return item

    def _progress(self, unit: int, units: int, started: float, where: str) -> ForwardProgress:
        """Progress through the blocks: ``unit`` of ``units`` (block, variant, text) runs done."""
        self.stats.elapsed_s = time.perf_counter() - started
        read = self.stats.bytes_read
        return ForwardProgress(
            "forward", unit, units, self.stats.elapsed_s, f"{where} · {read / 1e6:.1f} MB read", read
        )

    def _report(self, stage: int, stages: int, started: float) -> ForwardProgress:
        self.stats.elapsed_s = time.perf_counter() - started
        if self.config.deadline is not None and time.monotonic() > self.config.deadline:
            raise LimitExceededError(
                f"Stopped after {self.stats.elapsed_s / 60:.1f} minutes at stage {stage} of {stages}: this server's "
                "time limit per check (LORAFID_MAX_AUDIT_MINUTES). Run it with the CLI on your own machine."
            )
        read = self.stats.bytes_read
        message = f"stage {stage}/{stages}: {read / 1e6:.1f} MB read"
        return ForwardProgress("reading", stage, stages, self.stats.elapsed_s, message, read)

    def _hold(self, purpose: str, tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> None:
        """Record that these tensors are materialised now (for ``stats.peak_weight_bytes``)."""
        values = tensors.values() if isinstance(tensors, Mapping) else tensors
        self._hold_bytes(purpose, sum(t.numel() * t.element_size() for t in values))

    def _hold_bytes(self, purpose: str, size: int) -> None:
        """Record that ``size`` bytes are held now for ``purpose`` (``_hold``, or bytes still arriving)."""
        self._held[purpose] = size
        self.stats.peak_weight_bytes = max(self.stats.peak_weight_bytes, sum(self._held.values()))

    def _read(self, names: set[str], variants: Sequence[Variant]) -> dict[str, dict[str, torch.Tensor]]:
        """{"base": {name: tensor}, "finetune": {...}} for the sides some variant needs, read in parallel."""
        out, jobs = self._reads(names, variants)
        return self._accept(self._fetch(out, jobs, self._pool()), jobs)

    def _read_ahead(self, names: set[str], variants: Sequence[Variant]) -> Future[Any]:
        """Start ``_read`` of ``names`` on a thread of its own; ``_accept(*future.result())`` takes it.

        Its bytes count as held from now on (``stats.peak_weight_bytes``): while one stage runs,
        the next stage's tensors arrive beside it.
        """
        out, jobs = self._reads(names, variants)
        self._hold_bytes("read ahead", sum(job[3].size_bytes for job in jobs))
        if self._ahead is None:
            self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafid-read-ahead")
        # The reader pool is taken here, on the main thread: a read ahead still starting when the
        # stream is closed then fails on the closed pool instead of opening a new one.
        pool = self._pool()
        return self._ahead.submit(lambda: (self._fetch(out, jobs, pool), jobs))

    def _reads(
        self, names: set[str], variants: Sequence[Variant]
    ) -> tuple[dict[str, dict[str, torch.Tensor]], list[tuple[str, str, Source, TensorInfo]]]:
        """What reading ``names`` takes: the tensors kept by an earlier pass, and the reads left to do."""
        plan = self.plan()
        base_source, finetune_source = self.sources_unchecked()
        need_base = any(v.kind != "finetune" for v in variants)
        need_finetune = any(v.kind != "base" for v in variants)
        jobs: list[tuple[str, str, Source, TensorInfo]] = []
        out: dict[str, dict[str, torch.Tensor]] = {"base": {}, "finetune": {}}
        for name in sorted(names):
            for side, needed, index, source in (
                ("base", need_base, plan.base_tensors, base_source),
                ("finetune", need_finetune, plan.finetune_tensors, finetune_source),
            ):
                if not needed or name not in index:
                    continue
                if name in self._kept[side]:  # read by an earlier pass (``keep_reads``)
                    out[side][name] = self._kept[side][name]
                else:
                    jobs.append((side, name, source, index[name]))
        return out, jobs

    def _fetch(
        self,
        out: dict[str, dict[str, torch.Tensor]],
        jobs: list[tuple[str, str, Source, TensorInfo]],
        pool: ThreadPoolExecutor,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Run the reads (in parallel, on ``pool``) into ``out``. Touches nothing else: it may run on
        the read-ahead thread."""
        pin = self.device.type == "cuda"
        tensors = list(pool.map(lambda job: read_tensor(job[2], job[3], pin), jobs))
        for (side, name, _, _), tensor in zip(jobs, tensors, strict=True):
            out[side][name] = tensor
        return out

    def _accept(
        self, out: dict[str, dict[str, torch.Tensor]], jobs: list[tuple[str, str, Source, TensorInfo]]
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Count what was read (bytes, memory held) and keep it where asked; returns ``out``."""
        if self.keep_reads:
            for side, name, _, _ in jobs:
                self._kept[side][name] = out[side][name]
        self.stats.bytes_read += sum(job[3].size_bytes for job in jobs)
        self._held.clear()
        self._hold("read", [t for side in out.values() for t in side.values()])
        if self.keep_reads or self.keep_directions:
            kept = [t for side in self._kept.values() for t in side.values()]
            self._hold("kept between passes", kept + self._weights.kept_vectors())
        return out

    def _pool(self) -> ThreadPoolExecutor:
        # One pool for the whole run: new threads per block would each get a fresh malloc arena,
        # and freed block buffers left in old arenas made peak RSS creep up with depth.
        if self._readers is None:
            self._readers = ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="lorafid-forward")
        return self._readers

    def _block_weights(
        self, variants: Sequence[Variant], raw: dict[str, dict[str, torch.Tensor]], prefix: str
    ) -> Generator[tuple[Variant, dict[str, torch.Tensor]], None, None]:
        """Each variant's weights of one block (``VariantWeights.block``), directions kept as set."""
        keep = self.keep_reads or self.keep_directions
        rank = self.direction_rank if self.keep_directions else None
        return self._weights.block(variants, raw, prefix, keep=keep, direction_rank=rank)

    def _add_decompose_time(self, seconds: float) -> None:
        self.stats.decompose_s += seconds

    def _add_cached_directions(self) -> None:
        self.stats.directions_cached += 1

    def _warn_if_the_cache_is_too_small(self, variants: Sequence[Variant]) -> None:
        cache = self.config.direction_cache
        ranks = [v.rank for v in variants if v.kind == "served" and v.rank is not None]
        if cache is not None and ranks:
            cache.warn_if_too_small(self.direction_bytes(max(ranks)))

    def direction_bytes(self, rank: int) -> int:
        """What ``keep_directions`` holds once every carried matrix is decomposed up to ``rank``:
        k × rank float32 numbers per 2-D tensor the two models share (an upper bound: the
        embeddings and head, which are not decomposed, are counted)."""
        plan = self.plan()
        return sum(
            min(info.shape) * min(rank, min(info.shape)) * 4
            for name, info in plan.finetune_tensors.items()
            if len(info.shape) == 2 and name in plan.base_tensors
        )


def stream_logprobs(
    base: str,
    finetune: str,
    token_ids: Sequence[Sequence[int]],
    variants: Sequence[Variant],
    config: ForwardConfig | None = None,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yields (text_index, {variant.name: float32 CPU tensor (len(ids), vocab) of log-softmax
    next-token log-probabilities at each position}) one text at a time, after the last layer.

    Row j of a text's tensor is the distribution of the token after ids[: j + 1]. Every text
    goes through block i (for every variant) before block i is dropped, so nothing is yielded
    before the last block has run; closing the generator early frees everything.

    Raises:
        ValueError: no variant, duplicate names, an empty text, or a token id outside the vocabulary.
        LorafidError subclasses: see ``LayerStream.plan``.
    """
    with LayerStream(base, finetune, config) as stream:
        yield from stream.logprobs(token_ids, variants)


def _check_inputs(token_ids: Sequence[Sequence[int]], variants: Sequence[Variant], vocab_size: int) -> list[list[int]]:
    if not variants:
        raise ValueError("No variant to run: pass at least one Variant.")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"Variant names must be unique, got {names}")
    texts = [list(map(int, ids)) for ids in token_ids]
    for index, ids in enumerate(texts):
        if not ids:
            raise ValueError(f"Text {index} has no tokens.")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"Text {index} has token id {bad[0]}, outside the vocabulary of {vocab_size}.")
    return texts


def _length_groups(texts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    """Indexes of the texts grouped by length, each group at most ``max_tokens`` positions (at
    least one text), lengths in order of first appearance.

    Example: lengths 3, 5, 3, 3 with ``max_tokens`` 6 -> [[0, 2], [3], [1]].
    """
    by_length: dict[int, list[list[int]]] = {}
    for index, ids in enumerate(texts):
        chunks = by_length.setdefault(len(ids), [[]])
        if chunks[-1] and (len(chunks[-1]) + 1) * len(ids) > max_tokens:
            chunks.append([])
        chunks[-1].append(index)
    return [group for chunks in by_length.values() for group in chunks]
