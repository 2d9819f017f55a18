"""The running node: store, index, assembly and SCP wired together, started and stopped as one."""

from __future__ import annotations

import logging
import os
import struct
import threading
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from .operations import logs

from .network import tls
from .orchestration.assembly import Assembler
from .config import Config, ConfigError
from .network.export import Exporter
from .storage.deliveries import ExportQueue
from .operations.health import health_report
from .operations.http import status_app
from .operations.metrics import NodeCollector, node_registry
from .operations.state import NodeState
from .operations.webserver import BackgroundServer
from .storage.index import Index, InstanceRecord
from .storage.jobs import JobQueue
from .orchestration.rules import Decision
from .network.filemeta import dataset_offset
from .network.integrity import IncompleteDataset
from .network.scp import StorageSCP, inspect
from .storage.store import InstanceStore
from .orchestration.worker import Workers, submit_selected

__all__ = ["Node", "setup_logging"]

log = logging.getLogger(__name__)

_CLEAN_STOP = "clean-stop"


def setup_logging(level: str, log_format: str = "text", data: Path | None = None) -> None:
    """Structured or plain log lines, the audit log in ``data``; pynetdicom's chatter stays quiet."""
    logs.setup(level, log_format, data)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # highdicom reports every step of building a SEG or SR at INFO.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # pynetdicom logs every DIMSE message (with identifiers) at INFO: costly and not for a log file.
    # Its standard handler also formats each message whatever the level (about 0.1 ms per
    # instance); the node logs associations and refusals itself.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    from pynetdicom import _config

    _config.LOG_HANDLER_LEVEL = "none"


class Node:
    """One musclenode instance on one data folder.

    Parameters
    ----------
    config : Config
        The effective configuration.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = InstanceStore(config.data, min_free_bytes=config.min_free_mb * 2**20)
        self.index = Index(config.index_path)
        self.jobs = JobQueue(config.index_path, max_attempts=config.max_attempts,
                             backoff_seconds=config.retry_seconds)
        self.exports = ExportQueue(config.index_path, self.store.root)
        tls_destinations = [d.name for d in config.destinations if d.tls]
        client = tls.client_context(config) if tls_destinations else None
        self.exporter = Exporter(self.exports, config.ae_title, tls={name: client for name in tls_destinations})
        self.workers = Workers(config, self.index, self.jobs, self.exports, self.store, self.exporter)
        self.assembler = Assembler(self.index, config, on_ready=self._on_ready)
        self.scp = StorageSCP(config, self.store, self.index, self.assembler.association_ended)
        # Health, metrics and the dashboard read on connections of their own, never the SCP's.
        self.state = NodeState(config)
        self.http: BackgroundServer | None = None
        self.dashboard = None
        self._stopped = threading.Event()

    def _on_ready(self, study_uid: str, decisions: list[Decision]) -> None:
        if submit_selected(self.index, self.jobs, decisions):
            self.workers.wake()

    def health(self) -> dict:
        """The health report (:func:`node.operations.health.health_report`)."""
        return health_report(
            listening=self.scp.listening, free_bytes=self.store.free_bytes(),
            min_free_bytes=self.store.min_free_bytes, jobs=self.state.jobs.counts(),
            deliveries=self.state.exports.counts(), last_association=self.state.last_association(),
        )

    def _metrics_registry(self):
        return node_registry(NodeCollector(
            self.state, inference_seconds=lambda: self.workers.inference_seconds,
            export_failures=lambda: self.exporter.failures, free_bytes=self.store.free_bytes,
            min_free_bytes=self.store.min_free_bytes))

    def start(self) -> None:
        """Recover from the previous run if it did not stop cleanly, then listen."""
        marker = self.config.data / _CLEAN_STOP
        if marker.exists():
            marker.unlink()
        else:
            self.recover()
        # The assembler first: it closes the associations a crash left open, which must happen
        # before the SCP accepts new ones.
        self.assembler.start()
        try:
            self.scp.start()
        except OSError as exc:
            self.assembler.stop()
            if getattr(exc, "setting", "node.port") == "tls.port":
                setting, port = "tls.port", self.config.tls.port
            else:
                setting, port = "node.port", self.config.port
            raise ConfigError(self._cannot_listen(setting, self.config.host, port, exc)) from None
        try:
            self._start_web()
        except ConfigError:
            self.scp.stop()
            self.assembler.stop()
            raise
        self.workers.start()
        self.exporter.start()

    def _start_web(self) -> None:
        """The health and metrics endpoint, and the dashboard, each on its own thread."""
        if self.config.http_port:
            try:
                self.http = BackgroundServer(status_app(self.health, self._metrics_registry(), live=lambda: self.scp.listening),
                                             self.config.http_host, self.config.http_port, "status",
                                             threads=2, max_requests=32)
            except OSError as exc:
                raise ConfigError(self._cannot_listen("http.port", self.config.http_host, self.config.http_port,
                                                      exc)) from None
            self.http.start()
        settings = self.config.dashboard
        if settings.port == 0:
            return
        if not settings.enabled:
            log.info("dashboard off: no [[dashboard.users]] with a password_hash and no dashboard.proxy_header")
            return
        from .dashboard import DashboardServer, Hooks

        hooks = Hooks(health=self.health, wake_workers=self.workers.wake, wake_exporter=self.exporter.wake)
        try:
            self.dashboard = DashboardServer(self.config, settings, hooks)
        except OSError as exc:
            if self.http is not None:
                self.http.stop()
            raise ConfigError(f"dashboard.port: cannot listen on {settings.host}:{settings.port}:"
                              f" {exc.strerror or exc}") from None
        self.dashboard.start()
        log.info("dashboard on http://%s:%d/", settings.host, self.dashboard.port)

    def _cannot_listen(self, setting: str, host: str, port: int, exc: OSError) -> str:
        return (f"{setting}: cannot listen on {host}:{port}: {exc.strerror or exc}"
                f" (from {self.config.sources.get(setting, 'default')})")

    def recover(self) -> None:
        """Put the store and the index back in step after a crash or a power cut.

        Files in ``incoming/`` were never acknowledged and go. A file in ``studies/`` that the
        index lacks is either complete (acknowledged, its index commit lost with the power: it is
        indexed again) or cut short (a crash while it was written, so never acknowledged: it goes).
        """
        discarded = self.store.discard_incoming()
        indexed = self.index.indexed_paths()
        restored = 0
        for path in sorted(self.store.studies.glob("*/*/*.dcm")):
            relative = str(path.relative_to(self.store.root))
            if relative in indexed:
                continue
            try:
                record = record_for_file(path, relative)
            except IncompleteDataset as exc:
                log.info("removed %s, cut short while it was written (never acknowledged): %s", relative, exc)
                path.unlink(missing_ok=True)
                discarded += 1
                continue
            except Exception:
                log.exception("could not index %s during recovery", relative)
                continue
            self.index.add_instance(record, None, source_ae_title(path), "")
            restored += 1
        if discarded:
            log.info("removed %d unacknowledged partial files", discarded)
        if restored:
            log.warning("indexed %d stored files that the index had lost", restored)

    def stop(self) -> None:
        """Stop listening, let timers, jobs and exports finish their step, mark the stop clean."""
        if self.dashboard is not None:
            self.dashboard.stop()
        if self.http is not None:
            self.http.stop()
        self.scp.stop()
        self.assembler.stop()
        self.workers.stop()
        self.exporter.stop()
        self.index.close()
        self.state.close()
        (self.config.data / _CLEAN_STOP).touch()
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()


def source_ae_title(path: Path) -> str:
    return str(read_file_meta_info(path).get("SourceApplicationEntityTitle", ""))


def record_for_file(path: Path, relative: str) -> InstanceRecord:
    """The index record of a stored file, made the way the SCP makes it on receipt.

    Raises :class:`IncompleteDataset` for a file that ends early (inside its file meta or its
    dataset).
    """
    raw = path.read_bytes()
    try:
        stream = raw[dataset_offset(raw):]
        syntax = str(read_file_meta_info(path).TransferSyntaxUID)
    except (ValueError, AttributeError, InvalidDicomError, struct.error) as exc:
        raise IncompleteDataset(f"file meta information: {exc}") from None
    if not stream:
        raise IncompleteDataset("no dataset after the file meta information")
    found, header_bytes = inspect(stream, syntax)
    return InstanceRecord(
        sop_instance_uid=found.text(0x0008, 0x0018),
        sop_class_uid=found.text(0x0008, 0x0016),
        transfer_syntax=syntax,
        study_uid=found.text(0x0020, 0x000D),
        series_uid=found.text(0x0020, 0x000E),
        path=relative,
        size=len(raw),
        modality=found.text(0x0008, 0x0060),
        series_description=found.text(0x0008, 0x103E),
        header_bytes=header_bytes,
    )


def data_folder_writable(path: Path) -> str | None:
    """Why the data folder cannot be used, or ``None``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create {path}: {exc.strerror}"
    if not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None
