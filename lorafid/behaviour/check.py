"""Behaviour check: how far the served extraction's next-token distributions are from the fine-tune's.

The weight audit says how much of Δ a rank keeps; this says what that does to the model's
outputs. Prompt texts (a built-in set, or the user's) are tokenized with the fine-tune's
tokenizer, the layer-streamed forward (``forward``) runs the fine-tune F, its base and the
served variants at each rank, and each variant is scored against F, teacher-forced:

- ``kl``: KL(F ‖ variant) in nats of the next-token distribution at every position (mean,
  p95, max), computed in float64 from the float32 log-probabilities;
- ``top1_agreement``: share of positions where the variant's most likely token is F's;
- ``loglik_delta``: mean log-likelihood of the text's own next tokens under the variant
  minus under F (negative: the variant finds the text less likely);
- per prompt and overall (positions of all prompts pooled), and for each rank the share of
  the KL due to the tensors a LoRA cannot carry: (KL lora-only − KL keep-extras) / KL lora-only.

Serving modes: ``lora-only`` (embeddings, lm_head, norms, biases at the base's values, as a
multi-LoRA server runs it; variants ``rank-R``) and ``keep-extras`` (those at the fine-tune's;
variants ``rank-R+extras``); ``both`` runs both. When the whole model fits
(``max_generate_bytes``), a short greedy continuation per prompt is also generated with F, the
base and each served variant, with the first token where each departs from F's.

Worked example of the metrics: F = (0.5, 0.5), variant = (0.9, 0.1) at one position gives
KL = 0.5·ln(0.5/0.9) + 0.5·ln(0.5/0.1) = 0.5108 nats; top-1 agrees (a tie in F goes to the
first token, as ``argmax`` does).

Not here: reading weights or running blocks (``forward``), the linear algebra (``spectrum``),
UI (``app.py``, ``cli.py``), the tokenizer (``tokenizer``), the prompt texts (``prompts``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lorafid.behaviour.prompts import PROMPT_SET, Prompt, builtin_prompts
from lorafid.behaviour.report import BehaviourReport, VariantResult
from lorafid.behaviour.tokenizer import encode_prompts, load_tokenizer
from lorafid.compute import ComputeHook
from lorafid.errors import LorafidError
from lorafid.progress import Progress, run_to_end
from lorafid.weights.source import Source

if TYPE_CHECKING:
    from lorafid.behaviour.direction_cache import DirectionCache

SERVING_MODES: tuple[str, ...] = ("lora-only", "keep-extras", "both")
# -- metrics -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenScores:
    """Per-position numbers of one variant on one text (NumPy, float64)."""

    kl: np.ndarray  # (T,) KL(F ‖ variant) in nats at every position
    top1: np.ndarray  # (T,) bool: the variant's argmax is F's
    loglik: np.ndarray  # (T-1,) log-probability the variant gives the text's next token
    reference_loglik: np.ndarray  # (T-1,) the same under F


def score_tokens(reference: torch.Tensor, variant: torch.Tensor, ids: Sequence[int]) -> TokenScores:
    """Compare a variant's log-probabilities (T × vocab) with F's on the text ``ids`` (length T).

    Example: reference log(0.5, 0.5), variant log(0.9, 0.1) -> kl 0.5108, top1 True.
    """
    ref = reference.to(torch.float64)
    var = variant.to(torch.float64)
    kl = (ref.exp() * (ref - var)).sum(-1).clamp_min(0.0)  # ≥ 0 in exact arithmetic
    top1 = ref.argmax(-1) == var.argmax(-1)
    following = torch.as_tensor(list(ids[1:]), dtype=torch.long)
    positions = torch.arange(len(following))
    return TokenScores(
        kl=kl.numpy(),
        top1=top1.numpy(),
        loglik=var[positions, following].numpy(),
        reference_loglik=ref[positions, following].numpy(),
    )


@dataclass(frozen=True)
class Summary:
    """KL, top-1 and log-likelihood change over a set of positions."""

    kl_mean: float
    kl_p95: float
    kl_max: float
    top1_agreement: float
    loglik_delta: float  # mean log-likelihood under the variant minus under F, nats per token
    tokens: int  # positions scored for KL and top-1

    @staticmethod
    def of(scores: Sequence[TokenScores]) -> Summary:
        kl = np.concatenate([s.kl for s in scores])
        loglik = np.concatenate([s.loglik for s in scores])
        reference = np.concatenate([s.reference_loglik for s in scores])
        return Summary(
            kl_mean=float(kl.mean()),
            kl_p95=float(np.percentile(kl, 95)),
            kl_max=float(kl.max()),
            top1_agreement=float(np.concatenate([s.top1 for s in scores]).mean()),
            loglik_delta=float(loglik.mean() - reference.mean()) if len(loglik) else 0.0,
            tokens=len(kl),
        )


# -- the check -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BehaviourConfig:
    """How to run a behaviour check. Defaults suit a laptop at test size and a GPU at 8B."""

    ranks: tuple[int, ...] = (16, 64, 256)
    serving: str = "both"  # "lora-only", "keep-extras", or "both" (gives the extras' share of KL)
    prompts: Sequence[Prompt] | None = None  # None: the built-in set
    chat_template: bool = False  # wrap each prompt as a user turn in the fine-tune's chat template
    max_tokens: int = 256  # per prompt, after templating
    continuation_tokens: int = 24  # greedy tokens per prompt side by side; 0: none
    max_generate_bytes: int = 8 * 2**30  # generate only if (variants + 2) whole models fit in this
    device: str = "auto"
    dtype: torch.dtype = torch.float32
    base_revision: str | None = None
    finetune_revision: str | None = None
    token: str | bool | None = field(default=None, repr=False)  # for requests only, never stored
    endpoint: str | None = None
    allow_local: bool = True
    max_model_bytes: int | None = None
    max_tensor_bytes: int | None = None  # see ForwardConfig: a server's limits, checked from the headers
    max_tensors: int | None = None
    deadline: float | None = None  # time.monotonic() after which the check stops (LimitExceededError)
    compute: ComputeHook | None = field(default=None, repr=False)  # where blocks run: see ForwardConfig.compute
    # Directions of Δ kept between runs (see ForwardConfig.direction_cache); None: decompose every run.
    direction_cache: DirectionCache | None = field(default=None, repr=False, compare=False)

    def variants(self) -> list[Any]:
        """F first, then the base, then the served variants by rank (lora-only before keep-extras)."""
        from lorafid.behaviour.variants import BASE, FINETUNE, served

        out = [FINETUNE, BASE]
        for rank in sorted(set(self.ranks)):
            if self.serving in ("lora-only", "both"):
                out.append(served(rank))
            if self.serving in ("keep-extras", "both"):
                out.append(served(rank, keep_extras=True))
        return out

    def check(self) -> None:
        if self.serving not in SERVING_MODES:
            raise LorafidError(f"Serving mode {self.serving!r} is unknown; use one of {', '.join(SERVING_MODES)}.")
        if not self.ranks or any(not isinstance(r, int) or r < 1 for r in self.ranks):
            raise LorafidError(f"Ranks must be positive integers, e.g. 16,64,256; got {list(self.ranks)}.")
        if self.max_tokens < 2:
            raise LorafidError("max_tokens must be at least 2 (one token to condition on, one to score).")


class BehaviourCheck:
    """One behaviour check of a (base, fine-tune) pair. ``run()`` yields ``Progress`` (stages
    "reading", "scoring", "generating", "done"); ``report()``
    returns what is finished at any time (``status`` "partial" until every prompt is scored)."""

    def __init__(self, base: str, finetune: str, config: BehaviourConfig | None = None) -> None:
        from lorafid.behaviour.forward import ForwardConfig

        self.config = config or BehaviourConfig()
        self.config.check()
        cfg = self.config
        self._specs = (base, finetune)
        self._forward_config = ForwardConfig(
            device=cfg.device,
            token=cfg.token,
            endpoint=cfg.endpoint,
            base_revision=cfg.base_revision,
            finetune_revision=cfg.finetune_revision,
            allow_local=cfg.allow_local,
            dtype=cfg.dtype,
            max_model_bytes=cfg.max_model_bytes,
            max_tensor_bytes=cfg.max_tensor_bytes,
            max_tensors=cfg.max_tensors,
            deadline=cfg.deadline,
            compute=cfg.compute,
            direction_cache=cfg.direction_cache,
        )
        self.prompts = list(cfg.prompts) if cfg.prompts is not None else builtin_prompts()
        if not self.prompts:
            raise LorafidError("No prompts to score.")
        self.variants = cfg.variants()
        self._scores: dict[int, dict[str, TokenScores]] = {}
        self._ids: list[list[int]] = []
        self._continuations: list[dict[str, Any]] | None = None
        self._continuation_note = ""
        self._sources: list[dict[str, Any]] = []
        self._stats: dict[str, Any] = {}
        self._created = ""

    def run(self) -> Iterator[Progress]:
        """Tokenize, stream the forward, score; then the side-by-side continuations if they fit."""
        from lorafid.behaviour.forward import ForwardProgress, LayerStream

        cfg = self.config
        started = time.perf_counter()
        self._created = datetime.now(UTC).isoformat(timespec="seconds")
        with LayerStream(*self._specs, self._forward_config) as stream:
            plan = stream.plan()
            # The fine-tune opened once: its tokenizer comes from the forward's source.
            tokenizer = load_tokenizer(self._specs[1], source=stream.sources[1])
            self._ids = encode_prompts(tokenizer, self.prompts, chat=cfg.chat_template, max_tokens=cfg.max_tokens)
            if len(tokenizer) > plan.config.vocab_size:
                raise LorafidError(
                    f"The fine-tune's tokenizer has {len(tokenizer)} tokens but its model only "
                    f"{plan.config.vocab_size}; the tokenizer files do not belong to these weights."
                )
            self._sources = [_source_record(s) for s in stream.sources]
            # Generation will want every weight again: keep what the forward reads (each model read once).
            stream.keep_reads = cfg.continuation_tokens > 0 and self._generation_bytes(stream) <= cfg.max_generate_bytes
            for event in stream.events(self._ids, self.variants):
                elapsed = time.perf_counter() - started
                if isinstance(event, ForwardProgress):
                    yield Progress(event.stage, event.done, event.total, elapsed, event.message)
                    continue
                index, logprobs = event
                reference = logprobs["finetune"]
                self._scores[index] = {
                    v.name: score_tokens(reference, logprobs[v.name], self._ids[index])
                    for v in self.variants
                    if v.name != "finetune"
                }
                yield Progress("scoring", len(self._scores), len(self.prompts), elapsed, f"prompt {index + 1} scored")
            self._stats = {
                "weight_bytes_read": stream.stats.bytes_read,
                "peak_weight_bytes": stream.stats.peak_weight_bytes,
                "tokens_per_variant": stream.stats.tokens,
                "forward_s": stream.stats.elapsed_s,
                "compute_s": stream.stats.compute_s,
                "decompose_s": stream.stats.decompose_s,
                "matrices_from_direction_cache": stream.stats.directions_cached,
            }
            if cfg.continuation_tokens > 0:
                yield Progress("generating", 0, len(self.prompts), time.perf_counter() - started, "")
                self._continuations = yield from self._generate(stream, tokenizer, plan, started)
        self._stats["elapsed_s"] = time.perf_counter() - started
        yield Progress("done", len(self.prompts), len(self.prompts), self._stats["elapsed_s"], "done")

    def _generate(
        self, stream: Any, tokenizer: Any, plan: Any, started: float
    ) -> Generator[Progress, None, list[dict[str, Any]] | None]:
        """Greedy continuations of F, the base and each served variant, if all of them fit at once;
        each variant's prompts in batches (``generation``), a ``Progress`` ("generating", prompts ×
        variants done) after each batch.
        A variant that is another's twin (``LayerStream.twins``) gets the other's continuations."""
        from lorafid.behaviour.blocks import build_model
        from lorafid.behaviour.generation import greedy_continuations

        generators = list(self.variants)
        needed = self._generation_bytes(stream)
        if needed > self.config.max_generate_bytes:
            self._continuation_note = (
                f"not generated: {len(generators)} whole models need {needed / 2**30:.1f} GiB, above "
                f"max_generate_bytes {self.config.max_generate_bytes / 2**30:.1f} GiB"
            )
            return None
        texts: dict[str, list[list[int]]] = {}
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        twins = stream.twins(generators)
        generators = [v for v in generators if v.name not in twins]
        total = len(generators) * len(self._ids)
        for done_variants, (variant, state) in enumerate(stream.state_dicts(generators)):
            model = build_model(plan.config, state, stream.device)
            by_prompt: dict[int, list[int]] = {}
            batches = greedy_continuations(
                model, self._ids, self.config.continuation_tokens, pad_id=pad, eos_id=eos, device=stream.device
            )
            for batch in batches:
                by_prompt.update(batch)
                done = done_variants * len(self._ids) + len(by_prompt)
                message = f"{variant.name} · {len(by_prompt)}/{len(self._ids)} prompts"
                yield Progress("generating", done, total, time.perf_counter() - started, message)
            texts[variant.name] = [by_prompt[i] for i in range(len(self._ids))]
            del model, state
        for twin, same in twins.items():
            texts[twin] = texts[same]
        rows = []
        for index in range(len(self._ids)):
            reference = texts["finetune"][index]
            row: dict[str, Any] = {
                "prompt": self.prompts[index].id,
                "finetune": tokenizer.decode(reference, skip_special_tokens=True),
                "variants": {},
            }
            for name, outputs in texts.items():
                if name != "finetune":
                    row["variants"][name] = {
                        "text": tokenizer.decode(outputs[index], skip_special_tokens=True),
                        "first_divergence": first_divergence(reference, outputs[index]),
                    }
            rows.append(row)
        return rows

    def _generation_bytes(self, stream: Any) -> int:
        """What generating needs at once: every variant's whole model in the compute dtype, plus
        both models as read (kept from the forward), counted as two more whole models."""
        plan = stream.plan()
        element = torch.tensor([], dtype=self.config.dtype).element_size()
        whole = sum(math.prod(t.shape) for t in plan.finetune_tensors.values()) * element  # one model, compute dtype
        return (len(self.variants) - len(stream.twins(self.variants)) + 2) * whole

    def report(self) -> BehaviourReport:
        """The ``lorafid.behaviour/1`` report of what is finished so far."""
        cfg = self.config
        done = sorted(self._scores)
        names = [v.name for v in self.variants if v.name != "finetune"]
        variants: dict[str, VariantResult] = {}
        for v in self.variants:
            if v.name == "finetune" or not done:
                continue
            summary = Summary.of([self._scores[i][v.name] for i in done])
            variants[v.name] = VariantResult(v.kind, v.rank, v.keep_extras, **summary.__dict__)
        extras_share = {}
        for rank in sorted(set(cfg.ranks)):
            lora, kept = variants.get(f"rank-{rank}"), variants.get(f"rank-{rank}+extras")
            if lora and kept and lora.kl_mean > 0:
                extras_share[str(rank)] = max(0.0, (lora.kl_mean - kept.kl_mean) / lora.kl_mean)
        rows = []
        for i in done:
            reference = self._scores[i][names[0]].reference_loglik
            rows.append(
                {
                    "id": self.prompts[i].id,
                    "category": self.prompts[i].category,
                    "text": self.prompts[i].text,
                    "tokens": len(self._ids[i]),
                    "finetune_loglik": float(reference.mean()) if len(reference) else None,
                    "variants": {name: Summary.of([self._scores[i][name]]).__dict__ for name in names},
                }
            )
        return BehaviourReport(
            status="complete" if len(done) == len(self.prompts) else "partial",
            created=self._created,
            base=self._sources[0] if self._sources else {"spec": self._specs[0]},
            finetune=self._sources[1] if self._sources else {"spec": self._specs[1]},
            settings={
                "ranks": sorted(set(cfg.ranks)),
                "serving": cfg.serving,
                "chat_template": cfg.chat_template,
                "prompt_set": PROMPT_SET if cfg.prompts is None else "user",
                "prompts": len(self.prompts),
                "max_tokens": cfg.max_tokens,
                "continuation_tokens": cfg.continuation_tokens,
                "device": cfg.device,
                "dtype": str(cfg.dtype).removeprefix("torch."),
                "reference": "finetune",
                "kl": "KL(finetune || variant), nats, next-token distribution at every position, float64",
            },
            variants=variants,
            extras_share=extras_share,
            prompts=rows,
            continuations=self._continuations,
            continuations_note=self._continuation_note,
            stats=self._stats,
        )


def first_divergence(reference: Sequence[int], other: Sequence[int]) -> int | None:
    """Index of the first token where ``other`` departs from ``reference``; None if they agree.

    Example: [5, 6, 7] vs [5, 6, 9] -> 2; [5, 6] vs [5, 6, 7] -> 2; [5, 6] vs [5, 6] -> None.
    """
    for index, (a, b) in enumerate(zip(reference, other, strict=False)):
        if a != b:
            return index
    return None if len(reference) == len(other) else min(len(reference), len(other))


def behave(base: str, finetune: str, config: BehaviourConfig | None = None) -> BehaviourReport:
    """Run a whole behaviour check and return its report (the library's one-call form)."""
    return run_to_end(BehaviourCheck(base, finetune, config))


def _source_record(source: Source) -> dict[str, Any]:
    info = source.info
    return {
        "spec": info.spec,
        "kind": info.kind,
        "repo_id": info.repo_id,
        "requested_revision": info.requested_revision,
        "resolved_sha": info.resolved_sha,
        "path": info.path,
    }


def describe(report: BehaviourReport) -> str:
    """The terminal summary of a behaviour check: one line per variant.

    Example line: ``rank-64           0.0123   0.0456   97.5%   -0.0031   1024``.
    """
    settings = report.settings
    lines = [
        f"{report.finetune['spec']} vs its variants, {settings['prompts']} prompts "
        f"({settings['prompt_set']}{', chat template' if settings['chat_template'] else ''}), reference: the fine-tune",
        f"{'variant':<18}{'KL mean':>10}{'KL p95':>10}{'KL max':>10}{'top-1':>9}{'Δ loglik':>10}{'tokens':>8}",
    ]
    for name, v in report.variants.items():
        lines.append(
            f"{name:<18}{v.kl_mean:>10.4f}{v.kl_p95:>10.4f}{v.kl_max:>10.4f}"
            f"{v.top1_agreement:>9.1%}{v.loglik_delta:>10.4f}{v.tokens:>8}"
        )
    if report.extras_share:
        shares = ", ".join(f"rank {r}: {s:.0%}" for r, s in report.extras_share.items())
        lines.append(f"share of the KL due to embeddings/lm_head/norms/biases left at the base: {shares}")
    rows = report.continuations or []
    if rows:
        diverged = {name: [r["variants"][name]["first_divergence"] for r in rows] for name in rows[0]["variants"]}
        lines.append(
            "greedy continuations identical to the fine-tune's: "
            + ", ".join(f"{n} {sum(d is None for d in ds)}/{len(ds)}" for n, ds in diverged.items())
        )
    elif report.continuations_note:
        lines.append(f"continuations {report.continuations_note}")
    if report.status != "complete":
        lines.append(f"partial: {len(report.prompts)} of {settings['prompts']} prompts scored")
    return "\n".join(lines)
