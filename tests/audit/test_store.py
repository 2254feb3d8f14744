"""store.py: per-matrix persistence, and permalink lookup that respects revisions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from lorafid.audit import spectrum as sp
from lorafid.audit.matrices import MatrixResult
from lorafid.audit.report import AuditSettings, Report, SourceRecord
from lorafid.audit.store import Store


def report_for(base_spec: str, base_revision: str | None, finetune_revision: str | None) -> Report:
    spectrum = sp.delta_spectrum(torch.zeros(3, 3), torch.diag(torch.tensor([3.0, 2.0, 1.0])))
    matrix = MatrixResult.from_spectrum(name="m.layers.0.x.weight", layer=0, module="x", dtype="F32", spectrum=spectrum)
    base = SourceRecord(base_spec, "hub", "org/base", base_revision, "a" * 40, None, ("model.safetensors",))
    finetune = SourceRecord("org/ft", "hub", "org/ft", finetune_revision, "b" * 40, None, ("model.safetensors",))
    return Report(base=base, finetune=finetune, settings=AuditSettings(rank=2, device="cpu"), matrices=(matrix,))


def test_matrices_round_trip_with_spectra_and_no_pickle(tmp_path: Path) -> None:
    store = Store(tmp_path)
    report = report_for("org/base", None, None)
    store.put_matrix("k", report.matrices[0])
    store.save_report("k", report)
    loaded = store.load_report("k")
    assert loaded is not None and loaded.matrices == report.matrices
    assert loaded.matrices[0].sigma_sq is not None and report.matrices[0].sigma_sq is not None
    np.testing.assert_array_equal(loaded.matrices[0].sigma_sq, report.matrices[0].sigma_sq)
    assert loaded.matrices[0].metrics(1) == report.matrices[0].metrics(1)


def test_find_respects_revisions(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.save_report("main", report_for("org/base", None, None))
    store.save_report("v2", report_for("org/base", None, "v2"))
    store.save_report("at", report_for("org/base@r1", "r1", None))
    assert store.find("org/base", "org/ft") == "main"
    assert store.find("org/base", "org/ft", None, "v2") == "v2"
    assert store.find("org/base", "org/ft", None, "v3") is None
    assert store.find("org/base@r1", "org/ft") == "at"  # the revision came with the spec
    assert store.find("org/other", "org/ft") is None


def test_forget_drops_everything(tmp_path: Path) -> None:
    store = Store(tmp_path)
    report = report_for("org/base", None, None)
    store.put_matrix("k", report.matrices[0])
    store.save_report("k", report)
    store.forget("k")
    assert store.load_report("k") is None and store.matrices("k") == {}


def test_gallery_lists_only_audits_with_results_and_shared_ones_when_asked(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with_result = report_for("org/base", None, None)
    store.put_matrix("done", with_result.matrices[0])
    store.save_report("done", with_result)
    crashed = dataclasses.replace(with_result, matrices=(), pending=("m.layers.0.x.weight",), status="partial")
    store.save_report("crashed", crashed)  # planned, then failed before its first matrix
    assert [a.key for a in store.list_audits()] == ["done"]
    assert store.list_audits(shared_only=True) == []  # never checked: private
    store.set_visibility("done", True, False)
    assert store.list_audits(shared_only=True) == []  # a gated or private side: not shared
    store.set_visibility("done", True, True)
    assert [a.key for a in store.list_audits(shared_only=True)] == ["done"]
    assert store.visibility("done") == (True, True) and store.visibility("crashed") == (False, False)
    listed = store.list_audits()[0]
    assert (listed.base_sha, listed.finetune_sha) == ("a" * 40, "b" * 40)
    store.forget("done")
    assert store.visibility("done") == (False, False)


def test_find_pinned_matches_repos_and_commits(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.save_report("main", report_for("org/base", None, None))
    store.save_report("at", report_for("org/base@r1", "r1", None))  # same repos and commits, typed otherwise
    assert store.find_pinned("org/base", "org/ft", "a" * 40, "b" * 40) == "at"  # the latest of the two
    assert store.find_pinned("org/base", "org/ft", "a" * 40, "c" * 40) is None
    assert store.find_pinned("org/other", "org/ft", "a" * 40, "b" * 40) is None


def test_load_report_keeps_every_field_of_the_report(tmp_path: Path) -> None:
    """A round trip through the store gives back the report it was given (the adapter section too)."""
    store = Store(tmp_path)
    report = dataclasses.replace(
        report_for("org/base", None, None), adapter={"schema": "lorafid.adapter/1", "rank": 2, "energy_kept": 0.5}
    )
    store.put_matrix("k", report.matrices[0])
    store.save_report("k", report)
    loaded = store.load_report("k")
    assert loaded is not None
    assert loaded.adapter == report.adapter
    for field in dataclasses.fields(Report):
        assert getattr(loaded, field.name) == getattr(report, field.name), field.name


# The tables as the first released store wrote them, before it recorded a version.
_UNVERSIONED = """
CREATE TABLE audits (key TEXT PRIMARY KEY, base_spec TEXT NOT NULL, finetune_spec TEXT NOT NULL,
    status TEXT NOT NULL, updated REAL NOT NULL, report_json TEXT NOT NULL);
CREATE TABLE matrices (audit_key TEXT NOT NULL, name TEXT NOT NULL, result_json TEXT NOT NULL,
    sigma_sq BLOB NOT NULL, PRIMARY KEY (audit_key, name));
CREATE TABLE vectors (audit_key TEXT NOT NULL, name TEXT NOT NULL, result_json TEXT NOT NULL,
    PRIMARY KEY (audit_key, name));
"""


def test_a_store_from_before_versions_is_migrated_and_keeps_its_audits(tmp_path: Path) -> None:
    import sqlite3

    from lorafid.audit.store import STORE_VERSION

    report = report_for("org/base", None, None)
    old = Store(tmp_path / "seed")
    old.put_matrix("k", report.matrices[0])
    old.save_report("k", report)
    old.close()
    rows = {
        table: sqlite3.connect(tmp_path / "seed" / "store.sqlite3").execute(f"SELECT * FROM {table}").fetchall()
        for table in ("audits", "matrices")
    }
    (tmp_path / "old").mkdir()
    db = sqlite3.connect(tmp_path / "old" / "store.sqlite3")
    db.executescript(_UNVERSIONED)
    db.executemany("INSERT INTO audits VALUES (?, ?, ?, ?, ?, ?)", rows["audits"])
    db.executemany("INSERT INTO matrices VALUES (?, ?, ?, ?)", rows["matrices"])
    db.commit()
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()

    store = Store(tmp_path / "old")
    assert store.version == STORE_VERSION >= 2
    loaded = store.load_report("k")
    assert loaded is not None and loaded.matrices == report.matrices
    assert store.find("org/base", "org/ft") == "k"
    store.put_document("probe", {"verdict": "x"})  # a table version 1 added
    store.close()
    db = sqlite3.connect(tmp_path / "old" / "store.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == STORE_VERSION
    indexes = {r[1] for r in db.execute("PRAGMA index_list(audits)")}
    assert "audits_by_pair" in indexes
    db.close()
    assert Store(tmp_path / "old").version == STORE_VERSION  # reopening migrates nothing twice


def test_a_store_from_a_newer_lorafid_is_refused_untouched(tmp_path: Path) -> None:
    import sqlite3

    import pytest

    from lorafid.audit.store import STORE_VERSION
    from lorafid.errors import LorafidError

    db = sqlite3.connect(tmp_path / "store.sqlite3")
    db.execute(f"PRAGMA user_version = {STORE_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(LorafidError, match=r"newer lorafid .* set LORAFID_HOME to another folder"):
        Store(tmp_path)
    db = sqlite3.connect(tmp_path / "store.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == STORE_VERSION + 1
    assert db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
