"""The durable store: received instances as files, exactly as they came, never half-written.

A file is written under ``incoming/``, fsynced, renamed into ``studies/STUDY/SERIES/SOP.dcm`` and
its folder fsynced, so that after a crash or a power cut a file in ``studies/`` is complete and a
file in ``incoming/`` was never acknowledged.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

__all__ = ["DiskFull", "InstanceStore", "UID_PATTERN"]

#: A DICOM UID: digits and dots, at most 64 characters. Checked before a UID becomes part of a
#: path so that no sender can write outside the store.
UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")


class DiskFull(OSError):
    """Writing would take the data folder below its free-space watermark."""


def _fsync_directory(path: Path) -> None:
    # A rename is durable only once the directory that holds the new name is on disk.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class InstanceStore:
    """Files of received instances under one data folder.

    Parameters
    ----------
    root : Path
        The node's data folder; created if missing.
    min_free_bytes : int
        Free space that must remain after a write; below it :meth:`write` raises :class:`DiskFull`.
    """

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.studies = self.root / "studies"
        self.incoming = self.root / "incoming"
        self.min_free_bytes = min_free_bytes
        for folder in (self.root, self.studies, self.incoming):
            folder.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance lives. Raises ``ValueError`` for anything that is not a UID."""
        for name, uid in (("Study", study_uid), ("Series", series_uid), ("SOP Instance", sop_instance_uid)):
            if not uid or len(uid) > 64 or not UID_PATTERN.fullmatch(uid):
                raise ValueError(f"{name} Instance UID {uid[:80]!r} is not a valid UID")
        return self.studies / study_uid / series_uid / f"{sop_instance_uid}.dcm"

    def free_bytes(self) -> int:
        """Free space on the file system of the data folder."""
        return shutil.disk_usage(self.root).free

    def check_space(self, needed: int) -> None:
        """Raise :class:`DiskFull` unless ``needed`` bytes fit above the watermark."""
        free = self.free_bytes()
        if free - needed < self.min_free_bytes:
            raise DiskFull(
                f"{free // 2**20} MiB free in {self.root}, watermark {self.min_free_bytes // 2**20} MiB"
            )

    def write(self, path: Path, chunks: list[bytes]) -> None:
        """Write ``chunks`` as the file ``path``, durably and atomically.

        The space check comes first, so that nothing partial is left when the disk is nearly full.
        """
        size = sum(len(c) for c in chunks)
        self.check_space(size)
        self._ensure_directory(path.parent)
        temporary = self.incoming / f"{path.name}.{os.getpid()}.{id(chunks):x}.part"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            written = os.writev(fd, chunks)
            # writev may write less than asked for large buffers; finish the rest in order.
            if written < size:
                rest = b"".join(chunks)[written:]
                while rest:
                    rest = rest[os.write(fd, rest):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            temporary.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(temporary, path)
        _fsync_directory(path.parent)

    def _ensure_directory(self, folder: Path) -> None:
        if folder in self._known_dirs:
            return
        missing = []
        current = folder
        while not current.exists():
            missing.append(current)
            current = current.parent
        folder.mkdir(parents=True, exist_ok=True)
        # New directories must themselves be recorded in their parents before files in them count.
        for created in reversed(missing):
            _fsync_directory(created.parent)
        self._known_dirs.add(folder)

    def discard_incoming(self) -> int:
        """Remove files left in ``incoming/`` by a crash: none of them was acknowledged."""
        removed = 0
        for leftover in self.incoming.glob("*.part"):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed
