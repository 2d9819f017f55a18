"""Query/retrieve SCU: C-FIND, C-MOVE and C-GET against an archive (Study Root information model).

Each call opens its own association, so calls may run in parallel threads. Failures raise
:class:`QueryRetrieveError` with what the archive answered, in words; nothing here retries (the
cohort fetcher decides that).

C-GET needs the storage SOP classes it will receive: the caller names them (from an
instance-level C-FIND), and each is proposed once per common transfer syntax, so that the
archive can send every instance as it stores it instead of converting it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

__all__ = ["QueryRetrieveError", "QueryRetrieveSCU", "Received", "SubOperations", "identifier"]

log = logging.getLogger(__name__)

#: Transfer syntaxes a C-GET proposes for each storage SOP class, one presentation context each
#: (PS3.7 allows several contexts with one abstract syntax; the archive picks the one it stores).
GET_TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit,
    JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
    RLELossless,
)
#: PS3.8: at most 128 presentation contexts in one association (odd IDs 1..255).
_MAX_CONTEXTS = 128

#: C-FIND/C-MOVE/C-GET statuses that are not failures (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4).
_PENDING = (0xFF00, 0xFF01)
_SUCCESS = 0x0000
_CANCEL = 0xFE00
_WARNING = 0xB000


class QueryRetrieveError(Exception):
    """The archive could not be reached, refused the association, or answered with a failure."""


@dataclass(frozen=True)
class SubOperations:
    """The outcome of a C-MOVE or C-GET: the archive's final counts of its C-STORE sub-operations."""

    completed: int
    failed: int
    warning: int
    status: int


@dataclass(frozen=True)
class Received:
    """One instance received over a C-GET: its identity and the file bytes (preamble, meta, dataset)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    file_bytes: bytes


def _status_text(status: int) -> str:
    known = {
        0xA700: "out of resources", 0xA701: "out of resources (cannot calculate the number of matches)",
        0xA702: "out of resources (cannot perform sub-operations)", 0xA801: "move destination unknown",
        0xA900: "identifier does not match SOP class", 0xC000: "unable to process",
        _CANCEL: "cancelled", _WARNING: "some sub-operations failed",
    }
    return f"0x{status:04X} ({known.get(status, 'failure')})"


class QueryRetrieveSCU:
    """Talks to one archive as a query/retrieve SCU.

    Parameters
    ----------
    ae_title, host, port
        The archive's query/retrieve SCP.
    calling_ae : str
        Our AE title; for C-MOVE to this node it is also the move destination.
    timeout : float
        Seconds for the association, each DIMSE message and network silence.
    """

    def __init__(self, ae_title: str, host: str, port: int, calling_ae: str, timeout: float = 60) -> None:
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.calling_ae = calling_ae
        self.timeout = timeout

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        return ae

    def _associate(self, ae: AE, **kwargs):
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title, **kwargs)
        if not assoc.is_established:
            where = f"{self.ae_title}@{self.host}:{self.port}"
            if assoc.is_rejected:
                raise QueryRetrieveError(f"{where} rejected the association (is {self.calling_ae} known to it?)")
            raise QueryRetrieveError(f"no association with {where} (archive down or unreachable?)")
        return assoc

    def find(self, identifier: Dataset) -> list[Dataset]:
        """C-FIND: every matching identifier (``identifier.QueryRetrieveLevel`` says the level).

        Raises
        ------
        QueryRetrieveError
            When no association is made, the archive answers a failure, or it stops answering.
        """
        with self.find_session() as find:
            return find(identifier)

    @contextmanager
    def find_session(self) -> Iterator[Callable[[Dataset], list[Dataset]]]:
        """One association for many C-FINDs: ``with scu.find_session() as find: find(identifier)``."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae)

        def find(identifier: Dataset) -> list[Dataset]:
            matches: list[Dataset] = []
            for status, found in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
                if not status:
                    raise QueryRetrieveError("C-FIND: the archive stopped answering (timeout or aborted association)")
                code = int(status.Status)
                if code in _PENDING:
                    if found is not None:
                        matches.append(found)
                elif code == _SUCCESS:
                    break
                else:
                    raise QueryRetrieveError(f"C-FIND at {identifier.QueryRetrieveLevel} level failed: "
                                             f"{_status_text(code)}")
            return matches

        try:
            yield find
        finally:
            if assoc.is_established:
                assoc.release()

    def move(self, identifier: Dataset, destination: str) -> SubOperations:
        """C-MOVE the instances that ``identifier`` names to the AE title ``destination``."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = self._associate(ae)
        try:
            return self._outcome(assoc.send_c_move(identifier, destination, StudyRootQueryRetrieveInformationModelMove),
                                 "C-MOVE")
        finally:
            if assoc.is_established:
                assoc.release()

    def get(self, identifier: Dataset, sop_classes: Iterable[str], store: Callable[[Received], None]) -> SubOperations:
        """C-GET the instances that ``identifier`` names; ``store`` is called with each one.

        ``store`` runs in the association's thread before the instance is acknowledged; an
        exception there refuses the instance (0xA700), which the final counts then show.
        """
        classes = sorted(set(sop_classes))
        per_class = max(1, min(len(GET_TRANSFER_SYNTAXES), (_MAX_CONTEXTS - 1) // max(1, len(classes))))
        if len(classes) > _MAX_CONTEXTS - 1:
            raise QueryRetrieveError(f"C-GET: {len(classes)} storage SOP classes do not fit one association")
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for sop_class in classes:
            for syntax in GET_TRANSFER_SYNTAXES[:per_class]:
                ae.add_requested_context(sop_class, [syntax])

        def handle_store(event) -> int:
            ds = event.dataset
            try:
                store(Received(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                               str(event.request.AffectedSOPInstanceUID), event.encoded_dataset(include_meta=True)))
            except Exception:
                log.exception("C-GET: could not keep instance %s", event.request.AffectedSOPInstanceUID)
                return 0xA700
            return 0x0000

        roles = [build_role(sop_class, scp_role=True) for sop_class in classes]
        assoc = self._associate(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
        try:
            return self._outcome(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet), "C-GET")
        finally:
            if assoc.is_established:
                assoc.release()

    @staticmethod
    def _outcome(responses, what: str) -> SubOperations:
        last = None
        for status, _ in responses:
            if not status:
                raise QueryRetrieveError(f"{what}: the archive stopped answering (timeout or aborted association)")
            last = status
            if int(status.Status) not in _PENDING:
                break
        if last is None:
            raise QueryRetrieveError(f"{what}: no response")
        code = int(last.Status)
        counts = SubOperations(
            completed=int(last.get("NumberOfCompletedSuboperations", 0) or 0),
            failed=int(last.get("NumberOfFailedSuboperations", 0) or 0),
            warning=int(last.get("NumberOfWarningSuboperations", 0) or 0),
            status=code,
        )
        if code not in (_SUCCESS, _WARNING):
            raise QueryRetrieveError(f"{what} failed: {_status_text(code)}, {counts.completed} sent,"
                                     f" {counts.failed} failed")
        return counts


def identifier(level: str, **keys: str | Sequence[str]) -> Dataset:
    """A query/retrieve identifier at ``level`` (``"STUDY"``, ``"SERIES"``, ``"IMAGE"``) with ``keys``.

    A sequence value becomes a multi-valued element (list of UID matching, PS3.4 C.2.2.2.2).
    """
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, list(value) if isinstance(value, (list, tuple)) else value)
    return ds
