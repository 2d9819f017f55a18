"""What each dashboard page shows, gathered from the node's data folder (blocking: SQLite reads).

Plain functions of a :class:`PageData`, called on the web server's worker threads, returning
dicts for the templates. Studies are named by opaque ids (:mod:`node.dashboard.ids`); patient
names come from the stored headers and go only to logged-in pages.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import threading
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from inference.vocabulary import FatMethod, Muscle

from ..config import Config, DashboardSettings, to_toml
from ..operations.state import NodeState
from ..orchestration.headers import parse_header
from ..storage.jobs import Job
from .ids import StudyIds

__all__ = ["PageData", "when"]

log = logging.getLogger(__name__)

#: Result kinds as the worker records them, in the order the job page lists them.
RESULT_KINDS = {"seg": "Segmentation (DICOM SEG)", "sr": "Structured report (TID 1500 SR)",
                "outlines": "Key-slice outlines (TID 1500 SR for viewers)",
                "summary": "Summary page (Secondary Capture)"}

#: Columns of the measurement table: (cohort row key, heading).
MEASUREMENT_COLUMNS = (
    ("muscle", "muscle"), ("side", "side"), ("level", "levels"), ("slices", "slices"),
    ("mean_csa_mm2", "mean CSA (mm²)"), ("volume_cm3", "volume (cm³)"), ("fat_method", "fat method"),
    ("fat_percent", "fat (%)"), ("fat_z", "fat z"), ("fat_percentile", "fat centile"), ("grade", "grade"),
    ("asymmetry_percent", "asymmetry (%)"),
)


def when(timestamp: float | None) -> str:
    """Local time of a timestamp, or a dash."""
    return "–" if timestamp is None else datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _person_name(value: Any) -> str:
    return str(value or "").replace("^", " ").strip()


class PageData:
    """The dashboard's reads of one node.

    Parameters
    ----------
    config : Config
    settings : DashboardSettings
    state : NodeState
        The dashboard's own connections.
    ids : StudyIds
    health : callable
        The node's health report.
    """

    def __init__(self, config: Config, settings: DashboardSettings, state: NodeState, ids: StudyIds,
                 health: Callable[[], dict]) -> None:
        self.config = config
        self.settings = settings
        self.state = state
        self.ids = ids
        self.health = health
        self._patients: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    # -- studies --------------------------------------------------------------------------------

    def patient(self, study_uid: str) -> dict[str, str]:
        """Patient name and ID, study date and description of a study (from a stored header)."""
        with self._lock:
            if study_uid in self._patients:
                return self._patients[study_uid]
        found = {"name": "", "patient_id": "", "study_date": "", "description": "", "accession": ""}
        header = self.state.index.study_header(study_uid)
        if header is not None:
            try:
                dataset = parse_header(*header)
                dataset.decode()
                date = str(dataset.get("StudyDate", "") or "")
                found = {
                    "name": _person_name(dataset.get("PatientName")),
                    "patient_id": str(dataset.get("PatientID", "") or ""),
                    "study_date": f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 else date,
                    "description": str(dataset.get("StudyDescription", "") or ""),
                    "accession": str(dataset.get("AccessionNumber", "") or ""),
                }
            except Exception:  # a header the index kept but that does not parse: show the study without it
                log.warning("the stored header of a study cannot be read for the dashboard", exc_info=True)
        with self._lock:
            self._patients[study_uid] = found
        return found

    def study_uid(self, opaque: str) -> str | None:
        return self.ids.find(opaque, self.state.index.study_uids())

    def _study_link(self, study_uid: str) -> dict[str, Any]:
        return {**self.patient(study_uid), "id": self.ids.opaque(study_uid)}

    def studies(self, limit: int = 100) -> dict[str, Any]:
        index = self.state.index
        associations = index.associations(limit=30)
        delivered = index.association_series([a["id"] for a in associations])
        series_cache: dict[str, Any] = {}

        def series(uid: str):
            if uid not in series_cache:
                series_cache[uid] = index.series(uid)
            return series_cache[uid]

        arrivals = []
        for association in associations:
            studies: dict[str, list[Any]] = {}
            for uid in delivered.get(association["id"], []):
                record = series(uid)
                if record is not None:
                    studies.setdefault(record.study_uid, []).append(record)
            arrivals.append({
                **association, "started_text": when(association["started"]), "ended_text": when(association["ended"]),
                "studies": [{**self._study_link(study), "series": len(items)} for study, items in studies.items()],
            })
        rows = []
        for study in index.studies(limit=limit):
            decisions = index.latest_decisions(study["study_uid"])
            jobs = Counter(j.state for j in self.state.jobs.jobs_for_study(study["study_uid"]))
            rows.append({
                **self._study_link(study["study_uid"]), "series": study["series"], "instances": study["instances"],
                "last_received": when(study["last_received"]),
                "selected": sum(1 for d in decisions.values() if d["selected"]),
                "judged": len(decisions), "jobs": dict(jobs),
            })
        return {"arrivals": arrivals, "studies": rows}

    def study(self, study_uid: str) -> dict[str, Any]:
        index = self.state.index
        decisions = index.latest_decisions(study_uid)
        series = []
        for record in index.study_series(study_uid):
            decision = decisions.get(record.series_uid)
            series.append({
                "description": record.description, "modality": record.modality, "instances": record.instances,
                "state": record.state, "version": record.version, "calling_ae": record.calling_ae,
                "last_received": when(record.last_received),
                "decision": None if decision is None else {
                    "selected": bool(decision["selected"]), "kind": decision["kind"], "role": decision["role"],
                    "reason": decision["reason"], "decided": when(decision["decided"]),
                },
            })
        associations = [{**a, "started_text": when(a["started"]), "ended_text": when(a["ended"])}
                        for a in index.study_associations(study_uid)]
        return {"study": self._study_link(study_uid), "series": series, "associations": associations,
                "jobs": [self._job_row(j) for j in self.state.jobs.jobs_for_study(study_uid)]}

    # -- jobs -----------------------------------------------------------------------------------

    def _job_row(self, job: Job) -> dict[str, Any]:
        result = job.result or {}
        waited = None if job.started is None else max(0.0, job.started - job.created)
        quality = result.get("quality")
        return {
            "id": job.id, "kind": job.kind, "state": job.state, "attempts": job.attempts,
            "roles": sorted(job.series), "reason": job.reason,
            "created": when(job.created), "started": when(job.started), "finished": when(job.finished),
            "waited": waited, "seconds": result.get("seconds"), "steps": result.get("steps") or {},
            "files": result.get("files"), "not_sent": result.get("not_sent"),
            "quality": quality, "quality_items": _quality_items(quality),
            "study": self._study_link(job.study_uid),
        }

    def jobs(self, limit: int = 100) -> dict[str, Any]:
        return {"jobs": [self._job_row(j) for j in self.state.jobs.jobs(limit=limit)],
                "counts": self.state.jobs.counts()}

    def job(self, job_id: int) -> dict[str, Any]:
        """One job with its results. Raises ``KeyError`` if there is no such job."""
        job = self.state.jobs.get(job_id)
        outputs = self.state.exports.outputs(job_id)
        files = []
        for kind in RESULT_KINDS:
            for number, output in enumerate((o for o in outputs if o["kind"] == kind), start=1):
                files.append({**output, "label": RESULT_KINDS[kind] + (f" {number}" if kind == "summary" else ""),
                              "name": f"job-{job_id}-{kind}-{number}.dcm"})
        deliveries = self.state.exports.for_job(job_id)
        by_destination: dict[str, dict[str, Any]] = {}
        for delivery in deliveries:
            entry = by_destination.setdefault(delivery.destination, {
                "destination": delivery.destination, "address": f"{delivery.ae_title}@{delivery.host}:{delivery.port}",
                "sent": 0, "pending": 0, "errors": set()})
            entry["sent" if delivery.state == "sent" else "pending"] += 1
            if delivery.state != "sent" and delivery.last_error:
                entry["errors"].add(delivery.last_error)
        measurements = [_for_people(row) for row in (job.result or {}).get("measurements") or []]
        return {
            "job": self._job_row(job), "files": files,
            "summaries": [f for f in files if f["kind"] == "summary"],
            "measurements": measurements, "columns": MEASUREMENT_COLUMNS,
            "deliveries": [{**d, "errors": sorted(d["errors"])} for d in by_destination.values()],
            "resend_to": self.resend_choices(job_id),
        }

    def output_path(self, job_id: int, output_id: int) -> tuple[Path, dict[str, Any]] | None:
        """The file of one result of a job (in the data folder), or ``None``."""
        output = next((o for o in self.state.exports.outputs(job_id) if o["id"] == output_id), None)
        if output is None:
            return None
        path = (self.config.data / output["path"]).resolve()
        if not path.is_relative_to(self.config.data.resolve()) or not path.is_file():
            return None
        return path, output

    def measurements_csv(self, job_id: int) -> str | None:
        """The job's cohort rows (the columns of ``musclenode process``'s cohort.csv), or ``None``."""
        rows = (self.state.jobs.get(job_id).result or {}).get("measurements")
        if not rows:
            return None
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    # -- deliveries -----------------------------------------------------------------------------

    def resend_choices(self, job_id: int | None = None) -> list[dict[str, str]]:
        """Destinations a job's results may be resent to: the configured ones, and those its
        results already went to (the sending peer, when none are configured)."""
        choices = {d.name: f"{d.ae_title}@{d.host}:{d.port}" for d in self.config.destinations}
        if job_id is not None:
            for delivery in self.state.exports.for_job(job_id):
                address = f"{delivery.ae_title}@{delivery.host}:{delivery.port}"
                if delivery.destination not in choices and address not in choices.values():
                    choices[address] = address
        return [{"value": name, "address": address} for name, address in choices.items()]

    def deliveries(self) -> dict[str, Any]:
        exports = self.state.exports
        destinations = []
        for name, counts in exports.destination_counts().items():
            pending = exports.deliveries(destination=name, state="pending", limit=500)
            by_job: dict[int, dict[str, Any]] = {}
            for delivery in pending:
                entry = by_job.setdefault(delivery.job_id, {"job": delivery.job_id, "files": 0, "attempts": 0,
                                                            "last_error": None, "next": None})
                entry["files"] += 1
                entry["attempts"] = max(entry["attempts"], delivery.attempts)
                entry["last_error"] = entry["last_error"] or delivery.last_error
                entry["next"] = when(delivery.not_before) if delivery.not_before else "now"
            sent = exports.deliveries(destination=name, state="sent", limit=20)
            recent: dict[int, dict[str, Any]] = {}
            for delivery in sent:
                entry = recent.setdefault(delivery.job_id, {"job": delivery.job_id, "files": 0, "sent": None})
                entry["files"] += 1
                entry["sent"] = entry["sent"] or when(delivery.sent)
            address = next((f"{d.ae_title}@{d.host}:{d.port}" for d in (pending or sent)), "")
            destinations.append({"name": name, "address": address, "counts": counts,
                                 "pending": sorted(by_job.values(), key=lambda e: e["job"]),
                                 "sent": sorted(recent.values(), key=lambda e: -e["job"])})
        return {"destinations": destinations, "counts": exports.counts(),
                "configured": [d.name for d in self.config.destinations]}

    # -- health and configuration ---------------------------------------------------------------

    def configuration(self) -> str:
        """The effective configuration as TOML, secrets hidden."""
        text = to_toml(self.config)
        return hide_secrets(text)


def _for_people(row: dict[str, Any]) -> dict[str, Any]:
    """A cohort row with muscle names, sides and fat methods as people read them."""
    shown = dict(row)
    try:
        shown["muscle"] = Muscle(row["muscle"]).display
    except (KeyError, ValueError):
        pass
    if row.get("side") == "both":
        shown["side"] = "left + right"
    try:
        shown["fat_method"] = FatMethod(row["fat_method"]).code.meaning
    except (KeyError, ValueError):
        pass
    return shown


def _quality_items(quality: Any) -> list[tuple[str, str]]:
    """A quality-control record as (name, value) pairs for display, whatever its shape."""
    if quality is None:
        return []
    if isinstance(quality, dict):
        return [(str(k), v if isinstance(v, str) else _short(v)) for k, v in quality.items()]
    if isinstance(quality, list):
        return [(str(i + 1), item if isinstance(item, str) else _short(item)) for i, item in enumerate(quality)]
    return [("verdict", str(quality))]


def _short(value: Any) -> str:
    return json.dumps(value, default=str)[:300]


_SECRET_WORDS = ("password", "secret", "token", "hash", "private")


def hide_secrets(toml_text: str) -> str:
    """Replace the value of every setting whose name speaks of a secret with ``(hidden)``."""
    lines = []
    for line in toml_text.splitlines():
        key, sep, _ = line.partition("=")
        if sep and not line.lstrip().startswith(("#", "[")) and any(w in key.lower() for w in _SECRET_WORDS):
            line = f'{key}= "(hidden)"'
        lines.append(line)
    return "\n".join(lines) + "\n"
