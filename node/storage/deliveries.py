"""Deliveries: result files and the queue of their deliveries to each destination.

Every result file of a job gets one delivery per destination. A delivery stays ``pending`` until
the destination acknowledges it with Success (or a warning); a destination that is down or
refuses keeps its deliveries pending with an exponential backoff (capped), so it gets everything
once it is back. Nothing is deleted before it was acknowledged. ``resend`` queues a job's results
for a destination again. The sending itself is :class:`node.network.export.Exporter`.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..config import Destination
from .database import Database

__all__ = ["Delivery", "ExportQueue"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outputs (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    UNIQUE (job_id, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS exports (
    id INTEGER PRIMARY KEY,
    output_id INTEGER NOT NULL REFERENCES outputs (id),
    destination TEXT NOT NULL,
    ae_title TEXT NOT NULL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    state TEXT NOT NULL,            -- pending | sent
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    sent REAL
);
CREATE INDEX IF NOT EXISTS exports_pending ON exports (state, destination, not_before);
"""

#: Retry delays grow from this, doubling, up to the cap: a PACS down for hours is retried every
#: five minutes, and sooner after short outages.
_FIRST_RETRY_SECONDS = 2.0
_MAX_RETRY_SECONDS = 300.0


@dataclass(frozen=True)
class Delivery:
    """One result file on its way to one destination."""

    id: int
    job_id: int
    sop_instance_uid: str
    sop_class_uid: str
    path: str
    kind: str
    destination: str
    ae_title: str
    host: str
    port: int
    state: str
    attempts: int
    last_error: str | None
    #: When the next attempt is due (seconds since the epoch; 0: now).
    not_before: float = 0.0
    #: When the destination acknowledged it.
    sent: float | None = None


def _queue(db: sqlite3.Connection, output_id: int, destination: Destination) -> None:
    db.execute(
        "INSERT INTO exports (output_id, destination, ae_title, host, port, state) VALUES (?, ?, ?, ?, ?, 'pending')",
        (output_id, destination.name, destination.ae_title, destination.host, destination.port),
    )


class ExportQueue:
    """Result files and their deliveries, in the node's SQLite database."""

    def __init__(self, path: Path, root: Path) -> None:
        self.root = root
        self._db = Database(path, _SCHEMA, "FULL")

    def close(self) -> None:
        self._db.close()

    def add(self, job_id: int, files: Sequence[tuple[str, str, str, str]], destinations: Sequence[Destination]) -> None:
        """Register a job's result files (SOP instance UID, SOP class UID, path, kind) for delivery."""
        with self._db.transaction() as db:
            for sop_instance, sop_class, path, kind in files:
                db.execute(
                    "INSERT OR IGNORE INTO outputs (job_id, sop_instance_uid, sop_class_uid, path, kind)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (job_id, sop_instance, sop_class, path, kind),
                )
                output_id = db.execute(
                    "SELECT id FROM outputs WHERE job_id = ? AND sop_instance_uid = ?", (job_id, sop_instance)
                ).fetchone()[0]
                for destination in destinations:
                    _queue(db, output_id, destination)

    def resend(self, job_id: int, destination: Destination) -> int:
        """Queue every result of a job for a destination again; returns how many files."""
        with self._db.transaction() as db:
            rows = db.execute("SELECT id FROM outputs WHERE job_id = ?", (job_id,)).fetchall()
            if not rows:
                raise KeyError(f"job {job_id} has no results")
            for (output_id,) in rows:
                _queue(db, output_id, destination)
        return len(rows)

    def _deliveries(self, where: str, parameters: Sequence[Any]) -> list[Delivery]:
        rows = self._db.query(
            "SELECT e.id, o.job_id, o.sop_instance_uid, o.sop_class_uid, o.path, o.kind, e.destination,"
            " e.ae_title, e.host, e.port, e.state, e.attempts, e.last_error, e.not_before, e.sent"
            f" FROM exports e JOIN outputs o ON o.id = e.output_id {where}",
            parameters,
        )
        return [Delivery(**dict(r)) for r in rows]

    def due(self, now: float | None = None) -> dict[str, list[Delivery]]:
        """Pending deliveries that are due, by destination name."""
        now = time.time() if now is None else now
        due: dict[str, list[Delivery]] = {}
        for delivery in self._deliveries("WHERE e.state = 'pending' AND e.not_before <= ? ORDER BY e.id", (now,)):
            due.setdefault(delivery.destination, []).append(delivery)
        return due

    def for_job(self, job_id: int) -> list[Delivery]:
        return self._deliveries("WHERE o.job_id = ? ORDER BY e.id", (job_id,))

    def deliveries(self, destination: str | None = None, state: str | None = None,
                   limit: int = 200) -> list[Delivery]:
        """Deliveries, newest first, optionally of one destination and in one state."""
        conditions, parameters = [], []
        if destination is not None:
            conditions.append("e.destination = ?")
            parameters.append(destination)
        if state is not None:
            conditions.append("e.state = ?")
            parameters.append(state)
        where = ("WHERE " + " AND ".join(conditions)) if conditions else ""
        return self._deliveries(f"{where} ORDER BY e.id DESC LIMIT ?", (*parameters, limit))

    def destination_counts(self) -> dict[str, dict[str, int]]:
        """Deliveries by destination and state (``pending``, ``sent``, and ``retrying``: pending
        after at least one failed attempt)."""
        rows = self._db.query(
            "SELECT destination, SUM(state = 'pending'), SUM(state = 'sent'),"
            " SUM(state = 'pending' AND attempts > 0) FROM exports GROUP BY destination ORDER BY destination"
        )
        return {r[0]: {"pending": r[1] or 0, "sent": r[2] or 0, "retrying": r[3] or 0} for r in rows}

    def outputs(self, job_id: int) -> list[dict[str, Any]]:
        """A job's result files: id, SOP instance and class UIDs, path (in the data folder), kind."""
        rows = self._db.query(
            "SELECT id, job_id, sop_instance_uid, sop_class_uid, path, kind FROM outputs WHERE job_id = ? ORDER BY id",
            (job_id,),
        )
        return [dict(r) for r in rows]

    def send_now(self, destination: str | None = None, job_id: int | None = None) -> int:
        """Make pending deliveries due at once (of one destination and/or job); returns how many.

        A destination that was down is retried with a growing delay; after it is back, this
        saves waiting for the next attempt.
        """
        conditions, parameters = ["state = 'pending'"], []
        if destination is not None:
            conditions.append("destination = ?")
            parameters.append(destination)
        if job_id is not None:
            conditions.append("output_id IN (SELECT id FROM outputs WHERE job_id = ?)")
            parameters.append(job_id)
        with self._db.transaction() as db:
            cursor = db.execute(f"UPDATE exports SET not_before = 0 WHERE {' AND '.join(conditions)}", parameters)
            return cursor.rowcount

    def mark_sent(self, delivery_ids: Sequence[int]) -> None:
        now = time.time()
        with self._db.transaction() as db:
            db.executemany(
                "UPDATE exports SET state = 'sent', sent = ?, attempts = attempts + 1, last_error = NULL WHERE id = ?",
                [(now, i) for i in delivery_ids],
            )

    def mark_failed(self, delivery_ids: Sequence[int], error: str) -> None:
        """Keep them pending and push their next attempt back."""
        now = time.time()
        with self._db.transaction() as db:
            for delivery_id in delivery_ids:
                (attempts,) = db.execute("SELECT attempts FROM exports WHERE id = ?", (delivery_id,)).fetchone()
                delay = min(_FIRST_RETRY_SECONDS * 2 ** attempts, _MAX_RETRY_SECONDS)
                db.execute(
                    "UPDATE exports SET attempts = attempts + 1, not_before = ?, last_error = ? WHERE id = ?",
                    (now + delay, error, delivery_id),
                )

    def counts(self) -> dict[str, int]:
        rows = self._db.query(
            "SELECT state, COUNT(*), SUM(attempts > 0 AND state = 'pending') FROM exports GROUP BY state"
        )
        counts = {"pending": 0, "sent": 0, "retrying": 0}
        for state, number, retrying in rows:
            counts[state] = number
            if state == "pending":
                counts["retrying"] = retrying or 0
        return counts
