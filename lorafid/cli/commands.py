"""The ``lorafid`` command: the parser of every subcommand and the dispatch to the module that runs it
(``audit``, ``registry``, ``batch``, ``extract``, ``probe``, ``behave`` in this package).

Exit codes: 0 success; 1 a lorafid error (one line on stderr saying what to do, no
traceback); 2 bad usage; 130 interrupted (what was computed is kept in the store, and in
``--out`` as a partial report).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, cast

from lorafid import __version__
from lorafid.cli.arguments import add_output_options, add_verbose, configure_logging, positive_int, regex
from lorafid.cli.audit import run_audit, run_rerank
from lorafid.cli.batch import add_batch, run_batch
from lorafid.cli.behave import add_behave, run_behave
from lorafid.cli.extract import add_extract, run_extract
from lorafid.cli.probe import add_probe, run_probe
from lorafid.cli.registry import add_registry, open_registry, run_verify
from lorafid.errors import LorafidError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad value of one option is one line that names it, not the whole usage.

    Example: ``lorafid audit a b --include 'mlp\\.('`` prints ``lorafid audit: --include 'mlp\\.(' is
    not a valid regular expression (…)`` and exits 2. Other errors (a missing argument) keep the
    usage, which is then what the user needs.
    """

    def error(self, message: str) -> NoReturn:
        bad = re.match(r"argument ([^:/ ]+)[^:]*: (.*)", message, re.S)
        if bad and not bad.group(2).startswith(("expected", "not allowed", "ignored")):
            detail = re.sub(r"^invalid \S+ value: ", "has an invalid value: ", bad.group(2))
            self.exit(2, f"{self.prog}: {bad.group(1)} {detail}\n")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lorafid",
        description="Measure how much of a fine-tune survives as a LoRA extracted from its delta to the base.",
    )
    parser.add_argument("--version", action="version", version=f"lorafid {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log Hub requests that are retried, and why")
    # Every subcommand's parser is a Parser (one-line value errors); the modules take the base type.
    commands = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", required=True, parser_class=Parser),
    )

    run = commands.add_parser("audit", help="audit a base / fine-tune pair")
    run.add_argument("base", help="Hub repo ID (org/name[@revision]), a directory of shards, or a .safetensors file")
    run.add_argument("finetune", help="the fine-tuned model, same forms as BASE")
    run.add_argument("--rank", type=positive_int, default=64, help="LoRA rank to report at (default: 64)")
    add_output_options(run)
    run.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    run.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login); never stored")
    run.add_argument("--base-revision", help="revision of BASE (branch, tag or commit)")
    run.add_argument("--finetune-revision", help="revision of FINETUNE")
    run.add_argument("--include-embeddings", action="store_true", help="also audit embeddings and lm_head")
    run.add_argument("--include", metavar="REGEX", type=regex, help="audit only tensors whose name matches")
    run.add_argument("--exclude", metavar="REGEX", type=regex, help="skip tensors whose name matches")
    run.add_argument("--fresh", action="store_true", help="ignore results stored by an earlier run")
    run.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    add_verbose(run)
    run.add_argument(
        "--adapter",
        metavar="ADAPTER",
        help="a published PEFT LoRA (Hub repo org/name[@revision] or local folder): how much of the change it carries",
    )
    run.add_argument("--adapter-revision", help="revision of ADAPTER")

    rerank = commands.add_parser("rerank", help="re-read a saved report at another rank (no weights fetched)")
    rerank.add_argument("report", type=Path, help="a report.json written by lorafid audit --out")
    rerank.add_argument("--rank", type=positive_int, required=True)
    add_output_options(rerank)
    rerank.add_argument("--quiet", action="store_true", help="no summary")
    add_verbose(rerank)
    add_batch(commands)
    add_extract(commands)
    add_registry(commands, run)
    add_probe(commands)
    add_behave(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(verbose=getattr(args, "verbose", False))
    try:
        if args.command == "audit" and args.verify:
            return run_verify(args)
        if args.command == "audit":
            return run_audit(args)
        if args.command == "open":
            return open_registry(args)
        if args.command == "batch":
            return run_batch(args)
        if args.command == "extract":
            return run_extract(args)
        if args.command == "probe":
            return run_probe(args)
        if args.command == "behave":
            return run_behave(args)
        return run_rerank(args)
    except LorafidError as e:
        print(f"lorafid: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
