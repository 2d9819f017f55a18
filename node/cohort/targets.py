"""Where fetched instances land, and what is there already (so that nothing is fetched twice).

- :class:`FolderTarget` (C-GET and DICOMweb): ``FOLDER/STUDY_UID/SERIES_UID/SOP_UID.dcm``, each
  file written under ``FOLDER/.incoming/`` and renamed into place once complete, so a file under
  its final name is always whole, also after the fetch was killed. ``musclenode process FOLDER``
  reads it as it is.
- :class:`NodeStoreTarget` (C-MOVE): the archive sends to the node's own storage SCP, which keeps
  the instances in its store and index (README "Durability"); what is there is read from the
  index, which the node fills before it acknowledges an instance.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from ..storage.index import Index
from ..storage.store import UID_PATTERN

__all__ = ["FolderTarget", "NodeStoreTarget", "check_uid"]


def check_uid(uid: str, what: str) -> str:
    """``uid`` if it is a valid UID (it becomes a file name); ``ValueError`` otherwise."""
    if not uid or len(uid) > 64 or not UID_PATTERN.fullmatch(uid):
        raise ValueError(f"{what} {uid[:80]!r} is not a valid UID")
    return uid


class FolderTarget:
    """Fetched instances as files in a folder (see the module docstring).

    Parameters
    ----------
    root : Path
        The folder; created if missing. Partial files a killed run left in ``.incoming`` are
        removed.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        for stale in self.incoming.glob("*.part"):
            stale.unlink(missing_ok=True)

    def path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        return (self.root / check_uid(study_uid, "Study Instance UID") / check_uid(series_uid, "Series Instance UID")
                / f"{check_uid(sop_instance_uid, 'SOP Instance UID')}.dcm")

    def present(self, study_uid: str, series_uid: str) -> set[str]:
        """SOP Instance UIDs of the series already in the folder."""
        folder = self.root / check_uid(study_uid, "Study Instance UID") / check_uid(series_uid, "Series Instance UID")
        return {p.stem for p in folder.glob("*.dcm")} if folder.is_dir() else set()

    def keep(self, study_uid: str, series_uid: str, sop_instance_uid: str, file_bytes: bytes) -> None:
        """Write one Part 10 file durably under its final name."""
        final = self.path(study_uid, series_uid, sop_instance_uid)
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.incoming / f"{uuid.uuid4().hex}.part"
        with open(temporary, "wb") as handle:
            handle.write(file_bytes)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)


class NodeStoreTarget:
    """The node's own store, filled by its storage SCP (the C-MOVE destination).

    Parameters
    ----------
    index_path : Path
        The node's ``index.sqlite`` (``node.data``); opened beside the running node (SQLite WAL).
    """

    def __init__(self, index_path: Path) -> None:
        self.index = Index(index_path)

    def present(self, study_uid: str, series_uid: str) -> set[str]:
        """SOP Instance UIDs of the series that the node has stored and indexed."""
        return {row["sop_instance_uid"] for row in self.index.instances(series_uid)}

    def close(self) -> None:
        self.index.close()
