"""``lorafid behave BASE FINETUNE``: what the served extraction does to the outputs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lorafid.cli.arguments import add_verbose, check_writable, non_negative_int, positive_int, rank_list
from lorafid.errors import LorafidError


def add_behave(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    behave = commands.add_parser(
        "behave", help="next-token KL and top-1 agreement of the served extraction vs the fine-tune, per prompt"
    )
    behave.add_argument("base", help="the base model: Hub repo ID (org/name[@revision]) or a local directory")
    behave.add_argument("finetune", help="the fine-tune (the reference), same forms as BASE; its tokenizer is used")
    behave.add_argument("--ranks", type=rank_list, default=(16, 64, 256), help="ranks to serve (default: 16,64,256)")
    behave.add_argument("--prompts", type=Path, help="one text per line, or JSONL with 'text' (default: built-in)")
    behave.add_argument(
        "--serving",
        choices=("lora-only", "keep-extras", "both"),
        default="both",
        help="embeddings/lm_head/norms/biases at the base's (lora-only, as multi-LoRA servers run it) or the "
        "fine-tune's (keep-extras); both (default) also gives the share of KL they cause",
    )
    behave.add_argument("--chat-template", action="store_true", help="wrap each prompt as a user turn (chat models)")
    behave.add_argument("--max-tokens", type=positive_int, default=256, help="tokens per prompt (default: 256)")
    behave.add_argument(
        "--continuation-tokens",
        type=non_negative_int,
        default=24,
        help="greedy tokens per prompt side by side, when the models fit (default: 24; 0: none)",
    )
    behave.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    add_threads(behave)
    add_direction_cache(behave)
    behave.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login); never stored")
    behave.add_argument("--base-revision", help="revision of BASE (branch, tag or commit)")
    behave.add_argument("--finetune-revision", help="revision of FINETUNE")
    behave.add_argument("--out", type=Path, help="write the lorafid.behaviour/1 JSON report here")
    behave.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    add_verbose(behave)


def add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=positive_int,
        help="CPU threads for the local forward passes (default: one per core idle now, at least 1)",
    )


def add_direction_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-direction-cache",
        action="store_true",
        help="decompose every matrix again instead of reusing the directions an earlier check of this pair kept "
        "(kept under $LORAFID_HOME/directions, at most LORAFID_DIRECTION_CACHE_GB, default 4; 0 turns it off)",
    )


def direction_cache(args: argparse.Namespace) -> Any:
    """The ``DirectionCache`` a check uses: the environment's, unless ``--no-direction-cache``."""
    from lorafid.behaviour.direction_cache import DirectionCache

    return None if args.no_direction_cache else DirectionCache.from_environment()


def say_cached(stats: dict[str, Any], quiet: bool) -> None:
    """One stderr line when an earlier run's directions were reused (a check of the pair made before)."""
    cached = int(stats.get("matrices_from_direction_cache") or 0)
    if cached and not quiet:
        print(
            f"lorafid: the directions of {cached} matrices came from an earlier check of this pair "
            "(the direction cache; --no-direction-cache decomposes them again)",
            file=sys.stderr,
        )


def idle_cores() -> int:
    """Cores this process may use minus the 1-minute load average, at least 1.

    Why not torch's default (one thread per core): the forward's matmuls are small, and where
    another job holds a core, OpenMP threads wait for it at every barrier: on a loaded 2-core
    machine 2 threads made the forward 6-7x slower per token than 1 (BENCHMARKS.md, "Threads").
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return cores
    return max(1, min(cores, cores - round(load)))


def use_threads(requested: int | None) -> int:
    """Set torch's CPU threads to ``requested`` or, by default, ``idle_cores()``; returns the count."""
    import torch

    threads = requested or idle_cores()
    torch.set_num_threads(threads)
    return threads


def run_behave(args: argparse.Namespace) -> int:
    """Exit 0 with a complete check; 130 on Ctrl-C (the prompts already scored are written to --out)."""
    from lorafid.behaviour.check import BehaviourCheck, BehaviourConfig, describe
    from lorafid.behaviour.prompts import read_prompts

    check_writable(args.out)
    use_threads(args.threads)
    ranks, note = clamped_ranks(tuple(args.ranks), args)
    if note:
        print(f"lorafid behave: note: {note}", file=sys.stderr)
    config = BehaviourConfig(
        ranks=ranks,
        serving=args.serving,
        prompts=read_prompts(args.prompts) if args.prompts else None,
        chat_template=args.chat_template,
        max_tokens=max(2, args.max_tokens),
        continuation_tokens=args.continuation_tokens,
        device=args.device,
        token=args.token,
        base_revision=args.base_revision,
        finetune_revision=args.finetune_revision,
        direction_cache=direction_cache(args),
    )
    check = BehaviourCheck(args.base, args.finetune, config)
    bar = tqdm(total=1, desc="behave", disable=args.quiet)
    interrupted = False
    try:
        with bar:
            for step in check.run():
                bar.total = step.total
                bar.desc = step.stage
                bar.update(step.done - bar.n)
    except KeyboardInterrupt:
        interrupted = True
    report = check.report()
    if note:
        report = replace(report, ranks_note=note)
    if interrupted and config.continuation_tokens and report.continuations is None:
        # Every prompt was scored, but the side-by-side continuations were cut short: not complete.
        report = replace(
            report,
            status="partial",
            continuations_note="not generated: interrupted (Ctrl-C) before they were finished",
        )
    if args.out is not None:
        try:
            args.out.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        except OSError as e:
            raise LorafidError(f"Cannot write {args.out}: {e.strerror}.") from e
    if not args.quiet or interrupted:
        print(describe(report))
    say_cached(report.stats, args.quiet)
    if interrupted:
        print("lorafid: interrupted; the prompts scored so far are in the report.", file=sys.stderr)
        return 130
    return 0


def clamped_ranks(ranks: tuple[int, ...], args: argparse.Namespace) -> tuple[tuple[int, ...], str | None]:
    """The ranks to serve, those above the largest matrix's full rank brought down to it, and a
    note saying so (None when every rank is below). Reads both models' headers only.

    Example: (16, 1000000000) on a model whose matrices are at most 32 wide -> ((16, 32), "rank
    1,000,000,000 is above ... run as rank 32").
    """
    import tempfile

    from lorafid.audit.engine import Audit, AuditConfig
    from lorafid.audit.store import Store

    with tempfile.TemporaryDirectory() as home:  # the plan leaves nothing in the user's store
        store = Store(home)
        config = AuditConfig(
            token=args.token, base_revision=args.base_revision, finetune_revision=args.finetune_revision, store=store
        )
        try:
            with Audit(args.base, args.finetune, config) as job:
                largest = max((min(p.shape) for p in job.plan().matrices if len(p.shape) == 2), default=0)
        finally:
            store.close()
    above = sorted(r for r in ranks if largest and r > largest)
    if not above:
        return ranks, None
    said = ", ".join(f"{r:,}" for r in above)
    note = (
        f"rank {said} is above the largest matrix's full rank ({largest:,}): run as rank {largest:,}, "
        "which already carries the whole change"
    )
    return tuple(sorted({min(r, largest) for r in ranks})), note
