"""Workers: take jobs from the queue, run the pipeline, keep the results, hand them to export.

Also the bridge from assembly to jobs: when the rules select a group of series, a job is
submitted for the versions of its series at that moment.

Failure containment: whatever goes wrong while one job is processed ends that job, never the
worker. Bad input the pipeline recognises fails the job with its reason (:class:`PipelineError`);
disk and memory errors are retried; any other exception fails the job with a reason a person
reads ("musclenode failed unexpectedly ...: what happened") while the traceback goes to the log,
and the worker takes the next job. A job queue that cannot be read for a moment (a locked
database) is tried again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from io import BytesIO
from pathlib import Path
from typing import Sequence

from pydicom.dataset import Dataset

from ..config import Config
from reports.heap import settle_after_first_study
from reports.pipeline import PipelineError, WorkItem, cohort_rows, run

from .. import __version__
from ..network.export import Exporter
from ..storage.deliveries import ExportQueue
from .pipeline_settings import pipeline_settings
from .routing import destinations_for
from ..storage.index import Index
from ..storage.jobs import Job, JobQueue
from .rules import LEVEL_REFERENCE, Decision
from ..storage.store import InstanceStore

__all__ = ["Workers", "submit_selected", "unexpected_reason"]

log = logging.getLogger(__name__)

#: Seconds a worker waits before reading a job queue again that it could not read.
_QUEUE_RETRY_SECONDS = 5.0


def unexpected_reason(exc: BaseException) -> str:
    """A failed job's reason for an exception the pipeline did not expect, in words a person reads."""
    what = str(exc).strip() or "no message"
    if len(what) > 300:
        what = what[:297] + "..."
    return (f"musclenode failed unexpectedly while processing this series ({type(exc).__name__}: {what}). "
            "This is a fault in musclenode rather than a known problem of the images; the traceback is in "
            "the node's log. Other series are not affected.")


def submit_selected(index: Index, jobs: JobQueue, decisions: Sequence[Decision]) -> list[Job]:
    """Submit a job for every selected group among the decisions of a study."""
    groups: dict[str, list[Decision]] = defaultdict(list)
    for decision in decisions:
        if decision.selected and decision.grouping:
            groups[decision.grouping].append(decision)
    # The study's level reference goes with every job: its arrival or change makes a new job.
    reference = next((d for d in decisions if d.role == LEVEL_REFERENCE), None)
    submitted = []
    for grouping, members in groups.items():
        series = {d.role: d.series_uid for d in members}
        versions = {d.series_uid: d.version for d in members}
        if reference is not None:
            series[LEVEL_REFERENCE] = reference.series_uid
            versions[reference.series_uid] = reference.version
        first = index.series(members[0].series_uid)
        job = jobs.submit(grouping, members[0].kind, first.study_uid, series, versions,
                          source_ae=first.calling_ae, source_address=first.address)
        if job is not None:
            log.info("job %d queued: %s (%s)", job.id, members[0].kind, ", ".join(sorted(series)))
            submitted.append(job)
    return submitted


class Workers:
    """A pool of worker threads sharing one model session each.

    Parameters
    ----------
    config : Config
    index, jobs, exports : the node's stores
    store : InstanceStore
    exporter : Exporter
        Woken when results are ready.
    """

    def __init__(self, config: Config, index: Index, jobs: JobQueue, exports: ExportQueue,
                 store: InstanceStore, exporter: Exporter) -> None:
        self.config = config
        self.index = index
        self.jobs = jobs
        self.exports = exports
        self.store = store
        self.exporter = exporter
        self.inference_seconds = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._settings = pipeline_settings(self.config)

    def _segmenter(self):
        from inference.registry import load_model
        from inference.runtime import Segmenter

        card = load_model(self.config.model_name, self.config.model_dirs)
        threads = self.config.threads or max(1, (os.cpu_count() or 1) // self.config.workers)
        return Segmenter(card, providers=self.config.device, threads=threads)

    def start(self) -> None:
        requeued = self.jobs.requeue_interrupted()
        if requeued:
            log.warning("%d jobs interrupted by the last stop run again", requeued)
        for number in range(self.config.workers):
            thread = threading.Thread(target=self._run, args=(f"worker-{number}",), name=f"worker-{number}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        # A job cut short here is requeued at the next start (its results are deterministic), so
        # a stop need not wait for a long inference.
        for thread in self._threads:
            thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def _run(self, name: str) -> None:
        try:
            segmenter = self._segmenter()
        except Exception:
            log.exception("%s cannot load the model; jobs wait until the node is fixed and restarted", name)
            return
        log.info("%s ready: model %s %s on %s", name, segmenter.card.name, segmenter.card.version, segmenter.device)
        while not self._stop.is_set():
            try:
                job = self.jobs.claim(name)
                due = self.jobs.next_due() if job is None else None
            except Exception:
                log.exception("%s cannot read the job queue; trying again in %.0f s", name, _QUEUE_RETRY_SECONDS)
                self._stop.wait(_QUEUE_RETRY_SECONDS)
                continue
            if job is None:
                wait = 5.0 if due is None else max(0.05, min(5.0, due - time.time()))
                self._wake.wait(wait)
                self._wake.clear()
                continue
            try:
                self._process(job, segmenter)
            except Exception as exc:  # a fault after the pipeline: keeping, routing or recording results
                log.exception("job %d failed unexpectedly after processing", job.id)
                self._fail(job.id, unexpected_reason(exc), transient=False)

    def _fail(self, job_id: int, reason: str, transient: bool) -> None:
        """Record a job's failure; a queue that cannot record it is logged, and the worker goes on."""
        try:
            self.jobs.fail(job_id, reason, transient=transient)
        except Exception:
            log.exception("job %d: its failure could not be recorded (%s)", job_id, reason)

    def _work_item(self, job: Job) -> WorkItem:
        files: dict[str, list[Path]] = {}
        for role, series_uid in job.series.items():
            series = self.index.series(series_uid)
            if series is None:
                raise PipelineError(f"series of role {role} is no longer in the index")
            if series.version != job.versions[series_uid]:
                raise _Superseded()
            files[role] = [self.store.root / i["path"] for i in self.index.instances(series_uid)]
        # The rules' level reference (jobs queued before the rules chose one have none, and the
        # pipeline then says there is no sagittal series).
        reference = tuple(files.pop(LEVEL_REFERENCE, ()))
        return WorkItem(kind=job.kind, series_files=files, level_reference=reference)

    def _process(self, job: Job, segmenter) -> None:
        started = time.perf_counter()
        try:
            item = self._work_item(job)
            results = run(item, segmenter, self._settings, software_version=__version__)
        except _Superseded:
            log.info("job %d: its series changed; a newer job follows", job.id)
            self.jobs.supersede(job.id, "the series changed before it ran; a newer job follows")
            return
        except PipelineError as exc:
            log.warning("job %d failed: %s", job.id, exc)
            self._fail(job.id, str(exc), transient=exc.transient)
            return
        except (OSError, MemoryError) as exc:
            log.warning("job %d: transient failure: %s", job.id, exc)
            self._fail(job.id, f"{type(exc).__name__}: {exc}", transient=True)
            return
        except Exception as exc:
            log.exception("job %d failed unexpectedly", job.id)
            self._fail(job.id, unexpected_reason(exc), transient=False)
            return
        self.inference_seconds += results.seconds.get("inference", 0.0)
        settle_after_first_study()
        try:
            files = self._keep(results.datasets)
        except OSError as exc:
            self._fail(job.id, f"cannot write results: {exc}", transient=True)
            return
        destinations, why_none = destinations_for(self.config, job.source_ae, job.source_address)
        summary = {
            "files": len(files), "seconds": round(time.perf_counter() - started, 2),
            "steps": {k: round(v, 2) for k, v in results.seconds.items()},
            "destinations": [d.name for d in destinations], "not_sent": why_none,
            "findings": len(results.label_map.findings),
            "segmentations": len(results.segmentations),
            # Images of the input that were not processed, each with its reason (inference.set_aside).
            "set_aside": [item.as_dict() for item in results.set_aside],
            # The segmentation's verdict and the images it excluded (inference.segmentation_quality).
            "quality": None if results.quality is None else results.quality.as_dict(),
            # The vertebral levels of the series' frames, or why there are none (inference.vertebrae).
            "levels": None if results.levels is None else results.levels.as_dict(),
            # The cohort rows of ``musclenode process`` (no patient identifiers): the dashboard's
            # measurement table and its CSV download.
            "measurements": [_plain(row) for row in cohort_rows(results, job.study_uid)],
        }
        if not self.jobs.finish(job.id, summary):
            log.info("job %d finished after its series changed; its results are not exported", job.id)
            return
        self.exports.add(job.id, files, destinations)
        self.exporter.wake()
        log.info("job %d done in %.1f s: %d result objects", job.id, summary["seconds"], len(files))

    def _keep(self, datasets: Sequence[tuple[str, Dataset]]) -> list[tuple[str, str, str, str]]:
        """Write result objects durably under ``results/SERIES/SOP.dcm``; same UIDs replace."""
        kept = []
        for kind, dataset in datasets:
            path = self.store.root / "results" / str(dataset.SeriesInstanceUID) / f"{dataset.SOPInstanceUID}.dcm"
            buffer = BytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
            self.store.write(path, [buffer.getvalue()])
            kept.append((str(dataset.SOPInstanceUID), str(dataset.SOPClassUID),
                         str(path.relative_to(self.store.root)), kind))
        return kept


def _plain(row: dict) -> dict:
    """A cohort row with every value as JSON keeps it: numbers, text (as cohort.csv writes it), or null."""
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v) for k, v in row.items()}


class _Superseded(Exception):
    """The job's series changed after it was queued."""
