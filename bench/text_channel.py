"""The text channel on the test models: tokens (and requests) for a right verdict, and the local cost.

    python -m bench.text_channel [--repeats 5]

Part 1 serves each candidate from the loopback OpenAI-compatible server (no log-probabilities,
no prompt arrays, no ``n``: one continuation of up to 100 tokens per request, the worst case)
and runs the check with budgets of 1 to 16 requests. Each row: the served candidate, its gap to
the nearest other candidate (KL(P‖Q) − KL(P‖P), measured with the largest budget), then per
budget the finding: ``named`` (every other candidate ruled out), ``held`` (right, others not
ruled out yet), ``none`` / ``sampler`` (a check that refused to name one) or ``WRONG``.

Part 2 times the local scoring of the same continuations under every candidate (the
layer-streamed forward, 12 candidates at once) against a plain ``transformers`` forward of one
model on the same tokens, interleaved and repeated (median and spread of the ratio).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from lorafid.progress import run_to_end

RANKS = (4, 8, 16, 32)
BUDGETS = (1, 2, 4, 8, 16)
SERVED = ("finetune", "rank-32", "rank-16", "rank-8", "rank-4", "base")


def verdict_word(report: Any, served: str) -> str:
    """``named``: every other candidate ruled out; ``held``: the served one not ruled out, others
    not yet either; ``WRONG``: the served one ruled out (for the original: all of its family)."""
    finding = (report.text or {}).get("finding")
    if finding in ("matches-none", "sampler-changed", "too-little-text"):
        return {"matches-none": "none", "sampler-changed": "sampler", "too-little-text": "short"}[finding]
    held = set(report.verdict.consistent)
    family = {n for n in report.candidates if n.startswith("finetune")} if served == "finetune" else {served}
    if not held & family:
        return "WRONG"
    return "named" if held <= family else "held"


def part_one(hub: Any, family: Any) -> list[Any]:
    from lorafid.errors import ProviderError
    from lorafid.providers.probe import Probe, ProbeConfig
    from lorafid.providers.text_channel import TEXT
    from lorafid.retry import RetryPolicy
    from tests.openai_server import OpenAIServer, served_weights, vocabulary_prompts

    print(f"{'served':<10}{'gap to nearest':>16}  nearest          " + "".join(f"{b:>9}" for b in BUDGETS))
    kept = []
    for served in SERVED:
        weights = served_weights(family.base.tensors, family.full.tensors, served)
        server = OpenAIServer(family.full.files, weights, no_logprobs=True, prompt_arrays=False, accept_n=False)
        server.start()
        texts = list(vocabulary_prompts(server.tokenizer, 36, words=6))
        words, last = [], None
        for budget in BUDGETS:
            config = ProbeConfig(
                server.url, "tiny-served", ranks=RANKS, hub_token=False, hub_endpoint=hub.endpoint,
                channel=TEXT, max_requests=budget, max_tokens=100, samples=1, max_retries=0,
                retry=RetryPolicy(max_tries=1),
            )  # fmt: skip
            try:
                last = run_to_end(Probe("org/base", "org/finetune", texts, {"name": "bench", "version": "1"}, config))
            except ProviderError as e:
                words.append("error")
                print(f"  {served}, {budget} requests: {e}")
                continue
            words.append(f"{verdict_word(last, served)}/{last.text['tokens']}")
        server.stop()
        assert last is not None
        nearest = min((c for c in last.candidates.values() if c.name != last.verdict.closest), key=lambda c: c.gap)
        kept.append(last)
        print(f"{served:<10}{nearest.gap:>16.4f}  {nearest.name:<17}" + "".join(f"{w:>9}" for w in words))
    return kept


def part_two(hub: Any, family: Any, reports: list[Any], repeats: int) -> None:
    from lorafid.behaviour.forward import ForwardConfig
    from lorafid.providers.logprob_probe import candidate_variants
    from lorafid.providers.text_probe import TextObservation, score_text
    from tests.openai_server import causal_lm

    report = reports[0]
    generator = torch.Generator().manual_seed(0)  # token ids in the vocabulary, the check's lengths
    vocab = int(family.full.tensors["model.embed_tokens.weight"].shape[0])
    tokens = [torch.randint(4, vocab, (6 + p["tokens"],), generator=generator).tolist() for p in report.prompts]
    observations = [TextObservation(0, tuple(t), 6, "length") for t in tokens]
    variants = candidate_variants(RANKS, ("int4-g128",))
    model = causal_lm(family.full.files, family.full.tensors)
    config = ForwardConfig(device="cpu", token=False, endpoint=hub.endpoint)

    def ours() -> None:
        for _ in score_text("org/base", "org/finetune", observations, variants, config):
            pass

    @torch.no_grad()
    def plain() -> None:
        for ids in tokens:
            torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)

    ratios = []
    for _ in range(repeats):  # interleaved: a busy neighbour slows both alike
        started = time.perf_counter()
        ours()
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        plain()
        plain_s = time.perf_counter() - started
        ratios.append(ours_s / (plain_s * len(variants)))
    print(
        f"\nlocal scoring, {len(variants)} candidates over {sum(len(t) for t in tokens)} tokens: "
        f"{statistics.median(ratios):.2f}× a plain transformers forward per candidate "
        f"(median of {repeats}, range {min(ratios):.2f}-{max(ratios):.2f}; the streamed forward reads the "
        "weights from the Hub server and builds every candidate's weights as it goes)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from tests.hub_server import HubServer
    from tests.llama_models import model_family, publish

    family = model_family("llama", layers=2)
    hub = HubServer().start()
    try:
        publish(hub, "org/base", family.base)
        publish(hub, "org/finetune", family.full)
        reports = part_one(hub, family)
        part_two(hub, family, reports, args.repeats)
    finally:
        hub.stop()


if __name__ == "__main__":
    main()
