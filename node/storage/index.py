"""The index: what was received, from whom, in which series, and what was decided about it.

SQLite in WAL mode, in the data folder. Every public method is one transaction. The index is the
seam where a larger site would put PostgreSQL: callers use only the methods of :class:`Index`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .database import Database

__all__ = ["Index", "InstanceRecord", "SeriesRecord", "StoredInstance"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS associations (
    id INTEGER PRIMARY KEY,
    calling_ae TEXT NOT NULL,
    address TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    outcome TEXT,
    instances INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    description TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    address TEXT NOT NULL,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,
    -- receiving: instances arriving or quiet time running; ready: assembled and judged;
    -- changed: an instance arrived after it was ready, so it is assembled and judged again.
    state TEXT NOT NULL DEFAULT 'receiving',
    version INTEGER NOT NULL DEFAULT 1,
    ready_at REAL
);
CREATE INDEX IF NOT EXISTS series_by_study ON series (study_uid);
CREATE INDEX IF NOT EXISTS series_by_state ON series (state);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received REAL NOT NULL,
    association_id INTEGER,
    -- The encoded elements before the pixel data, as received; the summary (JSON) is made from
    -- them off the receiving path, when the series is judged.
    header_bytes BLOB NOT NULL,
    header TEXT
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (series_uid);
CREATE TABLE IF NOT EXISTS deliveries (
    series_uid TEXT NOT NULL,
    association_id INTEGER NOT NULL,
    PRIMARY KEY (series_uid, association_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY,
    series_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    decided REAL NOT NULL,
    selected INTEGER NOT NULL,
    kind TEXT,
    role TEXT,
    grouping TEXT,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_by_series ON decisions (series_uid, id);
"""


@dataclass(frozen=True)
class InstanceRecord:
    """What the SCP indexes for one stored instance."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_uid: str
    series_uid: str
    path: str
    size: int
    modality: str
    series_description: str
    header_bytes: bytes
    header: dict[str, Any] | None = None


@dataclass(frozen=True)
class StoredInstance:
    """The outcome of indexing an instance."""

    new: bool
    series_state: str
    series_version: int


@dataclass(frozen=True)
class SeriesRecord:
    """A series as the index knows it."""

    series_uid: str
    study_uid: str
    modality: str
    description: str
    calling_ae: str
    address: str
    first_received: float
    last_received: float
    instances: int
    state: str
    version: int
    ready_at: float | None
    open_associations: int


class Index:
    """The SQLite index of one data folder.

    Parameters
    ----------
    path : Path
        The database file; created with its schema if missing.
    durable : bool
        With ``True`` every commit is fsynced (``synchronous=FULL``). With ``False`` (the default
        for the node, whose files are fsynced before they are indexed) a commit survives a crash
        of the process but may be lost by a power cut; after an unclean stop the node indexes
        such files again from the store (:meth:`node.service.Node.recover`).
    """

    def __init__(self, path: Path, durable: bool = False) -> None:
        self.path = Path(path)
        self._db = Database(self.path, _SCHEMA, "FULL" if durable else "NORMAL")
        self._transaction = self._db.transaction
        self._query = self._db.query

    def close(self) -> None:
        self._db.close()

    # -- associations ---------------------------------------------------------------------------

    def association_started(self, calling_ae: str, address: str) -> int:
        """Record an accepted association and return its id."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO associations (calling_ae, address, started) VALUES (?, ?, ?)",
                (calling_ae, address, time.time()),
            )
            return int(cursor.lastrowid)

    def association_ended(self, association_id: int, outcome: str, instances: int, failures: int) -> list[str]:
        """Record the end of an association; return the series it delivered to."""
        with self._transaction() as db:
            db.execute(
                "UPDATE associations SET ended = ?, outcome = ?, instances = ?, failures = ? WHERE id = ?",
                (time.time(), outcome, instances, failures, association_id),
            )
            rows = db.execute("SELECT series_uid FROM deliveries WHERE association_id = ?", (association_id,))
            return [r[0] for r in rows]

    def end_interrupted_associations(self) -> int:
        """Mark associations left open by a crash as ended; return how many."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE associations SET ended = ?, outcome = 'interrupted' WHERE ended IS NULL", (time.time(),)
            )
            return cursor.rowcount

    def associations(self, limit: int = 20) -> list[dict[str, Any]]:
        """The most recent associations, newest first."""
        rows = self._query("SELECT * FROM associations ORDER BY id DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    def association_series(self, association_ids: Sequence[int]) -> dict[int, list[str]]:
        """The series each of these associations delivered instances to."""
        if not association_ids:
            return {}
        marks = ",".join("?" * len(association_ids))
        rows = self._query(
            f"SELECT association_id, series_uid FROM deliveries WHERE association_id IN ({marks})"
            " ORDER BY association_id, series_uid",
            tuple(association_ids),
        )
        found: dict[int, list[str]] = {int(i): [] for i in association_ids}
        for association_id, series_uid in rows:
            found[association_id].append(series_uid)
        return found

    def study_associations(self, study_uid: str) -> list[dict[str, Any]]:
        """The associations that delivered instances of a study, newest first."""
        rows = self._query(
            "SELECT DISTINCT a.* FROM associations a JOIN deliveries d ON d.association_id = a.id"
            " JOIN series s ON s.series_uid = d.series_uid WHERE s.study_uid = ? ORDER BY a.id DESC",
            (study_uid,),
        )
        return [dict(r) for r in rows]

    # -- instances ------------------------------------------------------------------------------

    def add_instance(self, record: InstanceRecord, association_id: int | None, calling_ae: str, address: str) -> StoredInstance:
        """Index a stored instance; an instance that is already indexed is updated in place.

        A new instance in a series that was ready marks the series ``changed`` with a new version.
        """
        now = time.time()
        header = None if record.header is None else json.dumps(record.header, separators=(",", ":"))
        with self._transaction() as db:
            previous = db.execute(
                "SELECT series_uid FROM instances WHERE sop_instance_uid = ?", (record.sop_instance_uid,)
            ).fetchone()
            db.execute(
                "INSERT OR REPLACE INTO instances (sop_instance_uid, sop_class_uid, transfer_syntax, study_uid,"
                " series_uid, path, size, received, association_id, header_bytes, header)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    record.sop_instance_uid, record.sop_class_uid, record.transfer_syntax, record.study_uid,
                    record.series_uid, record.path, record.size, now, association_id,
                    record.header_bytes, header,
                ),
            )
            new = previous is None
            added = 1 if new else 0
            db.execute(
                "INSERT INTO series (series_uid, study_uid, modality, description, calling_ae, address,"
                " first_received, last_received, instances) VALUES (?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (series_uid) DO UPDATE SET last_received = excluded.last_received,"
                " instances = instances + ?, calling_ae = excluded.calling_ae, address = excluded.address,"
                " version = version + (state = 'ready'),"
                " state = CASE state WHEN 'ready' THEN 'changed' ELSE state END",
                (
                    record.series_uid, record.study_uid, record.modality,
                    record.series_description, calling_ae, address, now, now, added, added,
                ),
            )
            if not new and previous[0] != record.series_uid:
                # The sender moved the instance to another series: the old one lost it.
                db.execute("UPDATE series SET instances = instances - 1 WHERE series_uid = ?", (previous[0],))
            if association_id is not None:
                db.execute(
                    "INSERT OR IGNORE INTO deliveries (series_uid, association_id) VALUES (?, ?)",
                    (record.series_uid, association_id),
                )
            state, version = db.execute(
                "SELECT state, version FROM series WHERE series_uid = ?", (record.series_uid,)
            ).fetchone()
            return StoredInstance(new=new, series_state=state, series_version=version)

    def instance_path(self, sop_instance_uid: str) -> str | None:
        """The stored file of an instance, or ``None`` if it is not indexed."""
        rows = self._query("SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return rows[0][0] if rows else None

    def instances(self, series_uid: str, with_header_bytes: bool = False) -> list[dict[str, Any]]:
        """The indexed instances of a series, each with its header summary (``None`` if not made yet)."""
        extra = ", header_bytes" if with_header_bytes else ""
        rows = self._query(
            f"SELECT sop_instance_uid, sop_class_uid, transfer_syntax, path, size, header{extra} FROM instances"
            " WHERE series_uid = ? ORDER BY sop_instance_uid",
            (series_uid,),
        )
        return [{**dict(r), "header": None if r["header"] is None else json.loads(r["header"])} for r in rows]

    def set_headers(self, summaries: dict[str, dict[str, Any]]) -> None:
        """Store header summaries by SOP Instance UID."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE instances SET header = ? WHERE sop_instance_uid = ?",
                [(json.dumps(h, separators=(",", ":")), uid) for uid, h in summaries.items()],
            )

    def study_header(self, study_uid: str) -> tuple[bytes, str] | None:
        """The encoded header elements and transfer syntax of one instance of a study, or ``None``.

        For displays that show who the study belongs to (patient name, study date), read when
        needed instead of copying patient data into more tables.
        """
        rows = self._query(
            "SELECT header_bytes, transfer_syntax FROM instances WHERE study_uid = ? LIMIT 1", (study_uid,)
        )
        return (bytes(rows[0][0]), rows[0][1]) if rows else None

    def indexed_paths(self) -> set[str]:
        """Every indexed file path, to compare with the store after a power cut."""
        return {r[0] for r in self._query("SELECT path FROM instances")}

    def instance_count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM instances")[0][0])

    # -- series ---------------------------------------------------------------------------------

    def _series_rows(self, where: str, parameters: Sequence[Any]) -> list[SeriesRecord]:
        rows = self._query(
            "SELECT s.*, (SELECT COUNT(*) FROM deliveries d JOIN associations a ON a.id = d.association_id"
            " WHERE d.series_uid = s.series_uid AND a.ended IS NULL) AS open_associations"
            f" FROM series s {where}",
            parameters,
        )
        return [SeriesRecord(**dict(r)) for r in rows]

    def series(self, series_uid: str) -> SeriesRecord | None:
        rows = self._series_rows("WHERE s.series_uid = ?", (series_uid,))
        return rows[0] if rows else None

    def all_series(self) -> list[SeriesRecord]:
        return self._series_rows("ORDER BY s.first_received", ())

    def study_series(self, study_uid: str) -> list[SeriesRecord]:
        return self._series_rows("WHERE s.study_uid = ? ORDER BY s.first_received", (study_uid,))

    def studies(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recently received studies, newest first: series and instance counts, times."""
        rows = self._query(
            "SELECT study_uid, COUNT(*) AS series, SUM(instances) AS instances,"
            " MIN(first_received) AS first_received, MAX(last_received) AS last_received"
            " FROM series GROUP BY study_uid ORDER BY MAX(last_received) DESC LIMIT ?",
            (limit,),
        )
        return [dict(r) for r in rows]

    def study_uids(self) -> list[str]:
        """Every study the index knows."""
        return [r[0] for r in self._query("SELECT DISTINCT study_uid FROM series")]

    def pending_series(self) -> list[SeriesRecord]:
        """Series that are not ready: their timers must run (again) after a restart."""
        return self._series_rows("WHERE s.state != 'ready' ORDER BY s.last_received", ())

    def mark_ready(self, series_uid: str, version: int) -> bool:
        """Mark a series ready if it is still at ``version``; return whether it was marked."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE series SET state = 'ready', ready_at = ? WHERE series_uid = ? AND version = ?"
                " AND state != 'ready'",
                (time.time(), series_uid, version),
            )
            return cursor.rowcount == 1

    # -- decisions ------------------------------------------------------------------------------

    def record_decisions(self, decisions: Sequence[dict[str, Any]]) -> None:
        """Record selection decisions; each dict has the keys of the decisions table."""
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO decisions (series_uid, version, decided, selected, kind, role, grouping, reason)"
                " VALUES (:series_uid, :version, :decided, :selected, :kind, :role, :grouping, :reason)",
                [{**d, "decided": now, "selected": int(d["selected"])} for d in decisions],
            )

    def latest_decisions(self, study_uid: str | None = None) -> dict[str, dict[str, Any]]:
        """The most recent decision for every series (of one study, if given) that has one."""
        where = "" if study_uid is None else " WHERE series_uid IN (SELECT series_uid FROM series WHERE study_uid = ?)"
        rows = self._query(
            "SELECT d.* FROM decisions d JOIN (SELECT series_uid, MAX(id) AS id FROM decisions"
            f"{where} GROUP BY series_uid) latest ON latest.id = d.id",
            () if study_uid is None else (study_uid,),
        )
        return {r["series_uid"]: dict(r) for r in rows}

    def decisions(self, series_uid: str) -> list[dict[str, Any]]:
        """Every decision about a series, oldest first."""
        rows = self._query("SELECT * FROM decisions WHERE series_uid = ? ORDER BY id", (series_uid,))
        return [dict(r) for r in rows]

    def data_version(self) -> int:
        """A number that changes whenever another connection has committed to the database since
        this connection last asked (SQLite's ``PRAGMA data_version``): for displays that refresh
        when something changed."""
        return int(self._query("PRAGMA data_version")[0][0])

    def counts(self) -> dict[str, int]:
        """Totals for status displays and metrics."""
        row = self._query(
            "SELECT (SELECT COUNT(*) FROM instances), (SELECT COUNT(*) FROM series),"
            " (SELECT COUNT(*) FROM series WHERE state = 'ready'), (SELECT COUNT(*) FROM associations)"
        )[0]
        return {"instances": row[0], "series": row[1], "series_ready": row[2], "associations": row[3]}
