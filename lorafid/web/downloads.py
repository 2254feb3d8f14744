"""Report downloads: one file per request, in a private temporary folder.

``write_report_json`` writes a report at its rank into a folder of its own, atomically;
``sweep_downloads`` removes folders older than ``DOWNLOAD_MAX_AGE_S``; ``download_dir`` is
the folder, removed when the process exits. Writes only under that folder.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from lorafid.audit.report import Report

DOWNLOAD_MAX_AGE_S = 15 * 60  # a prepared download is fetched within seconds; older ones are swept


def write_report_json(report: Report, directory: Path) -> Path:
    """Write the report at its rank for one download request, and return its path.

    Each call gets its own new folder (a random name under ``directory``), so two visitors
    downloading the same pair at the same rank never share, overwrite or half-read a file;
    the file is written under a temporary name and renamed into place (atomic). Folders
    older than ``DOWNLOAD_MAX_AGE_S`` are removed on the way. The file name still says
    the pair and the rank: "lorafid-org_tuned-vs-org_base-rank64.json".
    """
    slug = "-vs-".join(
        re.sub(r"[^A-Za-z0-9._-]+", "_", s.spec).strip("_")[-60:] for s in (report.finetune, report.base)
    )
    return write_download(directory, f"lorafid-{slug}-rank{report.rank}.json", report.to_json())


def write_download(directory: Path, name: str, text: str) -> Path:
    """``text`` as ``name`` in a new per-request folder under ``directory``, written atomically.

    Every download (an audit's report, a provider check, a behaviour check) goes through here:
    its own folder, so concurrent requests never share a file; a temporary name renamed into
    place, so nobody reads half a file; old folders swept on the way.
    """
    sweep_downloads(directory)
    folder = directory / uuid.uuid4().hex
    folder.mkdir(parents=True)
    path = folder / name
    staging = folder / f".{name}.partial"
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)
    return path


def sweep_downloads(directory: Path, max_age_s: float = DOWNLOAD_MAX_AGE_S) -> None:
    """Remove per-request download folders older than ``max_age_s`` (Gradio serves its own copy)."""
    cutoff = time.time() - max_age_s
    for folder in directory.iterdir() if directory.is_dir() else []:
        try:
            if folder.is_dir() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue  # swept by a concurrent request


def download_dir() -> Path:
    """A private temporary folder for report downloads (Gradio serves files from temp).

    Removed when the process exits, so restarts and test runs leave nothing behind.
    """
    path = Path(tempfile.mkdtemp(prefix="lorafid-downloads-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
