"""The DICOM SCP: Verification and Storage, with peers checked at association time.

The C-STORE handler does the minimum that durability needs before it answers: check the dataset
is complete, read its header (not its pixels), write the bytes as they came with file meta,
fsync, rename, index. Everything slower (assembly, rules, inference) happens elsewhere.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, build_context, evt
from pynetdicom.events import Event

from .. import IMPLEMENTATION_VERSION_NAME
from ..config import Config
from .filemeta import file_preamble_and_meta
from ..storage.index import Index, InstanceRecord
from ..operations.logs import audit
from .integrity import DEFLATED, IncompleteDataset, Scan, inflate, scan
from ..storage.store import DiskFull, InstanceStore
from .tls import peer_certificate, server_context

__all__ = ["STORAGE_SOP_CLASSES", "TRANSFER_SYNTAXES", "StorageSCP", "Status"]

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
    id: int
    calling_ae: str
    address: str
    outcome: str = "closed"
    instances: int = 0
    failures: int = 0
    # Seconds spent in the C-STORE handler by step, so a slow transfer can be explained.
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("read", "write", "index"), 0.0))


# Top-level elements the store needs before it answers; everything else is read later.
_SOP_CLASS, _SOP_INSTANCE = (0x0008, 0x0016), (0x0008, 0x0018)
_STUDY, _SERIES = (0x0020, 0x000D), (0x0020, 0x000E)
_MODALITY, _SERIES_DESCRIPTION = (0x0008, 0x0060), (0x0008, 0x103E)
_WANTED = frozenset((_SOP_CLASS, _SOP_INSTANCE, _STUDY, _SERIES, _MODALITY, _SERIES_DESCRIPTION))


def inspect(stream: bytes, transfer_syntax: str) -> tuple[Scan, bytes]:
    """Check a received dataset and return its scan and its encoded header (before pixel data).

    Raises
    ------
    IncompleteDataset
        If the bytes are truncated, garbled or cannot be inflated.
    """
    syntax = UID(transfer_syntax)
    if syntax == DEFLATED:
        try:
            stream = inflate(stream)
        except zlib.error as exc:
            raise IncompleteDataset(f"deflated dataset cannot be inflated: {exc}") from None
        found = scan(stream, implicit=False, little=True, wanted=_WANTED)
    else:
        found = scan(stream, syntax.is_implicit_VR, syntax.is_little_endian, wanted=_WANTED)
    end = found.pixel_data_offset if found.pixel_data_offset is not None else len(stream)
    return found, bytes(stream[:end])


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
        AE title, address, peers.
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
        self._associations: dict[int, _AssociationState] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        self._tls_server: Any = None
        # Built now, so that bad TLS files are refused (ConfigError) before anything listens.
        self._ssl_context = server_context(config) if config.tls.enabled else None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        # 0 = no limit: the sender chooses its PDU size and large instances arrive in few PDUs.
        ae.maximum_pdu_size = self.config.max_pdu
        ae.require_called_aet = True
        ae.maximum_associations = 32
        ae.network_timeout = 120
        ae.dimse_timeout = 120
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
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]

    def start(self) -> None:
        """Listen for associations (in background threads): plain, TLS, or both."""
        tls = self.config.tls
        if tls.plain:
            self._server = self.ae.start_server(
                (self.config.host, self.config.port), block=False, evt_handlers=self.handlers
            )
            log.info("listening as %s on %s:%d", self.config.ae_title, self.config.host, self.config.port)
        if tls.enabled:
            try:
                self._tls_server = self.ae.start_server(
                    (self.config.host, tls.port), block=False, evt_handlers=self.handlers,
                    ssl_context=self._ssl_context,
                )
            except OSError as exc:
                self.stop()
                exc.setting = "tls.port"  # type: ignore[attr-defined]  # named in the refusal
                raise
            log.info("listening as %s with TLS on %s:%d", self.config.ae_title, self.config.host, tls.port)

    @property
    def listening(self) -> bool:
        return self._server is not None or self._tls_server is not None

    def stop(self) -> None:
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        self._server = self._tls_server = None

    # -- association life cycle ---------------------------------------------------------------

    def _on_requested(self, event: Event) -> None:
        calling = event.assoc.requestor.primitive.calling_ae_title.strip()
        address = event.assoc.requestor.address
        peer = self.config.peer_for(calling, address)
        if peer is not None and peer.require_certificate and not peer_certificate(event.assoc):
            log.warning("rejected association from %s at %s: the peer must call over TLS with a certificate",
                        calling, address)
            audit("association rejected", calling_ae=calling, address=address, reason="no TLS client certificate")
            # Rejected-permanent, by the service user, no reason given (PS3.8 9.3.4).
            event.assoc.acse.send_reject(0x01, 0x01, 0x01)
            event.assoc.kill()
            return
        if self.config.open or peer is not None:
            _prefer_senders_transfer_syntax(event.assoc)
            return
        log.warning("rejected association from %s at %s: not a configured peer", calling, address)
        audit("association rejected", calling_ae=calling, address=address, reason="not a configured peer")
        # Rejected-permanent, by the service user, calling AE title not recognised (PS3.8 9.3.4).
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
        # As pynetdicom does after its own rejections: wait until the DUL has sent the PDU, or
        # the socket would be closed under it and the peer would see an abort, not a reason.
        event.assoc.kill()

    def _on_accepted(self, event: Event) -> None:
        calling = event.assoc.requestor.ae_title.strip()
        address = event.assoc.requestor.address
        association_id = self.index.association_started(calling, address)
        with self._lock:
            self._associations[id(event.assoc)] = _AssociationState(association_id, calling, address)
        log.info("association %d accepted from %s at %s", association_id, calling, address)
        audit("association accepted", association=association_id, calling_ae=calling, address=address)

    def _state(self, event: Event) -> _AssociationState | None:
        with self._lock:
            return self._associations.get(id(event.assoc))

    def _on_released(self, event: Event) -> None:
        state = self._state(event)
        if state is not None:
            state.outcome = "released"

    def _on_aborted(self, event: Event) -> None:
        state = self._state(event)
        if state is not None:
            state.outcome = "aborted"

    def _on_closed(self, event: Event) -> None:
        with self._lock:
            state = self._associations.pop(id(event.assoc), None)
        if state is None:
            return  # rejected or never accepted
        series = self.index.association_ended(state.id, state.outcome, state.instances, state.failures)
        log.info(
            "association %d %s: %d instances stored, %d refused; handler seconds: %s",
            state.id, state.outcome, state.instances, state.failures,
            ", ".join(f"{step} {seconds:.3f}" for step, seconds in state.timings.items()),
        )
        audit("association ended", association=state.id, calling_ae=state.calling_ae, address=state.address,
              outcome=state.outcome, stored=state.instances, refused=state.failures, series=len(series))
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
        request = event.request
        transfer_syntax = str(event.context.transfer_syntax)
        stream = request.DataSet.getvalue()
        timings = state.timings if state is not None else dict.fromkeys(("read", "write", "index"), 0.0)
        started = time.perf_counter()
        try:
            found, header_bytes = inspect(stream, transfer_syntax)
        except IncompleteDataset as exc:
            raise Refused(Status.CANNOT_UNDERSTAND, f"incomplete dataset: {exc}") from None

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
            self.store.write(path, [meta, stream])
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
                size=len(meta) + len(stream),
                modality=found.text(*_MODALITY),
                series_description=found.text(*_SERIES_DESCRIPTION),
                header_bytes=header_bytes,
            ),
            association_id=state.id if state else None,
            calling_ae=state.calling_ae if state else "",
            address=state.address if state else "",
        )
        timings["index"] += time.perf_counter() - written

    def _already_stored(self, sop_instance_uid: str, path: Path, stream: bytes) -> bool:
        """Whether this exact dataset is on disk already under the same name."""
        existing = self.index.instance_path(sop_instance_uid)
        if existing is None or self.store.root / existing != path or not path.exists():
            return False
        on_disk = path.read_bytes()
        # Compare the dataset, not the file meta: another sender writes another Source AE Title.
        (meta_length,) = struct.unpack_from("<I", on_disk, 140)
        return on_disk[144 + meta_length :] == stream
