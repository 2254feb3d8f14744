"""What is published: the index row (``RegistryEntry``), where a result lives (``result_path``),
its two files (``result_files``) and reading a published report back (``read_published``,
``attach_spectra``), refusing schemas this lorafid does not know with a message that says
which lorafid wrote them. Layout of the registry dataset: ``lorafid.sharing.hub_dataset``.
Pure: no network.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from safetensors.numpy import save as save_safetensors

from lorafid import __version__
from lorafid.audit.report import SCHEMA, Report
from lorafid.errors import RegistryError, ResultSchemaError
from lorafid.sharing.hub_errors import cut

REGISTRY_SCHEMA = "lorafid.registry/1"
"""Schema of one index row (``RegistryEntry``)."""
TABLE_RANKS: tuple[int, ...] = (64, 128, 256, 512)
"""Ranks whose kept energy each index row carries: those LoRA-serving providers typically use."""
PRECISION = 1e-5
"""The precision bar: energy retained and cosine distance agree within this (absolute)."""


# -- what is published --------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryEntry:
    """One published result, as a row of the index: enough for the gallery and the table.

    ``energy_at`` holds the energy-weighted share of Δ kept at ``TABLE_RANKS`` (exact: from
    the spectra when published); ``rank_for_90`` the smallest rank keeping 90% overall.
    """

    path: str  # the report's path in the dataset; the spectra sit beside it
    base: str  # repo IDs
    finetune: str
    base_sha: str
    finetune_sha: str
    base_revision: str | None  # as asked for when audited
    finetune_revision: str | None
    settings_hash: str
    tool_version: str
    report_schema: str
    numerics: dict[str, str | bool]
    created: str
    matrices: int
    energy_at: dict[str, float]
    rank_for_90: int | None
    sentence: str
    schema: str = REGISTRY_SCHEMA

    @property
    def name(self) -> str:
        """The content name: what ``lorafid open`` and ``--verify`` take as REF."""
        return self.path.rsplit("/", 1)[-1].removesuffix(".json")

    @property
    def spectra_path(self) -> str:
        return self.path.removesuffix(".json") + ".spectra.safetensors"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RegistryEntry:
        if data.get("schema") != REGISTRY_SCHEMA:
            raise ResultSchemaError(
                f"An index row has schema {data.get('schema')!r}; this lorafid {__version__} reads "
                f"{REGISTRY_SCHEMA}. Upgrade lorafid to read it."
            )
        try:
            entry = cls(**{k: data[k] for k in cls.__dataclass_fields__})
            texts = (entry.path, entry.base, entry.finetune, entry.base_sha, entry.finetune_sha, entry.created)
            well_formed = (
                all(isinstance(t, str) for t in texts)
                and entry.path.startswith("results/")
                and entry.path.endswith(".json")
                and ".." not in entry.path
                and all(isinstance(v, float | int) for v in entry.energy_at.values())
                and (entry.rank_for_90 is None or isinstance(entry.rank_for_90, int))
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ResultSchemaError(f"An index row of {REGISTRY_SCHEMA} is malformed ({e}).") from e
        if not well_formed:
            raise ResultSchemaError(f"An index row of {REGISTRY_SCHEMA} is malformed (a field of the wrong type).")
        return entry


def settings_hash(report: Report) -> str:
    """12 hex digits of what, besides the two commits, fixes the numbers (the rank does not)."""
    s = report.settings
    payload = {
        "include_embeddings": s.include_embeddings,
        "include": s.include,
        "exclude": s.exclude,
        "numerics": s.numerics,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def result_path(report: Report) -> str:
    """Where a result lives in the registry (see the module docstring)."""
    base, finetune = report.base, report.finetune
    if not (base.repo_id and finetune.repo_id and base.resolved_sha and finetune.resolved_sha):
        raise RegistryError("Only audits of two Hub repos, pinned to commits, can be published.")
    name = f"{base.resolved_sha}-{finetune.resolved_sha}-{settings_hash(report)}-lorafid{report.tool_version}"
    return f"results/{base.repo_id}/{finetune.repo_id}/{name}.json"


def entry_for(report: Report) -> RegistryEntry:
    """The index row of a complete report (with its spectra, for exact figures)."""
    summary = report.summary()
    total = sum(m.energy for m in report.matrices)
    energy_at = {
        str(r): (sum(m.energy * m.energy_retained(r) for m in report.matrices) / total if total else 1.0)
        for r in TABLE_RANKS
    }
    return RegistryEntry(
        path=result_path(report),
        base=str(report.base.repo_id),
        finetune=str(report.finetune.repo_id),
        base_sha=str(report.base.resolved_sha),
        finetune_sha=str(report.finetune.resolved_sha),
        base_revision=report.base.requested_revision,
        finetune_revision=report.finetune.requested_revision,
        settings_hash=settings_hash(report),
        tool_version=report.tool_version,
        report_schema=SCHEMA,
        numerics=dict(report.settings.numerics),
        created=report.created,
        matrices=len(report.matrices),
        energy_at=energy_at,
        rank_for_90=summary.rank_for_90,
        sentence=summary.sentence(),
    )


def read_published(data: Mapping[str, Any], where: str) -> Report:
    """A report from published JSON: the current schema is read; any other is refused, saying why.

    Example: {"schema": "lorafid.report/2", "tool_version": "0.3.0", ...} -> ResultSchemaError
    "… was written by lorafid 0.3.0 as lorafid.report/2; this lorafid … reads lorafid.report/1:
    upgrade lorafid to open it."
    """
    schema = data.get("schema")
    if schema == SCHEMA:
        try:
            return Report.from_dict(dict(data))
        except (KeyError, TypeError, ValueError) as e:
            raise ResultSchemaError(f"{where} claims {SCHEMA} but does not follow it ({e}); it was not opened.") from e
    tool = data.get("tool_version", "an unknown version")
    if isinstance(schema, str) and schema.startswith("lorafid.report/"):
        version = schema.rpartition("/")[2]
        newer = version.isdigit() and int(version) > int(SCHEMA.rpartition("/")[2])
        advice = "upgrade lorafid to open it" if newer else f"open it with lorafid {tool}, or re-run the audit"
        raise ResultSchemaError(
            f"{where} was written by lorafid {tool} as {schema}; this lorafid {__version__} reads {SCHEMA}: {advice}."
        )
    raise ResultSchemaError(f"{where} is not a lorafid result (schema {cut(str(schema))!r}).")


def attach_spectra(report: Report, spectra: Mapping[str, np.ndarray], where: str) -> Report:
    """Attach downloaded spectra after checking they fit: one per matrix, k values each."""
    for m in report.matrices:
        got = spectra.get(m.name)
        if got is None or got.shape != (min(m.shape),) or not np.all(np.isfinite(got)):
            raise RegistryError(f"The spectra of {where} do not match its report ({m.name}); it was not opened.")
    return report.with_spectra({m.name: np.asarray(spectra[m.name], dtype=np.float64) for m in report.matrices})


def result_files(report: Report) -> dict[str, bytes]:
    """The two files of a published result: the report JSON and its spectra."""
    path = result_path(report)
    spectra = {m.name: np.ascontiguousarray(m.sigma_sq, dtype="<f8") for m in report.matrices if m.sigma_sq is not None}
    if len(spectra) != len(report.matrices):
        raise RegistryError("A result is published with its full spectra; this report was loaded without them.")
    return {
        path: (report.to_json() + "\n").encode(),
        path.removesuffix(".json") + ".spectra.safetensors": save_safetensors(
            spectra, metadata={"schema": SCHEMA, "content": "sigma_sq per matrix"}
        ),
    }
