"""The reference standard: how a measurement compares with healthy people of the same age and sex.

Two kinds of reference answer the same question:

- the **published table** shipped with musclenode (``reports/data/reference-v1.csv``, sources and
  caveats in ``reports/data/README.md``): mean and SD of healthy cohorts, by method, muscle,
  measurement, vertebral levels, sex and age band;
- a **site reference** fitted from a site's own control cohort (``musclenode reference fit``, see
  :mod:`reports.reference_fit`): per method, muscle (sides pooled), measurement and levels,
  centile curves of age, sex, BMI and site on a skewed, bounded scale (:mod:`reports.centiles`).

:func:`compare` gives, for one measurement, the z-score, the percentile and the reference used.
It prefers a site reference when one is given and has a model for the measurement and the
person's sex. When the person lacks what the model needs (age, sex, BMI), or the model has no
curves for the measurement or the sex, the published table is used with a note; when the person
is outside the ages or BMIs the model was fitted on, there is no z-score, and the result says why
(a curve is not extrapolated, and another reference is not silently substituted).

Rules
-----
- **Never across methods.** A reference is used only for the method that measured the value:
  a fat percentage from T1/T2 thresholding is never compared with a Dixon fat fraction (the
  two are different quantities; Masi et al. 2023, Wesselink et al. 2024). The published table has
  no ``t1t2_threshold`` rows, so such values get "no reference for this method".
- **Levels must be equal.** Fat fraction rises steeply at L4–L5 (Crawford et al. 2016), so a
  measurement over L3–L5 is not compared with a reference over L1–L5, nor an unknown level range
  with any. ``lumbar`` is a level key of its own: the whole lumbar muscle as a source segmented
  it, when the source does not state the levels.
- **Stratum choice** among the published rows that match method, muscle, measurement, levels,
  the patient's sex (or ``any``) and age (inside the row's band): most specific first (a row
  specific to sex counts one, a row that is one age band of a cohort counts one), then the larger
  n (an unknown n ranks last), then the narrower age band, then the source key and table order.
  Rows that need a missing age or sex are skipped; when nothing is left the result says which
  value was missing and why.
- **Ages** are matched in completed years ("20–29" includes 29.9). A blank age bound means the
  source does not state it; such rows are used only from :data:`ADULT_AGE` years, because every
  published cohort here is adult.
- **Percentile**, published table: 100 × Φ(z) with z = (value − mean) / SD: it assumes the
  reference values are normally distributed, which fat fractions (bounded at 0, skewed) only
  approximate. The result says so. Site reference: the value's centile in the model's own skewed
  distribution for the person, and z its normal quantile (exact, :data:`CENTILE_BASIS`).
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from inference.patient import PatientContext
from inference.vocabulary import ReferenceMethod, Sex, muscle_group, vertebra_range

from .centiles import (
    CentileCurves,
    Covariates,
    ModelFileError,
    SiteReference,
    centile,
    load_site_reference,
    save_site_reference,
)

__all__ = [
    "ADULT_AGE",
    "ANY_SEX",
    "CENTILE_BASIS",
    "Comparison",
    "MEASUREMENTS",
    "PERCENTILE_BASIS",
    "PUBLISHED_VERSION",
    "ModelFileError",
    "ReferenceTableError",
    "ReferenceRow",
    "ReferenceTable",
    "SiteReference",
    "Stratum",
    "Z_BANDS",
    "compare",
    "level_key",
    "load_site_reference",
    "load_table",
    "muscle_key",
    "normal_percentile",
    "published_table",
    "save_site_reference",
    "select_stratum",
    "z_score",
]

PUBLISHED_VERSION = "reference-v1"
MEASUREMENTS = ("fat_fraction_percent", "csa_mm2")
#: The sex of a group of women and men together.
ANY_SEX = "any"
_ROW_SEXES = (Sex.FEMALE, Sex.MALE, ANY_SEX)
LUMBAR = "lumbar"
ADULT_AGE = 18
PERCENTILE_BASIS = ("normal CDF of the z-score: assumes normally distributed values in the reference "
                    "group, which fat fractions only approximate")
CENTILE_BASIS = ("centile of the value in the site reference's distribution for the person's age, sex, BMI and "
                 "site (sinh-arcsinh on the logit or log scale); z is its normal quantile: exact, no normality "
                 "assumed")
#: z-scores at which a stratum gives its reference values (bands of ±1 and ±2 SD, and P5/P95).
Z_BANDS = (-2.0, -1.6448536269514722, -1.0, 0.0, 1.0, 1.6448536269514722, 2.0)

_TABLE_COLUMNS = ("method", "muscle", "measurement", "levels", "sex", "age_low", "age_high",
                  "age_specific", "mean", "sd", "n", "source", "note")
_SOURCE_COLUMNS = ("source", "citation", "link")


class ReferenceTableError(ValueError):
    """A reference table or site reference file has a row the lookup cannot use."""


# ---------------------------------------------------------------------------------------------
# Keys


def muscle_key(muscles: str | Iterable[str]) -> str:
    """Canonical key of one muscle or a group: members in the vocabulary's order, joined by "+".

    >>> muscle_key(["erector_spinae", "multifidus"])
    'multifidus+erector_spinae'
    """
    try:
        return "+".join(muscle_group(muscles))
    except ValueError as exc:
        raise ReferenceTableError(str(exc)) from None


def level_key(levels: str) -> str:
    """Canonical key of a vertebral level range: "L5", "L3-L5" (inclusive) or "lumbar".

    Accepts an en dash and lower case ("l3–l5"); a range of one level collapses ("L5-L5" -> "L5").
    The range is one of bodies (:func:`inference.vocabulary.vertebra_range`), as the published
    cohorts state the levels they measured over.
    """
    if levels.strip().lower() == LUMBAR:
        return LUMBAR
    try:
        vertebrae = vertebra_range(levels)
    except ValueError as exc:
        raise ReferenceTableError(f"{exc}, or {LUMBAR!r}") from None
    first, last = vertebrae[0], vertebrae[-1]
    return first.value if first is last else f"{first.value}-{last.value}"


def _reference_method(method: str) -> ReferenceMethod:
    try:
        return ReferenceMethod(method)
    except ValueError:
        raise ReferenceTableError(f"method {method!r} is not one of {', '.join(ReferenceMethod)}") from None


# ---------------------------------------------------------------------------------------------
# Published table


@dataclass(frozen=True)
class ReferenceRow:
    """One stratum of the published table (a row of ``reference-vN.csv``).

    ``age_low``/``age_high`` are inclusive completed years; None when the source does not state
    the bound. ``age_specific`` says whether the row is one age band of a cohort (True) or the
    whole cohort, whose age range the bounds then give (False).
    """

    method: ReferenceMethod
    muscle: str
    measurement: str
    levels: str
    sex: str
    age_low: int | None
    age_high: int | None
    age_specific: bool
    mean: float
    sd: float
    n: int | None
    source: str
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", _reference_method(self.method))
        if self.measurement not in MEASUREMENTS:
            raise ReferenceTableError(f"measurement {self.measurement!r} is not one of {', '.join(MEASUREMENTS)}")
        if muscle_key(self.muscle) != self.muscle:
            raise ReferenceTableError(f"muscle {self.muscle!r} is not in canonical order ({muscle_key(self.muscle)})")
        if level_key(self.levels) != self.levels:
            raise ReferenceTableError(f"levels {self.levels!r} is not canonical ({level_key(self.levels)})")
        if self.sex not in _ROW_SEXES:
            raise ReferenceTableError(f"sex {self.sex!r} is not one of {', '.join(_ROW_SEXES)}")
        if self.age_low is not None and self.age_high is not None and self.age_low > self.age_high:
            raise ReferenceTableError(f"age band {self.age_low}-{self.age_high} is empty")
        if self.age_specific and self.age_low is None and self.age_high is None:
            raise ReferenceTableError("an age-specific row needs at least one age bound")
        if not (math.isfinite(self.mean) and math.isfinite(self.sd) and self.sd > 0):
            raise ReferenceTableError(f"mean {self.mean} and sd {self.sd} must be finite, sd positive")
        if self.n is not None and self.n < 2:
            raise ReferenceTableError(f"n {self.n} must be at least 2")
        if not self.source:
            raise ReferenceTableError("every row needs a source")

    @property
    def key(self) -> tuple:
        """What makes a row unique in its table."""
        return (self.method, self.muscle, self.measurement, self.levels, self.sex, self.age_low, self.age_high)

    def age_band(self) -> str:
        low = "?" if self.age_low is None else str(self.age_low)
        high = "?" if self.age_high is None else str(self.age_high)
        return f"{low}-{high} y"


@dataclass(frozen=True)
class ReferenceTable:
    """A versioned published table: its rows and the short citations of their sources."""

    version: str
    rows: tuple[ReferenceRow, ...]
    citations: dict[str, str] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: dict[tuple, int] = {}
        for number, row in enumerate(self.rows, start=1):
            if row.key in seen:
                raise ReferenceTableError(
                    f"{self.version}: row {number} repeats the key of row {seen[row.key]}: {row.key}")
            seen[row.key] = number
            if self.citations and row.source not in self.citations:
                raise ReferenceTableError(
                    f"{self.version}: row {number} names source {row.source!r}, which has no citation")

    def citation(self, source: str) -> str:
        return self.citations.get(source, source)


def _optional_int(text: str, what: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ReferenceTableError(f"{what} {text!r} is not a whole number") from None


def _float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ReferenceTableError(f"{what} {text!r} is not a number") from None


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ReferenceTableError(f"{path}: missing columns {', '.join(missing)}")
        return list(reader)


def load_table(path: str | Path, version: str | None = None) -> ReferenceTable:
    """Read a published table CSV and the sources CSV beside it (``NAME-sources.csv``).

    Parameters
    ----------
    path : path
        The table, e.g. ``reference-v1.csv``.
    version : str, optional
        Defaults to the file name without ``.csv``.

    Raises
    ------
    ReferenceTableError
        Naming the file and line of a row that does not parse or validate.
    """
    path = Path(path)
    version = version or path.stem
    rows: list[ReferenceRow] = []
    for line, raw in enumerate(_read_csv(path, _TABLE_COLUMNS), start=2):
        try:
            specific = raw["age_specific"].strip().lower()
            if specific not in ("yes", "no"):
                raise ReferenceTableError(f"age_specific {raw['age_specific']!r} must be yes or no")
            rows.append(ReferenceRow(
                method=raw["method"].strip(), muscle=raw["muscle"].strip(),
                measurement=raw["measurement"].strip(), levels=raw["levels"].strip(), sex=raw["sex"].strip(),
                age_low=_optional_int(raw["age_low"], "age_low"), age_high=_optional_int(raw["age_high"], "age_high"),
                age_specific=specific == "yes", mean=_float(raw["mean"], "mean"), sd=_float(raw["sd"], "sd"),
                n=_optional_int(raw["n"], "n"), source=raw["source"].strip(), note=raw["note"].strip(),
            ))
        except ReferenceTableError as exc:
            raise ReferenceTableError(f"{path}, line {line}: {exc}") from None
    citations: dict[str, str] = {}
    links: dict[str, str] = {}
    sources = path.with_name(f"{path.stem}-sources.csv")
    if sources.exists():
        for raw in _read_csv(sources, _SOURCE_COLUMNS):
            citations[raw["source"].strip()] = raw["citation"].strip()
            links[raw["source"].strip()] = raw["link"].strip()
    try:
        return ReferenceTable(version, tuple(rows), citations, links)
    except ReferenceTableError as exc:
        raise ReferenceTableError(f"{path}: {exc}") from None


@functools.lru_cache(maxsize=1)
def published_table() -> ReferenceTable:
    """The table shipped with this version of musclenode (:data:`PUBLISHED_VERSION`)."""
    with resources.as_file(resources.files("reports") / "data" / f"{PUBLISHED_VERSION}.csv") as path:
        return load_table(path, PUBLISHED_VERSION)


# ---------------------------------------------------------------------------------------------
# Site reference: centile curves (reports.centiles)


# ---------------------------------------------------------------------------------------------
# Numbers


def z_score(value: float, mean: float, sd: float) -> float:
    """(value − mean) / sd."""
    if not sd > 0:
        raise ValueError(f"sd must be positive, got {sd}")
    return (value - mean) / sd


def normal_percentile(z: float) -> float:
    """100 × Φ(z), the standard normal cumulative distribution function, in percent."""
    return 50.0 * (1.0 + math.erf(z / math.sqrt(2.0)))


# ---------------------------------------------------------------------------------------------
# Lookup


@dataclass(frozen=True)
class Stratum:
    """The reference group or model a measurement was compared with.

    Attributes
    ----------
    kind : {"published", "site"}
    version : str
        Published table version (``reference-v1``) or the site reference's title
        (``NAME version V``): what every result names.
    description : str
        For people: method, muscle, levels, and the group or the model's covariates.
    mean, sd : float or None
        The published group's mean and SD; None for a site reference (not a normal model).
    n : int or None
    source : str
        Source key of the published row, or the site reference's name.
    citation : str
    note : str
    bands : tuple of float
        The reference values at the z-scores :data:`Z_BANDS` (for a published group
        mean + z SD; for a site reference the person's centiles).
    equation : str
        How z was computed, with the numbers, for the SR.
    curves : CentileCurves or None
        A site reference's centile curves against age for the person's sex, BMI and site.
    """

    kind: str
    version: str
    description: str
    mean: float | None
    sd: float | None
    n: int | None
    source: str
    citation: str
    note: str = ""
    bands: tuple[float, ...] = ()
    equation: str = ""
    curves: CentileCurves | None = None

    def at(self, z: float) -> float:
        """The reference value at one of :data:`Z_BANDS`."""
        return self.bands[Z_BANDS.index(z)]


@dataclass(frozen=True)
class Comparison:
    """One measurement against the reference standard.

    ``z`` and ``percentile`` are None exactly when ``reason`` says why there is no comparison.
    """

    value: float
    method: ReferenceMethod
    muscle: str
    measurement: str
    levels: str | None
    z: float | None
    percentile: float | None
    stratum: Stratum | None
    reason: str | None
    reference_version: str
    notes: tuple[str, ...] = ()
    percentile_basis: str = PERCENTILE_BASIS


def _describe(row: ReferenceRow) -> str:
    who = {Sex.FEMALE: "women", Sex.MALE: "men", ANY_SEX: "women and men"}[row.sex]
    ages = row.age_band() + ("" if row.age_specific else " (whole cohort)")
    return f"{row.method} {row.muscle} {row.measurement} {row.levels}, {who}, {ages}"


def _rank(indexed: tuple[int, ReferenceRow]) -> tuple:
    index, row = indexed
    specificity = (row.sex != ANY_SEX) + row.age_specific
    width = math.inf if row.age_low is None or row.age_high is None else row.age_high - row.age_low
    return (-specificity, row.n is None, -(row.n or 0), width, row.source, index)


def select_stratum(rows: Sequence[ReferenceRow],
                   patient: PatientContext) -> tuple[ReferenceRow | None, str | None, tuple[str, ...]]:
    """Choose among rows that already match method, muscle, measurement and levels.

    Returns
    -------
    row, reason, notes
        The chosen row (None with a reason when none fits the patient) and remarks on the choice.
    """
    age = patient.age_completed_years
    usable: list[tuple[int, ReferenceRow]] = []
    need_sex = need_age = 0
    other_sex: set[str] = set()
    outside: list[str] = []
    for index, row in enumerate(rows):
        if row.sex != ANY_SEX:
            if patient.sex is None:
                need_sex += 1
                continue
            if patient.sex != row.sex:
                other_sex.add(row.sex)
                continue
        if age is None:
            if row.age_specific:
                need_age += 1
                continue
        else:
            low = ADULT_AGE if row.age_low is None else row.age_low
            high = math.inf if row.age_high is None else row.age_high
            if not low <= age <= high:
                outside.append(row.age_band())
                continue
        usable.append((index, row))
    if usable:
        row = min(usable, key=_rank)[1]
        notes = []
        if age is None:
            notes.append(f"age unknown ({patient.why_missing('age_years')}): not checked against the cohort's "
                         f"ages {row.age_band()}")
        elif row.age_low is None or row.age_high is None:
            notes.append("the source does not state every bound of this group's ages")
        if len(usable) > 1:
            notes.append(f"chosen from {len(usable)} matching groups: most specific (sex, age band), then larger n")
        return row, None, tuple(notes)
    reasons = []
    if need_sex:
        reasons.append(f"sex is missing ({patient.why_missing('sex')}) and {need_sex} of the matching groups "
                       "are sex-specific")
    if other_sex:
        reasons.append(f"sex {patient.sex}: the groups are for {' and '.join(sorted(other_sex))} only")
    if need_age:
        reasons.append(f"age is missing ({patient.why_missing('age_years')}) and {need_age} of the matching "
                       "groups are age bands")
    if outside:
        reasons.append(f"age {age} is outside the groups' ages ({', '.join(sorted(set(outside)))})")
    return None, "no reference group fits this patient: " + "; ".join(reasons), ()


def _no_method_reason(method: ReferenceMethod, version: str) -> str:
    if method is ReferenceMethod.T1T2_THRESHOLD:
        return (f"no reference for this method: {version} has no t1t2_threshold groups; a fat percentage from "
                "T1/T2 thresholding is not the quantity a Dixon fat fraction is and is never compared with Dixon "
                "references (Masi et al. 2023; Wesselink et al. 2024)")
    return f"no reference for this method: {version} has no {method} groups"


def _published(method: ReferenceMethod, muscle: str, measurement: str, levels: str | None,
               patient: PatientContext, table: ReferenceTable) -> tuple[Stratum | None, str | None, tuple[str, ...]]:
    same_method = [r for r in table.rows if r.method == method]
    if not same_method:
        return None, _no_method_reason(method, table.version), ()
    same_quantity = [r for r in same_method if r.muscle == muscle and r.measurement == measurement]
    if not same_quantity:
        return None, f"{table.version} has no {method} {measurement} reference for {muscle}", ()
    available = sorted({r.levels for r in same_quantity})
    if levels is None:
        return None, (f"the measurement's vertebral levels are unknown, and the references are level-specific "
                      f"(available for {muscle}: {', '.join(available)})"), ()
    rows = [r for r in same_quantity if r.levels == levels]
    if not rows:
        return None, (f"{table.version} has no {method} {muscle} reference over {levels} "
                      f"(available: {', '.join(available)})"), ()
    row, reason, notes = select_stratum(rows, patient)
    if row is None:
        return None, reason, notes
    equation = f"z = (value - mean) / SD, with the group's mean {row.mean:.4g} and SD {row.sd:.4g}"
    stratum = Stratum(kind="published", version=table.version, description=_describe(row), mean=row.mean,
                      sd=row.sd, n=row.n, source=row.source, citation=table.citation(row.source), note=row.note,
                      bands=tuple(row.mean + z * row.sd for z in Z_BANDS), equation=equation)
    return stratum, None, notes


def _site(method: ReferenceMethod, muscle: str, measurement: str, levels: str | None, value: float,
          patient: PatientContext, site: SiteReference
          ) -> tuple[Stratum | None, float | None, str | None, tuple[str, ...], bool]:
    """A site reference's comparison: ``(stratum, z, reason, notes, final)``.

    ``final`` is True when the reason must stand (the person is outside what the model was
    fitted on) rather than send the comparison on to the published table.
    """
    title = site.title
    model = site.find(method, muscle, measurement, levels)
    if model is None:
        return None, None, f"site reference {title} has no {method} {muscle} {measurement} model over {levels}", (), False
    lacking = [n for n in ("age_years", "sex", "bmi") if getattr(patient, n) is None]
    if lacking:
        why = "; ".join(f"{n.replace('_years', '')} missing ({patient.why_missing(n)})" for n in lacking)
        return None, None, f"site reference {title} needs age, sex and BMI: {why}", (), False
    who = Covariates(float(patient.age_years), str(patient.sex), float(patient.bmi), site.site)
    if who.sex not in model.sexes:  # a group the cohort did not have, like a muscle it did not measure
        return None, None, f"site reference {title} was fitted on sex {'+'.join(model.sexes)} only", (), False
    refusal = model.refusal(who)
    if refusal:
        return None, None, f"no z-score from site reference {title}: {refusal}", (), True
    notes = []
    if model.levels is None and levels is not None:
        notes.append(f"the site model was fitted without levels; the measurement is over {levels}")
    if len(model.sites) > 1 and site.site is None:
        notes.append(f"compared with the average of the site reference's {len(model.sites)} sites "
                     "(reference.site_name names this node's site)")
    calibration = model.calibration
    if calibration.get("calibrated") is False:
        notes.append("the site reference failed its held-out calibration: " + "; ".join(calibration["problems"]))
    z = model.z(value, who)
    bands = tuple(float(v) for v in model.value_at(list(Z_BANDS), who))
    median = bands[Z_BANDS.index(0.0)]
    unit = "%" if measurement == "fat_fraction_percent" else "mm2"
    sex = {Sex.FEMALE: "women", Sex.MALE: "men"}.get(who.sex, who.sex)
    terms = ["age"] + (["sex"] if "male" in model.mu else []) + (["BMI"] if "bmi" in model.mu else []) \
        + (["site"] if model.sites else [])
    description = (f"{method} {muscle} {measurement} {model.levels or 'levels not given'}, site controls, centile "
                   f"curves of {', '.join(terms)} for {sex} aged {who.age:.0f}, BMI {who.bmi:.1f}"
                   f"{f', site {who.site}' if who.site else ''} (n {model.n}, {model.n_subjects} people, ages "
                   f"{model.age_range[0]:.0f}-{model.age_range[1]:.0f})")
    equation = (f"z = normal quantile of the value's centile in site reference {title} for this person "
                f"(sinh-arcsinh distribution on the {'logit' if model.transform == 'logit_percent' else 'log'} "
                f"scale); median {median:.4g} {unit}, 5th-95th centiles {bands[1]:.4g}-{bands[5]:.4g} {unit}")
    stratum = Stratum(kind="site", version=title, description=description, mean=None, sd=None, n=model.n,
                      source=site.name, citation=f"site reference {title}", note="", bands=bands,
                      equation=equation, curves=model.curves(who))
    return stratum, z, None, tuple(notes), True


def compare(value: float, *, method: str, muscle: str | Iterable[str], measurement: str, levels: str | None,
            patient: PatientContext, table: ReferenceTable | None = None,
            site: SiteReference | None = None) -> Comparison:
    """Compare one measurement with the reference standard.

    Parameters
    ----------
    value : float
        The measurement (fat fraction in percent, or CSA in mm²).
    method : str
        How the value was measured: a :class:`~inference.vocabulary.ReferenceMethod`, or a
        :class:`~inference.vocabulary.FatMethod`, compared under its reference method (``gmm3``
        counts as ``t1t2_threshold``). Only references of the same method are used; the result
        records the reference method.
    muscle : str or iterable of str
        A muscle or group (see :func:`muscle_key`).
    measurement : str
        One of :data:`MEASUREMENTS`.
    levels : str or None
        Vertebral levels the value covers (see :func:`level_key`); None when unknown.
    patient : PatientContext
    table : ReferenceTable, optional
        Defaults to :func:`published_table`.
    site : SiteReference, optional
        Preferred when it has a model for this measurement and the patient has what it needs.

    Returns
    -------
    Comparison
        With z-score, percentile and stratum, or with the reason there is none.
    """
    if not math.isfinite(value):
        raise ValueError(f"value must be finite, got {value}")
    if measurement not in MEASUREMENTS:
        raise ReferenceTableError(f"measurement {measurement!r} is not one of {', '.join(MEASUREMENTS)}")
    muscle = muscle_key(muscle)
    levels = None if levels is None else level_key(levels)
    reference = ReferenceMethod.of(method)
    if reference is None:
        raise ReferenceTableError(f"method {method!r} is neither a reference method "
                                  f"({', '.join(ReferenceMethod)}) nor a fat method of the pipeline")
    method = reference
    table = table or published_table()
    notes: list[str] = []
    stratum = reason = None
    if site is not None:
        stratum, z, site_reason, site_notes, final = _site(method, muscle, measurement, levels, value, patient, site)
        notes.extend(site_notes)
        if stratum is not None:
            return Comparison(value, method, muscle, measurement, levels, z, centile(z), stratum, None,
                              stratum.version, tuple(notes), CENTILE_BASIS)
        if final:
            return Comparison(value, method, muscle, measurement, levels, None, None, None, site_reason, site.title,
                              tuple(notes))
        notes.append(f"{site_reason}; published {table.version} used instead")
    stratum, reason, published_notes = _published(method, muscle, measurement, levels, patient, table)
    notes.extend(published_notes)
    if stratum is None:
        version = table.version if site is None else f"{site.title}, {table.version}"
        return Comparison(value, method, muscle, measurement, levels, None, None, None, reason, version, tuple(notes))
    z = z_score(value, stratum.mean, stratum.sd)
    return Comparison(value, method, muscle, measurement, levels, z, normal_percentile(z), stratum, None,
                      stratum.version, tuple(notes))
