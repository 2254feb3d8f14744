"""Each local candidate against a plain ``transformers`` forward of one model, in one process.

    OMP_NUM_THREADS=1 python -m bench.candidates                  # hidden 1024, 4 layers, 4 variants
    python -m bench.candidates --hidden 4096 --intermediate 14336 --heads 32 --kv-heads 8 \\
        --vocab 128256 --layers 2 --device cuda                    # 8B block shapes (GPU row: unmeasured)

A random bf16 Llama pair (``bench.behaviour.write_pair``) is written once. Each round times,
interleaved (``bench.timing``): ``LayerStream.logprobs`` of ``--variants`` candidates (the
fine-tune, the base, then served ranks 16, 64, 256, ... lora-only) over ``--texts`` texts of
``--tokens`` tokens, the layer-streamed forward as the provider and behaviour checks run it
(reading both models, decomposing every Δ, building every variant's weights, log-softmax); and
a plain ``transformers`` forward + log-softmax of the fine-tune (loaded once, before the
rounds) over the same texts, repeated once per candidate. The ratio of the two per round is
the cost of one candidate against one plain forward of one model on the same tokens: the
issue's target is ≤ 1.2× at hidden ≥ 1024. Also printed: the streamed side's own split
(compute vs the rest: reading) from ``ForwardStats``, the decompositions' share of it
(``ForwardStats.decompose_s``), and the ratio with that fixed per-matrix cost taken out.
``--provider-grid`` runs the provider check's default candidates instead (a full-grid pass):
the decompositions are shared by more candidates, as in a real check.

``--direction-cache`` says where the streamed side's directions come from: ``off`` (default:
every round decomposes every matrix, a first check of the pair), ``fill`` (every round starts
from an empty ``DirectionCache``: decomposes, hashes both tensors and writes each entry: what the
cache adds to a first check), ``warm`` (a cache filled by an untimed run before the rounds: a
later check of the same pair).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.behaviour import write_pair
from bench.timing import interleaved, ratios, spread


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """The random pair's shape (``bench.behaviour.write_pair``): a 4-layer Llama of hidden 1024 (53M)."""
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """What the candidates score: ``--texts`` random texts of ``--tokens`` tokens, ``--variants`` of them."""
    parser.add_argument("--texts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--variants", type=int, default=4, help="fine-tune, base, then ranks 16, 64, 256, ...")


def first_variants(count: int) -> list[Any]:
    """The fine-tune, the base, then served ranks 16, 64, 256, ... (lora-only): ``count`` in all."""
    from lorafid.behaviour.variants import BASE, FINETUNE, served

    return [FINETUNE, BASE, *(served(16 * 4**i) for i in range(max(0, count - 2)))][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_arguments(parser)
    add_workload_arguments(parser)
    parser.add_argument(
        "--provider-grid",
        action="store_true",
        help="instead, the provider check's default candidates (its ranks below the full rank in both serving "
        "modes, the fine-tune, its 8-bit and int4 copies, the base), as one full-grid pass scores them",
    )
    parser.add_argument("--direction-cache", choices=("off", "fill", "warm"), default="off")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from lorafid.behaviour.direction_cache import DirectionCache
    from lorafid.behaviour.forward import ForwardConfig, LayerStream

    device = torch.device(args.device)
    variants = first_variants(args.variants)
    if args.provider_grid:
        from lorafid.providers.evidence import grid_within
        from lorafid.providers.logprob_probe import candidate_variants
        from lorafid.providers.probe import DEFAULT_QUANTIZED, DEFAULT_RANKS

        ranks, _ = grid_within(DEFAULT_RANKS, args.hidden)  # the model's full rank: q_proj's, hidden × hidden
        variants = candidate_variants(ranks, DEFAULT_QUANTIZED)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.texts, args.tokens), generator=g)
    with tempfile.TemporaryDirectory(prefix="lorafid-bench-candidates-") as work:
        base, tuned = write_pair(Path(work), args, args.layers)
        model = AutoModelForCausalLM.from_pretrained(str(tuned), dtype=torch.float32).to(device).eval()
        stats: dict[str, Any] = {}
        decompose_s: list[float] = []  # per round

        rounds = iter(range(10**6))

        def cache() -> DirectionCache | None:
            if args.direction_cache == "off":
                return None
            name = "warm" if args.direction_cache == "warm" else f"fill-{next(rounds)}"  # fill: empty each round
            return DirectionCache(Path(work) / "directions" / name)

        def streamed() -> None:
            config = ForwardConfig(device=args.device, direction_cache=cache())
            with LayerStream(str(base), str(tuned), config) as stream:
                for _ in stream.logprobs(ids.tolist(), variants):
                    pass
                stats["compute_s"], stats["elapsed_s"] = stream.stats.compute_s, stream.stats.elapsed_s
                decompose_s.append(stream.stats.decompose_s)

        def plain() -> None:
            with torch.no_grad():
                for _ in variants:
                    for row in ids:
                        torch.log_softmax(model(row[None].to(device)).logits.float(), -1).cpu()

        if args.direction_cache == "warm":
            streamed()  # untimed: fills the cache the rounds read
            decompose_s.clear()
        seconds, _ = interleaved({"streamed": streamed, "plain": plain}, args.repeats, device)
    names = ", ".join(v.name for v in variants)
    print(
        f"hidden {args.hidden} · {args.layers} layers · {args.texts} texts x {args.tokens} tokens · "
        f"{torch.get_num_threads()} threads · {args.repeats} interleaved rounds · direction cache "
        f"{args.direction_cache} · variants: {names}"
    )
    print(f"streamed, {len(variants)} variants: {spread(seconds['streamed'], ' s')}")
    print(f"plain transformers x {len(variants)}: {spread(seconds['plain'], ' s')}")
    print(f"per candidate vs one plain forward: {spread(ratios(seconds['streamed'], seconds['plain']), 'x')}")
    print(f"streamed split (last round): compute {stats['compute_s']:.2f} s of {stats['elapsed_s']:.2f} s")
    print(f"of which decompositions (spectrum.decompose): {spread(decompose_s, ' s')}")
    without = [s - d for s, d in zip(seconds["streamed"], decompose_s, strict=True)]
    print(f"per candidate without the decompositions: {spread(ratios(without, seconds['plain']), 'x')}")


if __name__ == "__main__":
    main()
