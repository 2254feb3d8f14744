"""The provider check's report: the versioned ``lorafid.probe/1`` JSON document.

``ProbeReport`` holds no API key and, of the endpoint, only its host; ``from_dict`` is the one
boundary where a stored or downloaded document is checked and read back.

Not here: running the check (``probe``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from typing import Any

from lorafid import __version__
from lorafid.documents import decode_document
from lorafid.providers.evidence import (
    CandidateResult,
    PromptScore,
    Verdict,
)
from lorafid.providers.text_channel import GREEDY, TEXT
from lorafid.providers.text_evidence import TextCandidate

SCHEMA = "lorafid.probe/1"

# -- the report --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeReport:
    """The versioned result (``lorafid.probe/1``): no key, no endpoint path or query."""

    status: str  # "complete" or "partial"
    endpoint_host: str
    model: str
    method: str | None  # the channel used
    channels_tried: list[dict[str, str]]
    base: dict[str, str | None]
    finetune: dict[str, str | None]
    prompt_set: dict[str, Any]
    settings: dict[str, Any]
    requests: dict[str, int]
    candidates: dict[str, CandidateResult] | dict[str, TextCandidate]
    verdict: Verdict | None
    prompts: list[dict[str, Any]]
    failed_prompts: dict[int, str]
    error: str | None = None
    # The text channel: the sampler sent, what the endpoint accepted, and the evidence's totals.
    text: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": SCHEMA, "tool_version": __version__}
        out.update(asdict(self))
        out["candidates"] = {n: _rounded(asdict(c)) for n, c in self.candidates.items()}
        if self.text is None:
            del out["text"]
        out["verdict"] = asdict(self.verdict) if self.verdict else None
        out["failed_prompts"] = {str(k): v for k, v in self.failed_prompts.items()}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Any) -> ProbeReport:
        """Decode ``to_dict``'s layout: the one place where a stored, downloaded or published
        check is read back. Raises ``ReportFormatError`` (only) for anything else, naming the
        missing or mistyped field, never a KeyError or TypeError traceback.
        """
        remedy = "Run it again with lorafid probe --out."
        return decode_document(data, SCHEMA, "provider check", remedy, cls._decode)

    @classmethod
    def _decode(cls, data: dict[str, Any]) -> ProbeReport:
        text_method = data["method"] in (TEXT, GREEDY)
        record = TextCandidate if text_method else CandidateResult
        fields = {f.name for f in dataclass_fields(record)}
        candidates: dict[str, Any] = {}
        for name, c in dict(data["candidates"]).items():
            missing = fields - set(c)
            if missing:
                raise KeyError(f"candidates.{name}.{sorted(missing)[0]}")
            candidates[name] = record(**{k: c[k] for k in fields} | {"interval": tuple(c["interval"])})
        verdict = data["verdict"]
        if verdict is not None:
            range_ = verdict["rank_range"]
            verdict = Verdict(
                **verdict
                | {"consistent": tuple(verdict["consistent"]), "rank_range": tuple(range_) if range_ else None}
            )
        return cls(
            status=str(data["status"]),
            endpoint_host=str(data["endpoint_host"]),
            model=str(data["model"]),
            method=data["method"],
            channels_tried=list(data["channels_tried"]),
            base=dict(data["base"]),
            finetune=dict(data["finetune"]),
            prompt_set=dict(data["prompt_set"]),
            settings=dict(data["settings"]),
            requests=dict(data["requests"]),
            candidates=candidates,
            verdict=verdict,
            prompts=list(data["prompts"]),
            failed_prompts={int(k): str(v) for k, v in dict(data["failed_prompts"]).items()},
            error=data.get("error"),
            text=data.get("text"),
        )

    def table(self) -> str:
        """The candidates as a terminal table, closest first."""
        text = [c for c in self.candidates.values() if isinstance(c, TextCandidate)]
        if text:
            return _text_table(text)
        lines = [f"{'candidate':<26}{'KL nats/token':>14}{'95% interval':>24}{'top-1':>8}{'|Δlogp|':>9}"]
        logprob = [c for c in self.candidates.values() if isinstance(c, CandidateResult)]
        for c in sorted(logprob, key=lambda c: c.distance):
            interval = f"[{c.interval[0]:.3g}, {c.interval[1]:.3g}]"
            mark = "" if not c.ruled_out else "  ruled out"
            lines.append(
                f"{c.name:<26}{c.distance:>14.4g}{interval:>24}{c.top1_agreement:>8.1%}{c.chosen_logprob_error:>9.3g}{mark}"
            )
        return "\n".join(lines)


def _text_table(candidates: Sequence[TextCandidate]) -> str:
    lines = [f"{'candidate':<26}{'log p/token':>12}{'gap':>11}{'95% interval':>24}{'fit z':>8}{'argmax':>8}"]
    for c in sorted(candidates, key=lambda c: c.gap):
        interval = f"[{c.interval[0]:.3g}, {c.interval[1]:.3g}]"
        mark = "  ruled out" if c.ruled_out else ""
        lines.append(
            f"{c.name:<26}{c.mean_logprob:>12.4f}{c.gap:>11.3g}{interval:>24}{c.fit_z:>8.1f}{c.argmax_agreement:>8.1%}{mark}"
        )
    return "\n".join(lines)


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    """Floats (and pairs of them, the intervals) to 8 decimals; distances and intervals alike."""

    def one(v: Any) -> Any:
        if isinstance(v, float) and math.isfinite(v):
            return round(v, 8)
        if isinstance(v, tuple | list) and all(isinstance(x, float) for x in v):
            return [one(x) for x in v]
        return v

    return {k: one(v) for k, v in values.items()}


def prompt_rows(scores: Iterable[PromptScore], texts: Sequence[str]) -> list[dict[str, Any]]:
    """Per-prompt evidence: the text's start, tokens scored, each candidate's mean distance."""
    return [
        {
            "index": s.prompt_index,
            "text": texts[s.prompt_index][:120],
            "tokens": s.tokens,
            "distance": {n: round(v / max(s.tokens, 1), 8) for n, v in s.kl_sum.items()},
        }
        for s in scores
    ]
