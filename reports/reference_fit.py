"""Fit a site reference as centile curves from the site's own control cohort (``musclenode reference fit``).

Per method x muscle (sides pooled) x measurement x vertebral levels (when the cohort gives
levels), the model of :mod:`reports.centiles` is fitted by maximum likelihood with statsmodels'
:class:`~statsmodels.base.model.GenericLikelihoodModel` (BFGS, then standard errors from the
numerical Hessian): a sinh-arcsinh distribution on the logit (fat) or log (CSA) scale whose
location follows a cubic B-spline of age, sex, BMI and site, and whose scale follows a B-spline
of age and sex. The spline's degrees of freedom for the location are chosen among
:data:`AGE_DF_CHOICES` by AIC (GAMLSS's generalised AIC with penalty 2; on synthetic cohorts
BIC's heavier penalty chose too stiff a curve at the ends of the age range).

Held-out calibration
--------------------
People (never single sides) are split by a hash of their identifier: :data:`HELD_OUT` of them
are held out, the model is fitted on the others, and the held-out people's z-scores must have
mean ≈ 0, SD ≈ 1 and 90 % of them inside the 5th-95th centile band (:func:`calibrate`). The
model saved is the one fitted without them, so what the report says is what is used. The same
function checks a saved model against a new cohort (``musclenode reference calibrate``).

The cohort file
---------------
A CSV, one row per measured muscle side (and level). Both the ``cohort.csv`` that ``musclenode
process`` writes and a hand-made file are read:

=================================  ===========================================================
``patient_id``                     who (also: ``patient``, ``subject``, ``study_id``, ``study``,
                                   ``id``)
``muscle``                         muscle key (:func:`reports.reference.muscle_key`)
``side``                           left / right; ``both`` rows (the two sides together) are
                                   left out, the sides are pooled as separate observations
``level``                          optional: vertebral levels; ``all`` or empty means none
``age``, ``sex``, ``bmi``          years, F or M, kg/m²
``fat_fraction_percent`` or        fat in percent; the method in ``method`` or ``fat_method``
``fat_percent``
``csa_mm2`` or ``mean_csa_mm2``    cross-sectional area
``method`` or ``fat_method``       a reference method or a fat method (:class:`ReferenceMethod`)
``site``, ``scanner``              optional: the site's term uses ``site`` when it has two or
                                   more values, else ``scanner``
=================================  ===========================================================
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from inference.vocabulary import ReferenceMethod, Sex

from .centiles import (
    TRANSFORMS,
    CentileModel,
    SiteReference,
    shash_logpdf,
    spline_basis,
    spline_knots,
    to_model_scale,
)
from .reference import ReferenceTableError, level_key, muscle_key

__all__ = [
    "AGE_DF_CHOICES",
    "HELD_OUT",
    "ID_COLUMNS",
    "MIN_PEOPLE",
    "CohortError",
    "FitReport",
    "Observation",
    "calibrate",
    "describe",
    "fit_model",
    "fit_site_reference",
    "held_out",
    "read_cohort",
]

ID_COLUMNS = ("patient_id", "patient", "subject", "study_id", "study", "id")
#: Share of the people held out for calibration.
HELD_OUT = 0.2
#: Fewest people a model is fitted on (after the hold-out).
MIN_PEOPLE = 30
#: Fewest held-out people a calibration is judged on.
MIN_CALIBRATION_PEOPLE = 10
#: Degrees of freedom of the location's age spline, chosen by AIC.
AGE_DF_CHOICES = (3, 4, 5, 6)
#: Degrees of freedom of the scale's age spline.
SIGMA_DF = 3
#: The 5th-95th centile band in z: Φ⁻¹(0.95).
Z95 = 1.6448536269514722
_VALUE_COLUMNS = {"fat_fraction_percent": ("fat_fraction_percent", "fat_percent"),
                  "csa_mm2": ("csa_mm2", "mean_csa_mm2")}
_RANGES = {"fat_fraction_percent": (0.0, 100.0), "csa_mm2": (0.0, math.inf)}


class CohortError(ValueError):
    """The cohort file has a column or value that cannot be fitted."""


@dataclass(frozen=True)
class Observation:
    """One measured value of one person's side, with the covariates of the model."""

    subject: str
    method: str
    muscle: str
    measurement: str
    levels: str | None
    age: float
    sex: str
    bmi: float
    value: float
    site: str | None = None
    scanner: str | None = None


@dataclass(frozen=True)
class FitReport:
    """What was fitted and what was left out, for the command line and the log."""

    reference: SiteReference
    skipped_rows: tuple[str, ...]
    skipped_groups: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Reading


def _number(text: str | None, what: str, line: int) -> float | None:
    text = (text or "").strip()
    if not text or text.lower() in ("n/a", "na", "nan", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise CohortError(f"line {line}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise CohortError(f"line {line}: {what} {text!r} is not finite")
    return value


def read_cohort(path: str | Path) -> tuple[list[Observation], list[str]]:
    """Observations from a cohort CSV (see the module notes), and the rows left out with the reason.

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
        missing = [c for c in ("muscle", "age", "sex", "bmi") if c not in columns]
        id_column = next((c for c in ID_COLUMNS if c in columns), None)
        method_column = next((c for c in ("method", "fat_method") if c in columns), None)
        if id_column is None:
            missing.append("patient_id (or " + ", ".join(ID_COLUMNS[1:]) + ")")
        if method_column is None:
            missing.append("method (or fat_method)")
        measured = {m: next(c for c in names if c in columns) for m, names in _VALUE_COLUMNS.items()
                    if any(c in columns for c in names)}
        if not measured:
            missing.append(" or ".join(n for names in _VALUE_COLUMNS.values() for n in names))
        if missing:
            raise CohortError(f"{path}: missing columns {', '.join(missing)}")
        for line, raw in enumerate(reader, start=2):
            side = (raw.get("side") or "").strip().lower()
            if side == "both":
                continue  # the two sides together: the sides are in the file on their own
            method = ReferenceMethod.of((raw[method_column] or "").strip())
            if method is None:
                if not (raw[method_column] or "").strip():
                    skipped.append(f"line {line}: no method")
                    continue
                raise CohortError(f"{path}, line {line}: method {raw[method_column]!r} is neither a reference "
                                  f"method ({', '.join(ReferenceMethod)}) nor a fat method")
            try:
                muscle = muscle_key(raw["muscle"] or "")
                level_text = (raw.get("level") or "").strip()
                levels = level_key(level_text) if level_text and level_text.lower() != "all" else None
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
            site = (raw.get("site") or "").strip() or None
            scanner = (raw.get("scanner") or "").strip() or None
            for measurement, column in measured.items():
                value = _number(raw[column], measurement, line)
                if value is None:
                    continue
                low, high = _RANGES[measurement]
                if not low <= value <= high or (measurement == "csa_mm2" and value == 0):
                    raise CohortError(f"{path}, line {line}: {measurement} {value:g} is outside {low:g}-{high:g}")
                observations.append(Observation(subject, str(method), muscle, measurement, levels, age, sex, bmi,
                                                value, site, scanner))
    return observations, skipped


# ---------------------------------------------------------------------------------------------
# Fitting


def held_out(subject: str, share: float = HELD_OUT) -> bool:
    """Whether a person is held out: a hash of the identifier, the same in every run and order."""
    digest = hashlib.sha256(subject.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def _likelihood_model():
    from statsmodels.base.model import GenericLikelihoodModel

    class SinhArcsinhRegression(GenericLikelihoodModel):
        """Location and log scale linear in their designs; skewness and log tail weight constant."""

        def __init__(self, endog, mu_design, sigma_design, names):
            self.mu_design, self.sigma_design = mu_design, sigma_design
            super().__init__(endog, np.column_stack([mu_design, sigma_design]),
                             extra_params_names=["epsilon", "log_delta"])
            self.exog_names[:len(names)] = names
            # The two designs share columns (intercept, age): count the parameters, not the rank.
            self.k_constant = 1
            self.df_model = len(names) - 1
            self.df_resid = len(endog) - len(names) - 2

        def split(self, params):
            k, m = self.mu_design.shape[1], self.sigma_design.shape[1]
            return params[:k], params[k:k + m], params[k + m], params[k + m + 1]

        def loglikeobs(self, params):
            beta_mu, beta_sigma, epsilon, log_delta = self.split(params)
            return shash_logpdf(self.endog, self.mu_design @ beta_mu, np.exp(self.sigma_design @ beta_sigma),
                                epsilon, np.exp(log_delta))

    return SinhArcsinhRegression


def _terms(group: Sequence[Observation], batch: str | None) -> tuple[bool, bool, list[str]]:
    sexes = {o.sex for o in group}
    bmis = {o.bmi for o in group}
    sites = sorted({getattr(o, batch) for o in group if getattr(o, batch)}) if batch else []
    return len(sexes) > 1, len(bmis) > 1, sites if len(sites) > 1 else []


def fit_model(group: Sequence[Observation], batch: str | None = None, age_df: int | None = None) -> CentileModel:
    """Fit one centile model to the observations of one method x muscle x measurement x levels.

    Parameters
    ----------
    group : sequence of Observation
    batch : {"site", "scanner"} or None
        The observations' attribute that the site term uses.
    age_df : int, optional
        Degrees of freedom of the location's age spline; default: the best of
        :data:`AGE_DF_CHOICES` by AIC.

    Raises
    ------
    ValueError
        When the optimiser does not converge for any choice of degrees of freedom.
    """
    first = group[0]
    transform = TRANSFORMS[first.measurement]
    ages = np.array([o.age for o in group])
    male = np.array([o.sex == Sex.MALE for o in group], dtype=np.float64)
    bmi = np.array([o.bmi for o in group])
    y = to_model_scale([o.value for o in group], transform)
    with_sex, with_bmi, sites = _terms(group, batch)
    site_of = [getattr(o, batch) if batch else None for o in group]
    low, high = float(ages.min()), float(ages.max())
    bmi_centre = round(float(bmi.mean()), 2)
    knots_sigma = spline_knots(ages, SIGMA_DF, low, high)

    def design(knots, location):
        spline = spline_basis(ages, knots)
        columns = {"intercept": np.ones_like(ages)}
        columns.update({f"age{i + 1}": spline[:, i] for i in range(spline.shape[1])})
        if with_sex:
            columns["male"] = male
        if with_bmi and location:
            columns["bmi"] = bmi - bmi_centre
        if location:
            for site in sites[:-1]:
                columns[f"site:{site}"] = np.array([1.0 if s == site else -1.0 if s == sites[-1] else 0.0
                                                    for s in site_of])
        return columns

    sigma_columns = design(knots_sigma, location=False)
    Model = _likelihood_model()
    best: tuple[float, Any, dict, list[float], int] | None = None
    failures = []
    for df in ([age_df] if age_df else AGE_DF_CHOICES):
        knots_mu = spline_knots(ages, df, low, high)
        mu_columns = design(knots_mu, location=True)
        mu_design = np.column_stack(list(mu_columns.values()))
        sigma_design = np.column_stack(list(sigma_columns.values()))
        # Start from least squares: location by OLS, constant scale, no skew, normal tails.
        beta, *_ = np.linalg.lstsq(mu_design, y, rcond=None)
        residual_sd = float(np.std(y - mu_design @ beta)) or 1.0
        start = np.concatenate([beta, [math.log(residual_sd)], np.zeros(sigma_design.shape[1] - 1), [0.0, 0.0]])
        names = list(mu_columns) + [f"sigma_{n}" for n in sigma_columns]
        model = Model(y, mu_design, sigma_design, names)
        result = model.fit(start_params=start, method="bfgs", maxiter=5000, disp=False)
        converged = bool(result.mle_retvals.get("converged", False))
        if not converged or not np.isfinite(result.llf):
            failures.append(f"df {df}: the optimiser did not converge")
            continue
        aic = -2.0 * result.llf + 2.0 * len(start)
        if best is None or aic < best[0]:
            best = (aic, result, mu_columns, knots_mu, df)
    if best is None:
        raise ValueError("; ".join(failures))
    aic, result, mu_columns, knots_mu, chosen_df = best
    params = np.asarray(result.params)
    k, m = len(mu_columns), len(sigma_columns)
    return CentileModel(
        method=first.method, muscle=first.muscle, measurement=first.measurement, levels=first.levels,
        transform=transform, knots_mu=[float(v) for v in knots_mu], knots_sigma=[float(v) for v in knots_sigma],
        mu={n: float(v) for n, v in zip(mu_columns, params[:k])},
        log_sigma={n: float(v) for n, v in zip(sigma_columns, params[k:k + m])},
        epsilon=float(params[k + m]), log_delta=float(params[k + m + 1]), bmi_centre=bmi_centre,
        sites=sites, age_range=[low, high], bmi_range=[float(bmi.min()), float(bmi.max())],
        sexes=sorted({o.sex for o in group}), n=len(group), n_subjects=len({o.subject for o in group}),
        fit={"log_likelihood": float(result.llf), "aic": float(aic),
             "bic": float(-2.0 * result.llf + math.log(len(y)) * len(params)),
             "age_df": chosen_df, "parameters": len(params), "optimiser": "BFGS (statsmodels)",
             "standard_errors": {n: float(v) for n, v in zip(result.model.exog_names, np.asarray(result.bse))}
             if np.all(np.isfinite(result.bse)) else None},
    )


# ---------------------------------------------------------------------------------------------
# Calibration


def calibrate(model: CentileModel, observations: Iterable[Observation], batch: str | None = None) -> dict[str, Any]:
    """How well a model's z-scores describe observations it was not fitted on.

    Observations outside the model's ages, BMIs or sexes are left out (counted). The model is
    calibrated when the z-scores have mean within max(0.1, 3/√people) of 0, SD within
    max(0.1, 3/√(2 people)) of 1, and the share inside the 5th-95th centile band within
    max(0.03, 3 √(0.09/people)) of 0.90; the standard errors count people, not sides (the two
    sides of a person are not independent), so the bounds are conservative.

    Returns
    -------
    dict
        ``people``, ``observations``, ``outside_range``, and when at least
        :data:`MIN_CALIBRATION_PEOPLE` people remain: ``mean_z``, ``sd_z``, ``inside_5_95``,
        ``below_5``, ``above_95``, ``tolerance``, ``calibrated`` and ``problems``.
    """
    usable, outside = [], 0
    for o in observations:
        if (o.method, o.muscle, o.measurement) != (model.method, model.muscle, model.measurement):
            continue
        if model.levels is not None and o.levels != model.levels:
            continue
        if (not model.age_range[0] <= o.age <= model.age_range[1] or not model.bmi_range[0] <= o.bmi <= model.bmi_range[1]
                or o.sex not in model.sexes):
            outside += 1
            continue
        usable.append(o)
    people = len({o.subject for o in usable})
    report: dict[str, Any] = {"people": people, "observations": len(usable), "outside_range": outside}
    if people < MIN_CALIBRATION_PEOPLE:
        report.update(calibrated=None, problems=[f"only {people} people to check against (at least "
                                                 f"{MIN_CALIBRATION_PEOPLE} needed): not assessed"])
        return report
    z = model.z_many([o.value for o in usable], [o.age for o in usable], [o.sex for o in usable],
                     [o.bmi for o in usable], [getattr(o, batch) if batch else None for o in usable])
    mean, sd = float(np.mean(z)), float(np.std(z, ddof=1))
    inside = float(np.mean(np.abs(z) <= Z95))
    tolerance = {"mean_z": max(0.1, 3 / math.sqrt(people)), "sd_z": max(0.1, 3 / math.sqrt(2 * people)),
                 "inside_5_95": max(0.03, 3 * math.sqrt(0.09 / people))}
    problems = []
    if abs(mean) > tolerance["mean_z"]:
        problems.append(f"mean z {mean:+.2f} (allowed ±{tolerance['mean_z']:.2f})")
    if abs(sd - 1) > tolerance["sd_z"]:
        problems.append(f"SD of z {sd:.2f} (allowed 1 ± {tolerance['sd_z']:.2f})")
    if abs(inside - 0.9) > tolerance["inside_5_95"]:
        problems.append(f"{100 * inside:.1f} % inside the 5th-95th centiles (allowed 90 ± "
                        f"{100 * tolerance['inside_5_95']:.1f} %)")
    report.update(mean_z=round(mean, 4), sd_z=round(sd, 4), inside_5_95=round(inside, 4),
                  below_5=round(float(np.mean(z < -Z95)), 4), above_95=round(float(np.mean(z > Z95)), 4),
                  tolerance={k: round(v, 4) for k, v in tolerance.items()}, calibrated=not problems,
                  problems=problems)
    return report


# ---------------------------------------------------------------------------------------------
# The whole cohort


def _batch(observations: Sequence[Observation], batch: str) -> str | None:
    if batch in ("site", "scanner"):
        return batch
    if batch == "none":
        return None
    for attribute in ("site", "scanner"):
        if len({getattr(o, attribute) for o in observations if getattr(o, attribute)}) > 1:
            return attribute
    return None


def _range(values: list[float]) -> list[float] | None:
    return [min(values), max(values)] if values else None


def fit_site_reference(observations: Sequence[Observation], name: str, version: str = "1", *,
                       skipped_rows: Sequence[str] = (), batch: str = "auto", share_held_out: float = HELD_OUT,
                       age_df: int | None = None, cohort_file: str | Path | None = None) -> FitReport:
    """Fit one centile model per method x muscle x measurement x levels, each calibrated on held-out people.

    Parameters
    ----------
    observations : sequence of Observation
        From :func:`read_cohort`.
    name, version : str
        How results name the reference (``NAME version VERSION``).
    skipped_rows : sequence of str
        Rows :func:`read_cohort` left out, carried into the report.
    batch : {"auto", "site", "scanner", "none"}
        What the site term uses; ``auto``: ``site`` when the cohort has two or more sites, else
        ``scanner`` when it has two or more scanners, else nothing.
    share_held_out : float
        Share of the people held out for calibration (0 fits on everyone, uncalibrated).
    age_df : int, optional
        Fixed degrees of freedom of the age spline instead of the BIC's choice.
    cohort_file : path, optional
        Recorded in the model with its SHA-256.
    """
    import statsmodels

    batch_attribute = _batch(observations, batch)
    groups: dict[tuple, list[Observation]] = {}
    for o in observations:
        groups.setdefault((o.method, o.muscle, o.measurement, o.levels), []).append(o)
    models: list[CentileModel] = []
    skipped_groups: list[str] = []
    for key in sorted(groups, key=lambda k: tuple("" if v is None else v for v in k)):
        group = groups[key]
        label = f"{key[0]} {key[1]} {key[2]} {key[3] or '(no levels)'}"
        fitting = [o for o in group if not held_out(o.subject, share_held_out)]
        checking = [o for o in group if held_out(o.subject, share_held_out)]
        people = len({o.subject for o in fitting})
        if people < MIN_PEOPLE:
            skipped_groups.append(f"{label}: {people} people to fit on, fewer than {MIN_PEOPLE}")
            continue
        try:
            model = fit_model(fitting, batch_attribute, age_df)
        except ValueError as exc:
            skipped_groups.append(f"{label}: {exc}")
            continue
        models.append(replace(model, calibration=calibrate(model, checking, batch_attribute)))
    cohort: dict[str, Any] = {
        "observations": len(observations), "people": len({o.subject for o in observations}),
        "age": _range([o.age for o in observations]), "bmi": _range([o.bmi for o in observations]),
        "sexes": sorted({o.sex for o in observations}),
        "sites": sorted({o.site for o in observations if o.site}),
        "scanners": sorted({o.scanner for o in observations if o.scanner}),
        "levels": sorted({o.levels for o in observations if o.levels}),
        "site_term": batch_attribute, "held_out_share": share_held_out,
        "held_out_people": len({o.subject for o in observations if held_out(o.subject, share_held_out)}),
    }
    if cohort_file is not None:
        path = Path(cohort_file)
        cohort["file"] = path.name
        cohort["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    software = {"statsmodels": statsmodels.__version__, "numpy": np.__version__}
    try:
        from importlib.metadata import version as installed

        software["musclenode"] = installed("musclenode")
    except Exception:  # not installed as a distribution (a source checkout)
        pass
    reference = SiteReference(name, version, tuple(models), cohort, software,
                              tuple(skipped_groups))
    return FitReport(reference, tuple(skipped_rows), tuple(skipped_groups))


def describe(report: FitReport) -> Iterable[str]:
    """Lines for people: each model's terms, ranges and held-out calibration; what was left out."""
    reference = report.reference
    cohort = reference.cohort
    yield (f"site reference {reference.title}: {len(reference.models)} models from {cohort.get('people')} people "
           f"({cohort.get('observations')} values); site term: {cohort.get('site_term') or 'none'}")
    for m in reference.models:
        terms = ["age spline df " + str(m.fit.get("age_df"))]
        if "male" in m.mu:
            terms.append("sex")
        if "bmi" in m.mu:
            terms.append("BMI")
        if m.sites:
            terms.append(f"{len(m.sites)} sites")
        c = m.calibration
        if c.get("calibrated") is None:
            calibration = "; ".join(c.get("problems", [])) or "not assessed"
        else:
            calibration = (f"held out {c['people']} people: mean z {c['mean_z']:+.2f}, SD {c['sd_z']:.2f}, "
                           f"{100 * c['inside_5_95']:.1f} % inside P5-P95"
                           + ("" if c["calibrated"] else " MISCALIBRATED: " + "; ".join(c["problems"])))
        yield (f"  {m.label}: {', '.join(terms)}; n {m.n} ({m.n_subjects} people), age {m.age_range[0]:.1f}-"
               f"{m.age_range[1]:.1f}, BMI {m.bmi_range[0]:.1f}-{m.bmi_range[1]:.1f}, sexes {'+'.join(m.sexes)}; "
               f"{calibration}")
    for problem in report.skipped_groups:
        yield f"  not fitted: {problem}"
    if report.skipped_rows:
        yield f"  {len(report.skipped_rows)} rows left out, e.g. {report.skipped_rows[0]}"
