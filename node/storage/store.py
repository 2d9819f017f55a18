"""The durable store: received instances as files, exactly as they came.

A new instance is written straight to ``studies/STUDY/SERIES/SOP.dcm`` and fsynced once before
the node answers: on Linux's journalling file systems (ext4, XFS, btrfs) that one flush also
commits the directory entry made with the file, because the entry's creation belongs to the
journal transaction (or, on btrfs, the log tree) that the fsync of the new inode forces out: ext4
``ext4_sync_file``, XFS ``xfs_file_fsync`` and btrfs ``btrfs_sync_file`` in Linux's ``fs/``. This is
also what Orthanc does with ``SyncStorageArea``. On any other file system the folder is fsynced as
well, as POSIX asks (``fsync``, POSIX.1-2017: durability of a directory entry needs the directory's
own fsync).

A crash while a new file is written leaves a file that was never acknowledged and is incomplete;
:meth:`InstanceStore.is_complete` tells it apart at start-up and the node removes it. An instance
that replaces another under the same name (the same SOP Instance UID sent again with other
content) goes through ``incoming/`` and a rename, so that the old file stays whole until the new
one is.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["DiskFull", "FileRange", "InstanceStore", "UID_PATTERN"]

#: A DICOM UID: digits and dots, at most 64 characters. Checked before a UID becomes part of a
#: path so that no sender can write outside the store.
UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")


class DiskFull(OSError):
    """Writing would take the data folder below its free-space watermark."""


@dataclass(frozen=True)
class FileRange:
    """``length`` bytes of the open file ``fd`` from ``offset``: a chunk that :meth:`InstanceStore.write`
    copies inside the kernel, so that a large instance never passes through the node's memory."""

    fd: int
    offset: int
    length: int


def _copy_range(source: FileRange, fd: int) -> None:
    offset, left = source.offset, source.length
    while left:
        try:
            copied = os.copy_file_range(source.fd, fd, left, offset)
        except OSError:  # across file systems on older kernels, or not supported: read and write
            copied = os.write(fd, os.pread(source.fd, min(left, 1 << 20), offset))
        if copied == 0:
            raise OSError(f"the source ended {left} bytes early")
        offset += copied
        left -= copied


def _write_all(fd: int, chunks: list[bytes | memoryview | FileRange]) -> None:
    if not any(isinstance(c, FileRange) for c in chunks):
        size = sum(len(c) for c in chunks)
        written = os.writev(fd, chunks)
        # writev may write less than asked for large buffers; finish the rest in order.
        if written < size:
            rest = b"".join(chunks)[written:]
            while rest:
                rest = rest[os.write(fd, rest):]
        return
    for chunk in chunks:
        if isinstance(chunk, FileRange):
            _copy_range(chunk, fd)
        else:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]


def _fsync_directory(path: Path) -> None:
    # A rename is durable only once the directory that holds the new name is on disk.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: File systems on which the fsync of a new file also makes its directory entry durable (see the
#: module's docstring for where each does it).
JOURNALLED_FILE_SYSTEMS = frozenset({"ext4", "xfs", "btrfs"})


@lru_cache(maxsize=8)
def file_system_type(path: Path) -> str:
    """The type of the file system that holds ``path`` (``"ext4"``, ``"tmpfs"``, ...), from the
    longest matching mount point in ``/proc/self/mounts``; ``""`` where that cannot be read."""
    resolved = str(Path(path).resolve())
    best, kind = "", ""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, fields[2]
    return kind


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
        #: Whether a new file's own fsync is enough (see the module's docstring).
        self.one_flush = file_system_type(self.root) in JOURNALLED_FILE_SYSTEMS

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

    def write(self, path: Path, chunks: list[bytes | memoryview | FileRange]) -> None:
        """Write ``chunks`` as the file ``path``, durably: when this returns, the file survives a
        crash or a power cut (see the module's docstring for how).

        The space check comes first, so that nothing partial is left when the disk is nearly full.
        Raises :class:`DiskFull` or any ``OSError`` of the writes; a file that was not finished is
        removed.
        """
        size = sum(c.length if isinstance(c, FileRange) else len(c) for c in chunks)
        self.check_space(size)
        self._ensure_directory(path.parent)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            self._replace(path, chunks)
            return
        self._write_and_sync(fd, path, chunks)
        if not self.one_flush:
            _fsync_directory(path.parent)

    def _replace(self, path: Path, chunks: list[bytes | memoryview | FileRange]) -> None:
        # Another file under this name: the new one is whole before it takes the name.
        temporary = self.incoming / f"{path.name}.{os.getpid()}.{id(chunks):x}.part"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self._write_and_sync(fd, temporary, chunks)
        os.replace(temporary, path)
        _fsync_directory(path.parent)

    @staticmethod
    def _write_and_sync(fd: int, path: Path, chunks: list[bytes | memoryview | FileRange]) -> None:
        try:
            _write_all(fd, chunks)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)

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
