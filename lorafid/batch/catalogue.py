"""A catalogue: the list of (base, fine-tune) pairs a batch audits, read from CSV or YAML.

CSV, one pair per row, a header naming the columns (only ``base`` and ``finetune`` required)::

    base,finetune,base_revision,finetune_revision,rank,label,split
    meta-llama/Llama-3.1-8B,org/ft-a,,,64,ft-a,
    meta-llama/Llama-3.1-8B,org/ft-b,,v2,16 64,ft-b @ v2,4

YAML, a list of mappings (or a mapping whose ``pairs`` key holds that list)::

    - {base: meta-llama/Llama-3.1-8B, finetune: org/ft-a, rank: 64}
    - {base: meta-llama/Llama-3.1-8B, finetune: org/ft-b, finetune_revision: v2, ranks: [16, 64], split: 4}

``rank``/``ranks``: one or more ranks to read the audit at (CSV: separated by spaces, ``;``
or ``|``); none = the batch's ``--rank``. ``split``: number of tasks the pair's layers are
spread over (large pairs); none = the batch's ``--split``. ``label``: a name for the table.

Every problem in the file is gathered into one ``CatalogueError`` naming rows and fields.
A pair listed twice is an error (two tasks would compute the same matrices): give one row
several ranks instead.

Not here: checking that repos exist (the audit does that, per pair, in its own task).
YAML is read with ``yaml.safe_load`` only: a catalogue never constructs Python objects.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafid.errors import CatalogueError, MissingExtraError
from lorafid.names import parse_ranks

FIELDS = ("base", "finetune", "base_revision", "finetune_revision", "rank", "ranks", "label", "split")


@dataclass(frozen=True)
class CataloguePair:
    """One row of a catalogue: what to audit and where to read it."""

    base: str  # Hub repo ID (org/name[@revision]) or an absolute local path present on every node
    finetune: str
    base_revision: str | None = None
    finetune_revision: str | None = None
    ranks: tuple[int, ...] = ()  # empty: the batch's default rank
    label: str = ""  # empty: the fine-tune's spec
    split: int | None = None  # tasks over the pair's layers; None: the batch's default

    @property
    def name(self) -> str:
        """What the table calls this pair: its label, else the fine-tune's spec."""
        return self.label or self.finetune


def load_catalogue(path: Path) -> list[CataloguePair]:
    """Read a ``.csv`` or ``.yaml``/``.yml`` catalogue.

    Raises:
        CatalogueError: unreadable file, unknown format, or rows with missing/invalid fields.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CatalogueError(f"Cannot read the catalogue {path}: {e}.") from e
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return parse_csv(text, where=str(path))
    if suffix in (".yaml", ".yml"):
        return parse_yaml(text, where=str(path))
    raise CatalogueError(f"Catalogue {path} must end in .csv, .yaml or .yml (one pair per row or list item).")


def parse_csv(text: str, where: str = "catalogue") -> list[CataloguePair]:
    """Pairs from CSV text with a header row; blank rows and rows whose first cell starts with # are skipped.

    Example: "base,finetune,rank\\norg/b,org/f,16 64\\n" -> [CataloguePair("org/b", "org/f", ranks=(16, 64))]
    """
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [f for f in ("base", "finetune") if f not in header]
    if missing:
        raise CatalogueError(f"{where}: the header row needs columns {', '.join(missing)} (got {header or 'none'}).")
    rows: list[tuple[str, dict[str, Any]]] = []
    for number, raw in enumerate(reader, start=2):
        cells = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else v for k, v in raw.items()}
        values = [v for v in cells.values() if v]
        if not values or str(next(iter(cells.values()), "")).startswith("#"):
            continue
        rows.append((f"row {number}", {k: v for k, v in cells.items() if v not in ("", None)}))
    return _build(rows, where)


def parse_yaml(text: str, where: str = "catalogue") -> list[CataloguePair]:
    """Pairs from YAML: a list of mappings, or ``{pairs: [...]}``."""
    try:
        import yaml
    except ImportError as e:
        raise MissingExtraError("Reading a YAML catalogue needs PyYAML: pip install lorafid[batch]") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CatalogueError(f"{where} is not valid YAML: {e}") from e
    if isinstance(data, dict) and set(data) == {"pairs"}:
        data = data["pairs"]
    if not isinstance(data, list):
        raise CatalogueError(f"{where}: expected a list of pairs (or a 'pairs:' key holding one).")
    rows = []
    for number, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            raise CatalogueError(f"{where}: item {number} is not a mapping with base and finetune.")
        rows.append((f"item {number}", {str(k): v for k, v in item.items() if v is not None}))
    return _build(rows, where)


def _build(rows: list[tuple[str, dict[str, Any]]], where: str) -> list[CataloguePair]:
    """Validate every row, gather every problem, and refuse pairs listed twice."""
    problems: list[str] = []
    pairs: list[CataloguePair] = []
    seen: dict[tuple[str, str, str | None, str | None], str] = {}
    for place, row in rows:
        try:
            pair = _pair(row)
        except ValueError as e:
            problems.append(f"{place}: {str(e).rstrip('.')}")
            continue
        identity = (pair.base, pair.finetune, pair.base_revision, pair.finetune_revision)
        if identity in seen:
            problems.append(f"{place}: same pair as {seen[identity]}; list it once with several ranks")
            continue
        seen[identity] = place
        pairs.append(pair)
    if problems:
        raise CatalogueError(f"{where}: " + "; ".join(problems) + ".")
    if not pairs:
        raise CatalogueError(f"{where} lists no pairs.")
    return pairs


def _pair(row: dict[str, Any]) -> CataloguePair:
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(FIELDS)})")
    for required in ("base", "finetune"):
        if not isinstance(row.get(required), str) or not row[required].strip():
            raise ValueError(f"{required} is missing")
    if "rank" in row and "ranks" in row:
        raise ValueError("give rank or ranks, not both")
    ranks = _ranks(row.get("rank", row.get("ranks")))
    split = _positive(row["split"], "split") if "split" in row else None
    return CataloguePair(
        base=row["base"].strip(),
        finetune=row["finetune"].strip(),
        base_revision=_text(row.get("base_revision")),
        finetune_revision=_text(row.get("finetune_revision")),
        ranks=ranks,
        label=_text(row.get("label")) or "",
        split=split,
    )


def _ranks(value: Any) -> tuple[int, ...]:
    """16 -> (16,); "16 64" -> (16, 64); [16, 64] -> (16, 64); None -> ()."""
    return () if value is None else parse_ranks(value, what="rank")


def _positive(value: Any, field: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{field} {value!r} is not a positive integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field} {value!r} is not a positive integer") from None
    if number < 1 or str(number) != str(value).strip():
        raise ValueError(f"{field} {value!r} is not a positive integer")
    return number


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None
