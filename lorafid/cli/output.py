"""What the command prints and writes: the audit's description and tables, the byte progress bar,
the adapter section, and the report files."""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm import tqdm

from lorafid.audit.engine import AuditProgress
from lorafid.audit.report import Report, save_spectra, spectra_path
from lorafid.audit.summary import aggregate_rank_for_energy, percent
from lorafid.errors import LorafidError

REASON_NOUNS: dict[str, tuple[str, str]] = {
    "embedding": ("embedding", "embeddings"),
    "not_2d": ("tensor that is not a matrix", "tensors that are not matrices"),
    "shape_mismatch": ("shape mismatch", "shape mismatches"),
    "only_in_base": ("only in the base", "only in the base"),
    "only_in_finetune": ("only in the fine-tune", "only in the fine-tune"),
    "unsupported_dtype": ("unsupported dtype", "unsupported dtypes"),
    "filtered": ("filtered out", "filtered out"),
    "non_finite": ("with NaN or Inf", "with NaN or Inf"),
}


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
    if summary.full_rank and report.rank > summary.full_rank:
        lines[1:1] = [
            f"(rank {report.rank:,} is above the largest matrix's full rank, {summary.full_rank}: "
            "a LoRA of that rank is the whole change, read at full rank)"
        ]
    # One space between columns: a header as wide as its column ("kept@100000") never runs on.
    kept = f"kept@{report.rank}"
    lines.append(f"{'module':<27} {'matrices':>8} {kept:>10} {'cos.dist':>9} {'rank for 90%':>13}")
    width = max(10, len(kept))
    for group in sorted(summary.by_module, key=lambda g: g.energy_retained):
        members = [m for m in report.matrices if m.module == group.key]
        if group.energy == 0.0:  # nothing changed in this kind: there is nothing to keep or lose
            lines.append(f"{group.key:<27} {group.matrices:>8} {'unchanged':>{width}} {'-':>9} {'-':>13}")
            continue
        needed = aggregate_rank_for_energy(members, 0.9)
        lines.append(
            f"{group.key:<27} {group.matrices:>8} {group.energy_retained:>{width}.1%} "
            f"{group.cosine_distance:>9.4f} {needed if needed is not None else '-':>13}"
        )
    changed_layers = (g for g in summary.by_layer if g.key != "-" and g.energy > 0.0)
    layers = sorted(changed_layers, key=lambda g: g.energy_retained)[:3]
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
        lines.append("not audited: " + ", ".join(count_noun(n, r) for r, n in sorted(reasons.items())))
    if report.status != "complete":
        lines.append(f"partial: {len(report.pending)} matrices not computed yet")
    return "\n".join(lines)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def terminal_text(text: str) -> str:
    """Text from outside (a registry row, a repo's names) safe to print: control characters,
    escape sequences and bidirectional overrides become ``?``; newlines stay.

    Example: "org/x\x1b[2J" -> "org/x?[2J" (the terminal is not cleared).
    """
    return _CONTROL.sub("?", text.replace("\t", " "))


def count_noun(n: int, reason: str) -> str:
    """``count_noun(2, "embedding")`` -> "2 embeddings"; unknown reasons read as their code."""
    one, many = REASON_NOUNS.get(reason, (reason.replace("_", " "),) * 2)
    return f"{n} {one if n == 1 else many}"


def write_report(report: Report, args: argparse.Namespace) -> None:
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


def follow_bytes(steps: Iterator[AuditProgress], size_bytes: int, desc: str, *, quiet: bool) -> None:
    """Run a streamed job to its end behind one byte progress bar (bytes, MB/s, ETA, matrices)."""
    with tqdm(total=size_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=quiet) as bar:
        for step in steps:
            bar.update(step.bytes_done - bar.n)
            bar.set_postfix_str(f"{step.done}/{step.total} matrices", refresh=False)


def print_adapter(report: Report) -> None:
    from lorafid.adapters.peft_adapter import section_of

    section = section_of(report)
    if section is not None:
        print("\n" + section.sentence())
