"""One study of an offline cohort as one task: judge its series, process every selected group, keep the results.

:func:`run_study` runs wherever the executor puts it (in this process, or in a Dask worker
process on another machine that sees the same paths). It never raises for a problem of the
study: a group that cannot be processed, for an expected reason (:class:`PipelineError`) or an
unexpected one (any other exception, whose traceback goes to the log), becomes a failed group
with its reason, and the study's other groups still run.

The results of a study are written under ``OUT/STUDY_UID/``: the SEG, SR and summary pages,
named by their deterministic UIDs (:mod:`reports.uids`), then ``study.json``, the study's record
(its inputs, model and software version, rows, skipped and failed series), renamed into place
last. A record whose model, software version and inputs match says the study is done: a run
again over the same cohort skips it (:func:`completed_record`).

The segmenter is loaded once per process (:func:`segmenter_for`): by :class:`SegmenterPlugin`
when a Dask worker starts, else by the first task.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pydicom import dcmread

from inference.vertebrae import NO_LEVEL_REFERENCE
from reports.heap import settle_after_first_study
from reports.pipeline import (PipelineError, PipelineSettings, WorkItem, cohort_rows, find_level_reference, run,
                              slice_rows)

from ..config import Rules
from .headers import summarise
from .rules import LEVEL_REFERENCE, Decision, SeriesHeaders, decide_study

__all__ = ["ModelSpec", "SegmenterPlugin", "StudyTask", "completed_record", "run_study", "segmenter_for"]

log = logging.getLogger(__name__)

RECORD = "study.json"
#: Record statuses that need no further run. ``failed`` and ``partial`` studies are tried again.
FINISHED = ("done", "nothing selected")


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to load the segmenter: model name and folders, device, threads."""

    name: str
    dirs: tuple[str, ...] = ()
    device: str = "auto"
    threads: int = 1

    def load(self):
        from inference.registry import load_model
        from inference.runtime import Segmenter

        card = load_model(self.name, tuple(Path(d) for d in self.dirs))
        return Segmenter(card, providers=self.device, threads=self.threads)


_segmenters: dict[ModelSpec, Any] = {}
_segmenter_loads = 0
_segmenter_lock = threading.Lock()


def segmenter_for(spec: ModelSpec):
    """This process's segmenter for ``spec``, loaded on first use and kept."""
    global _segmenter_loads
    with _segmenter_lock:
        if spec not in _segmenters:
            _segmenters[spec] = spec.load()
            _segmenter_loads += 1
        return _segmenters[spec]


try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover - dask is a run-time dependency; inline runs do not need it
    WorkerPlugin = object  # type: ignore[assignment,misc]


class SegmenterPlugin(WorkerPlugin):  # type: ignore[misc,valid-type]
    """Loads the segmenter when a Dask worker starts (and again in a worker that replaces a dead one)."""

    name = "musclenode-segmenter"

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def setup(self, worker) -> None:
        segmenter_for(self.spec)


@dataclass(frozen=True)
class StudyTask:
    """One study to process.

    Attributes
    ----------
    study_uid : str
    files : tuple of str
        Every file of the study, as the workers see them.
    inputs : mapping of str to int
        Series Instance UID -> number of files, as the scan found them; the record keeps it so
        that a study that gained or lost files is processed again.
    out : str
        The output folder (shared by the workers).
    """

    study_uid: str
    files: tuple[str, ...]
    inputs: Mapping[str, int]
    out: str
    model: ModelSpec
    model_id: str
    software_version: str
    rules: Rules
    settings: PipelineSettings = field(default_factory=PipelineSettings)


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.part")
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def completed_record(out: Path, study_uid: str, model_id: str, software_version: str,
                     inputs: Mapping[str, int]) -> dict[str, Any] | None:
    """The record of a study finished before with the same model, software and inputs, or None.

    Every result file the record names must still be there.
    """
    path = Path(out) / study_uid / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (record.get("status") not in FINISHED or record.get("model") != model_id
            or record.get("software_version") != software_version or record.get("inputs") != dict(inputs)):
        return None
    if not all((path.parent / name).is_file() for name in record.get("results", [])):
        return None
    return record


def _problem(study: str, series: str, description: str, outcome: str, reason: str) -> dict[str, str]:
    return {"study": study, "series": series, "description": description, "outcome": outcome, "reason": reason}


def run_study(task: StudyTask) -> dict[str, Any]:
    """Process one study; return its record (also written to ``OUT/STUDY_UID/study.json``).

    The record: ``study``, ``status`` (``done``, ``partial``, ``failed`` or ``nothing
    selected``), ``model``, ``software_version``, ``inputs``, ``groups`` (each with its
    ``outcome``, ``reason`` and result files), ``results``, ``rows`` (the cohort rows),
    ``problems`` (skipped, failed and not-measured series with reasons), ``tracebacks``, ``started`` and
    ``finished`` (Unix time), ``seconds``, ``cpu_seconds`` (of the whole worker process while it
    ran the study), ``worker`` (host and process) and ``segmenter_loads`` (in that process, so
    far).
    """
    started, cpu_started, started_at = time.perf_counter(), time.process_time(), time.time()
    study = task.study_uid
    record: dict[str, Any] = {
        "study": study, "status": "failed", "model": task.model_id, "software_version": task.software_version,
        "inputs": dict(task.inputs), "groups": [], "results": [], "rows": [], "problems": [], "tracebacks": [],
    }
    try:
        _process(task, record)
    except Exception as exc:  # anything not caught per group: reading the headers, writing the record
        log.exception("study %s failed", study)
        record["status"] = "failed"
        record["problems"].append(_problem(study, "", "", "failed", f"unexpected error: {type(exc).__name__}: {exc}"))
        record["tracebacks"].append(traceback.format_exc())
    record.update(started=round(started_at, 3), finished=round(time.time(), 3),
                  seconds=round(time.perf_counter() - started, 3),
                  cpu_seconds=round(time.process_time() - cpu_started, 3),
                  worker=f"{socket.gethostname()}:{os.getpid()}", segmenter_loads=_segmenter_loads)
    folder = Path(task.out) / study
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(folder / RECORD, json.dumps(record, indent=1, default=str).encode())
    except OSError as exc:
        log.error("study %s: cannot write its record: %s", study, exc)
        record["status"] = "failed"
        record["problems"].append(_problem(study, "", "", "failed", f"cannot write the study's record: {exc}"))
    return record


def _read_headers(task: StudyTask, record: dict[str, Any]) -> tuple[dict[str, list[Path]], list[SeriesHeaders]]:
    files: dict[str, list[Path]] = defaultdict(list)
    headers: dict[str, list[dict]] = defaultdict(list)
    for name in task.files:
        path = Path(name)
        try:
            ds = dcmread(path, stop_before_pixels=True)
            series_uid = str(ds.SeriesInstanceUID)
        except Exception as exc:  # a file changed or vanished since the scan
            record["problems"].append(_problem(task.study_uid, "", path.name, "skipped", f"file not readable: {exc}"))
            continue
        files[series_uid].append(path)
        headers[series_uid].append(summarise(ds))
    series = [SeriesHeaders(uid, task.study_uid, 1, tuple(h)) for uid, h in headers.items()]
    return files, series


def _process(task: StudyTask, record: dict[str, Any]) -> None:
    study = task.study_uid
    files, series = _read_headers(task, record)
    descriptions = {s.series_uid: str(s.first("SeriesDescription") or "") for s in series}
    groups: dict[str, list[Decision]] = defaultdict(list)
    reference: Decision | None = None
    for decision in decide_study(series, task.rules):
        if decision.selected and decision.grouping:
            groups[decision.grouping].append(decision)
        elif decision.role == LEVEL_REFERENCE:
            reference = decision
        else:
            record["problems"].append(_problem(study, decision.series_uid, descriptions.get(decision.series_uid, ""),
                                               "skipped", decision.reason))
    if not groups:
        # A level reference without an axial series to give levels to gave no numbers either.
        if reference is not None:
            record["problems"].append(_problem(study, reference.series_uid, descriptions.get(reference.series_uid, ""),
                                               "skipped", f"no axial series was selected; {reference.reason}"))
        record["status"] = "nothing selected"
        return
    reference_uid = reference.series_uid if reference is not None else None
    folder = Path(task.out) / study
    folder.mkdir(parents=True, exist_ok=True)
    segmenter = segmenter_for(task.model)
    # The sagittal series the rules chose to give the axial slices their vertebral levels; its
    # bodies are found once for all the study's groups.
    reference_files = tuple(files[reference_uid]) if reference_uid else ()
    bodies, no_reference = (find_level_reference(reference_files, task.settings) if reference_files
                            else (None, NO_LEVEL_REFERENCE))
    record["level_reference"] = {"series": reference_uid, "reason": no_reference,
                                 "problems": list(bodies.problems) if bodies is not None else []}
    for members in groups.values():
        item = WorkItem(kind=members[0].kind, series_files={d.role: files[d.series_uid] for d in members},
                        level_reference=reference_files if bodies is not None else (), level_reason=no_reference,
                        level_bodies=bodies)
        label = f"{item.kind} ({', '.join(sorted(item.series_files))})"
        group = {"label": label, "series": sorted(d.series_uid for d in members), "outcome": "failed",
                 "reason": None, "results": []}
        record["groups"].append(group)
        try:
            results = run(item, segmenter, task.settings, software_version=task.software_version)
            for kind, dataset in results.datasets:
                number = int(getattr(dataset, "InstanceNumber", 1) or 1)
                name = f"{kind}-{dataset.SeriesInstanceUID}-{number}.dcm"
                temporary = folder / f".{name}.{os.getpid()}.part"
                dataset.save_as(temporary, enforce_file_format=True)
                os.replace(temporary, folder / name)
                group["results"].append(name)
            record["rows"].extend(cohort_rows(results, study))
            record.setdefault("slices", []).extend(slice_rows(results, study))
            group["levels"] = None if results.levels is None else results.levels.as_dict()
            group["outcome"] = "done"
            if results.quality is not None:
                group["quality"] = results.quality.as_dict()
                if not results.quality.measured:  # tried, results written, no numbers: listed with its reason
                    for d in members:
                        record["problems"].append(_problem(study, d.series_uid, descriptions.get(d.series_uid, ""),
                                                           "not measured", f"{label}: {results.quality.reason}"))
        except PipelineError as exc:
            group["reason"] = str(exc)
        except Exception as exc:
            log.exception("study %s, %s: unexpected error", study, label)
            group["reason"] = f"unexpected error: {type(exc).__name__}: {exc}"
            record["tracebacks"].append(f"{study}, {label}:\n{traceback.format_exc()}")
        if group["outcome"] != "done":
            for d in members:
                record["problems"].append(_problem(study, d.series_uid, descriptions.get(d.series_uid, ""), "failed",
                                                   f"{label}: {group['reason']}"))
        record["results"].extend(group["results"])
    done = sum(g["outcome"] == "done" for g in record["groups"])
    record["status"] = "done" if done == len(record["groups"]) else ("partial" if done else "failed")
    if done:
        settle_after_first_study()
