"""Reading the next stage while this one runs: the layer-streamed forward from a rate-capped Hub.

    OMP_NUM_THREADS=1 python -m bench.read_ahead                     # hidden 1024, 4 layers, 40 MB/s
    OMP_NUM_THREADS=1 python -m bench.read_ahead --mb-per-s 20 --direction-cache warm

A random bf16 Llama pair (``bench.behaviour.write_pair``) is served by the loopback Hub with
one bandwidth cap for every connection, in a child process (``bench.capped_hub``). Each round
times, interleaved (``bench.timing``), ``LayerStream.logprobs`` of ``--variants`` candidates
over ``--texts`` × ``--tokens`` with the forward of this tree (each stage read while the one
before runs) and with ``lorafid/behaviour/forward.py`` as it was at ``--rev`` (each stage read
after the one before, loaded with ``bench.before_after.load_revision``), and checks that both
read the same bytes and give the same log-probabilities. ``--direction-cache warm`` takes every
decomposition from a cache filled before the rounds (a later check of the pair: less compute
to hide the reading behind).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.before_after import load_revision
from bench.behaviour import write_pair
from bench.candidates import add_pair_arguments, add_workload_arguments, first_variants
from bench.capped_hub import serve_in_child
from bench.timing import interleaved, ratios, spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_arguments(parser)
    add_workload_arguments(parser)
    parser.add_argument("--mb-per-s", type=float, default=40.0, help="the Hub's aggregate rate (0: uncapped)")
    parser.add_argument("--direction-cache", choices=("off", "warm"), default="off")
    parser.add_argument("--rev", default="1bc7ae8", help="the forward without read-ahead (default 1bc7ae8)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from lorafid.behaviour import forward as current
    from lorafid.behaviour.direction_cache import DirectionCache

    before = load_revision(args.rev, "lorafid/behaviour/forward.py")
    variants = first_variants(args.variants)
    ids = torch.randint(0, args.vocab, (args.texts, args.tokens), generator=torch.Generator().manual_seed(1)).tolist()
    with tempfile.TemporaryDirectory(prefix="lorafid-bench-read-ahead-") as work:
        base, tuned = write_pair(Path(work), args, args.layers)
        cache = DirectionCache(Path(work) / "directions") if args.direction_cache == "warm" else None
        with serve_in_child({"bench/base": base, "bench/finetune": tuned}, args.mb_per_s * 1e6) as hub:
            results: dict[str, Any] = {}

            def run(module: Any, label: str) -> None:
                config = module.ForwardConfig(device="cpu", endpoint=hub.endpoint, token=False, direction_cache=cache)
                with module.LayerStream("bench/base", "bench/finetune", config) as stream:
                    results[label] = (dict(stream.logprobs(ids, variants)), stream.stats.bytes_read)

            if cache is not None:
                run(current, "fill")  # untimed: fills the cache both sides read
            seconds, _ = interleaved(
                {"read ahead": lambda: run(current, "now"), "one after another": lambda: run(before, "before")},
                args.repeats,
                torch.device("cpu"),
            )
    (now, now_bytes), (old, old_bytes) = results["now"], results["before"]
    same = now_bytes == old_bytes and all(torch.equal(now[i][v], old[i][v]) for i in now for v in now[i])
    print(
        f"hidden {args.hidden} · {args.layers} layers · {args.texts} x {args.tokens} tokens · "
        f"{len(variants)} variants · "
        f"Hub at {args.mb_per_s:g} MB/s · direction cache {args.direction_cache} · {torch.get_num_threads()} threads · "
        f"{args.repeats} interleaved rounds · before = {args.rev}"
    )
    print(f"{now_bytes / 1e6:.1f} MB read by each; same bytes and log-probabilities: {same}")
    print(f"read ahead: {spread(seconds['read ahead'], ' s')}")
    print(f"one after another: {spread(seconds['one after another'], ' s')}")
    print(f"speed-up: {spread(ratios(seconds['one after another'], seconds['read ahead']), 'x')}")


if __name__ == "__main__":
    main()
