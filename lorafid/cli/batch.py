"""``lorafid batch CATALOGUE``: many pairs as Ray tasks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from lorafid.cli.arguments import positive_int
from lorafid.cli.output import describe_table


def add_batch(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    batch = commands.add_parser(
        "batch", help="audit every pair of a catalogue (CSV or YAML) on Ray, locally or on a cluster"
    )
    batch.add_argument("catalogue", type=Path, help="CSV or YAML: base, finetune[, revisions, rank(s), label, split]")
    batch.add_argument(
        "--ray",
        default="local",
        metavar="local|auto|ADDRESS",
        help="local: start Ray on this machine (default); auto: join the cluster `ray start` runs here or "
        "RAY_ADDRESS; ADDRESS: join that cluster (host:6379 or ray://host:10001)",
    )
    batch.add_argument(
        "--out", type=Path, default=Path("lorafid-batch"), help="reports and table (default: ./lorafid-batch)"
    )
    batch.add_argument("--rank", type=positive_int, default=64, help="rank for rows that name none (default: 64)")
    batch.add_argument(
        "--split", type=positive_int, default=1, help="tasks per pair, by layers, for rows that name none"
    )
    batch.add_argument("--cpus-per-task", type=float, default=1.0, help="cores Ray gives each task (default: 1)")
    batch.add_argument(
        "--gpus-per-task", type=float, help="GPUs per task (default: 1 when the cluster has GPUs, else 0)"
    )
    batch.add_argument("--max-concurrent", type=positive_int, default=8, help="tasks streaming at once (default: 8)")
    batch.add_argument("--max-retries", type=int, default=3, help="retries of a task whose worker died (default: 3)")
    batch.add_argument("--num-cpus", type=positive_int, help="size of a local Ray instance (default: all cores)")
    batch.add_argument(
        "--token",
        help="Hub token (default: HF_TOKEN or the stored login); tasks ask the driver's node for it, not Ray's logs",
    )
    batch.add_argument("--include-embeddings", action="store_true", help="also audit embeddings and lm_head")
    batch.add_argument("--include", metavar="REGEX", help="audit only tensors whose name matches")
    batch.add_argument("--exclude", metavar="REGEX", help="skip tensors whose name matches")
    batch.add_argument("--fresh", action="store_true", help="recompute every pair, even those already complete")
    batch.add_argument("--quiet", action="store_true", help="no progress bar, no table")


def run_batch(args: argparse.Namespace) -> int:
    """Exit 0 when every pair is complete; 1 when some failed (all recorded in the table); 130 on Ctrl-C."""
    from lorafid.audit.store import default_home
    from lorafid.batch import driver as batch
    from lorafid.batch.catalogue import load_catalogue
    from lorafid.batch.cluster import connect
    from lorafid.batch.results import by_node

    pairs = load_catalogue(args.catalogue)
    connect(args.ray, num_cpus=args.num_cpus)
    options = batch.BatchOptions(
        rank=args.rank,
        split=args.split,
        include_embeddings=args.include_embeddings,
        include=args.include,
        exclude=args.exclude,
        fresh=args.fresh,
        cpus_per_task=args.cpus_per_task,
        gpus_per_task=args.gpus_per_task,
        max_concurrent=args.max_concurrent,
        max_retries=args.max_retries,
        token=args.token,
        # On this machine's Ray every task shares the driver's store; on a cluster each node keeps its own.
        store_home=default_home() if args.ray == "local" else None,
        progress=not args.quiet,
    )
    bar = tqdm(total=len(pairs), unit="pair", desc="batch", disable=args.quiet)

    def show(p: batch.BatchProgress) -> None:
        bar.update(p.done - bar.n)
        failed = f", {p.failed} failed" if p.failed else ""
        bar.set_postfix_str(f"{p.bytes_done / 1e9:.2f}/{p.bytes_total / 1e9:.2f} GB{failed}", refresh=True)

    with bar:
        result = batch.run_batch(pairs, options, out=args.out, on_progress=show)
    rows = result.table(args.rank)
    if not args.quiet:
        print(describe_table(rows))
        for node, ran in by_node(result.outcomes).items():
            print(f"ran on {node}: {', '.join(ran)}")
        reused = [o.pair.name for o in result.outcomes if o.from_store]
        if reused:
            print(f"from the store (same Hub, same commits): {', '.join(reused)}")
        print(f"table: {args.out / 'table.csv'} and table.json; reports in {args.out / 'pairs'}")
    if result.interrupted:
        print(
            "lorafid: interrupted; finished pairs and computed matrices are kept. Run the same command to resume.",
            file=sys.stderr,
        )
        return 130
    if result.failed:
        names = ", ".join(o.pair.name for o in result.failed[:3]) + (" ..." if len(result.failed) > 3 else "")
        print(
            f"lorafid: error: {len(result.failed)} of {len(pairs)} pairs failed ({names}); their errors are in "
            f"{args.out / 'table.csv'}. Run the same command again to retry them.",
            file=sys.stderr,
        )
        return 1
    return 0
