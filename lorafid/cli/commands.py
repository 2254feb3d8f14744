"""``lorafid audit BASE FINETUNE --rank R``, ``lorafid rerank REPORT --rank R``, ``lorafid behave BASE FINETUNE``.

Exit codes: 0 success; 1 a lorafid error (one line on stderr saying what to do, no
traceback); 2 bad usage; 130 interrupted (what was computed is kept in the store, and in
``--out`` as a partial report).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import stat
import sys
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from lorafid import __version__
from lorafid.audit.engine import Audit, AuditConfig, AuditProgress
from lorafid.audit.report import Report, load_spectra, save_spectra, spectra_path
from lorafid.audit.store import Store
from lorafid.audit.summary import aggregate_rank_for_energy, percent
from lorafid.errors import LorafidError
from lorafid.names import InvalidRanksError, parse_ranks
from lorafid.providers.evidence import candidate_names
from lorafid.providers.probe import ALL_CHANNELS, DEFAULT_QUANTIZED
from lorafid.providers.quantize import SCHEMES
from lorafid.providers.text_channel import MAX_SAMPLES, MAX_TOKENS_CAP, TEXT
from lorafid.retry import RetryPolicy

if TYPE_CHECKING:
    from lorafid.adapters.peft_adapter import AdapterAudit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafid",
        description="Measure how much of a fine-tune survives as a LoRA extracted from its delta to the base.",
    )
    parser.add_argument("--version", action="version", version=f"lorafid {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log Hub requests that are retried, and why")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("audit", help="audit a base / fine-tune pair")
    run.add_argument("base", help="Hub repo ID (org/name[@revision]), a directory of shards, or a .safetensors file")
    run.add_argument("finetune", help="the fine-tuned model, same forms as BASE")
    run.add_argument("--rank", type=_positive_int, default=64, help="LoRA rank to report at (default: 64)")
    _add_output_options(run)
    run.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    run.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login); never stored")
    run.add_argument("--base-revision", help="revision of BASE (branch, tag or commit)")
    run.add_argument("--finetune-revision", help="revision of FINETUNE")
    run.add_argument("--include-embeddings", action="store_true", help="also audit embeddings and lm_head")
    run.add_argument("--include", metavar="REGEX", type=_regex, help="audit only tensors whose name matches")
    run.add_argument("--exclude", metavar="REGEX", type=_regex, help="skip tensors whose name matches")
    run.add_argument("--fresh", action="store_true", help="ignore results stored by an earlier run")
    run.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    _add_verbose(run)
    run.add_argument(
        "--adapter",
        metavar="ADAPTER",
        help="a published PEFT LoRA (Hub repo org/name[@revision] or local folder): how much of the change it carries",
    )
    run.add_argument("--adapter-revision", help="revision of ADAPTER")

    rerank = commands.add_parser("rerank", help="re-read a saved report at another rank (no weights fetched)")
    rerank.add_argument("report", type=Path, help="a report.json written by lorafid audit --out")
    rerank.add_argument("--rank", type=_positive_int, required=True)
    _add_output_options(rerank)
    rerank.add_argument("--quiet", action="store_true", help="no summary")
    _add_verbose(rerank)
    _add_batch(commands)
    _add_extract(commands)
    _add_registry(commands, run)
    _add_probe(commands)
    _add_behave(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(verbose=getattr(args, "verbose", False))
    try:
        if args.command == "audit" and args.verify:
            return _verify(args)
        if args.command == "audit":
            return _audit(args)
        if args.command == "open":
            return _open(args)
        if args.command == "batch":
            return _batch(args)
        if args.command == "extract":
            return _extract(args)
        if args.command == "probe":
            return _probe(args)
        if args.command == "behave":
            return _behave(args)
        return _rerank(args)
    except LorafidError as e:
        print(f"lorafid: error: {e}", file=sys.stderr)
        return 1


def _audit(args: argparse.Namespace) -> int:
    _check_writable(args.out)  # before the audit, not after an hour of it
    config = AuditConfig(
        rank=args.rank,
        device=args.device,
        include_embeddings=args.include_embeddings,
        include=args.include,
        exclude=args.exclude,
        base_revision=args.base_revision,
        finetune_revision=args.finetune_revision,
        token=args.token,
        fresh=args.fresh,
    )
    with _audit_job(args, config) as job:
        plan = job.plan()
        try:
            _follow(job.run(), plan.size_bytes, "audit", quiet=args.quiet)
        except KeyboardInterrupt:
            report = job.report()
            _write(report, args)
            done = len(report.matrices)
            print(
                f"lorafid: interrupted after {done} of {done + len(report.pending)} matrices; they are kept. "
                "Run the same command again to resume.",
                file=sys.stderr,
            )
            return 130
        report = job.report()
    _write(report, args)
    if not args.quiet:
        print(describe(report))
        _print_adapter(report)
    if args.publish is not None:
        return _publish(report, args)
    return 0


def _follow(steps: Iterator[AuditProgress], size_bytes: int, desc: str, *, quiet: bool) -> None:
    """Run a streamed job to its end behind one byte progress bar (bytes, MB/s, ETA, matrices)."""
    with tqdm(total=size_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=quiet) as bar:
        for step in steps:
            bar.update(step.bytes_done - bar.n)
            bar.set_postfix_str(f"{step.done}/{step.total} matrices", refresh=False)


def _audit_job(args: argparse.Namespace, config: AuditConfig) -> Audit | AdapterAudit:
    """The plain audit, or with ``--adapter`` the audit that also measures the adapter."""
    if args.adapter is None:
        return Audit(args.base, args.finetune, config)
    from lorafid.adapters.peft_adapter import AdapterAudit

    return AdapterAudit(args.base, args.finetune, args.adapter, config, adapter_revision=args.adapter_revision)


def _print_adapter(report: Report) -> None:
    from lorafid.adapters.peft_adapter import section_of

    section = section_of(report)
    if section is not None:
        print("\n" + section.sentence())


def _rerank(args: argparse.Namespace) -> int:
    _check_writable(args.out)
    try:
        report = Report.from_json(args.report.read_text())
    except OSError as e:
        raise LorafidError(f"Cannot read {args.report}: {e.strerror}.") from e
    sidecar = spectra_path(args.report)
    if sidecar.exists():
        report = report.with_spectra(load_spectra(sidecar))
    else:
        with closing(Store()) as store:
            key = store.find(report.base.spec, report.finetune.spec)
            stored = store.load_report(key) if key else None
        if stored is not None and (stored.base, stored.finetune) == (report.base, report.finetune):
            report = report.with_spectra({m.name: m.sigma_sq for m in stored.matrices if m.sigma_sq is not None})
    report = report.with_rank(args.rank)
    _write(report, args)
    if not args.quiet:
        print(describe(report))
    return 0


def _add_batch(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    batch.add_argument("--rank", type=_positive_int, default=64, help="rank for rows that name none (default: 64)")
    batch.add_argument(
        "--split", type=_positive_int, default=1, help="tasks per pair, by layers, for rows that name none"
    )
    batch.add_argument("--cpus-per-task", type=float, default=1.0, help="cores Ray gives each task (default: 1)")
    batch.add_argument(
        "--gpus-per-task", type=float, help="GPUs per task (default: 1 when the cluster has GPUs, else 0)"
    )
    batch.add_argument("--max-concurrent", type=_positive_int, default=8, help="tasks streaming at once (default: 8)")
    batch.add_argument("--max-retries", type=int, default=3, help="retries of a task whose worker died (default: 3)")
    batch.add_argument("--num-cpus", type=_positive_int, help="size of a local Ray instance (default: all cores)")
    batch.add_argument(
        "--token", help="Hub token (default: HF_TOKEN or the stored login); reaches tasks via their environment"
    )
    batch.add_argument("--include-embeddings", action="store_true", help="also audit embeddings and lm_head")
    batch.add_argument("--include", metavar="REGEX", help="audit only tensors whose name matches")
    batch.add_argument("--exclude", metavar="REGEX", help="skip tensors whose name matches")
    batch.add_argument("--fresh", action="store_true", help="recompute every pair, even those already complete")
    batch.add_argument("--quiet", action="store_true", help="no progress bar, no table")


def _batch(args: argparse.Namespace) -> int:
    """Exit 0 when every pair is complete; 1 when some failed (all recorded in the table); 130 on Ctrl-C."""
    from lorafid.audit.store import default_home
    from lorafid.batch import driver as batch
    from lorafid.batch.catalogue import load_catalogue

    pairs = load_catalogue(args.catalogue)
    batch.connect(args.ray, num_cpus=args.num_cpus)
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


def _add_extract(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    extract = commands.add_parser(
        "extract", help="write the rank-r PEFT LoRA adapter of a fine-tune, with the audit of what it loses"
    )
    extract.add_argument("base", help="Hub repo ID (org/name[@revision]), a directory of shards, or .safetensors file")
    extract.add_argument("finetune", help="the fine-tuned model, same forms as BASE")
    extract.add_argument("--rank", type=_positive_int, required=True, help="LoRA rank r of every matrix")
    extract.add_argument("--out", type=Path, required=True, help="folder for the adapter (created; resumable)")
    extract.add_argument(
        "--dtype", choices=("bfloat16", "float16", "float32"), help="dtype of the factors (default: the fine-tune's)"
    )
    extract.add_argument(
        "--modules-to-save",
        nargs="+",
        default=(),
        metavar="MODULE",
        help="copy these modules whole from the fine-tune (e.g. embed_tokens lm_head norm); vLLM refuses them",
    )
    extract.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hub model repo")
    extract.add_argument("--private", action="store_true", help="create the --push-to-hub repo as private")
    extract.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    extract.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login); never stored")
    extract.add_argument("--base-revision", help="revision of BASE (branch, tag or commit)")
    extract.add_argument("--finetune-revision", help="revision of FINETUNE")
    extract.add_argument("--include", metavar="REGEX", help="extract only matrices whose name matches")
    extract.add_argument("--exclude", metavar="REGEX", help="skip matrices whose name matches")
    extract.add_argument("--fresh", action="store_true", help="discard factors staged by an interrupted run")
    extract.add_argument("--quiet", action="store_true", help="no progress bar, no summary")


def _extract(args: argparse.Namespace) -> int:
    """Exit 0 with the adapter written; 130 on Ctrl-C (staged factors are kept: run again to resume)."""
    from lorafid.adapters.extract import ExtractConfig, Extraction, push_to_hub

    audit = AuditConfig(
        rank=args.rank,
        device=args.device,
        include=args.include,
        exclude=args.exclude,
        base_revision=args.base_revision,
        finetune_revision=args.finetune_revision,
        token=args.token,
        fresh=args.fresh,
    )
    config = ExtractConfig(rank=args.rank, dtype=args.dtype, modules_to_save=tuple(args.modules_to_save), audit=audit)
    with Extraction(args.base, args.finetune, args.out, config) as job:
        plan = job.plan()
        try:
            _follow(job.run(), plan.size_bytes, "extract", quiet=args.quiet)
        except KeyboardInterrupt:
            print(
                f"lorafid: interrupted; the factors computed so far are kept in {args.out}. "
                "Run the same command again to resume.",
                file=sys.stderr,
            )
            return 130
        result = job.finish()
    for warning in result.warnings:
        print(f"lorafid: warning: {warning}", file=sys.stderr)
    if not args.quiet:
        print(f"wrote a rank-{args.rank} PEFT LoRA of {result.matrices} matrices to {result.out}")
        print(describe(result.report))
        _print_adapter(result.report)
    if args.push_to_hub:
        url = push_to_hub(result.out, args.push_to_hub, token=args.token, private=args.private)
        if not args.quiet:
            print(f"pushed to {url}")
    return 0


# -- the results registry: audit --publish / --verify, open ------------------------------------


def _add_registry(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], audit: argparse.ArgumentParser
) -> None:
    """``audit --publish [DATASET]``, ``audit --verify REF`` and ``lorafid open DATASET [REF]``."""
    audit.add_argument(
        "--publish",
        nargs="?",
        const="",
        metavar="DATASET",
        help="publish the result to a Hub dataset you can write to (default: $LORAFID_REGISTRY), "
        "with your own token; only audits of two public repos are published",
    )
    audit.add_argument(
        "--verify",
        metavar="REF",
        help="re-run a published result (a name in --registry, or a report.json) at its commits "
        "and check every rank agrees within 1e-5",
    )
    audit.add_argument("--registry", metavar="DATASET", help="registry for --verify (default: $LORAFID_REGISTRY)")
    opened = commands.add_parser("open", help="open a published result from a registry dataset (no weights fetched)")
    opened.add_argument("dataset", help="the registry: a Hub dataset org/name")
    opened.add_argument("ref", nargs="?", help="the result's name or a unique prefix of it; omit to list them")
    opened.add_argument("--rank", type=_positive_int, help="read it at this rank (default: the published one)")
    opened.add_argument("--token", help="Hub token, for a private registry (default: HF_TOKEN or the stored login)")
    _add_output_options(opened)
    opened.add_argument("--quiet", action="store_true", help="no summary")


def _registry_id(given: str | None, option: str) -> str:
    import os

    repo_id = given or os.environ.get("LORAFID_REGISTRY", "")
    if not repo_id:
        raise LorafidError(f"Name the registry dataset: {option} org/name, or set LORAFID_REGISTRY.")
    return repo_id


def _publish(report: Report, args: argparse.Namespace) -> int:
    """Publish a finished audit to the user's own dataset with the user's own token."""
    from lorafid.sharing.registry import Registry, publish, publish_refusal

    repo_id = _registry_id(args.publish, "--publish")
    reason = publish_refusal(report)
    if reason is not None:
        raise LorafidError(f"Not published: {reason} The result is kept in the local store.")
    registry = Registry(repo_id, token=args.token)
    entry = publish(registry, report)
    print(f"Published to {registry.url}: {entry.path}\nOpen it with: lorafid open {repo_id} {entry.name[:16]}")
    return 0


def _open(args: argparse.Namespace) -> int:
    from lorafid.sharing.registry import Registry

    registry = Registry(args.dataset, token=args.token)
    if args.ref is None:
        entries = registry.entries()
        for e in entries:
            kept = " ".join(f"{r}:{percent(v)}" for r, v in e.energy_at.items())
            print(f"{e.name[:16]}  {e.finetune} vs {e.base}  kept at {kept}  ({e.created})")
        print(f"{len(entries)} result(s) in {registry.url}")
        if registry.unreadable_rows:
            print(
                f"{registry.unreadable_rows} index row(s) of a newer schema were skipped: upgrade lorafid to see them."
            )
        return 0
    report = registry.open(args.ref)
    if args.rank is not None:
        report = report.with_rank(args.rank)
    _write(report, args)
    if not args.quiet:
        print(describe(report))
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Re-run the audit a published result names, at its commits, and compare every rank."""
    import tempfile

    from lorafid.sharing.registry import PRECISION, Registry, read_published, verify

    ref = Path(args.verify)
    if ref.is_file():
        published, where = read_published(json.loads(ref.read_text()), str(ref)), str(ref)
        if spectra_path(ref).exists():
            published = published.with_spectra(load_spectra(spectra_path(ref)))
    else:
        registry = Registry(_registry_id(args.registry, "--registry"), token=args.token)
        entry = registry.entry(args.verify)
        published, where = registry.open(entry), f"{registry.repo_id}/{entry.name}"
    for given, record in ((args.base, published.base), (args.finetune, published.finetune)):
        if given.partition("@")[0] != (record.repo_id or record.spec):
            raise LorafidError(
                f"{where} is an audit of {published.finetune.spec} vs {published.base.spec}, not of {given}."
            )
    s = published.settings
    with tempfile.TemporaryDirectory(prefix="lorafid-verify-") as home:
        store = Store(home)  # a fresh store: every number is recomputed, none reused
        config = AuditConfig(
            rank=published.rank,
            device=args.device,
            include_embeddings=s.include_embeddings,
            include=s.include,
            exclude=s.exclude,
            base_revision=published.base.resolved_sha,
            finetune_revision=published.finetune.resolved_sha,
            token=args.token,
            store=store,
        )
        with Audit(args.base.partition("@")[0], args.finetune.partition("@")[0], config) as job:
            plan = job.plan()
            with tqdm(total=plan.size_bytes, unit="B", unit_scale=True, desc="verify", disable=args.quiet) as bar:
                for step in job.run():
                    bar.update(step.bytes_done - bar.n)
            recomputed = job.report()
        store.close()
    result = verify(published, recomputed, where)
    print(
        f"Verified: {result.matrices} matrices of {where} reproduced at {result.ranks_compared} ranks; largest "
        f"difference {result.max_energy_diff:.1e} in energy retained, {result.max_cosine_diff:.1e} in cosine "
        f"distance (bar: {PRECISION:g})."
    )
    return 0


def describe_table(rows: Sequence[Any], limit: int = 20) -> str:
    """The batch's table in the terminal: worst loss first, failures with their error."""
    lines = [f"{'loss':>8}{'kept':>9}{'rank':>6}{'for 90%':>9}  pair"]
    for row in rows[:limit]:
        if row.loss is None:
            lines.append(f"{row.status:>8}{'':>9}{row.rank:>6}{'':>9}  {row.label}: {row.error}")
            continue
        needed = row.rank_for_90 if row.rank_for_90 is not None else "-"
        lines.append(f"{percent(row.loss):>8}{percent(row.energy_retained):>9}{row.rank:>6}{needed:>9}  {row.label}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more rows in the table")
    return "\n".join(lines)


def describe(report: Report) -> str:
    """The terminal summary: overall, per module kind, worst layers, what a LoRA cannot carry."""
    summary = report.summary()
    lines = [summary.sentence(), ""]
    # One space between columns: a header as wide as its column ("kept@100000") never runs on.
    kept = f"kept@{report.rank}"
    lines.append(f"{'module':<27} {'matrices':>8} {kept:>10} {'cos.dist':>9} {'rank for 90%':>13}")
    for group in sorted(summary.by_module, key=lambda g: g.energy_retained):
        members = [m for m in report.matrices if m.module == group.key]
        needed = aggregate_rank_for_energy(members, 0.9)
        lines.append(
            f"{group.key:<27} {group.matrices:>8} {group.energy_retained:>{max(10, len(kept))}.1%} "
            f"{group.cosine_distance:>9.4f} {needed if needed is not None else '-':>13}"
        )
    layers = sorted((g for g in summary.by_layer if g.key != "-"), key=lambda g: g.energy_retained)[:3]
    if layers:
        lines.append("worst layers: " + ", ".join(f"{g.key} (keeps {g.energy_retained:.0%})" for g in layers))
    total = summary.overall.energy + summary.lost_outside_lora
    if summary.lost_outside_lora > 0:
        lines.append(
            f"1-D tensors (norms, biases): {summary.lost_outside_lora / total:.2%} of the change, not carried by a LoRA"
        )
    reasons: dict[str, int] = {}
    for skipped in report.skipped:
        reasons[skipped.reason] = reasons.get(skipped.reason, 0) + 1
    if reasons:
        lines.append("not audited: " + ", ".join(_count(n, r) for r, n in sorted(reasons.items())))
    if report.status != "complete":
        lines.append(f"partial: {len(report.pending)} matrices not computed yet")
    return "\n".join(lines)


def _write(report: Report, args: argparse.Namespace) -> None:
    if args.out is None:
        return
    text = json.dumps(report.compare_py(), indent=4) if args.format == "compare-py" else report.to_json()
    try:
        args.out.write_text(text + "\n")
        if args.format == "report" and report.has_spectra():
            sidecar = spectra_path(args.out)
            save_spectra(report, sidecar)
            # The safetensors writer creates files 0600; the spectra are as shareable as the JSON.
            os.chmod(sidecar, stat.S_IMODE(args.out.stat().st_mode))
    except OSError as e:
        raise LorafidError(f"Cannot write {args.out}: {e.strerror}.") from e


def _check_writable(out: Path | None) -> None:
    """Fail before any work when ``--out`` cannot be written: a missing or read-only folder."""
    if out is None:
        return
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise LorafidError(f"Cannot write {out}: the folder {folder} does not exist. Create it, or pick another --out.")
    if out.is_dir():
        raise LorafidError(f"Cannot write {out}: it is a folder. Pass a file name, e.g. {out / 'report.json'}.")
    if not os.access(folder, os.W_OK):
        raise LorafidError(f"Cannot write {out}: the folder {folder} is not writable. Pick another --out.")


# Skip reasons as counted nouns: (one, many).
_REASON_NOUNS: dict[str, tuple[str, str]] = {
    "embedding": ("embedding", "embeddings"),
    "not_2d": ("tensor that is not a matrix", "tensors that are not matrices"),
    "shape_mismatch": ("shape mismatch", "shape mismatches"),
    "only_in_base": ("only in the base", "only in the base"),
    "only_in_finetune": ("only in the fine-tune", "only in the fine-tune"),
    "unsupported_dtype": ("unsupported dtype", "unsupported dtypes"),
    "filtered": ("filtered out", "filtered out"),
    "non_finite": ("with NaN or Inf", "with NaN or Inf"),
}


def _count(n: int, reason: str) -> str:
    """``_count(2, "embedding")`` -> "2 embeddings"; unknown reasons read as their code."""
    one, many = _REASON_NOUNS.get(reason, (reason.replace("_", " "),) * 2)
    return f"{n} {one if n == 1 else many}"


def _add_probe(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    probe = commands.add_parser(
        "probe", help="does an OpenAI-compatible API serve the fine-tune, a rank-r extraction of it, or another model?"
    )
    probe.add_argument("base", help="the base model: Hub repo ID (org/name[@revision]) or a local directory")
    probe.add_argument("finetune", help="the fine-tune the API claims to serve, same forms as BASE")
    probe.add_argument("--endpoint", required=True, help="the API's base URL, e.g. https://api.example.com/v1")
    probe.add_argument("--model", required=True, help="the model name the API serves the fine-tune under")
    probe.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default: OPENAI_API_KEY); never logged or stored",
    )
    probe.add_argument(
        "--ranks",
        type=_rank_list,
        default=(16, 32, 64, 128, 256, 512),
        help="candidate ranks (default: 16,32,64,128,256,512)",
    )
    probe.add_argument("--prompts", type=Path, help="one text per line, or JSONL with a text field (default: built-in)")
    probe.add_argument("--out", type=Path, help="write the lorafid.probe/1 JSON report here")
    probe.add_argument(
        "--top-logprobs", type=_positive_int, default=20, help="alternatives asked per token (default 20)"
    )
    probe.add_argument(
        "--max-new-tokens", type=_positive_int, default=32, help="chat only: greedy tokens per prompt (default 32)"
    )
    probe.add_argument("--concurrency", type=_positive_int, default=4, help="requests in flight (default 4)")
    probe.add_argument("--rate", type=_positive_float, help="at most this many requests per second (default: no limit)")
    probe.add_argument("--max-retries", type=int, default=8, help="retries on 429/5xx over the whole probe (default 8)")
    probe.add_argument(
        "--channel",
        choices=("auto", *ALL_CHANNELS),
        default="auto",
        help="how to read the provider: auto (default) tries the log-probability channels, then sampled text "
        f"({TEXT}); name one to use it alone",
    )
    probe.add_argument(
        "--max-requests",
        type=_positive_int,
        help="a hard budget of requests for the whole probe, retries included (e.g. 5 on a rate-limited free plan)",
    )
    probe.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=MAX_TOKENS_CAP,
        help=f"text channel: sampled tokens per continuation (default and cap {MAX_TOKENS_CAP}; the model's "
        "context bounds it too)",
    )
    probe.add_argument(
        "--samples",
        type=_positive_int,
        default=MAX_SAMPLES,
        help=f"text channel: n per prompt where the API takes n (default {MAX_SAMPLES})",
    )
    probe.add_argument(
        "--candidates",
        type=_quantizations,
        default=DEFAULT_QUANTIZED,
        help=f"quantized copies of the fine-tune to compare besides the 8-bit reference, comma-separated, from "
        f"{', '.join(SCHEMES)}; base:SCHEME adds every rank's extraction served on a quantized base (e.g. "
        f"base:fp8); 'none' for none (default: {','.join(DEFAULT_QUANTIZED)}). Each costs one local forward pass",
    )
    probe.add_argument("--seed", type=int, default=0, help="text channel: the seed sent with each request (default 0)")
    probe.add_argument("--device", default="auto", help="where the local candidates run: auto, cpu, cuda or cuda:N")
    probe.add_argument("--token", help="Hub token for the two repos (default: HF_TOKEN or the stored login)")
    probe.add_argument("--quiet", action="store_true", help="no progress bars and no table (the verdict still prints)")
    _add_verbose(probe)


def _probe(args: argparse.Namespace) -> int:
    """Exit 0 with a complete probe; 1 when some prompts failed, 130 when interrupted (the report
    and the verdict keep the prompts it got)."""
    from lorafid.providers.probe import Probe, ProbeConfig, probe_prompts

    _check_writable(args.out)
    texts, prompt_set = probe_prompts(args.prompts)
    api_key = os.environ.get(args.api_key_env) or None
    if api_key is None:
        print(f"lorafid: ${args.api_key_env} is not set: sending no API key.", file=sys.stderr)
    config = ProbeConfig(
        endpoint=args.endpoint,
        model=args.model,
        api_key=api_key,
        ranks=tuple(args.ranks),
        top_k=args.top_logprobs,
        max_new_tokens=args.max_new_tokens,
        concurrency=args.concurrency,
        rate_per_s=args.rate,
        max_retries=max(0, args.max_retries),
        retry=RetryPolicy.retries(min(4, max(0, args.max_retries))),
        channel=None if args.channel == "auto" else args.channel,
        max_requests=args.max_requests,
        max_tokens=min(args.max_tokens, MAX_TOKENS_CAP),
        samples=args.samples,
        quantized=tuple(args.candidates),
        seed=args.seed,
        hub_token=args.token,
        device=args.device,
    )
    job = Probe(args.base, args.finetune, texts, prompt_set, config)
    candidates = candidate_names(config.ranks, config.quantized)
    print(
        f"lorafid: {len(candidates)} local candidates, one forward pass each: {', '.join(candidates)}", file=sys.stderr
    )
    print(f"lorafid: {job.plan().describe()}", file=sys.stderr)  # before the first request
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            label = "provider" if stage == "provider" else "local candidates"
            bars[stage] = tqdm(total=total, desc=label, unit="prompt", disable=args.quiet)
        bars[stage].update(done - bars[stage].n)

    try:
        report = job.run(progress)
    finally:
        for bar in bars.values():
            bar.close()
    if args.out is not None:
        try:
            args.out.write_text(report.to_json() + "\n")
        except OSError as e:
            raise LorafidError(f"Cannot write {args.out}: {e.strerror}.") from e
    if report.verdict is not None:
        print(report.verdict.sentence)
    if not args.quiet:
        print(f"\nread by {report.method}; {report.requests['sent']} requests sent\n{report.table()}")
    if report.status != "complete":
        interrupted = (report.error or "").startswith("interrupted")
        failed = len(texts) - len(report.prompts)
        print(
            f"lorafid: {'interrupted' if interrupted else 'error'}: the probe is partial ({failed} of {len(texts)} "
            f"prompts missing: {report.error or next(iter(report.failed_prompts.values()), '')}); the report keeps "
            "the rest. Run the same command again for a complete probe.",
            file=sys.stderr,
        )
        return 130 if interrupted else 1
    return 0


def _add_behave(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    behave = commands.add_parser(
        "behave", help="next-token KL and top-1 agreement of the served extraction vs the fine-tune, per prompt"
    )
    behave.add_argument("base", help="the base model: Hub repo ID (org/name[@revision]) or a local directory")
    behave.add_argument("finetune", help="the fine-tune (the reference), same forms as BASE; its tokenizer is used")
    behave.add_argument("--ranks", type=_rank_list, default=(16, 64, 256), help="ranks to serve (default: 16,64,256)")
    behave.add_argument("--prompts", type=Path, help="one text per line, or JSONL with 'text' (default: built-in)")
    behave.add_argument(
        "--serving",
        choices=("lora-only", "keep-extras", "both"),
        default="both",
        help="embeddings/lm_head/norms/biases at the base's (lora-only, as multi-LoRA servers run it) or the "
        "fine-tune's (keep-extras); both (default) also gives the share of KL they cause",
    )
    behave.add_argument("--chat-template", action="store_true", help="wrap each prompt as a user turn (chat models)")
    behave.add_argument("--max-tokens", type=_positive_int, default=256, help="tokens per prompt (default: 256)")
    behave.add_argument(
        "--continuation-tokens",
        type=int,
        default=24,
        help="greedy tokens per prompt side by side, when the models fit (default: 24; 0: none)",
    )
    behave.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    behave.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login); never stored")
    behave.add_argument("--base-revision", help="revision of BASE (branch, tag or commit)")
    behave.add_argument("--finetune-revision", help="revision of FINETUNE")
    behave.add_argument("--out", type=Path, help="write the lorafid.behaviour/1 JSON report here")
    behave.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    _add_verbose(behave)


def _behave(args: argparse.Namespace) -> int:
    """Exit 0 with a complete check; 130 on Ctrl-C (the prompts already scored are written to --out)."""
    from lorafid.behaviour.check import BehaviourCheck, BehaviourConfig, describe, read_prompts

    _check_writable(args.out)
    config = BehaviourConfig(
        ranks=tuple(args.ranks),
        serving=args.serving,
        prompts=read_prompts(args.prompts) if args.prompts else None,
        chat_template=args.chat_template,
        max_tokens=max(2, args.max_tokens),
        continuation_tokens=max(0, args.continuation_tokens),
        device=args.device,
        token=args.token,
        base_revision=args.base_revision,
        finetune_revision=args.finetune_revision,
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
    if args.out is not None:
        try:
            args.out.write_text(json.dumps(report, indent=1) + "\n")
        except OSError as e:
            raise LorafidError(f"Cannot write {args.out}: {e.strerror}.") from e
    if not args.quiet or interrupted:
        print(describe(report))
    if interrupted:
        print("lorafid: interrupted; the prompts scored so far are in the report.", file=sys.stderr)
        return 130
    return 0


def _rank_list(text: str) -> tuple[int, ...]:
    """``--ranks 16,64,256`` -> (16, 64, 256)."""
    try:
        return parse_ranks(text)
    except InvalidRanksError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _quantizations(text: str) -> tuple[str, ...]:
    """``--candidates fp8,int4-g128`` -> ("fp8", "int4-g128"); "none" -> ()."""
    names = tuple(part.strip() for part in text.split(",") if part.strip() and part.strip() != "none")
    unknown = [n for n in names if n.removeprefix("base:") not in SCHEMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown quantization {', '.join(unknown)}; choose from {', '.join(SCHEMES)}")
    return names


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand without the flag must not reset ``lorafid -v audit`` to False.
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _configure_logging(*, verbose: bool) -> None:
    """``--verbose``: lorafid's INFO messages (retries, re-resolved URLs) on stderr, one line each."""
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("lorafid: %(message)s"))
        logger = logging.getLogger("lorafid")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="write the report here (and full spectra beside it)")
    parser.add_argument(
        "--format",
        choices=("report", "compare-py"),
        default="report",
        help="report: lorafid's JSON (default); compare-py: the seed post's results.json layout",
    )


def _regex(text: str) -> str:
    """An ``--include``/``--exclude`` pattern, checked now: a bad one is a usage error, not a traceback."""
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression ({e})") from None
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


if __name__ == "__main__":
    sys.exit(main())
