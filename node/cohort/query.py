"""``musclenode cohort query``: ask the archive for the studies that match, write the manifest."""

from __future__ import annotations

from typing import Callable

from pydicom.dataset import Dataset

from inference.patient import from_dataset

from ..network.query_retrieve import QueryRetrieveSCU
from .filters import CohortFilter, parse_date, value_text
from .manifest import ManifestRow

__all__ = ["query_cohort"]


def _row(study: Dataset, series: list[Dataset]) -> ManifestRow:
    patient = from_dataset(study)
    try:
        when = parse_date(value_text(study, "StudyDate")).isoformat()
    except ValueError:
        when = ""
    counts = [value_text(s, "NumberOfSeriesRelatedInstances") for s in series]
    return ManifestRow(
        study_uid=value_text(study, "StudyInstanceUID"),
        accession=value_text(study, "AccessionNumber"),
        study_date=when,
        patient_id=value_text(study, "PatientID"),
        sex=patient.sex or "",
        age=patient.age_completed_years,
        study_description=value_text(study, "StudyDescription"),
        modalities=tuple(sorted({value_text(s, "Modality") for s in series} - {""})),
        series_uids=tuple(value_text(s, "SeriesInstanceUID") for s in series),
        series_descriptions=tuple(value_text(s, "SeriesDescription") for s in series),
        instances=sum(int(c) for c in counts) if counts and all(c.isdigit() for c in counts) else None,
    )


def query_cohort(scu: QueryRetrieveSCU, cohort: CohortFilter,
                 progress: Callable[[int, int], None] | None = None) -> list[ManifestRow]:
    """The matching studies, ordered by date, each with its matching series.

    One study-level C-FIND, then a series-level C-FIND per study that passes the study filters,
    all on one association. ``progress(done, total)`` is called after each study.

    Raises
    ------
    node.network.query_retrieve.QueryRetrieveError
        When the archive cannot be queried.
    """
    studies = scu.find(cohort.study_identifier())
    rows: list[ManifestRow] = []
    with scu.find_session() as find:
        for number, study in enumerate(studies, start=1):
            uid = value_text(study, "StudyInstanceUID")
            if uid and cohort.study_mismatch(study) is None:
                series = sorted((s for s in find(cohort.series_identifier(uid)) if cohort.series_matches(s)),
                                key=lambda s: (int(value_text(s, "SeriesNumber") or 0) if value_text(s, "SeriesNumber").isdigit()
                                               else 0, value_text(s, "SeriesInstanceUID")))
                if series:
                    rows.append(_row(study, series))
            if progress is not None:
                progress(number, len(studies))
    return sorted(rows, key=lambda r: (r.study_date, r.study_uid))
