"""Patient data as it is found in headers: age, sex, height, weight and BMI, read by one set of rules.

The reference standard compares a measurement with people of the same age and sex (and, for a
site reference, BMI); the result objects repeat the patient's attributes. Both read them here,
once. Headers are often empty or wrong, so every value is either usable, with a note when it was
read generously, or missing with the reason: never guessed.

Rules
-----
- **Age.** ``PatientAge`` when it can be read, since it is what the modality recorded at the
  time of the scan: the DICOM Age String ("034Y", "006M", "010W", "020D"), and also without its
  unit ("34": years) or without zero padding ("34Y"), each read with a note and written back in
  DICOM form ("034Y"). Otherwise the exact age between ``PatientBirthDate`` and ``StudyDate``
  (then ``AcquisitionDate``). When both exist and differ by more than a year, ``PatientAge`` is
  kept and the disagreement noted. ``000Y`` is kept as 0 years with a note, since anonymisers
  often write it for an unknown age. Usable ages lie within :data:`AGE_BOUNDS_YEARS`.
- **Sex.** ``PatientSex`` ``M``, ``F`` or ``O`` (DICOM's enumerated values, any case). Anything
  else ("U", "X", free text) is missing, with the value it had.
- **Height.** ``PatientSize`` is in metres (DICOM); usable within :data:`HEIGHT_BOUNDS_M`. A value
  within :data:`HEIGHT_BOUNDS_CM` (178) can only be centimetres: no adult or child is 50 to 250 m
  tall and a height below 2.5 cm is no person's. It is converted (1.78 m) and the note says so.
  0 means "not entered". Anything else is missing.
- **Weight.** ``PatientWeight`` in kg, usable within :data:`WEIGHT_BOUNDS_KG`. Many scanners write
  0 for "not entered": 0 is missing, as "not recorded". A weight entered in pounds cannot be
  told from a heavy person and is not guessed at.
- **BMI.** weight / height², only from a usable height and weight, and itself within
  :data:`BMI_BOUNDS` (sanity bounds against unit errors, not clinical limits).

Research sidecars (:func:`from_sidecar`) follow the same rules for the same quantities.

What the results carry
----------------------
The SEG, the SR and the summary pages copy the patient's attributes from a source header. A
header value that would make a result object invalid, or that says something the node decided
was wrong, is not copied verbatim: :func:`result_header` gives the header with the values as the
node used them (``PatientAge`` "034Y" for "34", ``PatientSize`` 1.78 for 178) and without the
type 3 values it found unusable (a ``PatientWeight`` of 0, an impossible ``PatientAge``); the type 2
``PatientSex`` and ``PatientBirthDate`` are empty when they are not valid DICOM values.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Mapping

from pydicom.dataset import Dataset

from .vocabulary import Sex

__all__ = [
    "AGE_BOUNDS_YEARS",
    "BMI_BOUNDS",
    "HEIGHT_BOUNDS_CM",
    "HEIGHT_BOUNDS_M",
    "WEIGHT_BOUNDS_KG",
    "AgeReading",
    "MissingValue",
    "PatientContext",
    "age_between",
    "from_dataset",
    "from_sidecar",
    "read_patient_age",
    "result_header",
]

#: Usable heights in metres, and the range in which a height can only be centimetres.
HEIGHT_BOUNDS_M = (0.5, 2.5)
HEIGHT_BOUNDS_CM = (50.0, 250.0)
WEIGHT_BOUNDS_KG = (1.0, 400.0)
BMI_BOUNDS = (8.0, 100.0)
AGE_BOUNDS_YEARS = (0.0, 130.0)

#: The fields of a context, each a value or a :class:`MissingValue`.
_FIELDS = ("age_years", "sex", "height_m", "weight_kg", "bmi")
# Research sidecars (BIDS participants files and the like) often spell sex out.
_SIDECAR_SEXES = {"m": Sex.MALE, "male": Sex.MALE, "f": Sex.FEMALE, "female": Sex.FEMALE,
                  "o": Sex.OTHER, "other": Sex.OTHER}
_AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
_UNIT_WORDS = {"D": "days", "W": "weeks", "M": "months", "Y": "years"}
#: The DICOM form (three digits and a unit), and what is read generously besides.
_AGE_STRING = re.compile(r"^(\d{3})([DWMY])$")
_AGE_LENIENT = re.compile(r"^(\d{1,3}) ?([DWMY])?$")
_NOT_GIVEN = ("", "n/a", "na", "nan", "none", "null", "unknown")


@dataclass(frozen=True)
class MissingValue:
    """A patient value that is not available, and why."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


@dataclass(frozen=True)
class AgeReading:
    """An age read from a PatientAge value.

    Attributes
    ----------
    years : float
        Age in years (fractional for ages in days, weeks or months).
    text : str
        The value in DICOM form, e.g. ``"034Y"``.
    note : str
        How a value not in DICOM form was read ("" for one that was).
    """

    years: float
    text: str
    note: str = ""


@dataclass(frozen=True)
class PatientContext:
    """What is known about the patient: values as the node uses them, and what is missing and why.

    Identifying values are kept out of ``repr`` so that logging a context never logs them.

    Attributes
    ----------
    age_years : float or None
        Age at the scan in years (fractional for ages given in days, weeks or months, or from
        dates).
    sex : Sex or None
    height_m, weight_kg, bmi : float or None
        Height in metres, weight in kilograms, body mass index in kg/m².
    age_source : str or None
        Where the age came from, e.g. ``"PatientAge"`` or ``"PatientBirthDate and StudyDate"``.
    missing : tuple of MissingValue
        Every value that is None, with the reason.
    notes : tuple of str
        Remarks on values that are present (a unit added, a disagreement between two sources).
    name, patient_id : str
        PatientName (its DICOM string) and PatientID as recorded ("" when not).
    birth_date : str
        PatientBirthDate when it is a valid date (DICOM DA, ``YYYYMMDD``), else "".
    """

    age_years: float | None = None
    sex: Sex | None = None
    height_m: float | None = None
    weight_kg: float | None = None
    bmi: float | None = None
    age_source: str | None = None
    missing: tuple[MissingValue, ...] = ()
    notes: tuple[str, ...] = ()
    name: str = field(default="", repr=False)
    patient_id: str = field(default="", repr=False)
    birth_date: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.sex is not None:
            try:
                object.__setattr__(self, "sex", Sex(self.sex))
            except ValueError:
                raise ValueError(f"sex must be one of {', '.join(Sex)} or None, got {self.sex!r}") from None
        stated = {m.field for m in self.missing}
        for name in _FIELDS:
            if getattr(self, name) is None and name not in stated:
                raise ValueError(f"{name} is None but no reason is given in missing")
            if getattr(self, name) is not None and name in stated:
                raise ValueError(f"{name} has a value but is also listed as missing")

    @property
    def age_completed_years(self) -> int | None:
        """Age in completed years, as age bands such as "20–29" and cohort tables count it."""
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


def read_patient_age(value: str) -> AgeReading:
    """Age from a PatientAge value: the DICOM Age String, or the same without unit or padding.

    ``"034Y"``, ``"006M"``, ``"010W"``, ``"020D"`` are DICOM (PS3.5 6.2, VR AS). ``"34"`` (no unit)
    is read as years and ``"34Y"`` (not padded) as written, each with a note.

    Raises
    ------
    ValueError
        For anything else ("34 years", "03.4Y", "-34Y", "0034Y", "").
    """
    text = str(value).strip().upper()
    exact = _AGE_STRING.match(text)
    if exact:
        number, unit = int(exact.group(1)), exact.group(2)
        return AgeReading(number * _AGE_UNITS[unit], text)
    lenient = _AGE_LENIENT.match(text)
    if not lenient:
        raise ValueError(f"{value!r} is not a DICOM age string (three digits and D, W, M or Y)")
    number, unit = int(lenient.group(1)), lenient.group(2)
    if unit is None:
        note = f"PatientAge {value!r} has no unit: read as {number} years"
        unit = "Y"
    else:
        note = f"PatientAge {value!r} is not in DICOM form: read as {number} {_UNIT_WORDS[unit]}"
    return AgeReading(number * _AGE_UNITS[unit], f"{number:03d}{unit}", note)


def age_between(birth: date, on: date) -> float:
    """Exact age in years on a date: completed years plus the fraction of the current year of life.

    A birthday gives a whole number, so that someone scanned on their 40th birthday is in the
    40–49 band. A 29 February birthday falls on 28 February in common years.

    Raises
    ------
    ValueError
        When ``on`` is before ``birth``.
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
    """Collects values and reasons under the module's rules, then assembles a PatientContext."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.missing: list[MissingValue] = []
        self.notes: list[str] = []

    def lack(self, name: str, reason: str) -> None:
        self.values[name] = None
        self.missing.append(MissingValue(name, reason))

    def sex(self, value: Any, label: str, spellings: Mapping[str, Sex], allowed: str, absent: str) -> None:
        if not _given(value):
            return self.lack("sex", absent)
        sex = spellings.get(str(value).strip().lower())
        if sex is None:
            return self.lack("sex", f"{label} {str(value)!r} is not {allowed}")
        self.values["sex"] = sex
        return None

    def _measured(self, name: str, value: Any, label: str, what: str) -> float | None:
        """A header's number, or None after noting why it is missing (absent, no number, 0)."""
        if not _given(value):
            self.lack(name, f"{label} not recorded")
            return None
        number = _number(value)
        if number is None:
            self.lack(name, f"{label} {value!r} is not a number")
        elif number == 0:
            self.lack(name, f"{label} is 0, which scanners write when no {what} was entered")
        return number or None

    def height(self, value: Any, label: str) -> None:
        height = self._measured("height_m", value, label, "height")
        if height is None:
            return None
        low, high = HEIGHT_BOUNDS_M
        low_cm, high_cm = HEIGHT_BOUNDS_CM
        if low <= height <= high:
            self.values["height_m"] = height
        elif low_cm <= height <= high_cm:
            self.values["height_m"] = height / 100
            self.notes.append(f"{label} {height:g} is centimetres, not metres: read as {height / 100:.2f} m")
        else:
            self.lack("height_m", f"{label} {height:g} is outside {low}-{high} m (and {low_cm:g}-{high_cm:g} cm)")
        return None

    def weight(self, value: Any, label: str) -> None:
        weight = self._measured("weight_kg", value, label, "weight")
        if weight is None:
            return None
        low, high = WEIGHT_BOUNDS_KG
        if low <= weight <= high:
            self.values["weight_kg"] = weight
        else:
            self.lack("weight_kg", f"{label} {weight:g} is outside {low:g}-{high:g} kg")
        return None

    def age(self, years: float, source: str) -> None:
        low, high = AGE_BOUNDS_YEARS
        if not low <= years <= high:
            return self.lack("age_years", f"{source} gives {years:g} years, outside {low:g}-{high:g}")
        self.values["age_years"] = years
        self.values["age_source"] = source
        return None

    def build(self, **identity: str) -> PatientContext:
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
            **{name: self.values.get(name) for name in _FIELDS},
            age_source=self.values.get("age_source"),
            missing=tuple(self.missing),
            notes=tuple(self.notes),
            **identity,
        )


_HEADER_SEXES = {sex.value.lower(): sex for sex in Sex}


def _header_age(ds: Any) -> tuple[AgeReading | None, str]:
    """PatientAge when usable, else None and why not."""
    text = ds.get("PatientAge")
    if not _given(text):
        return None, "PatientAge not recorded"
    try:
        reading = read_patient_age(str(text))
    except ValueError as exc:
        return None, f"PatientAge {exc}"
    low, high = AGE_BOUNDS_YEARS
    if not low <= reading.years <= high:
        # An impossible PatientAge must not hide a usable birth date.
        return None, f"PatientAge {str(text)!r} is outside {low:g}-{high:g} years"
    return reading, ""


def from_dataset(ds: Any) -> PatientContext:
    """Patient context from a DICOM data set (a pydicom ``Dataset`` or anything with ``get``).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset or mapping
        Any instance of the series; only patient and study attributes are read.

    Returns
    -------
    PatientContext
        Values found, each missing one with its reason, and the identity as recorded.
    """
    builder = _Builder()
    reading, age_problem = _header_age(ds)
    birth_text = ds.get("PatientBirthDate")
    birth = _dicom_date(birth_text)
    scan, scan_label = None, None
    for keyword in ("StudyDate", "AcquisitionDate"):
        scan = _dicom_date(ds.get(keyword))
        if scan is not None:
            scan_label = keyword
            break
    from_dates: float | None = None
    dates_problem = ""
    if birth is None:
        dates_problem = ("PatientBirthDate not recorded" if not _given(birth_text)
                         else f"PatientBirthDate {str(birth_text)!r} is not a date")
    elif scan is None:
        dates_problem = "neither StudyDate nor AcquisitionDate is a date to compare PatientBirthDate with"
    elif scan < birth:
        dates_problem = f"PatientBirthDate {birth.isoformat()} is after {scan_label} {scan.isoformat()}"
    else:
        from_dates = age_between(birth, scan)
    if reading is not None:
        builder.age(reading.years, "PatientAge")
        if reading.note:
            builder.notes.append(reading.note)
        if reading.years == 0 and reading.text == "000Y":
            # Anonymisers and some modalities write 000Y for "unknown"; a real age of 0 is rare here.
            builder.notes.append("PatientAge is 000Y, which is often written when the age is unknown")
        if from_dates is not None and abs(from_dates - reading.years) > 1.0:
            builder.notes.append(f"PatientAge gives {reading.years:.1f} years but PatientBirthDate and {scan_label} "
                                 f"give {from_dates:.1f}; PatientAge kept")
    elif from_dates is not None:
        builder.age(from_dates, f"PatientBirthDate and {scan_label}")
    else:
        builder.lack("age_years", f"{age_problem}, and {dates_problem}")

    builder.sex(ds.get("PatientSex"), "PatientSex", _HEADER_SEXES, "M, F or O", "PatientSex not recorded")
    builder.height(ds.get("PatientSize"), "PatientSize")
    builder.weight(ds.get("PatientWeight"), "PatientWeight")
    return builder.build(
        name=str(ds.get("PatientName") or ""),
        patient_id=str(ds.get("PatientID") or ""),
        birth_date=birth.strftime("%Y%m%d") if birth is not None else "",
    )


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
    builder.sex(values.get("sex"), "sidecar sex", _SIDECAR_SEXES, "M, F, O, male, female or other",
                "sex not in the sidecar")
    builder.height(values.get("height_m"), "sidecar height_m")
    builder.weight(values.get("weight_kg"), "sidecar weight_kg")
    return builder.build()


#: Type 2 attributes of the Patient module (PS3.3 C.7.1.1) and their VRs: present, empty when unknown.
_PATIENT_TYPE_2 = {"PatientName": "PN", "PatientID": "LO", "PatientBirthDate": "DA", "PatientSex": "CS"}


def _ds_number(value: float) -> str:
    """A decimal string (VR DS, at most 16 characters) for a measured value."""
    return f"{value:.6g}"


def result_header(ds: Dataset) -> Dataset:
    """A source header fit to copy the patient's attributes from into a result object.

    The patient values are those :func:`from_dataset` decided on: ``PatientAge`` in DICOM form
    (or absent when it was not usable), ``PatientSize`` in metres, ``PatientWeight`` only when
    usable (these three are type 3: absent rather than wrong), ``PatientSex`` one of M, F, O or
    empty, ``PatientBirthDate`` a valid date or empty (both type 2: empty rather than invalid).
    Every other attribute is the source's own.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A header of the source series (pixel data may be present; it is shared, not copied).

    Returns
    -------
    pydicom.dataset.Dataset
        ``ds`` itself when nothing needs changing, else a new data set that shares the
        unchanged elements (``ds`` is never modified).
    """
    context = from_dataset(ds)
    reading, _ = _header_age(ds)
    wanted = {
        "PatientAge": ("AS", reading.text if reading is not None else None),
        "PatientSize": ("DS", None if context.height_m is None else _ds_number(context.height_m)),
        "PatientWeight": ("DS", None if context.weight_kg is None else _ds_number(context.weight_kg)),
        "PatientSex": ("CS", "" if context.sex is None else context.sex.value),
        "PatientBirthDate": ("DA", context.birth_date),
    }
    # What the source has is rewritten when the node reads it otherwise; of what it lacks, only
    # the type 2 attributes of the Patient module are added, empty.
    changes = {keyword: (vr, value) for keyword, (vr, value) in wanted.items()
               if keyword in ds and (value is None or not _same(ds[keyword].value, value, vr))}
    changes.update({keyword: (vr, "") for keyword, vr in _PATIENT_TYPE_2.items() if keyword not in ds})
    if not changes:
        return ds
    out = Dataset()
    for element in ds:
        out.add(element)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    for keyword, (vr, value) in changes.items():
        if value is None:
            del out[keyword]
        else:
            out.add_new(keyword, vr, value)
    return out


def _same(current: Any, wanted: str, vr: str) -> bool:
    """Whether a header value already says what the node would write."""
    if vr == "DS":
        number = _number(current)
        return number is not None and math.isclose(number, float(wanted), rel_tol=1e-9)
    return str(current or "").strip() == wanted
