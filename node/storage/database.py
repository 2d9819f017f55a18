"""The node's SQLite database: one connection per component, WAL, one transaction at a time.

The index, the job queue and the export queue each keep their tables in the same file (the data
folder's ``index.sqlite``) through a :class:`Database`; other processes (``musclenode status``,
``retry``, ``resend``) open it too, which WAL allows while the node writes.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = ["Database"]


class Database:
    """A serialised SQLite connection.

    Parameters
    ----------
    path : Path
        The database file; its folder is created if missing.
    schema : str
        ``CREATE ... IF NOT EXISTS`` statements for the caller's tables.
    synchronous : str
        ``"FULL"`` (every commit fsynced) or ``"NORMAL"`` (a commit survives a crash of the
        process, not necessarily a power cut).
    """

    def __init__(self, path: Path, schema: str, synchronous: str = "FULL") -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._connection.row_factory = sqlite3.Row
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute(f"PRAGMA synchronous={synchronous}")
        self._connection.execute("PRAGMA foreign_keys=ON")
        self._connection.executescript(schema)

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write) transaction: committed on success, rolled back on any error."""
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Rows of one read."""
        with self._lock:
            return self._connection.execute(sql, parameters).fetchall()
