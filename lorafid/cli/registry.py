"""``audit --publish``, ``audit --verify REF`` and ``lorafid open DATASET [REF]``: the Hub-dataset registry."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from lorafid.audit.engine import Audit, AuditConfig
from lorafid.audit.report import Report, load_spectra, spectra_path
from lorafid.audit.store import Store
from lorafid.audit.summary import percent
from lorafid.cli.arguments import add_output_options, positive_int
from lorafid.cli.output import describe, terminal_text, write_report
from lorafid.errors import LorafidError

if TYPE_CHECKING:
    from lorafid.sharing.hub_dataset import Registry


def add_registry(commands: argparse._SubParsersAction[argparse.ArgumentParser], audit: argparse.ArgumentParser) -> None:
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
    opened.add_argument("--rank", type=positive_int, help="read it at this rank (default: the published one)")
    opened.add_argument("--token", help="Hub token, for a private registry (default: HF_TOKEN or the stored login)")
    add_output_options(opened)
    opened.add_argument("--quiet", action="store_true", help="no summary")
    # A flag and a separate filter: "--providers [HOST]" swallowed a DATASET written after it.
    opened.add_argument(
        "--providers",
        action="store_true",
        help="list the published provider checks instead: the latest per provider host and model",
    )
    opened.add_argument("--host", default="", help="with --providers: only this provider host (as listed)")


def registry_id(given: str | None, option: str) -> str:

    repo_id = given or os.environ.get("LORAFID_REGISTRY", "")
    if not repo_id:
        raise LorafidError(f"Name the registry dataset: {option} org/name, or set LORAFID_REGISTRY.")
    return repo_id


def publish_report(report: Report, args: argparse.Namespace) -> int:
    """Publish a finished audit to the user's own dataset with the user's own token."""
    from lorafid.sharing.hub_dataset import Registry, publish
    from lorafid.sharing.policy import publish_refusal

    repo_id = registry_id(args.publish, "--publish")
    reason = publish_refusal(report)
    if reason is not None:
        raise LorafidError(f"Not published: {reason} The result is kept in the local store.")
    registry = Registry(repo_id, token=args.token)
    entry = publish(registry, report)
    print(f"Published to {registry.url}: {entry.path}\nOpen it with: lorafid open {repo_id} {entry.name[:16]}")
    return 0


def open_registry(args: argparse.Namespace) -> int:
    from lorafid.sharing.hub_dataset import Registry

    registry = Registry(args.dataset, token=args.token)
    if args.providers or args.host:
        return list_providers(registry, args.host)
    if args.ref is None:
        entries = registry.entries()
        refs = unique_prefixes([e.name for e in entries])
        for e in entries:
            ranks = sorted(e.energy_at.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0)
            kept = " ".join(f"{r}:{percent(v)}" for r, v in ranks)
            print(terminal_text(f"{refs[e.name]}  {e.finetune} vs {e.base}  kept at {kept}  ({e.created})"))
        print(f"{len(entries)} result(s) in {registry.url}")
        if registry.unreadable_rows:
            print(
                f"{registry.unreadable_rows} index row(s) of a newer schema were skipped: upgrade lorafid to see them."
            )
        return 0
    report = registry.open(args.ref)
    if args.rank is not None:
        report = report.with_rank(args.rank)
    write_report(report, args)
    if not args.quiet:
        print(terminal_text(describe(report)))  # names in a published report come from its repos
    return 0


def list_providers(registry: Registry, host: str) -> int:
    """The public table of providers in the terminal: one block per provider host and model."""
    from lorafid.sharing.table import channel_name

    probes = registry.probes()
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for p in sorted(probes, key=lambda p: str(p.get("created", ""))):
        if not host or p["endpoint_host"] == host:
            latest[(str(p["endpoint_host"]), str(p["model"]))] = p
    for (where, model), p in sorted(latest.items()):
        requests = f"{p['requests']} requests" if isinstance(p.get("requests"), int) and p["requests"] else "requests ?"
        print(
            terminal_text(
                f"{where} · {model}  [{channel_name(str(p.get('method') or ''))}, {requests}, "
                f"{str(p.get('created', ''))[:10]}]\n  {p['finetune']}@{p['finetune_sha'][:7]} vs "
                f"{p['base']}@{p['base_sha'][:7]}: {p['verdict']['sentence']}"
            )
        )
    print(f"{len(latest)} provider check(s){f' of {host}' if host else ''} in {registry.url}")
    return 0


def unique_prefixes(names: list[str], shortest: int = 16) -> dict[str, str]:
    """Each name's shortest prefix (at least ``shortest`` characters) that no other name starts
    with: what the listing shows and ``lorafid open DATASET REF`` takes.

    Example: ["abc…-1", "abc…-2"] (equal for 40 characters) -> the first 41 characters of each.
    """
    out = {}
    for name in names:
        others = [n for n in names if n != name]
        length = min(len(name), shortest)
        while length < len(name) and any(o.startswith(name[:length]) for o in others):
            length += 1
        out[name] = name[:length]
    return out


def run_verify(args: argparse.Namespace) -> int:
    """Re-run the audit a published result names, at its commits, and compare every rank."""
    import tempfile

    from lorafid.sharing.hub_dataset import Registry
    from lorafid.sharing.records import PRECISION, read_published
    from lorafid.sharing.verify import verify

    ref = Path(args.verify)
    if ref.is_file():
        published, where = read_published(json.loads(ref.read_text()), str(ref)), str(ref)
        if spectra_path(ref).exists():
            published = published.with_spectra(load_spectra(spectra_path(ref)))
    else:
        registry = Registry(registry_id(args.registry, "--registry"), token=args.token)
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
