"""The running node: store, index, assembly and SCP wired together, started and stopped as one."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from pydicom import dcmread

from . import reactor
from .assembly import Assembler, ReadyCallback
from .config import Config
from .headers import summarise
from .index import Index, InstanceRecord
from .scp import StorageSCP
from .store import InstanceStore

__all__ = ["Node", "setup_logging"]

log = logging.getLogger(__name__)

_CLEAN_STOP = "clean-stop"


def setup_logging(level: str) -> None:
    """Log lines with time, level and source; pynetdicom's per-message chatter stays quiet."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pynetdicom logs every DIMSE message (with identifiers) at INFO: costly and not for a log file.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class Node:
    """One musclenode instance on one data folder.

    Parameters
    ----------
    config : Config
        The effective configuration.
    on_ready : callable, optional
        Called when a series has become ready and its study was judged again.
    """

    def __init__(self, config: Config, on_ready: ReadyCallback | None = None) -> None:
        self.config = config
        self.store = InstanceStore(config.data, min_free_bytes=config.min_free_mb * 2**20)
        self.index = Index(config.index_path)
        self.assembler = Assembler(self.index, config, on_ready=on_ready)
        self.scp = StorageSCP(config, self.store, self.index, self.assembler)
        self._stopped = threading.Event()

    def start(self) -> None:
        """Recover from the previous run if it did not stop cleanly, then listen."""
        reactor.install()
        marker = self.config.data / _CLEAN_STOP
        if marker.exists():
            marker.unlink()
        else:
            self.recover()
        self.assembler.start()
        self.scp.start()

    def recover(self) -> None:
        """Put the store and the index back in step after a crash or a power cut.

        Files in ``incoming/`` were never acknowledged and go. Files in ``studies/`` that the
        index lacks (their commit was lost with the power) are indexed again.
        """
        discarded = self.store.discard_incoming()
        if discarded:
            log.info("removed %d unacknowledged partial files", discarded)
        indexed = self.index.indexed_paths()
        restored = 0
        for path in sorted(self.store.studies.glob("*/*/*.dcm")):
            relative = str(path.relative_to(self.store.root))
            if relative in indexed:
                continue
            try:
                ds = dcmread(path, stop_before_pixels=True)
                self.index.add_instance(
                    InstanceRecord(
                        sop_instance_uid=str(ds.SOPInstanceUID),
                        sop_class_uid=str(ds.SOPClassUID),
                        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                        study_uid=str(ds.StudyInstanceUID),
                        series_uid=str(ds.SeriesInstanceUID),
                        path=relative,
                        size=path.stat().st_size,
                        header=summarise(ds),
                    ),
                    association_id=None,
                    calling_ae=str(ds.file_meta.get("SourceApplicationEntityTitle", "")),
                    address="",
                )
                restored += 1
            except Exception:
                log.exception("could not index %s during recovery", relative)
        if restored:
            log.warning("indexed %d stored files that the index had lost", restored)

    def stop(self) -> None:
        """Stop listening, let timers finish, and mark the stop as clean."""
        self.scp.stop()
        self.assembler.stop()
        self.index.close()
        (self.config.data / _CLEAN_STOP).touch()
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()


def data_folder_writable(path: Path) -> str | None:
    """Why the data folder cannot be used, or ``None``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create {path}: {exc.strerror}"
    if not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None
