"""The committed example audits (assets/examples/, made by scripts/make_examples.py) are
internally consistent, and say what the physics says they must.

Reference: every number is recomputed with numpy from the σ² in each sidecar, independently
of lorafid's spectrum code. Physics: the merged LoRA fine-tune's Δ is exactly rank 8 plus
the rounding of the stored weights, so rank 8 keeps all of it but the rounding (float32:
relative rounding ~2⁻²⁴ of the weights, far below 1e-4 of Δ; bfloat16: at most the rounding
floor lorafid estimates); a full fine-tune's Δ is high-rank, so rank 8 keeps clearly less.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lorafid.audit.matrices import RANK_GRID
from lorafid.audit.report import Report, load_spectra, spectra_path

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"
NAMES = ("minilm-full-finetune", "minilm-lora-r8", "minilm-lora-r8-bf16")


def _load(name: str) -> tuple[Report, dict[str, np.ndarray], dict]:
    path = EXAMPLES / f"{name}.json"
    text = path.read_text(encoding="utf-8")
    report = Report.from_json(text)
    spectra = load_spectra(spectra_path(path))
    return report.with_spectra(spectra), spectra, json.loads(text)


def _retained(sigma_sq: np.ndarray, energy: float, rank: int) -> float:
    """Energy retained at ``rank``: Σ_{i≤r} σ_i² / E, at most 1; exactly 1 at full rank
    (the rank-k "approximation" is Δ itself) and for an unchanged matrix. E is the sum of
    the signed eigenvalues, so the clipped σ² can sum a hair past it."""
    if energy == 0.0 or rank >= len(sigma_sq):
        return 1.0
    s = np.sort(np.asarray(sigma_sq, dtype=np.float64))[::-1]
    return min(float(np.sum(s[:rank]) / energy), 1.0)


def _overall(spectra: dict[str, np.ndarray], rank: int, report: Report) -> float:
    """Energy-weighted retention over all matrices, weighted by each matrix's E."""
    energies = {m.name: m.energy for m in report.matrices}
    total = sum(energies.values())
    kept = sum(_retained(s, energies[n], rank) * energies[n] for n, s in spectra.items())
    return kept / total


@pytest.mark.parametrize("name", NAMES)
def test_example_is_small_and_names_no_machine_path(name: str) -> None:
    path = EXAMPLES / f"{name}.json"
    assert path.stat().st_size < 1_000_000
    assert spectra_path(path).stat().st_size < 1_000_000
    data = json.loads(path.read_text(encoding="utf-8"))
    for side in ("base", "finetune"):
        assert data[side]["path"] is None
        assert "/" not in data[side]["spec"].split(" ")[0] or "all-MiniLM" in data[side]["spec"]
    text = path.read_text(encoding="utf-8")
    for marker in ("/tmp", "/home", "/root", "site-packages", "\\\\"):
        assert marker not in text


@pytest.mark.parametrize("name", NAMES)
def test_example_matches_numpy_reference(name: str) -> None:
    report, spectra, data = _load(name)
    assert report.status == "complete" and not report.pending
    assert {m.name for m in report.matrices} == set(spectra)
    assert report.has_spectra()
    for m, d in zip(report.matrices, data["matrices"], strict=True):
        s = spectra[m.name]
        assert len(s) == min(m.shape) == m.full_rank
        assert np.all(s >= -1e-12 * max(m.energy, 1e-300))
        assert math.isclose(float(np.sum(s)), m.energy, rel_tol=1e-6, abs_tol=1e-30)
        for rank, grid in zip(RANK_GRID, m.energy_grid, strict=True):
            assert grid == pytest.approx(_retained(s, m.energy, rank), abs=1e-9)
        at = d["at_rank"]
        ref = _retained(s, m.energy, report.rank)
        assert at["energy_retained"] == pytest.approx(ref, abs=1e-9)
        assert at["cosine_distance"] == pytest.approx(1 - math.sqrt(ref), abs=1e-9)
        lost = max(m.energy - ref * m.energy, 0.0)
        assert at["mse"] == pytest.approx(lost / (m.shape[0] * m.shape[1]), rel=1e-6, abs=1e-30)
        for share, rank in m.rank_for_energy.items():
            if m.energy == 0.0:
                assert rank == 0  # nothing changed: no rank is needed
                continue
            reached = [_retained(s, m.energy, r) >= float(share) - 1e-12 for r in range(1, len(s) + 1)]
            assert rank == reached.index(True) + 1
    summary = data["summary"]
    assert summary["rank"] == report.rank
    assert summary["overall"]["energy_retained"] == pytest.approx(_overall(spectra, report.rank, report), abs=1e-9)
    assert report.summary().overall.energy_retained == pytest.approx(_overall(spectra, report.rank, report), abs=1e-12)


def test_lora_example_is_rank_8_up_to_float32_rounding() -> None:
    report, spectra, _ = _load("minilm-lora-r8")
    assert report.rank == 8
    changed = {n: s for n, s in spectra.items() if np.sum(s) > 0}
    assert len(changed) == 36  # q, k, v, attention output, intermediate, output × 6 blocks
    assert _overall(spectra, 8, report) >= 1 - 1e-4
    for name, s in changed.items():
        assert _retained(s, float(np.sum(s)), 8) >= 1 - 1e-3, name
    unchanged = [m for m in report.matrices if m.energy == 0.0]
    assert all(m.metrics(8).energy_retained == 1.0 for m in unchanged)  # the pooler: untouched
    assert all(v.energy == 0.0 for v in report.vectors)  # biases and norms were frozen


def test_bf16_lora_example_loses_only_rounding() -> None:
    report, spectra, _ = _load("minilm-lora-r8-bf16")
    kept = _overall(spectra, 8, report)
    assert 0.5 < kept < 1.0  # bf16 rounding is a visible share of a small Δ ...
    floor = report.summary().noise_floor_retained
    assert kept >= floor - 0.02  # ... and the loss is no more than the estimated rounding floor


def test_full_finetune_example_is_high_rank() -> None:
    report, spectra, _ = _load("minilm-full-finetune")
    lora_report, lora_spectra, _ = _load("minilm-lora-r8")
    assert report.rank == 64
    full_8 = _overall(spectra, 8, report)
    assert full_8 < 0.9
    assert full_8 < _overall(lora_spectra, 8, lora_report) - 0.1
    assert _overall(spectra, 64, report) > full_8
    assert any(v.energy > 0 for v in report.vectors)  # norms and biases moved: lost to any LoRA
    assert report.summary().overall.energy_retained == pytest.approx(_overall(spectra, 64, report), abs=1e-12)


def test_dashboard_gallery_lists_and_opens_the_bundled_examples(tmp_path: Path) -> None:
    from lorafid.audit.store import Store
    from lorafid.web.config import EXAMPLES_DIR
    from lorafid.web.gallery import Catalog

    assert EXAMPLES_DIR == EXAMPLES
    catalog = Catalog(Store(tmp_path / "home"))  # the default: the bundled examples
    entries = catalog.entries()
    assert [e.ref for e in entries] == sorted(f"example:{name}.json" for name in NAMES)
    labels = " | ".join(e.label for e in entries)
    assert labels.count("example: ") == 3 and "full fine-tune" in labels and "LoRA" in labels
    for entry in entries:
        report = catalog.open(entry.ref)
        assert report.has_spectra()
        assert report.with_rank(37).summary().overall.energy_retained > 0  # any rank, from the sidecar
        assert entry.sentence == report.summary().sentence()
