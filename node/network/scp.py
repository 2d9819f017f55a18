"""The DICOM SCP: Verification and Storage, with peers checked and admitted at association time.

The C-STORE handler does the minimum that durability needs before it answers: check the dataset
is complete, read its header (not its pixels), write the bytes as they came with file meta,
fsync, rename, index. Everything slower (assembly, rules, inference) happens elsewhere.

Datasets arrive through a temporary file (pynetdicom's documented
``_config.STORE_RECV_CHUNKED_DATASET``), so that a large instance never sits in memory: it is
checked through a memory map and copied into the store by the kernel. One larger than
``limits.instance_mb`` is refused with 0xA700 (out of resources).

Each association request is admitted against ``limits.associations`` (all peers) and
``limits.associations_per_peer`` (one calling AE title at one address), or rejected-transient
with "local limit exceeded"; connections that have not yet sent their request take no slot (see
:mod:`node.network.server`). When an association has ended, and its threads with it, the way it
ended is recorded in the index and the audit log: ``released`` (A-RELEASE), ``aborted`` (the peer
sent A-ABORT), ``aborted by node`` (the node's association aborted, after ``limits.idle_seconds``
of silence for instance) or ``dropped`` (the connection closed, or broke off inside a PDU, without
release or abort).
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, _config as pynetdicom_config, build_context, evt
from pynetdicom.events import Event
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ABORT

from .. import IMPLEMENTATION_VERSION_NAME
from ..config import Config
from ..operations.logs import audit
from ..storage.index import Index, InstanceRecord
from ..storage.store import DiskFull, FileRange, InstanceStore
from . import server
from .filemeta import dataset_offset, file_preamble_and_meta
from .integrity import DEFLATED, DatasetTooLarge, IncompleteDataset, Scan, inflate, scan
from .tls import peer_certificate, server_context

__all__ = ["STORAGE_SOP_CLASSES", "TRANSFER_SYNTAXES", "StorageSCP", "Status", "inspect"]

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF Storage",
}

TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
]
VERIFICATION = "1.2.840.10008.1.1"

#: A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4: rejected-permanent by the service user,
#: no reason given / calling AE title not recognised; rejected-transient by the service provider
#: (presentation related function), local limit exceeded.
REJECT_NO_REASON = (0x01, 0x01, 0x01)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)


class Status:
    """C-STORE status codes the node answers with (PS3.4 Annex B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC210
    INVALID_IDENTIFIERS = 0xC211
    PROCESSING_FAILURE = 0xC001


def _status(code: int, comment: str) -> Dataset:
    # An Error Comment lets the sender's log say why, not just that, it failed (LO: 64 characters).
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


class Refused(Exception):
    """A C-STORE that is answered with a failure status."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class _AssociationState:
    assoc: Any
    calling_ae: str
    address: str
    #: The index's id, once the association is accepted (``None``: requested, not accepted).
    id: int | None = None
    #: How it ended, when an event told: released, aborted, aborted by node.
    outcome: str | None = None
    instances: int = 0
    failures: int = 0
    ending: bool = False
    # Seconds spent in the C-STORE handler by step, so a slow transfer can be explained.
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("read", "write", "index"), 0.0))

    @property
    def peer(self) -> tuple[str, str]:
        return self.calling_ae, self.address


# Top-level elements the store needs before it answers; everything else is read later.
_SOP_CLASS, _SOP_INSTANCE = (0x0008, 0x0016), (0x0008, 0x0018)
_STUDY, _SERIES = (0x0020, 0x000D), (0x0020, 0x000E)
_MODALITY, _SERIES_DESCRIPTION = (0x0008, 0x0060), (0x0008, 0x103E)
_WANTED = frozenset((_SOP_CLASS, _SOP_INSTANCE, _STUDY, _SERIES, _MODALITY, _SERIES_DESCRIPTION))


def inspect(stream: bytes | memoryview, transfer_syntax: str, max_size: int | None = None) -> tuple[Scan, bytes]:
    """Check a received dataset and return its scan and its encoded header (before pixel data).

    Raises
    ------
    IncompleteDataset
        If the bytes are truncated, garbled or cannot be inflated.
    DatasetTooLarge
        If a deflated dataset inflates to more than ``max_size`` bytes.
    """
    syntax = UID(transfer_syntax)
    if syntax == DEFLATED:
        try:
            stream = inflate(stream, max_size)
        except zlib.error as exc:
            raise IncompleteDataset(f"deflated dataset cannot be inflated: {exc}") from None
        found = scan(stream, implicit=False, little=True, wanted=_WANTED)
    else:
        found = scan(stream, syntax.is_implicit_VR, syntax.is_little_endian, wanted=_WANTED)
    end = found.pixel_data_offset if found.pixel_data_offset is not None else len(stream)
    return found, bytes(stream[:end])


def _dataset_offset(part10: bytes | mmap.mmap) -> int:
    try:
        return dataset_offset(part10)
    except ValueError as exc:
        raise IncompleteDataset(f"the received file: {exc}") from None


def _prefer_senders_transfer_syntax(assoc: Any) -> None:
    """Accept, of the transfer syntaxes a sender proposes in one context, the one it lists first.

    pynetdicom picks the first of the acceptor's own list that the sender proposed, which would
    make a sender convert a JPEG-LS file to explicit little endian (or worse, compress an
    uncompressed one) before sending. The sender's first choice is normally the file as it is, and
    storing what came is the point of the store.
    """
    preferred: dict[str, list[str]] = {}
    for context in assoc.requestor.primitive.presentation_context_definition_list:
        preferred.setdefault(context.abstract_syntax, list(context.transfer_syntax))
    reordered = []
    for context in assoc.acceptor.supported_contexts:
        ours = list(context.transfer_syntax)
        theirs = [ts for ts in preferred.get(context.abstract_syntax, []) if ts in ours]
        reordered.append(build_context(context.abstract_syntax, theirs + [ts for ts in ours if ts not in theirs]))
    assoc.acceptor.supported_contexts = reordered


class StorageSCP:
    """The node's listening application entity.

    Parameters
    ----------
    config : Config
        AE title, address, peers, limits.
    store : InstanceStore
        Where files go.
    index : Index
        Where they are recorded.
    on_association_ended : callable
        Called with the UIDs of the series that received instances when an association ends
        (the node's assembler, which starts their quiet time).
    """

    def __init__(self, config: Config, store: InstanceStore, index: Index,
                 on_association_ended: Callable[[list[str]], None]) -> None:
        self.config = config
        self.store = store
        self.index = index
        self.on_association_ended = on_association_ended
        # Admitted associations (requested and not yet recorded as ended), by id() of pynetdicom's.
        self._associations: dict[int, _AssociationState] = {}
        self._lock = threading.Lock()
        self._ended: queue.Queue[_AssociationState | None] = queue.Queue()
        self._reaper: threading.Thread | None = None
        self._server: Any = None
        self._tls_server: Any = None
        # Built now, so that bad TLS files are refused (ConfigError) before anything listens.
        self._ssl_context = server_context(config) if config.tls.enabled else None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        limits = self.config.limits
        ae = AE(ae_title=self.config.ae_title)
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        # The largest PDU the node takes; each one is read whole into memory before its
        # fragment goes to the dataset's temporary file.
        ae.maximum_pdu_size = self.config.max_pdu
        ae.require_called_aet = True
        # The node admits associations itself (see _admit). pynetdicom's own limit counts threads,
        # among them those of connections closed before their request, which wait out
        # acse_timeout: it is set out of the way.
        ae.maximum_associations = 1_000_000
        ae.acse_timeout = limits.request_seconds
        ae.network_timeout = limits.idle_seconds
        ae.dimse_timeout = limits.idle_seconds
        ae.add_supported_context(VERIFICATION)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        return ae

    @property
    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_PDU_RECV, self._on_pdu_received),
            (evt.EVT_ACSE_SENT, self._on_acse_sent),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]

    def start(self) -> None:
        """Listen for associations (in background threads): plain, TLS, or both."""
        # A documented pynetdicom setting: C-STORE datasets arrive in a temporary file
        # (event.dataset_path) instead of memory. It concerns C-STORE requests received, which in
        # this process only this SCP receives.
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
        self._reaper = threading.Thread(target=self._reap, name="association ends", daemon=True)
        self._reaper.start()
        tls = self.config.tls
        if tls.plain:
            self._server = self._listen(self.config.port, None)
            log.info("listening as %s on %s:%d", self.config.ae_title, self.config.host, self.config.port)
        if tls.enabled:
            try:
                self._tls_server = self._listen(tls.port, self._ssl_context)
            except OSError as exc:
                self.stop()
                exc.setting = "tls.port"  # type: ignore[attr-defined]  # named in the refusal
                raise
            log.info("listening as %s with TLS on %s:%d", self.config.ae_title, self.config.host, tls.port)

    def _listen(self, port: int, ssl_context: Any) -> Any:
        limits = self.config.limits
        return server.start(
            self.ae, (self.config.host, port), self.handlers, ssl_context=ssl_context,
            request_seconds=limits.request_seconds, idle_seconds=limits.idle_seconds,
            max_pending=server.pending_limit(limits.associations), prompt=not self.config.pynetdicom_polling,
        )

    @property
    def listening(self) -> bool:
        return self._server is not None or self._tls_server is not None

    def stop(self) -> None:
        for listener in (self._server, self._tls_server):
            if listener is not None:
                listener.shutdown()
        self._server = self._tls_server = None
        if self._reaper is not None:
            self._ended.put(None)
            self._reaper.join(timeout=10)
            self._reaper = None

    # -- association life cycle ---------------------------------------------------------------

    def _on_requested(self, event: Event) -> None:
        assoc = event.assoc
        calling = assoc.requestor.primitive.calling_ae_title.strip()
        address = assoc.requestor.address
        peer = self.config.peer_for(calling, address)
        if peer is not None and peer.require_certificate and not peer_certificate(assoc):
            self._reject(assoc, calling, address, REJECT_NO_REASON, "no TLS client certificate",
                         "the peer must call over TLS with a certificate")
            return
        if not self.config.open and peer is None:
            self._reject(assoc, calling, address, REJECT_CALLING_AE, "not a configured peer",
                         "not a configured peer")
            return
        refusal = self._admit(assoc, calling, address)
        if refusal is not None:
            self._reject(assoc, calling, address, REJECT_LOCAL_LIMIT, refusal, refusal)
            return
        _prefer_senders_transfer_syntax(assoc)

    def _reject(self, assoc: Any, calling: str, address: str, reason: tuple[int, int, int], audited: str,
                logged: str) -> None:
        log.warning("rejected association from %s at %s: %s", calling, address, logged)
        audit("association rejected", calling_ae=calling, address=address, reason=audited)
        assoc.acse.send_reject(*reason)
        # As pynetdicom does after its own rejections: wait until the DUL has sent the PDU, or
        # the socket would be closed under it and the peer would see an abort, not a reason.
        assoc.kill()

    def _admit(self, assoc: Any, calling: str, address: str) -> str | None:
        """Take an association slot for this request, or say why there is none."""
        limits = self.config.limits
        with self._lock:
            # An association whose threads ended without closing its connection (pynetdicom
            # should not let that happen) must not keep its slot.
            for state in self._associations.values():
                if not state.ending and not state.assoc.is_alive():
                    state.ending = True
                    self._ended.put(state)
            if len(self._associations) >= limits.associations:
                return f"{len(self._associations)} associations open, limits.associations is {limits.associations}"
            same_peer = sum(1 for s in self._associations.values() if s.peer == (calling, address))
            if same_peer >= limits.associations_per_peer:
                return (f"{same_peer} associations open from this peer,"
                        f" limits.associations_per_peer is {limits.associations_per_peer}")
            self._associations[id(assoc)] = _AssociationState(assoc, calling, address)
        return None

    def _state(self, event: Event) -> _AssociationState | None:
        with self._lock:
            return self._associations.get(id(event.assoc))

    def _on_accepted(self, event: Event) -> None:
        state = self._state(event)
        if state is None:
            return
        state.id = self.index.association_started(state.calling_ae, state.address)
        log.info("association %d accepted from %s at %s", state.id, state.calling_ae, state.address)
        audit("association accepted", association=state.id, calling_ae=state.calling_ae, address=state.address)

    def _ended_as(self, event: Event, outcome: str) -> None:
        state = self._state(event)
        if state is not None and state.outcome is None:
            state.outcome = outcome

    def _on_released(self, event: Event) -> None:
        self._ended_as(event, "released")

    def _on_pdu_received(self, event: Event) -> None:
        if isinstance(event.pdu, A_ABORT_RQ):
            self._ended_as(event, "aborted")

    def _on_acse_sent(self, event: Event) -> None:
        # The association itself aborting (a timeout): not the A-ABORT that the DUL answers a
        # broken PDU with, which is how a peer killed mid-transfer usually ends (dropped).
        if isinstance(event.primitive, A_ABORT):
            self._ended_as(event, "aborted by node")

    def _on_closed(self, event: Event) -> None:
        with self._lock:
            state = self._associations.get(id(event.assoc))
            if state is None or state.ending:
                return  # rejected before admission, or already on its way out
            state.ending = True
        # The connection is closed, but the association's thread may yet tell how it ended (the
        # abort indication of a dropped connection comes after this): wait for it elsewhere.
        self._ended.put(state)

    def _reap(self) -> None:
        """Record associations once their threads have ended (runs in its own thread)."""
        while True:
            state = self._ended.get()
            if state is None:
                return
            state.assoc.join(timeout=self.config.limits.idle_seconds + 30)
            try:
                self._record_end(state)
            except Exception:
                log.exception("recording the end of an association failed")
            finally:
                with self._lock:
                    self._associations.pop(id(state.assoc), None)

    def _record_end(self, state: _AssociationState) -> None:
        if state.id is None:
            return  # admitted, then rejected in pynetdicom's negotiation: never accepted
        assoc = state.assoc
        # Without an event that told otherwise, it ended without release or abort: pynetdicom marks
        # a connection lost as aborted too (an A-P-ABORT indication).
        outcome = state.outcome or ("released" if assoc.is_released else "dropped")
        series = self.index.association_ended(state.id, outcome, state.instances, state.failures)
        log.info(
            "association %d %s: %d instances stored, %d refused; handler seconds: %s",
            state.id, outcome, state.instances, state.failures,
            ", ".join(f"{step} {seconds:.3f}" for step, seconds in state.timings.items()),
        )
        audit("association ended", association=state.id, calling_ae=state.calling_ae, address=state.address,
              outcome=outcome, stored=state.instances, refused=state.failures, series=len(series))
        self.on_association_ended(series)

    # -- services -----------------------------------------------------------------------------

    def _on_echo(self, event: Event) -> int:
        return Status.SUCCESS

    def _on_store(self, event: Event) -> int | Dataset:
        state = self._state(event)
        try:
            self._store(event, state)
        except Refused as refused:
            if state is not None:
                state.failures += 1
            log.warning(
                "association %s: refused a %s instance with 0x%04X: %s",
                state.id if state else "?", STORAGE_SOP_CLASSES.get(event.request.AffectedSOPClassUID, "?"),
                refused.code, refused.reason,
            )
            return _status(refused.code, refused.reason)
        except Exception as exc:  # the node keeps serving whatever one instance does
            if state is not None:
                state.failures += 1
            log.exception("association %s: storing an instance failed", state.id if state else "?")
            return _status(Status.PROCESSING_FAILURE, f"internal error: {type(exc).__name__}")
        if state is not None:
            state.instances += 1
        return Status.SUCCESS

    def _store(self, event: Event, state: _AssociationState | None) -> None:
        # pynetdicom's temporary file: its own file meta, then the dataset as received.
        with open(event.dataset_path, "rb") as received:
            self._store_file(event, state, received.fileno())

    def _store_file(self, event: Event, state: _AssociationState | None, fd: int) -> None:
        request = event.request
        transfer_syntax = str(event.context.transfer_syntax)
        timings = state.timings if state is not None else dict.fromkeys(("read", "write", "index"), 0.0)
        started = time.perf_counter()
        max_size = self.config.limits.instance_mb * 2**20
        size_on_disk = os.fstat(fd).st_size
        if size_on_disk == 0:
            raise Refused(Status.CANNOT_UNDERSTAND, "incomplete dataset: nothing received")
        # Mapped, not read: only the pages that the check touches come into memory. The map is
        # unmapped with its last reference.
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        try:
            offset = _dataset_offset(mapped)
        except IncompleteDataset as exc:
            raise Refused(Status.CANNOT_UNDERSTAND, f"incomplete dataset: {exc}") from None
        size = size_on_disk - offset
        if size > max_size:
            raise Refused(Status.OUT_OF_RESOURCES,
                          f"{size / 2**20:.0f} MiB is over limits.instance_mb ({max_size // 2**20} MiB)")
        stream = memoryview(mapped)[offset:]
        try:
            found, header_bytes = inspect(stream, transfer_syntax, max_size)
        except IncompleteDataset as exc:
            raise Refused(Status.CANNOT_UNDERSTAND, f"incomplete dataset: {exc}") from None
        except DatasetTooLarge as exc:
            raise Refused(Status.OUT_OF_RESOURCES, f"{exc}; see limits.instance_mb") from None

        sop_class_uid, sop_instance_uid = found.text(*_SOP_CLASS), found.text(*_SOP_INSTANCE)
        if sop_class_uid != request.AffectedSOPClassUID:
            raise Refused(Status.DATASET_MISMATCH, "SOP Class UID differs from the request")
        if sop_instance_uid != request.AffectedSOPInstanceUID:
            raise Refused(Status.DATASET_MISMATCH, "SOP Instance UID differs from the request")
        study_uid, series_uid = found.text(*_STUDY), found.text(*_SERIES)
        try:
            path = self.store.path_for(study_uid, series_uid, sop_instance_uid)
        except ValueError as exc:
            raise Refused(Status.INVALID_IDENTIFIERS, str(exc)) from None
        if self._already_stored(sop_instance_uid, path, stream):
            return  # the same instance again: nothing changes, so the series is not re-processed
        meta = file_preamble_and_meta(
            sop_class_uid, sop_instance_uid, transfer_syntax, state.calling_ae if state else None
        )
        read_done = time.perf_counter()
        timings["read"] += read_done - started
        try:
            # The dataset goes from the temporary file to the store inside the kernel.
            self.store.write(path, [meta, FileRange(fd, offset, size)])
        except DiskFull as exc:
            raise Refused(Status.OUT_OF_RESOURCES, f"disk full: {exc}") from None
        except OSError as exc:
            raise Refused(Status.OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}") from None
        written = time.perf_counter()
        timings["write"] += written - read_done
        self.index.add_instance(
            InstanceRecord(
                sop_instance_uid=sop_instance_uid,
                sop_class_uid=sop_class_uid,
                transfer_syntax=transfer_syntax,
                study_uid=study_uid,
                series_uid=series_uid,
                path=str(path.relative_to(self.store.root)),
                size=len(meta) + size,
                modality=found.text(*_MODALITY),
                series_description=found.text(*_SERIES_DESCRIPTION),
                header_bytes=header_bytes,
            ),
            association_id=state.id if state else None,
            calling_ae=state.calling_ae if state else "",
            address=state.address if state else "",
        )
        timings["index"] += time.perf_counter() - written

    def _already_stored(self, sop_instance_uid: str, path: Path, stream: memoryview) -> bool:
        """Whether this exact dataset is on disk already under the same name."""
        existing = self.index.instance_path(sop_instance_uid)
        if existing is None or self.store.root / existing != path:
            return False
        # Compare the dataset, not the file meta: another sender writes another Source AE Title.
        chunk = 1 << 20
        try:
            with open(path, "rb") as handle:
                offset = _dataset_offset(handle.read(144))
                if os.fstat(handle.fileno()).st_size - offset != len(stream):
                    return False
                handle.seek(offset)
                return all(handle.read(chunk) == stream[start:start + chunk] for start in range(0, len(stream), chunk))
        except (OSError, IncompleteDataset):
            return False
