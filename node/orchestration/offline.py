"""Offline cohorts: ``musclenode process PATH... --out DIR``.

Folders of DICOM files go through the same steps as in the node: headers are summarised as the
SCP indexes them, series are judged by the same selection rules, and every selected group runs
through the same pipeline. The results (SEG, SR, summary pages) are written per study, and one
cohort CSV collects a row per study x muscle x side.
"""

from __future__ import annotations

import csv
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, TextIO

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from reports.pipeline import PipelineError, PipelineSettings, WorkItem, cohort_rows, run

from .. import __version__
from ..config import Config
from .headers import summarise
from .rules import Decision, SeriesHeaders, decide_study

__all__ = ["CohortSummary", "find_work", "process"]

log = logging.getLogger(__name__)


@dataclass
class CohortSummary:
    """What a run did, for the command's last lines and its exit status."""

    files: int = 0
    not_dicom: int = 0
    groups: int = 0
    done: int = 0
    failed: int = 0
    skipped: list[str] | None = None


def _files(paths: Iterable[Path]) -> Iterable[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path


def find_work(paths: Sequence[Path], config: Config, summary: CohortSummary) -> list[tuple[str, WorkItem, str]]:
    """Selected groups in the given files: (study UID, work item, what was selected)."""
    series_files: dict[str, list[Path]] = defaultdict(list)
    series_headers: dict[str, list[dict]] = defaultdict(list)
    series_study: dict[str, str] = {}
    for path in _files(paths):
        summary.files += 1
        try:
            ds = dcmread(path, stop_before_pixels=True)
            series_uid, study_uid = str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError):
            summary.not_dicom += 1
            continue
        series_files[series_uid].append(path)
        series_headers[series_uid].append(summarise(ds))
        series_study[series_uid] = study_uid

    studies: dict[str, list[SeriesHeaders]] = defaultdict(list)
    for series_uid, headers in series_headers.items():
        study_uid = series_study[series_uid]
        studies[study_uid].append(SeriesHeaders(series_uid, study_uid, 1, tuple(headers)))

    work = []
    summary.skipped = []
    for study_uid, series in studies.items():
        groups: dict[str, list[Decision]] = defaultdict(list)
        for decision in decide_study(series, config.rules):
            if decision.selected and decision.grouping:
                groups[decision.grouping].append(decision)
            else:
                description = next(h.first("SeriesDescription") for h in series if h.series_uid == decision.series_uid)
                summary.skipped.append(f"{description or decision.series_uid}: {decision.reason}")
        for members in groups.values():
            files = {d.role: series_files[d.series_uid] for d in members}
            work.append((study_uid, WorkItem(kind=members[0].kind, series_files=files),
                         f"{members[0].kind} ({', '.join(sorted(files))})"))
    return work


def _progress(done: int, total: int, label: str, stream: TextIO) -> None:
    width = 30
    filled = int(width * done / total) if total else width
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:50]:<50}")
    stream.flush()
    if done == total:
        stream.write("\n")


def process(paths: Sequence[Path], out: Path, config: Config, segmenter, stream: TextIO = sys.stderr) -> CohortSummary:
    """Process every selected group found in ``paths``; write results and ``cohort.csv`` in ``out``."""
    summary = CohortSummary()
    work = find_work(paths, config, summary)
    summary.groups = len(work)
    out.mkdir(parents=True, exist_ok=True)
    settings = PipelineSettings(erode_fat=config.erode_fat, cluster_method=config.cluster_method,
                                assume_levels=config.assume_levels or None)
    rows: list[dict] = []
    _progress(0, len(work), "finding series", stream)
    for number, (study_uid, item, label) in enumerate(work, start=1):
        try:
            results = run(item, segmenter, settings, software_version=__version__)
        except PipelineError as exc:
            summary.failed += 1
            log.warning("study %s, %s: %s", study_uid, label, exc)
            _progress(number, len(work), f"failed: {label}", stream)
            continue
        folder = out / study_uid
        folder.mkdir(parents=True, exist_ok=True)
        for kind, dataset in results.datasets:
            number_in_series = int(getattr(dataset, "InstanceNumber", 1) or 1)
            dataset.save_as(folder / f"{kind}-{dataset.SeriesInstanceUID}-{number_in_series}.dcm",
                            enforce_file_format=True)
        rows.extend(cohort_rows(results, study_uid))
        summary.done += 1
        _progress(number, len(work), label, stream)
    if rows:
        with open(out / "cohort.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return summary
