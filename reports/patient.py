"""Patient context: age, sex, height, weight and BMI, as recorded, with what is missing and why.

The reference standard compares a measurement with people of the same age and sex (and, for a
site reference, BMI). Those values come from DICOM headers that are often empty or wrong, so this
module reads them strictly: a value that is absent, malformed or implausible is reported as
missing with the reason, never guessed or silently repaired.

Decisions
---------
- Age: ``PatientAge`` ("034Y", "006M", "010W", "020D") when present and well formed, since it is
  what the modality recorded at the time of the scan; otherwise ``PatientBirthDate`` against
  ``StudyDate``, then ``AcquisitionDate``. When both exist and differ by more than a year, the
  ``PatientAge`` value is kept and the disagreement is noted. ``000Y`` is kept as 0 years with a
  note, since anonymisers often write it for an unknown age.
- Sex: ``PatientSex`` ``M``, ``F`` or ``O`` only (DICOM's defined terms). Anything else is missing.
- Height: ``PatientSize`` is in metres (DICOM). A value outside 0.5–2.5 m is reported as
  implausible and *not* converted, even when it looks like centimetres (178 -> 1.78 m?): the
  header's origin cannot be checked, and a wrong BMI silently changes a site-reference z-score.
  The note says what the value probably is, so a person can fix the source.
- Weight: ``PatientWeight`` in kg, plausible within 1–400 kg. Many scanners write 0 for "not
  entered"; 0 is reported as not recorded. A weight entered in pounds cannot be detected.
- BMI: weight / height², only when both are plausible, and itself checked against 8–100 kg/m²
  (sanity bounds against unit errors, not clinical limits).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date
from typing import Any, Mapping

__all__ = [
    "AGE_BOUNDS_YEARS",
    "BMI_BOUNDS",
    "HEIGHT_BOUNDS_M",
    "WEIGHT_BOUNDS_KG",
    "MissingValue",
    "PatientContext",
    "age_between",
    "from_dataset",
    "from_sidecar",
    "parse_patient_age",
]

HEIGHT_BOUNDS_M = (0.5, 2.5)
WEIGHT_BOUNDS_KG = (1.0, 400.0)
BMI_BOUNDS = (8.0, 100.0)
AGE_BOUNDS_YEARS = (0.0, 130.0)

_SEXES = ("M", "F", "O")
# Research sidecars (BIDS participants files and the like) often spell sex out.
_SIDECAR_SEXES = {"m": "M", "male": "M", "f": "F", "female": "F", "o": "O", "other": "O"}
_AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
_AGE_STRING = re.compile(r"^(\d{3})([DWMY])$")
_NOT_GIVEN = ("", "n/a", "na", "nan", "none", "null", "unknown")


@dataclass(frozen=True)
class MissingValue:
    """A patient value that is not available, and why."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


@dataclass(frozen=True)
class PatientContext:
    """What is known about the patient for the reference standard.

    Attributes
    ----------
    age_years : float or None
        Age at the scan in years (fractional for ages given in days, weeks or months).
    sex : {"M", "F", "O"} or None
    height_m, weight_kg, bmi : float or None
        Height in metres, weight in kilograms, body mass index in kg/m².
    age_source : str or None
        Where the age came from, e.g. ``"PatientAge"`` or ``"PatientBirthDate and StudyDate"``.
    missing : tuple of MissingValue
        Every value that is None, with the reason.
    notes : tuple of str
        Remarks on values that are present (e.g. a disagreement between two age sources).
    """

    age_years: float | None = None
    sex: str | None = None
    height_m: float | None = None
    weight_kg: float | None = None
    bmi: float | None = None
    age_source: str | None = None
    missing: tuple[MissingValue, ...] = ()
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.sex is not None and self.sex not in _SEXES:
            raise ValueError(f"sex must be one of {', '.join(_SEXES)} or None, got {self.sex!r}")
        stated = {m.field for m in self.missing}
        for name in ("age_years", "sex", "height_m", "weight_kg", "bmi"):
            if getattr(self, name) is None and name not in stated:
                raise ValueError(f"{name} is None but no reason is given in missing")
            if getattr(self, name) is not None and name in stated:
                raise ValueError(f"{name} has a value but is also listed as missing")

    @property
    def age_completed_years(self) -> int | None:
        """Age in completed years, as age bands such as "20–29" are meant."""
        return None if self.age_years is None else int(math.floor(self.age_years + 1e-9))

    def why_missing(self, name: str) -> str | None:
        """The reason a value is missing, or None when it is present."""
        for item in self.missing:
            if item.field == name:
                return item.reason
        return None

    def explanation(self) -> str:
        """One line for people: what is missing and why, or that nothing is."""
        if not self.missing:
            return "age, sex, height and weight all recorded"
        return "; ".join(str(m) for m in self.missing)


def parse_patient_age(value: str) -> float:
    """Age in years from a DICOM Age String ("034Y", "006M", "010W", "020D").

    Raises
    ------
    ValueError
        When the value is not three digits followed by D, W, M or Y.
    """
    match = _AGE_STRING.match(value.strip().upper())
    if not match:
        raise ValueError(f"{value!r} is not a DICOM age string (three digits and D, W, M or Y)")
    return int(match.group(1)) * _AGE_UNITS[match.group(2)]


def age_between(birth: date, on: date) -> float:
    """Exact age in years on a date: completed years plus the fraction of the current year of life.

    A birthday gives a whole number, so that someone scanned on their 40th birthday is in the
    40–49 band. A 29 February birthday falls on 28 February in common years.
    """
    if on < birth:
        raise ValueError(f"date {on.isoformat()} is before the birth date {birth.isoformat()}")
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    last = _birthday(birth, birth.year + years)
    following = _birthday(birth, birth.year + years + 1)
    return years + (on - last).days / (following - last).days


def _birthday(birth: date, year: int) -> date:
    if birth.month == 2 and birth.day == 29:
        try:
            return date(year, 2, 29)
        except ValueError:
            return date(year, 2, 28)
    return birth.replace(year=year)


def _dicom_date(value: Any) -> date | None:
    if isinstance(value, date):
        return value
    text = str(value or "").strip().replace(".", "")  # "YYYY.MM.DD" is the ACR-NEMA form
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    """A finite float from a header or sidecar value, or None when not given or not numeric."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().lower() in _NOT_GIVEN:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _given(value: Any) -> bool:
    return not (value is None or (isinstance(value, str) and value.strip().lower() in _NOT_GIVEN))


class _Builder:
    """Collects values and reasons, then checks and assembles a PatientContext."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.missing: list[MissingValue] = []
        self.notes: list[str] = []

    def lack(self, name: str, reason: str) -> None:
        self.values[name] = None
        self.missing.append(MissingValue(name, reason))

    def height(self, value: Any, label: str) -> None:
        if not _given(value):
            return self.lack("height_m", f"{label} not recorded")
        height = _number(value)
        if height is None:
            return self.lack("height_m", f"{label} {value!r} is not a number")
        low, high = HEIGHT_BOUNDS_M
        if not low <= height <= high:
            hint = ""
            if 50 <= height <= 250:
                hint = f"; it looks like centimetres ({height / 100:.2f} m?), not converted"
            elif height == 0:
                hint = "; 0 usually means not entered"
            return self.lack("height_m", f"{label} {height:g} is outside {low}-{high} m{hint}")
        self.values["height_m"] = height

    def weight(self, value: Any, label: str) -> None:
        if not _given(value):
            return self.lack("weight_kg", f"{label} not recorded")
        weight = _number(value)
        if weight is None:
            return self.lack("weight_kg", f"{label} {value!r} is not a number")
        if weight == 0:
            return self.lack("weight_kg", f"{label} is 0, which scanners write when no weight was entered")
        low, high = WEIGHT_BOUNDS_KG
        if not low <= weight <= high:
            return self.lack("weight_kg", f"{label} {weight:g} is outside {low:g}-{high:g} kg")
        self.values["weight_kg"] = weight

    def age(self, years: float, source: str) -> None:
        low, high = AGE_BOUNDS_YEARS
        if not low <= years <= high:
            return self.lack("age_years", f"{source} gives {years:g} years, outside {low:g}-{high:g}")
        self.values["age_years"] = years
        self.values["age_source"] = source

    def build(self) -> PatientContext:
        height, weight = self.values.get("height_m"), self.values.get("weight_kg")
        if height is not None and weight is not None:
            bmi = weight / height**2
            low, high = BMI_BOUNDS
            if low <= bmi <= high:
                self.values["bmi"] = bmi
            else:
                self.lack("bmi", f"weight {weight:g} kg and height {height:g} m give {bmi:.1f} kg/m2, "
                                 f"outside {low:g}-{high:g}: one of them is probably in the wrong unit")
        else:
            lacking = [n for n, v in (("height", height), ("weight", weight)) if v is None]
            self.lack("bmi", f"needs height and weight; {' and '.join(lacking)} missing")
        return PatientContext(
            age_years=self.values.get("age_years"),
            sex=self.values.get("sex"),
            height_m=self.values.get("height_m"),
            weight_kg=self.values.get("weight_kg"),
            bmi=self.values.get("bmi"),
            age_source=self.values.get("age_source"),
            missing=tuple(self.missing),
            notes=tuple(self.notes),
        )


def from_dataset(ds: Any) -> PatientContext:
    """Patient context from a DICOM data set (a pydicom ``Dataset`` or anything with ``get``).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Any instance of the series; only patient and study attributes are read.

    Returns
    -------
    PatientContext
        Values found, and each missing one with its reason.
    """
    builder = _Builder()

    age_text = ds.get("PatientAge")
    from_age: float | None = None
    age_problem = "PatientAge not recorded"
    if _given(age_text):
        try:
            from_age = parse_patient_age(str(age_text))
        except ValueError as exc:
            age_problem = f"PatientAge {exc}"
        else:
            low, high = AGE_BOUNDS_YEARS
            if not low <= from_age <= high:
                # An impossible PatientAge must not hide a usable birth date.
                age_problem = f"PatientAge {str(age_text)!r} is outside {low:g}-{high:g} years"
                from_age = None
    birth_text = ds.get("PatientBirthDate")
    birth = _dicom_date(birth_text)
    scan, scan_label = None, None
    for keyword in ("StudyDate", "AcquisitionDate"):
        scan = _dicom_date(ds.get(keyword))
        if scan is not None:
            scan_label = keyword
            break
    from_dates: float | None = None
    dates_problem: str
    if birth is None:
        dates_problem = ("PatientBirthDate not recorded" if not _given(birth_text)
                         else f"PatientBirthDate {str(birth_text)!r} is not a date")
    elif scan is None:
        dates_problem = "neither StudyDate nor AcquisitionDate is a date to compare PatientBirthDate with"
    elif scan < birth:
        dates_problem = f"PatientBirthDate {birth.isoformat()} is after {scan_label} {scan.isoformat()}"
    else:
        from_dates = age_between(birth, scan)
        dates_problem = ""
    if from_age is not None:
        builder.age(from_age, "PatientAge")
        if from_age == 0 and str(age_text).strip().upper() == "000Y":
            # Anonymisers and some modalities write 000Y for "unknown"; a real age of 0 is rare here.
            builder.notes.append("PatientAge is 000Y, which is often written when the age is unknown")
        if from_dates is not None and abs(from_dates - from_age) > 1.0:
            builder.notes.append(f"PatientAge gives {from_age:.1f} years but PatientBirthDate and {scan_label} give "
                                 f"{from_dates:.1f}; PatientAge kept")
    elif from_dates is not None:
        builder.age(from_dates, f"PatientBirthDate and {scan_label}")
    else:
        builder.lack("age_years", f"{age_problem}, and {dates_problem}")

    sex = ds.get("PatientSex")
    if not _given(sex):
        builder.lack("sex", "PatientSex not recorded")
    elif str(sex).strip().upper() in _SEXES:
        builder.values["sex"] = str(sex).strip().upper()
    else:
        builder.lack("sex", f"PatientSex {str(sex)!r} is not M, F or O")

    builder.height(ds.get("PatientSize"), "PatientSize")
    builder.weight(ds.get("PatientWeight"), "PatientWeight")
    return builder.build()


def from_sidecar(values: Mapping[str, Any]) -> PatientContext:
    """Patient context from a research sidecar (e.g. the JSON beside a NIfTI volume).

    Parameters
    ----------
    values : mapping
        Keys ``age`` (years), ``sex`` (M/F/O, or male/female/other in any case), ``height_m``,
        ``weight_kg``. Absent keys, None, "" and "n/a" count as not recorded.

    Returns
    -------
    PatientContext
    """
    builder = _Builder()
    age = values.get("age")
    if not _given(age):
        builder.lack("age_years", "age not in the sidecar")
    elif (years := _number(age)) is None:
        builder.lack("age_years", f"sidecar age {age!r} is not a number of years")
    else:
        builder.age(years, "sidecar")

    sex = values.get("sex")
    if not _given(sex):
        builder.lack("sex", "sex not in the sidecar")
    elif str(sex).strip().lower() in _SIDECAR_SEXES:
        builder.values["sex"] = _SIDECAR_SEXES[str(sex).strip().lower()]
    else:
        builder.lack("sex", f"sidecar sex {str(sex)!r} is not M, F, O, male, female or other")

    builder.height(values.get("height_m"), "sidecar height_m")
    builder.weight(values.get("weight_kg"), "sidecar weight_kg")
    return builder.build()
