"""Offline cohorts: ``musclenode process PATH... --out DIR``, one task per study, on Dask or in this process.

Folders of DICOM files go through the same steps as in the node:

1. the files are scanned (on the workers, in chunks) for their study and series;
2. a study whose results exist for the same model, software version and input files (its
   ``study.json``, see :mod:`node.orchestration.study_task`) is not processed again;
3. every other study is one task (:func:`node.orchestration.study_task.run_study`): the same
   selection rules and pipeline as the node, results under ``OUT/STUDY_UID/``;
4. the cohort tables are written from the records of all studies, processed now or before:

   - ``cohort.csv`` / ``cohort.parquet``: a row per study x muscle x side (x level);
   - ``studies.csv`` / ``.parquet``: a row per study: status, groups, time, worker, reason;
   - ``skipped_and_failed.csv`` / ``.parquet``: every series not processed, with the reason;
   - ``process.log``: the failures with their tracebacks.

A failure of one study never stops the run. The exit status (:data:`EXIT_CODES`) says whether
all selected work succeeded.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

from pydicom import dcmread

from reports.pipeline import COHORT_COLUMNS, SLICE_COLUMNS

from .. import __version__
from ..config import Config
from ..operations.progress import ProgressBar
from .cluster import describe_error
from .pipeline_settings import pipeline_settings
from .study_task import ModelSpec, StudyTask, completed_record, run_study
from .tables import write_table

__all__ = ["CohortSummary", "EXIT_CODES", "process", "scan"]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOTHING = 3
EXIT_CLUSTER = 4
EXIT_INTERRUPTED = 130
#: Exit status of ``musclenode process`` and what it means (README "Research cohorts").
EXIT_CODES = {
    EXIT_OK: "every selected series was processed (now or by an earlier run)",
    EXIT_FAILED: "some selected series failed; the others' results and rows are written",
    EXIT_USAGE: "bad configuration, arguments or model",
    EXIT_NOTHING: "no series was selected (no DICOM files, or every series skipped by the rules)",
    EXIT_CLUSTER: "the Dask cluster could not be started or reached",
    EXIT_INTERRUPTED: "interrupted; the tables cover the studies finished so far",
}

STUDY_COLUMNS = ("study", "status", "resumed", "groups", "groups_failed", "groups_not_measured", "series_skipped",
                 "seconds", "cpu_seconds", "worker", "reason")
PROBLEM_COLUMNS = ("study", "series", "description", "outcome", "reason")
#: Files per scanning task.
_SCAN_CHUNK = 500


@dataclass
class CohortSummary:
    """What a run did, for the command's last lines and its exit status."""

    files: int = 0
    not_dicom: int = 0
    studies: int = 0
    resumed: int = 0
    done: int = 0
    failed: int = 0
    nothing_selected: int = 0
    groups: int = 0
    groups_failed: int = 0
    groups_not_measured: int = 0
    skipped_series: int = 0
    interrupted: bool = False
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.failed:
            return EXIT_FAILED
        if self.groups == 0:
            return EXIT_NOTHING
        return EXIT_OK


def _files(paths: Iterable[Path], out: Path | None = None) -> list[str]:
    """Every file under ``paths``, except hidden ones (a fetch's ``.incoming``, a record's
    ``.part``) and the results in ``out`` (which may lie inside an input folder)."""
    results = out.resolve() if out is not None else None
    found: list[str] = []
    for path in paths:
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if (p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                        and (results is None or not p.resolve().is_relative_to(results))):
                    found.append(str(p))
        elif path.is_file():
            found.append(str(path))
    return found


def scan_files(paths: Sequence[str]) -> list[tuple[str, str, str] | None]:
    """(path, study UID, series UID) of each file, or None for a file that is not DICOM."""
    found: list[tuple[str, str, str] | None] = []
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
            found.append((path, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)))
        except Exception:
            found.append(None)
    return found


def scan(paths: Sequence[Path], executor, summary: CohortSummary,
         out: Path | None = None) -> dict[str, dict[str, list[str]]]:
    """Study UID -> series UID -> files, from every file under ``paths`` but ``out`` (scanned by the executor)."""
    files = _files(paths, out)
    summary.files = len(files)
    chunks = [files[i:i + _SCAN_CHUNK] for i in range(0, len(files), _SCAN_CHUNK)]
    studies: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for _, found, error in executor.map_unordered(scan_files, chunks):
        if error is not None:
            raise RuntimeError(f"scanning the files failed: {describe_error(error)}") from error
        for entry in found:
            if entry is None:
                summary.not_dicom += 1
            else:
                path, study, series = entry
                studies[study][series].append(path)
    return {study: {s: sorted(f) for s, f in series.items()} for study, series in sorted(studies.items())}


def _log_to(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / "process.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return handler


def _failed_record(task: StudyTask, reason: str) -> dict[str, Any]:
    """The record of a study whose task did not come back (its workers died)."""
    return {"study": task.study_uid, "status": "failed", "model": task.model_id,
            "software_version": task.software_version, "inputs": dict(task.inputs), "groups": [], "results": [],
            "rows": [], "problems": [{"study": task.study_uid, "series": "", "description": "", "outcome": "failed",
                                      "reason": reason}], "tracebacks": []}


def process(paths: Sequence[Path], out: Path, config: Config, model: ModelSpec, model_id: str, executor, *,
            resources: dict[str, float] | None = None, stream: TextIO = sys.stderr) -> CohortSummary:
    """Process every study found under ``paths`` on ``executor``; write the tables in ``out``.

    Parameters
    ----------
    paths : sequence of Path
        Files and folders of DICOM files (read by the workers: a path they share).
    out : Path
        Results and tables (written by the workers too: shared as well).
    config : Config
        Selection rules and measurement settings.
    model : ModelSpec
        The segmenter each worker loads.
    model_id : str
        The model's name and version (``"NAME VERSION"``), part of what makes results current.
    executor : InlineExecutor or DaskExecutor
        Entered by the caller.
    resources : dict, optional
        Dask resources each study task needs, e.g. ``{"GPU": 1}``.

    Returns
    -------
    CohortSummary
        Its ``exit_code`` is the command's exit status.
    """
    out.mkdir(parents=True, exist_ok=True)
    handler = _log_to(out)
    summary = CohortSummary()
    try:
        _run(paths, out, config, model, model_id, executor, resources, summary, stream)
    finally:
        log.removeHandler(handler)
        handler.close()
    return summary


def _run(paths: Sequence[Path], out: Path, config: Config, model: ModelSpec, model_id: str, executor,
         resources: dict[str, float] | None, summary: CohortSummary, stream: TextIO) -> None:
    studies = scan(paths, executor, summary, out)
    summary.studies = len(studies)
    settings = pipeline_settings(config)
    records: dict[str, dict[str, Any]] = {}
    tasks: list[StudyTask] = []
    for study_uid, series in studies.items():
        inputs = {s: len(f) for s, f in sorted(series.items())}
        record = completed_record(out, study_uid, model_id, __version__, inputs)
        if record is not None:
            record["resumed"] = True
            records[study_uid] = record
            continue
        tasks.append(StudyTask(study_uid=study_uid, files=tuple(f for s in sorted(series) for f in series[s]),
                               inputs=inputs, out=str(out), model=model, model_id=model_id,
                               software_version=__version__, rules=config.rules, settings=settings))
    summary.resumed = len(records)
    # Studies an earlier run finished are not among the tasks: the description says how many.
    described = f"processing ({summary.resumed} done by an earlier run)" if summary.resumed else "processing"
    bar = ProgressBar(described, len(tasks), ("done", "failed", "nothing selected"), stream=stream)
    try:
        for index, record, error in executor.map_unordered(run_study, tasks, resources=resources):
            if error is not None:
                reason = describe_error(error)
                log.error("study %s: %s", tasks[index].study_uid, reason)
                record = _failed_record(tasks[index], reason)
            for text in record.get("tracebacks", []):
                log.error("study %s failed:\n%s", record["study"], text)
            records[record["study"]] = record
            bar.advance(**{_progress_counter(record["status"]): 1})
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
    _tally(records, summary)
    _write_tables(out, records)


def _progress_counter(status: str) -> str:
    """The progress bar's counter of a study's status, the same three the closing summary counts."""
    if status in ("failed", "partial"):
        return "failed"
    return "nothing selected" if status == "nothing selected" else "done"


def _tally(records: dict[str, dict[str, Any]], summary: CohortSummary) -> None:
    for record in records.values():
        groups = record.get("groups", [])
        summary.groups += len(groups)
        summary.groups_failed += sum(g["outcome"] != "done" for g in groups)
        summary.groups_not_measured += sum(_not_measured(g) for g in groups)
        summary.skipped_series += sum(p["outcome"] == "skipped" for p in record.get("problems", []))
        status = record["status"]
        if status == "nothing selected":
            summary.nothing_selected += 1
        elif status == "done":
            summary.done += 1
        else:
            summary.failed += 1
            if not groups:  # the study failed before any group ran: it had selected work all the same
                summary.groups += 1
                summary.groups_failed += 1
    summary.records = [records[k] for k in sorted(records)]


def _not_measured(group: dict[str, Any]) -> bool:
    """Whether a processed group's segmentation failed quality control (results without numbers)."""
    return (group.get("quality") or {}).get("verdict") == "not measured"


def _write_tables(out: Path, records: dict[str, dict[str, Any]]) -> None:
    ordered = [records[k] for k in sorted(records)]
    rows = [row for record in ordered for row in record.get("rows", [])]
    problems = [p for record in ordered for p in record.get("problems", [])]
    studies = []
    for record in ordered:
        groups = record.get("groups", [])
        reasons = list(dict.fromkeys(p["reason"] for p in record.get("problems", []) if p["outcome"] == "failed"))
        studies.append({
            "study": record["study"], "status": record["status"], "resumed": bool(record.get("resumed")),
            "groups": len(groups), "groups_failed": sum(g["outcome"] != "done" for g in groups),
            "groups_not_measured": sum(_not_measured(g) for g in groups),
            "series_skipped": sum(p["outcome"] == "skipped" for p in record.get("problems", [])),
            "seconds": record.get("seconds"), "cpu_seconds": record.get("cpu_seconds"),
            "worker": record.get("worker"), "reason": "; ".join(reasons) or None,
        })
    write_table(out, "cohort", rows, COHORT_COLUMNS)
    write_table(out, "slices", [r for record in ordered for r in record.get("slices", [])], SLICE_COLUMNS)
    write_table(out, "studies", studies, STUDY_COLUMNS)
    write_table(out, "skipped_and_failed", problems, PROBLEM_COLUMNS)


def default_workers() -> int:
    """Local worker processes by default: one per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
