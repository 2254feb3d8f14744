"""What a batch produces: per-pair outcomes, report files, and the table sorted by loss.

``out/pairs/NNN-<label>.json`` (+ ``.spectra.safetensors``) is each pair's report, the
same document ``lorafid audit --out`` writes. ``out/table.csv`` and ``out/table.json``
hold one row per pair and rank, the worst loss first; ``gallery_ref`` (``store:<key>``)
is what the dashboard's gallery opens.

Not here: running anything (``lorafid.batch.driver``).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from lorafid.audit.report import Report, save_spectra
from lorafid.batch.catalogue import CataloguePair
from lorafid.errors import LorafidError

TABLE_SCHEMA = "lorafid.batch/2"  # 2: the nodes column


@dataclass(frozen=True)
class PairOutcome:
    """What became of one catalogue row."""

    index: int  # position in the catalogue
    pair: CataloguePair
    status: str  # "complete" | "failed" | "pending" (the batch was interrupted first)
    report: Report | None = field(default=None, repr=False)  # at the pair's first rank, with spectra
    key: str | None = None  # store key: the dashboard opens it as "store:<key>"
    error: str | None = None
    from_store: bool = False  # complete before this run: nothing was fetched
    report_file: str | None = None  # relative to ``out``
    nodes: tuple[str, ...] = ()  # the Ray nodes that computed it ("10.0.0.5 [1a2b3c4d]"); () from the store

    def on_nodes(self, nodes: tuple[str, ...]) -> PairOutcome:
        return replace(self, nodes=nodes)


@dataclass(frozen=True)
class TableRow:
    """One line of the final table: a pair read at one rank."""

    label: str
    base: str
    finetune: str
    rank: int
    status: str
    loss: float | None  # share of the fine-tune's change lost at this rank (1 − energy retained)
    energy_retained: float | None
    weight_rel_error: float | None  # ‖W_ft − W_served‖ / ‖W_ft‖ over the audited matrices
    rank_for_90: int | None  # smallest rank keeping 90% of the change
    matrices: int
    sentence: str
    base_sha: str | None
    finetune_sha: str | None
    gallery_ref: str | None  # "store:<key>", what the dashboard's gallery opens
    report_file: str | None
    error: str | None
    nodes: str = ""  # where it ran: Ray nodes separated by "; ", "store" when taken from the store


def nodes_text(outcome: PairOutcome) -> str:
    """The table's ``nodes`` cell: "10.0.0.5 [1a2b3c4d]; 10.0.0.6 [9f8e7d6c]", "store", or ""."""
    return "store" if outcome.from_store else "; ".join(outcome.nodes)


def by_node(outcomes: Sequence[PairOutcome]) -> dict[str, list[str]]:
    """Node -> names of the pairs it computed (a split pair under each of its nodes), catalogue order."""
    out: dict[str, list[str]] = {}
    for outcome in outcomes:
        for node in outcome.nodes:
            out.setdefault(node, []).append(outcome.pair.name)
    return out


@dataclass(frozen=True)
class BatchResult:
    outcomes: tuple[PairOutcome, ...]  # catalogue order
    interrupted: bool = False

    @property
    def failed(self) -> list[PairOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def table(self, default_rank: int = 64) -> list[TableRow]:
        return results_table(self.outcomes, default_rank)


def write_pair(
    out: Path | None,
    index: int,
    pair: CataloguePair,
    rank: int,
    key: str,
    report: Report,
    *,
    from_store: bool,
) -> PairOutcome:
    """The outcome of a complete pair, its report written to ``out/pairs/`` at ``rank`` (its first)."""
    report = report.with_rank(rank)
    relative = None
    if out is not None:
        relative = f"pairs/{index + 1:03d}-{_slug(pair.name)}.json"
        path = out / relative
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(report.to_json() + "\n")
            save_spectra(report, path.with_name(path.stem + ".spectra.safetensors"))
        except OSError as e:
            raise LorafidError(f"Cannot write {path}: {e.strerror}.") from e
    return PairOutcome(index, pair, report.status, report, key, None, from_store, relative)


def results_table(outcomes: Sequence[PairOutcome], default_rank: int = 64) -> list[TableRow]:
    """One row per pair and rank: the worst loss first, then failed and pending pairs in catalogue order."""
    rows: list[TableRow] = []
    for o in outcomes:
        for rank in o.pair.ranks or (default_rank,):
            rows.append(_row(o, rank))
    return sorted(rows, key=lambda r: (r.loss is None, -(r.loss or 0.0)))


def _row(outcome: PairOutcome, rank: int) -> TableRow:
    pair, report = outcome.pair, outcome.report
    given = {"status": outcome.status, "nodes": nodes_text(outcome)}  # every row's, run or not
    if report is None:
        return TableRow(
            pair.name,
            pair.base,
            pair.finetune,
            rank,
            **given,
            loss=None,
            energy_retained=None,
            weight_rel_error=None,
            rank_for_90=None,
            matrices=0,
            sentence="",
            base_sha=None,
            finetune_sha=None,
            gallery_ref=None,
            report_file=None,
            error=outcome.error or ("not run: the batch was interrupted" if outcome.status == "pending" else None),
        )
    summary = report.with_rank(rank).summary()
    return TableRow(
        pair.name,
        pair.base,
        pair.finetune,
        rank,
        **given,
        loss=1.0 - summary.overall.energy_retained,
        energy_retained=summary.overall.energy_retained,
        weight_rel_error=summary.overall.weight_rel_error,
        rank_for_90=summary.rank_for_90,
        matrices=len(report.matrices),
        sentence=summary.sentence(),
        base_sha=report.base.resolved_sha,
        finetune_sha=report.finetune.resolved_sha,
        gallery_ref=f"store:{outcome.key}" if outcome.key else None,
        report_file=outcome.report_file,
        error=None,
    )


def write_table(rows: Sequence[TableRow], out: Path) -> None:
    """``out/table.csv`` (one line per row) and ``out/table.json`` (``{"schema", "created", "rows"}``)."""
    names = list(TableRow.__dataclass_fields__)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with (out / "table.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=names)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
        document = {
            "schema": TABLE_SCHEMA,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "rows": [asdict(r) for r in rows],
        }
        (out / "table.json").write_text(json.dumps(document, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    except OSError as e:
        raise LorafidError(f"Cannot write the table to {out}: {e.strerror}.") from e


def _slug(text: str) -> str:
    """A file-name-safe form: "org/ft-a @ v2" -> "org_ft-a_v2"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "pair"
