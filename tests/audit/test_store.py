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
