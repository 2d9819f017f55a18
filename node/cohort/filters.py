"""Which studies and series belong to a cohort: pure functions over C-FIND identifiers.

Every filter is applied here, on what the archive answered, even when it was also sent to the
archive as a matching key: archives differ in what they match (case, wildcards, optional keys
such as ModalitiesInStudy), and the cohort must not depend on it.

A study matches when its date, description, age and sex match and at least one of its series
matches the series filters (modality, body part, series description); the matching series are
the ones the manifest lists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from typing import Any

from pydicom.dataset import Dataset

from inference.patient import from_dataset

from ..network.query_retrieve import identifier

__all__ = ["CohortFilter", "parse_date", "value_text"]

#: Keys asked for at study level: the manifest's columns and what the filters need.
STUDY_KEYS = ("StudyInstanceUID", "AccessionNumber", "StudyDate", "StudyDescription", "PatientID", "PatientSex",
              "PatientAge", "PatientBirthDate", "ModalitiesInStudy")
#: Keys asked for at series level.
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesDescription", "BodyPartExamined", "SeriesNumber",
               "NumberOfSeriesRelatedInstances")
SEXES = ("M", "F", "O")


def parse_date(text: str) -> date:
    """A date given as ``YYYYMMDD`` or ``YYYY-MM-DD``; ``ValueError`` otherwise."""
    digits = text.strip().replace("-", "")
    if not re.fullmatch(r"\d{8}", digits):
        raise ValueError(f"{text!r} is not a date (YYYY-MM-DD or YYYYMMDD)")
    return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))


def value_text(ds: Dataset, keyword: str) -> str:
    """An attribute of an identifier as stripped text; empty when absent."""
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


@dataclass(frozen=True)
class CohortFilter:
    """What a cohort query asks for; an empty field does not filter.

    Attributes
    ----------
    date_from, date_to : date or None
        StudyDate range, both ends included.
    modalities : tuple of str
        Series Modality, any of these (e.g. ``("MR",)``).
    body_parts : tuple of str
        Series BodyPartExamined, any of these, ignoring case.
    study_description, series_description : str or None
        Regular expressions searched in StudyDescription and SeriesDescription, ignoring case
        (like ``rules.lumbar_patterns``).
    age_min, age_max : int or None
        Age at the study in completed years, both ends included; the age comes from PatientAge,
        else PatientBirthDate and StudyDate (:func:`inference.patient.from_dataset`). A study whose
        age is unknown does not match an age filter.
    sexes : tuple of str
        PatientSex, any of ``M``, ``F``, ``O``.
    """

    date_from: date | None = None
    date_to: date | None = None
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    study_description: str | None = None
    series_description: str | None = None
    age_min: int | None = None
    age_max: int | None = None
    sexes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("study_description", "series_description"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"{name}: {pattern!r} is not a regular expression: {exc}") from None
        unknown = [s for s in self.sexes if s not in SEXES]
        if unknown:
            raise ValueError(f"sex {unknown[0]!r}: must be M, F or O")
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise ValueError("the date range ends before it starts")
        if self.age_min is not None and self.age_max is not None and self.age_min > self.age_max:
            raise ValueError("the age range ends before it starts")

    # -- what the archive is asked --------------------------------------------------------------

    def study_identifier(self) -> Dataset:
        """A study-level C-FIND identifier: the return keys, and the matching keys archives share."""
        keys: dict[str, Any] = {k: "" for k in STUDY_KEYS}
        if self.date_from or self.date_to:
            start = self.date_from.strftime("%Y%m%d") if self.date_from else ""
            end = self.date_to.strftime("%Y%m%d") if self.date_to else ""
            keys["StudyDate"] = f"{start}-{end}"  # range matching, PS3.4 C.2.2.2.5
        if self.modalities:
            keys["ModalitiesInStudy"] = list(self.modalities) if len(self.modalities) > 1 else self.modalities[0]
        if len(self.sexes) == 1:
            keys["PatientSex"] = self.sexes[0]
        return identifier("STUDY", **keys)

    @staticmethod
    def series_identifier(study_uid: str) -> Dataset:
        """A series-level C-FIND identifier listing every series of a study with its return keys."""
        return identifier("SERIES", StudyInstanceUID=study_uid, **{k: "" for k in SERIES_KEYS})

    # -- what matches ------------------------------------------------------------------------------

    def study_mismatch(self, study: Dataset) -> str | None:
        """Why a study-level identifier does not match (date, description, age, sex), or None."""
        if self.date_from or self.date_to:
            try:
                when = parse_date(value_text(study, "StudyDate"))
            except ValueError:
                return "no study date"
            if self.date_from and when < self.date_from or self.date_to and when > self.date_to:
                return "study date outside the range"
        if self.study_description is not None and not re.search(
                self.study_description, value_text(study, "StudyDescription"), re.IGNORECASE):
            return "study description"
        patient = from_dataset(study)
        if self.age_min is not None or self.age_max is not None:
            age = patient.age_completed_years
            if age is None:
                return f"age unknown ({patient.why_missing('age_years')})"
            if self.age_min is not None and age < self.age_min or self.age_max is not None and age > self.age_max:
                return "age outside the range"
        if self.sexes and patient.sex not in self.sexes:
            return "sex"
        return None

    def series_matches(self, series: Dataset) -> bool:
        """Whether a series-level identifier matches the modality, body part and description filters."""
        if self.modalities and value_text(series, "Modality").upper() not in {m.upper() for m in self.modalities}:
            return False
        if self.body_parts and value_text(series, "BodyPartExamined").upper() not in {b.upper() for b in self.body_parts}:
            return False
        if self.series_description is not None and not re.search(
                self.series_description, value_text(series, "SeriesDescription"), re.IGNORECASE):
            return False
        return True
