"""Argument types and options the subcommands share: ranks, quantizations, numbers, patterns,
--verbose, the output options, and the check that --out can be written before any work."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from lorafid.audit.engine import AuditConfig
from lorafid.errors import LorafidError
from lorafid.names import InvalidRanksError, parse_ranks
from lorafid.providers.quantize import SCHEMES

T = TypeVar("T", int, float)


def rank_list(text: str) -> tuple[int, ...]:
    """``--ranks 16,64,256`` -> (16, 64, 256)."""
    try:
        return parse_ranks(text)
    except InvalidRanksError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def quantizations(text: str) -> tuple[str, ...]:
    """``--candidates fp8,int4-g128`` -> ("fp8", "int4-g128"); "none" -> ()."""
    names = tuple(part.strip() for part in text.split(",") if part.strip() and part.strip() != "none")
    unknown = [n for n in names if n.removeprefix("base:") not in SCHEMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown quantization {', '.join(unknown)}; choose from {', '.join(SCHEMES)}")
    return names


def positive_float(text: str) -> float:
    """An option's number above 0 (``--rate 0.5``)."""
    return _number(text, float, "a number", "more than 0", lambda v: v > 0)


def positive_int(text: str) -> int:
    """An option's whole number from 1 (``--concurrency 4``)."""
    return _number(text, int, "an integer", "at least 1", lambda v: v > 0)


def non_negative_int(text: str) -> int:
    """An option's whole number from 0 (``--continuation-tokens 0``: none)."""
    return _number(text, int, "an integer", "0 or more", lambda v: v >= 0)


def _number(text: str, kind: Callable[[str], T], what: str, bound: str, within: Callable[[T], bool]) -> T:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not within(value):  # also NaN for floats
        raise argparse.ArgumentTypeError(f"must be {bound}")
    return value


def regex(text: str) -> str:
    """An ``--include``/``--exclude`` pattern, checked now: a bad one is a usage error, not a traceback."""
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"'{text}' is not a valid regular expression ({e})") from None
    return text


def add_verbose(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand without the flag must not reset ``lorafid -v audit`` to False.
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="write the report here (and full spectra beside it)")
    parser.add_argument(
        "--format",
        choices=("report", "compare-py"),
        default="report",
        help="report: lorafid's JSON (default); compare-py: the seed post's results.json layout",
    )


def configure_logging(*, verbose: bool) -> None:
    """``--verbose``: lorafid's INFO messages (retries, re-resolved URLs) on stderr, one line each."""
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("lorafid: %(message)s"))
        logger = logging.getLogger("lorafid")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def check_writable(out: Path | None) -> None:
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


def audit_config(args: argparse.Namespace) -> AuditConfig:
    """The audit settings ``audit`` and ``extract`` take from the same options."""
    return AuditConfig(
        rank=args.rank,
        device=args.device,
        include_embeddings=getattr(args, "include_embeddings", False),
        include=args.include,
        exclude=args.exclude,
        base_revision=args.base_revision,
        finetune_revision=args.finetune_revision,
        token=args.token,
        fresh=args.fresh,
    )
