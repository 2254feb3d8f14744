"""``lorafid extract BASE FINETUNE --rank R --out DIR``: the PEFT adapter, streamed and resumable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorafid.audit.report import Report
from lorafid.cli.arguments import audit_config, positive_int
from lorafid.cli.output import describe, follow_bytes, print_adapter


def add_extract(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    extract = commands.add_parser(
        "extract", help="write the rank-r PEFT LoRA adapter of a fine-tune, with the audit of what it loses"
    )
    extract.add_argument("base", help="Hub repo ID (org/name[@revision]), a directory of shards, or .safetensors file")
    extract.add_argument("finetune", help="the fine-tuned model, same forms as BASE")
    extract.add_argument("--rank", type=positive_int, required=True, help="LoRA rank r of every matrix")
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
    visibility = extract.add_mutually_exclusive_group()
    visibility.add_argument(
        "--private",
        action="store_true",
        help="create the --push-to-hub repo private (the default when a source is not public)",
    )
    visibility.add_argument(
        "--public",
        action="store_true",
        help="create the --push-to-hub repo public even when a source is gated or private",
    )
    extract.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    extract.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login); never stored")
    extract.add_argument("--base-revision", help="revision of BASE (branch, tag or commit)")
    extract.add_argument("--finetune-revision", help="revision of FINETUNE")
    extract.add_argument("--include", metavar="REGEX", help="extract only matrices whose name matches")
    extract.add_argument("--exclude", metavar="REGEX", help="skip matrices whose name matches")
    extract.add_argument("--fresh", action="store_true", help="discard factors staged by an interrupted run")
    extract.add_argument("--quiet", action="store_true", help="no progress bar, no summary")


def run_extract(args: argparse.Namespace) -> int:
    """Exit 0 with the adapter written; 130 on Ctrl-C (staged factors are kept: run again to resume)."""
    from lorafid.adapters.extract import ExtractConfig, Extraction, push_to_hub

    audit = audit_config(args)
    config = ExtractConfig(rank=args.rank, dtype=args.dtype, modules_to_save=tuple(args.modules_to_save), audit=audit)
    with Extraction(args.base, args.finetune, args.out, config) as job:
        plan = job.plan()
        try:
            follow_bytes(job.run(), plan.size_bytes, "extract", quiet=args.quiet)
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
        print_adapter(result.report)
    if args.push_to_hub:
        private = args.private or (not args.public and _keep_private(result.report, args.push_to_hub))
        url = push_to_hub(result.out, args.push_to_hub, token=args.token, private=private)
        if not args.quiet:
            print(f"pushed to {url}")
    return 0


def _keep_private(report: Report, repo_id: str) -> bool:
    """Whether the adapter repo must be private: a source is local, gated or private (asked with
    calls that send no token; a source that cannot be confirmed public counts as not public).
    Says why on stderr."""
    from lorafid.sharing.policy import not_public

    for record in (report.base, report.finetune):
        if record.kind != "hub" or not record.repo_id or not record.resolved_sha:
            reason = f"{record.spec} is a local checkpoint"
        else:
            reason = (not_public([(record.repo_id, record.resolved_sha)], None, "adapters") or "").partition(": only")[
                0
            ]
        if reason:
            print(
                f"lorafid: {reason}: creating {repo_id} as a private repo (pass --public to make it public).",
                file=sys.stderr,
            )
            return True
    return False
