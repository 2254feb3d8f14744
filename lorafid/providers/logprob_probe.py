"""The log-probability channels' local side: every candidate over the provider's tokens.

``score_candidates`` runs the fine-tune, the base, each rank in both serving modes and the
quantized references (or the subset a pass asks for: ``refine``) through the layer-streamed
forward over the very token sequences the provider scored; ``gather`` keeps the probabilities
of the provider's listed tokens;
``score_prompt`` and ``local_distances`` reduce both sides to per-prompt sums that
``evidence`` turns into distances and a verdict.

Not here: reading the provider (``logprob_channel``), the forward pass (``behaviour.forward``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lorafid.behaviour.variants import Variant
from lorafid.providers.evidence import (
    BASE,
    BASE_QUANTIZED,
    FINETUNE,
    PromptScore,
    candidate_names,
    coarse_kl,
    parse_candidate,
    quantized_name,
)
from lorafid.providers.logprob_channel import Observation
from lorafid.providers.quantize import scheme

# -- local candidates --------------------------------------------------------------------------


@dataclass(frozen=True)
class Gathered:
    """One candidate's numbers at one prompt's scored tokens (everything the distances need).

    ``alt_logprobs[t, j]`` is the candidate's log-probability of the provider's j-th
    alternative at scored token t (NaN where that alternative has no id), ``chosen[t]`` of the
    provider's own token, ``argmax[t]`` the candidate's most likely token.
    """

    alt_logprobs: np.ndarray
    chosen: np.ndarray
    argmax: np.ndarray


def gather(observation: Observation, logprobs: torch.Tensor) -> Gathered:
    """Pick a candidate's numbers from its (len(ids), vocab) next-token log-probabilities.

    Row t of ``logprobs`` predicts token t + 1, so scored token t reads row t − 1.
    """
    rows = logprobs.index_select(0, torch.tensor([t - 1 for t in observation.scored], dtype=torch.long))
    width = max((len(a) for a in observation.alternative_ids), default=0)
    listed = [[i for i in ids] + [None] * (width - len(ids)) for ids in observation.alternative_ids]
    index = torch.tensor([[i if i is not None else 0 for i in row] for row in listed], dtype=torch.long)
    alt = rows.gather(1, index.reshape(len(listed), width)).double().numpy()
    alt[np.array([[i is None for i in row] for row in listed], dtype=bool).reshape(alt.shape)] = np.nan
    own = torch.tensor([observation.ids[t] for t in observation.scored], dtype=torch.long)
    chosen = rows.gather(1, own[:, None])[:, 0].double().numpy()
    return Gathered(alt, chosen, rows.argmax(dim=1).numpy())


def candidate_variants(
    ranks: Sequence[int], quantized: Sequence[str] = (), names: Collection[str] | None = None
) -> list[Variant]:
    """The behaviour engine's variants for ``candidate_names(ranks, quantized)``, or those of them in ``names``."""
    hooks = {quantized_name(q): scheme(q) for q in ("int8", *quantized) if not q.startswith(BASE_QUANTIZED)}
    variants = []
    for name in candidate_names(ranks, quantized):
        if names is not None and name not in names:
            continue
        rank, keep = parse_candidate(name)
        if name == FINETUNE:
            variants.append(Variant(name=name, kind="finetune"))
        elif name in hooks:
            variants.append(Variant(name=name, kind="finetune", weight_hook=hooks[name]))
        elif name == BASE:
            variants.append(Variant(name=name, kind="base"))
        elif "@" in name:  # the extraction served on a quantized base
            base_scheme = scheme(name.partition("@")[2])
            variants.append(Variant(name=name, kind="served", rank=rank, base_hook=base_scheme))
        else:
            variants.append(Variant(name=name, kind="served", rank=rank, keep_extras=keep))
    return variants


def score_candidates(
    base: str,
    finetune: str,
    observations: Sequence[Observation],
    ranks: Sequence[int],
    config: Any = None,
    quantized: Sequence[str] = (),
    *,
    names: Collection[str] | None = None,
    stream: Any = None,
) -> Iterator[tuple[Observation, dict[str, Gathered]]]:
    """Run every candidate (or those in ``names``) over the observed token sequences, one prompt at
    a time; on an open ``LayerStream`` where given (passes of one check share it), else on a new one."""
    from lorafid.behaviour.forward import stream_logprobs

    token_ids = [list(o.ids) for o in observations]
    variants = candidate_variants(ranks, quantized, names)
    run = (
        stream.logprobs(token_ids, variants) if stream else stream_logprobs(base, finetune, token_ids, variants, config)
    )
    for text_index, by_name in run:
        observation = observations[text_index]
        yield observation, {name: gather(observation, lp) for name, lp in by_name.items()}


# -- distances, intervals, verdict -------------------------------------------------------------


def provider_matrix(observation: Observation, width: int) -> np.ndarray:
    """(T, width) provider log-probabilities of each position's alternatives; NaN where the
    alternative has no id in the fine-tune's vocabulary (it joins "the rest") or is absent."""
    out = np.full((len(observation.positions), width), np.nan)
    for t, (position, ids) in enumerate(zip(observation.positions, observation.alternative_ids, strict=True)):
        for j, (alternative, token_id) in enumerate(zip(position.top, ids, strict=True)):
            if token_id is not None:
                out[t, j] = alternative.logprob
    return out


def score_prompt(observation: Observation, gathered: dict[str, Gathered]) -> PromptScore:
    """Every candidate's summed distance to the provider over one prompt's scored tokens."""
    width = max((len(ids) for ids in observation.alternative_ids), default=0)
    p_alt = provider_matrix(observation, width)
    # The provider's most likely token at each position (its alternatives are its top k).
    provider_top1 = [
        ids[max(range(len(p.top)), key=lambda j: p.top[j].logprob)] if p.top else None
        for p, ids in zip(observation.positions, observation.alternative_ids, strict=True)
    ]
    provider_chosen = np.array([p.logprob for p in observation.positions], dtype=np.float64)
    kl, top1, chosen = {}, {}, {}
    for name, g in gathered.items():
        kl[name] = float(coarse_kl(p_alt, g.alt_logprobs).sum())
        top1[name] = sum(1 for a, b in zip(provider_top1, g.argmax, strict=True) if a is not None and a == int(b))
        chosen[name] = float(np.abs(provider_chosen - g.chosen).sum())
    return PromptScore(observation.prompt_index, len(observation.positions), kl, top1, chosen)


def local_distances(
    observations: Sequence[Observation], gathered: Sequence[dict[str, Gathered]]
) -> dict[str, dict[str, float]]:
    """Summed coarse KL from every candidate to every other, on the provider's partition.

    Alternatives without an id are left out exactly as in the comparison with the provider,
    so both describe the same coarse-grained distributions.
    """
    names = list(gathered[0]) if gathered else []
    out = {a: dict.fromkeys(names, 0.0) for a in names}
    for observation, by_name in zip(observations, gathered, strict=True):
        width = max((len(ids) for ids in observation.alternative_ids), default=0)
        unlisted = np.isnan(provider_matrix(observation, width))
        for a in names:
            pa = np.where(unlisted, np.nan, by_name[a].alt_logprobs)
            for b in names:
                if a != b:
                    out[a][b] += float(coarse_kl(pa, by_name[b].alt_logprobs).sum())
    return out
