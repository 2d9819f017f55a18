"""The durable store on its own: one flush for a new file, a whole old file until a replacement
is whole, the file system type that decides whether the folder is fsynced too."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.storage import store as store_module
from node.storage.store import FileRange, InstanceStore, file_system_type


def _counting_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append("directory" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real(fd)

    monkeypatch.setattr(store_module.os, "fsync", fsync)
    return calls


def test_a_new_file_costs_one_flush_on_a_journalled_file_system(tmp_path: Path, monkeypatch) -> None:
    store = InstanceStore(tmp_path)
    store.one_flush = True
    path = store.path_for("1.2", "1.2.3", "1.2.3.4")
    store.write(path, [b"first"])  # makes the series folder (its parents are fsynced once)
    calls = _counting_fsyncs(monkeypatch)
    second = store.path_for("1.2", "1.2.3", "1.2.3.5")
    store.write(second, [b"pre", memoryview(b"amble")])
    assert second.read_bytes() == b"preamble"
    assert calls == ["file"]


def test_elsewhere_the_folder_is_fsynced_too(tmp_path: Path, monkeypatch) -> None:
    store = InstanceStore(tmp_path)
    store.one_flush = False
    path = store.path_for("1.2", "1.2.3", "1.2.3.4")
    store.write(path, [b"first"])
    calls = _counting_fsyncs(monkeypatch)
    store.write(store.path_for("1.2", "1.2.3", "1.2.3.5"), [b"second"])
    assert calls == ["file", "directory"]


def test_a_replacement_takes_the_name_only_when_whole(tmp_path: Path, monkeypatch) -> None:
    store = InstanceStore(tmp_path)
    path = store.path_for("1.2", "1.2.3", "1.2.3.4")
    store.write(path, [b"old content"])
    source = tmp_path / "source"
    source.write_bytes(b"xxnew content")
    with open(source, "rb") as handle:
        store.write(path, [FileRange(handle.fileno(), 2, 11)])
    assert path.read_bytes() == b"new content"
    assert not list(store.incoming.iterdir())

    def broken(fd: int, chunks) -> None:
        os.write(fd, b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "_write_all", broken)
    with pytest.raises(OSError):
        store.write(path, [b"never whole"])
    assert path.read_bytes() == b"new content", "the old file stays whole"
    assert not list(store.incoming.iterdir())
    with pytest.raises(OSError):
        store.write(store.path_for("1.2", "1.2.3", "1.2.3.9"), [b"never whole"])
    assert not store.path_for("1.2", "1.2.3", "1.2.3.9").exists(), "an unfinished new file is removed"


def test_file_system_type_reads_the_longest_mount_point() -> None:
    mounts = Path("/proc/self/mounts").read_text().split()
    assert file_system_type(Path("/")) == mounts[mounts.index("/") + 1]
    assert file_system_type(Path("/proc/self")) == "proc"
