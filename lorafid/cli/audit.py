"""``lorafid audit BASE FINETUNE --rank R`` (also against a PEFT adapter) and ``lorafid rerank REPORT``."""

from __future__ import annotations

import argparse
import sys
from contextlib import closing
from typing import TYPE_CHECKING

from lorafid.audit.engine import Audit, AuditConfig
from lorafid.audit.report import Report, load_spectra, spectra_path
from lorafid.audit.store import Store
from lorafid.cli.arguments import audit_config, check_writable
from lorafid.cli.output import describe, follow_bytes, print_adapter, write_report
from lorafid.cli.registry import publish_report
from lorafid.errors import LorafidError

if TYPE_CHECKING:
    from lorafid.adapters.peft_adapter import AdapterAudit


def run_audit(args: argparse.Namespace) -> int:
    check_writable(args.out)  # before the audit, not after an hour of it
    config = audit_config(args)
    with audit_job(args, config) as job:
        plan = job.plan()
        try:
            follow_bytes(job.run(), plan.size_bytes, "audit", quiet=args.quiet)
        except KeyboardInterrupt:
            report = job.report()
            write_report(report, args)
            done = len(report.matrices)
            print(
                f"lorafid: interrupted after {done} of {done + len(report.pending)} matrices; they are kept. "
                "Run the same command again to resume.",
                file=sys.stderr,
            )
            return 130
        report = job.report()
    write_report(report, args)
    if not args.quiet:
        print(describe(report))
        print_adapter(report)
    if args.publish is not None:
        return publish_report(report, args)
    return 0


def audit_job(args: argparse.Namespace, config: AuditConfig) -> Audit | AdapterAudit:
    """The plain audit, or with ``--adapter`` the audit that also measures the adapter."""
    if args.adapter is None:
        return Audit(args.base, args.finetune, config)
    from lorafid.adapters.peft_adapter import AdapterAudit

    return AdapterAudit(args.base, args.finetune, args.adapter, config, adapter_revision=args.adapter_revision)


def run_rerank(args: argparse.Namespace) -> int:
    check_writable(args.out)
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
    write_report(report, args)
    if not args.quiet:
        print(describe(report))
    return 0
