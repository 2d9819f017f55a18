"""``musclenode cohort fetch MANIFEST``: retrieve every study of a cohort, resumably.

For each study of the manifest, in parallel up to a bound:

1. resolve its accession number to a Study Instance UID (C-FIND) when the manifest has none;
2. list the instances of the series to fetch (the manifest's series, else every series of the
   study): C-FIND at image level, or QIDO-RS for the DICOMweb route;
3. subtract what the target already holds (a folder, or the node's index);
4. retrieve only what is missing: a whole series when none of it is there, else just the
   missing instances (image level); by C-MOVE to the node, C-GET or WADO-RS;
5. check the target again: the study is complete when every listed instance is there.

A study that fails (archive down, association refused, instances missing after retrieval) is
tried again with backoff, up to ``attempts`` times, and then reported with the reason; it
never stops the others. Running the command again fetches only what is still missing.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence

from pynetdicom import sop_class

from ..network.dicomweb import DicomWebError, DicomWebSource, file_bytes
from ..network.query_retrieve import QueryRetrieveError, QueryRetrieveSCU, Received, identifier
from .manifest import ManifestRow
from .targets import FolderTarget, NodeStoreTarget

__all__ = ["DicomWebRoute", "FetchOutcome", "GetRoute", "MoveRoute", "fetch_cohort", "resolve_accession", "summarise"]

log = logging.getLogger(__name__)

#: SOP Instance UIDs per image-level retrieve request.
_CHUNK = 100


class _Permanent(Exception):
    """A failure that trying again cannot fix (no such study or series)."""


@dataclass
class FetchOutcome:
    """What happened to one study of the manifest.

    Attributes
    ----------
    key : str
        The study as the manifest names it.
    study_uid : str
        Its Study Instance UID ("" when the accession number could not be resolved).
    instances : int
        Instances the archive lists in the series fetched.
    already : int
        Of those, present before this run.
    fetched : int
        Present now that were not before.
    attempts : int
    error : str or None
        Why the study is incomplete; None when every instance is there.
    """

    key: str
    study_uid: str = ""
    instances: int = 0
    already: int = 0
    fetched: int = 0
    attempts: int = 0
    error: str | None = None


class Route(Protocol):
    """How instances are listed and retrieved, and where they land."""

    target: FolderTarget | NodeStoreTarget

    def series(self, study_uid: str) -> list[str]: ...

    def instances(self, study_uid: str, series_uid: str) -> dict[str, str]: ...

    def retrieve(self, study_uid: str, series_uid: str, missing: set[str], whole: bool,
                 sop_classes: set[str], arrived: Callable[[], None]) -> None: ...


class _DimseListing:
    """Listing by C-FIND (for the C-MOVE and C-GET routes)."""

    scu: QueryRetrieveSCU

    def series(self, study_uid: str) -> list[str]:
        found = self.scu.find(identifier("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=""))
        return [str(s.SeriesInstanceUID) for s in found if s.get("SeriesInstanceUID")]

    def instances(self, study_uid: str, series_uid: str) -> dict[str, str]:
        found = self.scu.find(identifier("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
                                         SOPInstanceUID="", SOPClassUID=""))
        return {str(i.SOPInstanceUID): str(i.get("SOPClassUID", "") or "") for i in found if i.get("SOPInstanceUID")}

    @staticmethod
    def _identifiers(study_uid: str, series_uid: str, missing: set[str], whole: bool):
        if whole:
            yield identifier("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
            return
        uids = sorted(missing)
        for start in range(0, len(uids), _CHUNK):
            chunk = uids[start:start + _CHUNK]
            yield identifier("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
                             SOPInstanceUID=chunk if len(chunk) > 1 else chunk[0])


class MoveRoute(_DimseListing):
    """C-MOVE to this node: the archive opens its own association to the node's storage SCP."""

    def __init__(self, scu: QueryRetrieveSCU, destination: str, target: NodeStoreTarget) -> None:
        self.scu = scu
        self.destination = destination
        self.target = target

    def retrieve(self, study_uid: str, series_uid: str, missing: set[str], whole: bool,
                 sop_classes: set[str], arrived: Callable[[], None]) -> None:
        for request in self._identifiers(study_uid, series_uid, missing, whole):
            counts = self.scu.move(request, self.destination)
            if counts.failed:
                raise QueryRetrieveError(
                    f"the archive could not deliver {counts.failed} instances to {self.destination} (may it call"
                    " the node? see [[peers]]; does it know the node's address?)")


#: Storage SOP classes a C-GET proposes when the archive's image-level C-FIND did not return the
#: instances' SOP Class UIDs (an optional key): MR, CT, Secondary Capture, SEG, SR, PDF.
COMMON_STORAGE = tuple(str(getattr(sop_class, name)) for name in (
    "MRImageStorage", "EnhancedMRImageStorage", "LegacyConvertedEnhancedMRImageStorage", "CTImageStorage",
    "EnhancedCTImageStorage", "SecondaryCaptureImageStorage", "SegmentationStorage", "BasicTextSRStorage",
    "EnhancedSRStorage", "ComprehensiveSRStorage", "Comprehensive3DSRStorage", "EncapsulatedPDFStorage",
))


class GetRoute(_DimseListing):
    """C-GET: the instances come back on our own association and are written to a folder."""

    def __init__(self, scu: QueryRetrieveSCU, target: FolderTarget) -> None:
        self.scu = scu
        self.target = target

    def retrieve(self, study_uid: str, series_uid: str, missing: set[str], whole: bool,
                 sop_classes: set[str], arrived: Callable[[], None]) -> None:
        def keep(instance: Received) -> None:
            self.target.keep(instance.study_uid, instance.series_uid, instance.sop_instance_uid, instance.file_bytes)
            arrived()

        for request in self._identifiers(study_uid, series_uid, missing, whole):
            counts = self.scu.get(request, sop_classes or COMMON_STORAGE, keep)
            if counts.failed:
                raise QueryRetrieveError(f"C-GET: {counts.failed} instances could not be received or kept")


class DicomWebRoute:
    """QIDO-RS to list, WADO-RS to retrieve, into a folder."""

    def __init__(self, source: DicomWebSource, target: FolderTarget) -> None:
        self.source = source
        self.target = target

    def series(self, study_uid: str) -> list[str]:
        return self.source.series(study_uid)

    def instances(self, study_uid: str, series_uid: str) -> dict[str, str]:
        return self.source.instances(study_uid, series_uid)

    def _keep(self, study_uid: str, series_uid: str, dataset, arrived: Callable[[], None]) -> None:
        self.target.keep(study_uid, series_uid, str(dataset.SOPInstanceUID), file_bytes(dataset))
        arrived()

    def retrieve(self, study_uid: str, series_uid: str, missing: set[str], whole: bool,
                 sop_classes: set[str], arrived: Callable[[], None]) -> None:
        if whole:
            for dataset in self.source.iter_series(study_uid, series_uid):
                self._keep(study_uid, series_uid, dataset, arrived)
            return
        for sop_instance_uid in sorted(missing):
            self._keep(study_uid, series_uid, self.source.instance(study_uid, series_uid, sop_instance_uid), arrived)


def resolve_accession(scu: QueryRetrieveSCU, accession: str) -> str:
    """The Study Instance UID of an accession number (C-FIND); exactly one study must match."""
    found = scu.find(identifier("STUDY", AccessionNumber=accession, StudyInstanceUID=""))
    uids = sorted({str(s.StudyInstanceUID) for s in found if s.get("StudyInstanceUID")})
    if not uids:
        raise _Permanent(f"no study has accession number {accession!r}")
    if len(uids) > 1:
        raise _Permanent(f"accession number {accession!r} matches {len(uids)} studies")
    return uids[0]


def _fetch_study(row: ManifestRow, route: Route, scu: QueryRetrieveSCU, attempts: int, backoff: float,
                 arrived: Callable[[], None]) -> FetchOutcome:
    outcome = FetchOutcome(key=row.key, study_uid=row.study_uid)
    before: int | None = None
    for attempt in range(1, attempts + 1):
        outcome.attempts = attempt
        try:
            if not outcome.study_uid:
                outcome.study_uid = resolve_accession(scu, row.accession)
            wanted = list(row.series_uids) or route.series(outcome.study_uid)
            if not wanted:
                raise _Permanent("the archive lists no series for this study")
            listing: dict[str, dict[str, str]] = {}
            for series_uid in wanted:
                listing[series_uid] = route.instances(outcome.study_uid, series_uid)
                if not listing[series_uid]:
                    raise _Permanent(f"the archive lists no instances of series {series_uid}")
            outcome.instances = sum(len(v) for v in listing.values())
            missing = {s: set(v) - route.target.present(outcome.study_uid, s) for s, v in listing.items()}
            if before is None:
                before = outcome.instances - sum(len(m) for m in missing.values())
                outcome.already = before
            for series_uid, sops in missing.items():
                if sops:
                    classes = {listing[series_uid][sop] for sop in sops if listing[series_uid][sop]}
                    route.retrieve(outcome.study_uid, series_uid, sops, len(sops) == len(listing[series_uid]),
                                   classes, arrived)
            still = sum(len(set(v) - route.target.present(outcome.study_uid, s)) for s, v in listing.items())
            outcome.fetched = outcome.instances - before - still
            if still == 0:
                outcome.error = None
                return outcome
            outcome.error = f"{still} of {outcome.instances} instances still missing after retrieval"
        except _Permanent as exc:
            outcome.error = str(exc)
            return outcome
        except (QueryRetrieveError, DicomWebError, OSError, ValueError) as exc:
            outcome.error = str(exc)
        log.warning("study %s, attempt %d of %d: %s", row.key, attempt, attempts, outcome.error)
        if attempt < attempts:
            time.sleep(backoff * 2 ** (attempt - 1))
    return outcome


def fetch_cohort(rows: Sequence[ManifestRow], route: Route, scu: QueryRetrieveSCU, *, concurrency: int = 4,
                 attempts: int = 3, backoff: float = 2.0,
                 progress=None) -> list[FetchOutcome]:
    """Fetch every study of ``rows``; return one outcome per row, in manifest order.

    Parameters
    ----------
    rows : sequence of ManifestRow
    route : MoveRoute, GetRoute or DicomWebRoute
    scu : QueryRetrieveSCU
        Resolves accession numbers (C-FIND).
    concurrency : int
        Studies fetched at the same time (each on its own association or HTTP requests).
    attempts : int
        Tries per study before it is reported as failed.
    backoff : float
        Seconds before the second try, doubling after.
    progress : node.operations.progress.ProgressBar, optional
        Advanced once per study, counting ``fetched``, ``present`` and ``failed``.
    """
    outcomes: dict[int, FetchOutcome] = {}

    def arrived() -> None:
        if progress is not None:
            progress.count("fetched")

    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="fetch") as pool:
        futures = {pool.submit(_fetch_study, row, route, scu, attempts, backoff, arrived): number
                   for number, row in enumerate(rows)}
        try:
            for future in as_completed(futures):
                outcome = future.result()
                outcomes[futures[future]] = outcome
                if progress is not None:
                    # Routes that cannot count instances as they arrive (C-MOVE) are counted per study.
                    counted = isinstance(route, MoveRoute)
                    progress.advance(present=outcome.already, failed=int(outcome.error is not None),
                                     **({"fetched": outcome.fetched} if counted else {}))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return [outcomes[number] for number in range(len(rows))]


def summarise(outcomes: Iterable[FetchOutcome]) -> dict[str, int]:
    """Totals over the outcomes: studies complete and failed, instances fetched and already there."""
    outcomes = list(outcomes)
    return {
        "studies": len(outcomes),
        "complete": sum(o.error is None for o in outcomes),
        "failed": sum(o.error is not None for o in outcomes),
        "instances": sum(o.instances for o in outcomes),
        "fetched": sum(o.fetched for o in outcomes),
        "already": sum(o.already for o in outcomes),
    }
