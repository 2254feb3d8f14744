"""The behaviour check's report: the versioned ``lorafid.behaviour/1`` JSON document, typed.

``BehaviourReport`` is what ``BehaviourCheck.report()`` returns; ``to_dict`` is the JSON
layout (keys in a stable order), and ``from_dict`` is the one place where a stored, downloaded
or published document is read back: anything else raises ``ReportFormatError`` naming the
missing or mistyped field, never a KeyError or TypeError traceback.

Not here: computing the numbers (``check``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from lorafid.documents import decode_document

SCHEMA = "lorafid.behaviour/1"


@dataclass(frozen=True)
class VariantResult:
    """One variant against the fine-tune, pooled over every scored position."""

    kind: str  # "served" or "base"
    rank: int | None
    keep_extras: bool
    kl_mean: float  # KL(fine-tune ‖ variant), nats per token
    kl_p95: float
    kl_max: float
    top1_agreement: float
    loglik_delta: float  # mean log-likelihood under the variant minus under the fine-tune, nats per token
    tokens: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantResult:
        wanted = {f.name for f in fields(cls)}
        missing = wanted - set(data)
        if missing:
            raise KeyError(sorted(missing)[0])
        return cls(**{k: data[k] for k in wanted})


@dataclass(frozen=True)
class BehaviourReport:
    """A behaviour check's result (see ``check`` for what each number means)."""

    status: str  # "complete", or "partial" until every prompt is scored
    created: str
    base: dict[str, Any]  # the source: spec, kind, repo_id, requested_revision, resolved_sha, path
    finetune: dict[str, Any]
    settings: dict[str, Any]  # ranks, serving, chat_template, prompt_set, prompts, max_tokens, ...
    variants: dict[str, VariantResult]
    extras_share: dict[str, float]  # rank -> share of the KL due to tensors a LoRA cannot carry
    prompts: list[dict[str, Any]]  # per prompt: id, category, text, tokens, finetune_loglik, variants
    continuations: list[dict[str, Any]] | None  # side-by-side greedy continuations, when they fit
    continuations_note: str
    stats: dict[str, Any]  # bytes read, peak weight bytes, tokens per variant, seconds
    ranks_note: str | None = None  # ranks asked above the largest matrix's full rank, run at it

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, keys in a stable order."""
        out: dict[str, Any] = {"schema": SCHEMA}
        for f in fields(self):
            out[f.name] = getattr(self, f.name)
        out["variants"] = {name: asdict(v) for name, v in self.variants.items()}
        if self.ranks_note is None:
            del out["ranks_note"]  # written only when a rank was brought down
        return out

    @classmethod
    def from_dict(cls, data: Any) -> BehaviourReport:
        """Decode ``to_dict``'s layout; raises ``ReportFormatError`` (only) for anything else."""
        remedy = "Run it again with lorafid behave --out."
        return decode_document(data, SCHEMA, "behaviour check", remedy, cls._decode)

    @classmethod
    def _decode(cls, data: dict[str, Any]) -> BehaviourReport:
        return cls(
            status=str(data["status"]),
            created=str(data["created"]),
            base=dict(data["base"]),
            finetune=dict(data["finetune"]),
            settings=dict(data["settings"]),
            variants={str(n): VariantResult.from_dict(dict(v)) for n, v in dict(data["variants"]).items()},
            extras_share={str(r): float(s) for r, s in dict(data["extras_share"]).items()},
            prompts=[dict(p) for p in data["prompts"]],
            continuations=None if data["continuations"] is None else [dict(c) for c in data["continuations"]],
            continuations_note=str(data["continuations_note"]),
            stats=dict(data["stats"]),
        )
