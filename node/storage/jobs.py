"""The job queue: persistent, in the node's SQLite database, with retries and crash recovery.

A job is one selected group of series (a Dixon acquisition, or a single T1/T2 series) at one
version of its series. States:

- ``queued``: waiting for a worker (also after a transient failure, until ``not_before``);
- ``running``: claimed by a worker; a job found running when the node starts was interrupted by a
  crash and is queued again (its results are deterministic, so running it again is safe);
- ``done``: results made and handed to export;
- ``failed``: a permanent error, or transient errors more often than the retry limit;
- ``superseded``: the series changed before the job ran or finished, and a newer job replaces it.

The queue is the seam for larger sites: a PostgreSQL or task-engine implementation offers the
same methods.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .database import Database

__all__ = ["Job", "JobQueue", "STATES"]

STATES = ("queued", "running", "done", "failed", "superseded")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    grouping TEXT NOT NULL,
    kind TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    -- role -> series UID, and the versions of those series the job was made for
    series TEXT NOT NULL,
    versions TEXT NOT NULL,
    source_ae TEXT NOT NULL DEFAULT '',
    source_address TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    worker TEXT,
    reason TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, not_before);
CREATE INDEX IF NOT EXISTS jobs_by_grouping ON jobs (grouping, id);
"""


@dataclass(frozen=True)
class Job:
    """A unit of work: segment, measure and report one group of series."""

    id: int
    grouping: str
    kind: str
    study_uid: str
    series: dict[str, str]
    versions: dict[str, int]
    source_ae: str
    source_address: str
    state: str
    attempts: int
    not_before: float
    created: float
    started: float | None
    finished: float | None
    worker: str | None
    reason: str | None
    result: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        values = dict(row)
        values["series"] = json.loads(values["series"])
        values["versions"] = json.loads(values["versions"])
        values["result"] = json.loads(values["result"]) if values["result"] else None
        return cls(**values)


class JobQueue:
    """Jobs in SQLite (WAL, FULL sync: a job's state is small and must survive a power cut).

    Parameters
    ----------
    path : Path
        The database file (the node's index database).
    max_attempts : int
        Transient failures after which a job fails for good.
    backoff_seconds : float
        First retry delay; doubled for each further attempt, capped at 15 minutes.
    """

    def __init__(self, path: Path, max_attempts: int = 4, backoff_seconds: float = 10.0) -> None:
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self._db = Database(path, _SCHEMA, "FULL")

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, parameters: Sequence[Any] = ()) -> sqlite3.Cursor:
        with self._db.transaction() as db:
            return db.execute(sql, parameters)

    def _read(self, sql: str, parameters: Sequence[Any] = ()) -> list[Job]:
        return [Job.from_row(r) for r in self._db.query(sql, parameters)]

    def submit(self, grouping: str, kind: str, study_uid: str, series: dict[str, str], versions: dict[str, int],
               source_ae: str = "", source_address: str = "") -> Job | None:
        """Queue a job unless the same group at the same versions is queued, running or done.

        Older unfinished jobs of the group are superseded; a finished one stays as it is (its
        results are replaced when the new job's results are exported under the same UIDs).
        Returns the new job, or ``None`` when nothing new was needed.
        """
        now = time.time()
        encoded_series = json.dumps(series, sort_keys=True)
        encoded_versions = json.dumps(versions, sort_keys=True)
        with self._db.transaction() as db:
            same = db.execute(
                "SELECT id FROM jobs WHERE grouping = ? AND series = ? AND versions = ?"
                " AND state IN ('queued', 'running', 'done')",
                (grouping, encoded_series, encoded_versions),
            ).fetchone()
            if same is not None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'superseded', finished = ?, reason = 'the series changed'"
                " WHERE grouping = ? AND state IN ('queued', 'running')",
                (now, grouping),
            )
            cursor = db.execute(
                "INSERT INTO jobs (grouping, kind, study_uid, series, versions, source_ae, source_address,"
                " state, created) VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?)",
                (grouping, kind, study_uid, encoded_series, encoded_versions, source_ae, source_address, now),
            )
            job_id = cursor.lastrowid
        return self.get(int(job_id))

    def claim(self, worker: str, now: float | None = None) -> Job | None:
        """Take the oldest queued job that is due, or ``None``."""
        now = time.time() if now is None else now
        with self._db.transaction() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE state = 'queued' AND not_before <= ? ORDER BY id LIMIT 1", (now,)
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', started = ?, worker = ?, attempts = attempts + 1 WHERE id = ?",
                (now, worker, row[0]),
            )
        return self.get(row[0])

    def finish(self, job_id: int, result: dict[str, Any]) -> bool:
        """Mark a running job done; False if it was superseded meanwhile (its results are stale)."""
        cursor = self._write(
            "UPDATE jobs SET state = 'done', finished = ?, result = ?, reason = NULL WHERE id = ? AND state = 'running'",
            (time.time(), json.dumps(result), job_id),
        )
        return cursor.rowcount == 1

    def fail(self, job_id: int, reason: str, transient: bool) -> Job:
        """Record a failure: transient ones are retried with backoff until the attempt limit."""
        job = self.get(job_id)
        now = time.time()
        if transient and job.attempts < self.max_attempts:
            delay = min(self.backoff_seconds * 2 ** (job.attempts - 1), 900.0)
            self._write(
                "UPDATE jobs SET state = 'queued', not_before = ?, reason = ? WHERE id = ? AND state = 'running'",
                (now + delay, f"attempt {job.attempts} failed, retrying in {delay:.0f} s: {reason}", job_id),
            )
        else:
            why = reason if not transient else f"failed {job.attempts} times, last: {reason}"
            self._write(
                "UPDATE jobs SET state = 'failed', finished = ?, reason = ? WHERE id = ? AND state = 'running'",
                (now, why, job_id),
            )
        return self.get(job_id)

    def supersede(self, job_id: int, reason: str) -> None:
        """Give up a job whose series changed under it."""
        self._write(
            "UPDATE jobs SET state = 'superseded', finished = ?, reason = ? WHERE id = ? AND state IN ('queued', 'running')",
            (time.time(), reason, job_id),
        )

    def requeue_interrupted(self) -> int:
        """Jobs left running by a crash go back to the queue; returns how many."""
        cursor = self._write(
            "UPDATE jobs SET state = 'queued', not_before = 0,"
            " reason = 'interrupted by a restart of the node, running again' WHERE state = 'running'"
        )
        return cursor.rowcount

    def retry(self, job_id: int) -> Job:
        """Queue a failed (or done) job again, by hand; the attempt count starts over."""
        job = self.get(job_id)
        if job.state not in ("failed", "done"):
            raise ValueError(f"job {job_id} is {job.state}; only failed or done jobs can be retried")
        self._write(
            "UPDATE jobs SET state = 'queued', attempts = 0, not_before = 0, reason = 'retried by hand' WHERE id = ?",
            (job_id,),
        )
        return self.get(job_id)

    def get(self, job_id: int) -> Job:
        jobs = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not jobs:
            raise KeyError(f"no job {job_id}")
        return jobs[0]

    def jobs(self, limit: int = 100) -> list[Job]:
        """The most recent jobs, newest first."""
        return self._read("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))

    def jobs_for_study(self, study_uid: str) -> list[Job]:
        """Every job of a study, newest first."""
        return self._read("SELECT * FROM jobs WHERE study_uid = ? ORDER BY id DESC", (study_uid,))

    def counts(self) -> dict[str, int]:
        rows = self._db.query("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {state: 0 for state in STATES} | {r[0]: r[1] for r in rows}

    def quality_counts(self) -> dict[str, int]:
        """Done jobs by their segmentation quality verdict (``pass``, ``limited``, ``not measured``)."""
        rows = self._db.query("SELECT json_extract(result, '$.quality.verdict'), COUNT(*) FROM jobs "
                              "WHERE state = 'done' AND json_extract(result, '$.quality.verdict') IS NOT NULL "
                              "GROUP BY 1")
        return {"pass": 0, "limited": 0, "not measured": 0} | {r[0]: r[1] for r in rows}

    def next_due(self) -> float | None:
        """When the next queued job becomes due (for a worker deciding how long to sleep)."""
        return self._db.query("SELECT MIN(not_before) FROM jobs WHERE state = 'queued'")[0][0]
