"""Fit a site reference from the site's own control cohort (``musclenode reference fit``).

Published norms come from other scanners, protocols and populations. A site that has measured
its own healthy controls with musclenode can fit, per method × muscle × measurement × levels,

    value = b0 + b_age · age + b_male · [sex is M] + b_bmi · BMI + ε,

by ordinary least squares (:func:`numpy.linalg.lstsq`), and save the coefficients with the residual
SD, n and the ranges of age and BMI it was fitted on. :func:`reports.reference.compare` then gives
z = (x − predicted) / residual SD.

The cohort file is a CSV, one row per measured muscle side (and level), with columns

=======================  ==========================================================================
``patient_id``           who (also accepted: ``patient``, ``subject``, ``study_id``, ``study``, ``id``)
``muscle``               muscle key (:func:`reports.reference.muscle_key`)
``side``                 left / right / both (kept for the record; both sides are fitted together)
``level``                optional: vertebral levels (:func:`reports.reference.level_key`)
``age``                  years
``sex``                  F or M; rows with O or no sex are left out (the model has a binary sex term)
``bmi``                  kg/m²
``fat_fraction_percent`` and/or ``csa_mm2``; an empty cell means not measured
``method``               a reference method (``dixon_ff``, ``t1t2_threshold``) or a fat method
                         (``gmm3`` ...), fitted under its reference method
=======================  ==========================================================================

Both sides of a person enter as separate observations: the residual SD is then that of one side's
value, which is what a single measurement is compared with; ``n_subjects`` says how many people
stand behind the ``n`` observations. A term is dropped when it cannot be estimated (one sex only,
or no spread in BMI or age), and a group with fewer than :data:`MIN_OBSERVATIONS` observations is
not fitted; both are reported.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from inference.vocabulary import ReferenceMethod, Sex

from .reference import (
    MEASUREMENTS,
    ReferenceTableError,
    SiteModel,
    SiteReference,
    level_key,
    muscle_key,
)

__all__ = ["ID_COLUMNS", "MIN_OBSERVATIONS", "CohortError", "FitReport", "Observation", "describe", "fit_linear",
           "fit_site_reference", "read_cohort"]

MIN_OBSERVATIONS = 20
ID_COLUMNS = ("patient_id", "patient", "subject", "study_id", "study", "id")
_REQUIRED = ("muscle", "age", "sex", "bmi", "method")
_RANGES = {"fat_fraction_percent": (0.0, 100.0), "csa_mm2": (0.0, math.inf)}


class CohortError(ValueError):
    """The cohort file has a column or value that cannot be fitted."""


@dataclass(frozen=True)
class Observation:
    """One measured value of one person, with the covariates of the model."""

    subject: str
    method: str
    muscle: str
    measurement: str
    levels: str | None
    age: float
    sex: str
    bmi: float
    value: float


@dataclass(frozen=True)
class FitReport:
    """What was fitted and what was left out, for the command line and the log."""

    reference: SiteReference
    skipped_rows: tuple[str, ...]
    skipped_groups: tuple[str, ...]


def _number(text: str, what: str, line: int) -> float | None:
    text = (text or "").strip()
    if not text or text.lower() in ("n/a", "na", "nan"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise CohortError(f"line {line}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise CohortError(f"line {line}: {what} {text!r} is not finite")
    return value


def read_cohort(path: str | Path) -> tuple[list[Observation], list[str]]:
    """Observations from a cohort CSV, and the rows left out with the reason.

    Raises
    ------
    CohortError
        On a missing column, an unknown method or muscle, or a value that is not a number or out
        of range: a reference must not be fitted on data that does not mean what it says.
    """
    path = Path(path)
    observations: list[Observation] = []
    skipped: list[str] = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        missing = [c for c in _REQUIRED if c not in columns]
        id_column = next((c for c in ID_COLUMNS if c in columns), None)
        if id_column is None:
            missing.append("patient_id (or " + ", ".join(ID_COLUMNS[1:]) + ")")
        measured = [m for m in MEASUREMENTS if m in columns]
        if not measured:
            missing.append(" or ".join(MEASUREMENTS))
        if missing:
            raise CohortError(f"{path}: missing columns {', '.join(missing)}")
        for line, raw in enumerate(reader, start=2):
            method = ReferenceMethod.of((raw["method"] or "").strip())
            if method is None:
                raise CohortError(f"{path}, line {line}: method {raw['method']!r} is neither a reference method "
                                  f"({', '.join(ReferenceMethod)}) nor a fat method")
            try:
                muscle = muscle_key(raw["muscle"] or "")
                level_text = (raw.get("level") or "").strip()
                levels = level_key(level_text) if level_text else None
            except ReferenceTableError as exc:
                raise CohortError(f"{path}, line {line}: {exc}") from None
            subject = (raw[id_column] or "").strip()
            sex = (raw["sex"] or "").strip().upper()
            age = _number(raw["age"], "age", line)
            bmi = _number(raw["bmi"], "bmi", line)
            lacking = [what for what, v in (("id", subject), ("age", age), ("bmi", bmi)) if v in ("", None)]
            if sex not in (Sex.FEMALE, Sex.MALE):
                lacking.append(f"sex F or M (got {sex!r})")
            if lacking:
                skipped.append(f"line {line}: no {', '.join(lacking)}")
                continue
            for measurement in measured:
                value = _number(raw[measurement], measurement, line)
                if value is None:
                    continue
                low, high = _RANGES[measurement]
                if not low <= value <= high:
                    raise CohortError(f"{path}, line {line}: {measurement} {value:g} is outside {low:g}-{high:g}")
                observations.append(Observation(subject, method, muscle, measurement, levels, age, sex, bmi, value))
    return observations, skipped


def fit_linear(design: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, float]:
    """Ordinary least squares: coefficients and residual SD, √(RSS / (n − p)).

    Parameters
    ----------
    design : array (n, p)
        Columns of the model, the first usually all ones.
    values : array (n,)

    Raises
    ------
    ValueError
        When the design is rank-deficient or leaves no degrees of freedom.
    """
    n, p = design.shape
    if n <= p:
        raise ValueError(f"{n} observations for {p} coefficients")
    coefficients, _, rank, _ = np.linalg.lstsq(design, values, rcond=None)
    if rank < p:
        raise ValueError(f"design has rank {rank} < {p}: a term does not vary")
    residuals = values - design @ coefficients
    return coefficients, float(math.sqrt(float(residuals @ residuals) / (n - p)))


def _fit_group(name: str, key: tuple, group: Sequence[Observation]) -> tuple[SiteModel | None, str | None]:
    method, muscle, measurement, levels = key
    label = f"{method} {muscle} {measurement} {levels or '(no levels)'}"
    if len(group) < MIN_OBSERVATIONS:
        return None, f"{label}: {len(group)} observations, fewer than {MIN_OBSERVATIONS}"
    age = np.array([o.age for o in group], dtype=float)
    male = np.array([o.sex == Sex.MALE for o in group], dtype=float)
    bmi = np.array([o.bmi for o in group], dtype=float)
    values = np.array([o.value for o in group], dtype=float)
    sexes = tuple(s.value for s in (Sex.FEMALE, Sex.MALE) if any(o.sex == s for o in group))
    columns: dict[str, np.ndarray] = {"intercept": np.ones(len(group))}
    dropped = []
    # A term without spread cannot be estimated; fitting without it says so instead of failing.
    for term, column in (("age", age), ("male", male), ("bmi", bmi)):
        if np.ptp(column) > 0:
            columns[term] = column
        else:
            dropped.append(term)
    design = np.column_stack(list(columns.values()))
    try:
        coefficients, residual_sd = fit_linear(design, values)
    except ValueError as exc:
        return None, f"{label}: {exc}"
    if not residual_sd > 0:
        return None, f"{label}: the values fit exactly (residual SD 0); not a usable reference"
    fitted = dict(zip(columns, (float(c) for c in coefficients)))
    note = f"terms not fitted (no spread in the cohort): {', '.join(dropped)}" if dropped else ""
    model = SiteModel(
        name=name, method=method, muscle=muscle, measurement=measurement, levels=levels,
        coef_intercept=fitted["intercept"], coef_age=fitted.get("age"), coef_male=fitted.get("male"),
        coef_bmi=fitted.get("bmi"), residual_sd=residual_sd, n=len(group),
        n_subjects=len({o.subject for o in group}), age_min=float(age.min()), age_max=float(age.max()),
        bmi_min=float(bmi.min()), bmi_max=float(bmi.max()), sexes=sexes, note=note,
    )
    return model, None


def fit_site_reference(observations: Iterable[Observation], name: str,
                       skipped_rows: Sequence[str] = ()) -> FitReport:
    """Fit one model per method × muscle × measurement × levels.

    Parameters
    ----------
    observations : iterable of Observation
        From :func:`read_cohort`.
    name : str
        The site reference's name; results report it as the reference version.
    skipped_rows : sequence of str
        Rows :func:`read_cohort` left out, carried into the report.
    """
    groups: dict[tuple, list[Observation]] = {}
    for o in observations:
        groups.setdefault((o.method, o.muscle, o.measurement, o.levels), []).append(o)
    models: list[SiteModel] = []
    skipped_groups: list[str] = []
    for key in sorted(groups, key=lambda k: tuple("" if v is None else v for v in k)):
        model, problem = _fit_group(name, key, groups[key])
        if model is not None:
            models.append(model)
        else:
            skipped_groups.append(problem or "")
    return FitReport(SiteReference(name, tuple(models)), tuple(skipped_rows), tuple(skipped_groups))


def describe(report: FitReport) -> Iterable[str]:
    """Lines for people: each model's coefficients, residual SD and n; what was left out."""
    yield f"site reference {report.reference.name}: {len(report.reference.models)} models"
    for m in report.reference.models:
        terms = [f"{m.coef_intercept:.4g}"]
        for label, value in (("age", m.coef_age), ("male", m.coef_male), ("BMI", m.coef_bmi)):
            if value is not None:
                terms.append(f"{value:+.4g}*{label}")
        yield (f"  {m.method} {m.muscle} {m.measurement} {m.levels or '(no levels)'}: {' '.join(terms)}, "
               f"residual SD {m.residual_sd:.4g}, n {m.n} ({m.n_subjects} people), "
               f"age {m.age_min:g}-{m.age_max:g}, sexes {'+'.join(m.sexes)}" + (f"; {m.note}" if m.note else ""))
    for problem in report.skipped_groups:
        yield f"  not fitted: {problem}"
    if report.skipped_rows:
        yield f"  {len(report.skipped_rows)} rows left out, e.g. {report.skipped_rows[0]}"
