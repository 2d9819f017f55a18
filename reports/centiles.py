"""Centile curves of a site reference: the model file and its numbers (no fitting here).

A site reference (``musclenode reference fit``, fitted by :mod:`reports.reference_fit`) holds,
per method x muscle (sides pooled) x measurement x vertebral levels, the distribution of the
measurement as a function of age, sex, BMI and site, in the way growth and brain charts are
built (GAMLSS: Rigby & Stasinopoulos 2005; the LMS method, Cole & Green 1992; brain charts,
Bethlehem et al. 2022; normative models with a sinh-arcsinh likelihood, Dinga et al. 2021):

1. the value is moved onto an unbounded scale: ``logit(fat / 100)`` for a fat fraction in
   percent (bounded by 0 and 100), ``log(area)`` for a CSA in mm² (bounded below by 0);
2. on that scale it follows a **sinh-arcsinh** distribution (Jones & Pewsey 2009) with
   location μ, scale σ, skewness ε and tail weight δ: ``y = μ + σ sinh((asinh(Z) + ε) / δ)``
   with Z standard normal. ε = 0, δ = 1 is the normal distribution;
3. μ = intercept + cubic B-spline of age + sex + BMI (linear, centred) + site;
   log σ = intercept + cubic B-spline of age + sex; ε and log δ are constants.
   Site enters μ in deviation coding: each site's offset from the average of the sites, which is
   what a person from an unnamed site is compared with.

The **z-score** is the normal quantile of the value's centile in that distribution,
``z = sinh(δ asinh((y − μ) / σ) − ε)``: exact for skewed and bounded values, unlike
(value − mean) / SD. The centile is ``100 Φ(z)``. Centile curves are the values of
``μ + σ sinh((asinh(Φ⁻¹(p)) + ε) / δ)`` moved back onto the measurement's scale.

Outside the ages and BMIs the model was fitted on, it gives no z-score (a spline does not
extrapolate); neither for a sex the cohort did not have.

The file is JSON (:data:`SCHEMA`), written by :func:`save_site_reference`; it carries its name
and version, the cohort it came from and the calibration on a held-out part of that cohort.
Only numpy and scipy are needed to use it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy.interpolate import BSpline
from scipy.special import expit, logit, ndtr, ndtri

from inference.vocabulary import ReferenceMethod, Sex, muscle_group, vertebra_range

__all__ = [
    "SCHEMA",
    "SPLINE_DEGREE",
    "TRANSFORMS",
    "CentileCurves",
    "CentileModel",
    "Covariates",
    "ModelFileError",
    "SiteReference",
    "load_site_reference",
    "save_site_reference",
    "shash_logpdf",
    "shash_quantile",
    "shash_z",
    "spline_basis",
    "to_model_scale",
    "from_model_scale",
]

SCHEMA = "musclenode-reference-model/1"
SPLINE_DEGREE = 3
#: Measurement -> the transform onto the model's scale.
TRANSFORMS = {"fat_fraction_percent": "logit_percent", "csa_mm2": "log"}
#: Fat fractions are clipped into this range (percent) before the logit: 0 and 100 have none.
FAT_CLIP_PERCENT = (0.05, 99.95)
#: The centiles drawn as curves (percent).
CURVE_CENTILES = (5.0, 25.0, 50.0, 75.0, 95.0)


class ModelFileError(ValueError):
    """A site reference file that cannot be used."""


# ---------------------------------------------------------------------------------------------
# Numbers


def to_model_scale(values: Any, transform: str) -> np.ndarray:
    """Measurement values onto the model's unbounded scale (see :data:`TRANSFORMS`)."""
    values = np.asarray(values, dtype=np.float64)
    if transform == "logit_percent":
        return logit(np.clip(values, *FAT_CLIP_PERCENT) / 100.0)
    if transform == "log":
        if np.any(values <= 0):
            raise ValueError("a logarithmic reference needs positive values")
        return np.log(values)
    raise ModelFileError(f"unknown transform {transform!r}")


def from_model_scale(values: Any, transform: str) -> np.ndarray:
    """The inverse of :func:`to_model_scale`."""
    values = np.asarray(values, dtype=np.float64)
    if transform == "logit_percent":
        return 100.0 * expit(values)
    if transform == "log":
        return np.exp(values)
    raise ModelFileError(f"unknown transform {transform!r}")


def shash_z(y: Any, mu: Any, sigma: Any, epsilon: Any, delta: Any) -> np.ndarray:
    """z-score of ``y`` under the sinh-arcsinh distribution: ``sinh(δ asinh((y − μ)/σ) − ε)``."""
    r = (np.asarray(y, dtype=np.float64) - mu) / sigma
    return np.sinh(delta * np.arcsinh(r) - epsilon)


def shash_quantile(z: Any, mu: Any, sigma: Any, epsilon: Any, delta: Any) -> np.ndarray:
    """The value whose z-score is ``z``: ``μ + σ sinh((asinh(z) + ε) / δ)``."""
    return mu + sigma * np.sinh((np.arcsinh(np.asarray(z, dtype=np.float64)) + epsilon) / delta)


def shash_logpdf(y: Any, mu: Any, sigma: Any, epsilon: Any, delta: Any) -> np.ndarray:
    """Log density of the sinh-arcsinh distribution (Jones & Pewsey 2009, eq. 2)."""
    r = (np.asarray(y, dtype=np.float64) - mu) / sigma
    s = np.sinh(delta * np.arcsinh(r) - epsilon)
    return (np.log(delta) - np.log(sigma) - 0.5 * np.log1p(r * r) + 0.5 * np.log1p(s * s)
            - 0.5 * math.log(2.0 * math.pi) - 0.5 * s * s)


def spline_knots(ages: Sequence[float], df: int, low: float, high: float) -> list[float]:
    """Full knot vector of a cubic B-spline basis with ``df`` columns besides the intercept.

    ``df − 3`` interior knots at quantiles of the ages, boundary knots at ``low`` and ``high``
    repeated ``degree + 1`` times (as patsy's and R's ``bs``).
    """
    interior = df - SPLINE_DEGREE
    if interior < 0:
        raise ValueError(f"a cubic spline needs at least {SPLINE_DEGREE} degrees of freedom, not {df}")
    inner = list(np.quantile(np.asarray(ages, dtype=np.float64), np.linspace(0, 1, interior + 2)[1:-1]))
    return [low] * (SPLINE_DEGREE + 1) + [float(k) for k in inner] + [high] * (SPLINE_DEGREE + 1)


def spline_basis(x: Any, knots: Sequence[float]) -> np.ndarray:
    """B-spline columns at ``x`` (inside the boundary knots), without the first (the intercept's).

    Returns
    -------
    numpy.ndarray
        ``(len(x), len(knots) − degree − 2)``.
    """
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    knots = np.asarray(knots, dtype=np.float64)
    low, high = knots[0], knots[-1]
    if np.any(x < low - 1e-9) or np.any(x > high + 1e-9):
        raise ValueError(f"spline evaluated outside {low:g}-{high:g}")
    x = np.clip(x, low, high)
    basis = BSpline.design_matrix(x, knots, SPLINE_DEGREE).toarray()
    return basis[:, 1:]


# ---------------------------------------------------------------------------------------------
# One model


@dataclass(frozen=True)
class Covariates:
    """Who a value is compared for: age (years), sex (F or M), BMI (kg/m²) and site (or None)."""

    age: float
    sex: str
    bmi: float
    site: str | None = None


@dataclass(frozen=True)
class CentileCurves:
    """Centile curves against age for one person's sex, BMI and site, on the measurement's scale.

    ``values[i][j]`` is centile ``centiles[i]`` (percent) at ``ages[j]``; ``age`` is the person's,
    ``who`` says for whom in words.
    """

    ages: tuple[float, ...]
    centiles: tuple[float, ...]
    values: tuple[tuple[float, ...], ...]
    who: str
    age: float


@dataclass(frozen=True)
class CentileModel:
    """The centile curves of one method x muscle x measurement x levels (see the module notes).

    Attributes
    ----------
    method, muscle, measurement : str
        As in :mod:`reports.reference`; ``muscle`` is a canonical key, sides pooled.
    levels : str or None
        Vertebral levels (``"L3"``, ``"L1-L5"``) or None when the cohort gave none.
    transform : str
        ``logit_percent`` or ``log`` (:data:`TRANSFORMS`).
    knots_mu, knots_sigma : list of float
        Full knot vectors of the age splines of μ and log σ.
    mu, log_sigma : dict of str to float
        Coefficients by term: ``intercept``, ``age1``..``ageK``, ``male``, ``bmi``, ``site:NAME``
        (μ only).
    epsilon, log_delta : float
    bmi_centre : float
        BMI is entered as ``bmi − bmi_centre``.
    sites : list of str
        Sites in deviation coding; the last one's offset is minus the sum of the others'.
    age_range, bmi_range : [float, float]
        What the model was fitted on; no z-score outside.
    sexes : list of str
    n, n_subjects : int
        Observations (sides of people) and people it was fitted on.
    fit : dict
        Log-likelihood, AIC, BIC, degrees of freedom chosen, optimiser's convergence.
    calibration : dict
        On the held-out people (see :func:`reports.reference_fit.calibrate`).
    """

    method: str
    muscle: str
    measurement: str
    levels: str | None
    transform: str
    knots_mu: list[float]
    knots_sigma: list[float]
    mu: dict[str, float]
    log_sigma: dict[str, float]
    epsilon: float
    log_delta: float
    bmi_centre: float
    sites: list[str]
    age_range: list[float]
    bmi_range: list[float]
    sexes: list[str]
    n: int
    n_subjects: int
    fit: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            ReferenceMethod(self.method)
            if "+".join(muscle_group(self.muscle)) != self.muscle:
                raise ValueError(f"muscle {self.muscle!r} is not a canonical key")
            if self.levels is not None:
                vertebra_range(self.levels)
        except ValueError as exc:
            raise ModelFileError(str(exc)) from None
        if TRANSFORMS.get(self.measurement) != self.transform:
            raise ModelFileError(f"{self.measurement} needs the transform {TRANSFORMS.get(self.measurement)}, "
                                 f"not {self.transform}")
        if not (self.age_range[0] < self.age_range[1]):
            raise ModelFileError(f"age range {self.age_range} is empty")

    @property
    def label(self) -> str:
        return f"{self.method} {self.muscle} {self.measurement} {self.levels or '(no levels)'}"

    # --- design -------------------------------------------------------------------------------

    def _design(self, names: Iterable[str], knots: Sequence[float], age: np.ndarray, male: np.ndarray,
                bmi: np.ndarray, site: Sequence[str | None]) -> np.ndarray:
        spline = spline_basis(age, knots)
        columns = []
        for name in names:
            if name == "intercept":
                columns.append(np.ones_like(age))
            elif name.startswith("age"):
                columns.append(spline[:, int(name[3:]) - 1])
            elif name == "male":
                columns.append(male)
            elif name == "bmi":
                columns.append(bmi - self.bmi_centre)
            elif name.startswith("site:"):
                columns.append(np.array([site_code(s, name[5:], self.sites) for s in site]))
            else:
                raise ModelFileError(f"{self.label}: unknown term {name!r}")
        return np.column_stack(columns)

    def parameters(self, age: Any, sex: Any, bmi: Any, site: Any = None) -> tuple[np.ndarray, ...]:
        """``(μ, σ, ε, δ)`` on the model's scale for arrays of covariates (no range checks)."""
        age = np.atleast_1d(np.asarray(age, dtype=np.float64))
        male = np.broadcast_to(np.asarray(np.atleast_1d(sex) == Sex.MALE.value, dtype=np.float64), age.shape)
        bmi = np.broadcast_to(np.atleast_1d(np.asarray(bmi, dtype=np.float64)), age.shape)
        sites = list(np.broadcast_to(np.atleast_1d(np.asarray(site, dtype=object)), age.shape))
        mu = self._design(self.mu, self.knots_mu, age, male, bmi, sites) @ np.array(list(self.mu.values()))
        log_sigma = self._design(self.log_sigma, self.knots_sigma, age, male, bmi, sites) @ np.array(
            list(self.log_sigma.values()))
        return mu, np.exp(log_sigma), np.full_like(mu, self.epsilon), np.full_like(mu, math.exp(self.log_delta))

    # --- use ----------------------------------------------------------------------------------

    def refusal(self, who: Covariates) -> str | None:
        """Why this model gives no z-score for this person, or None."""
        low, high = self.age_range
        if not low <= who.age <= high:
            return f"age {who.age:.1f} is outside the ages the model was fitted on ({low:.1f}-{high:.1f} years)"
        low, high = self.bmi_range
        if not low <= who.bmi <= high:
            return f"BMI {who.bmi:.1f} is outside the BMIs the model was fitted on ({low:.1f}-{high:.1f} kg/m2)"
        if who.sex not in self.sexes:
            return f"the model was fitted on sex {'+'.join(self.sexes)} only, not {who.sex}"
        return None

    def z(self, value: float, who: Covariates) -> float:
        """z-score of one value (raises ValueError when :meth:`refusal` gives a reason)."""
        reason = self.refusal(who)
        if reason:
            raise ValueError(reason)
        mu, sigma, epsilon, delta = self.parameters(who.age, who.sex, who.bmi, who.site)
        y = to_model_scale([value], self.transform)
        return float(shash_z(y, mu, sigma, epsilon, delta)[0])

    def z_many(self, values: Any, age: Any, sex: Any, bmi: Any, site: Any = None) -> np.ndarray:
        """z-scores of arrays of values and covariates (no range checks: for calibration)."""
        mu, sigma, epsilon, delta = self.parameters(age, sex, bmi, site)
        return shash_z(to_model_scale(values, self.transform), mu, sigma, epsilon, delta)

    def value_at(self, z: Any, who: Covariates) -> np.ndarray:
        """Values (measurement scale) at z-scores ``z`` for this person."""
        mu, sigma, epsilon, delta = self.parameters(who.age, who.sex, who.bmi, who.site)
        return from_model_scale(shash_quantile(z, mu, sigma, epsilon, delta), self.transform)

    def curves(self, who: Covariates, points: int = 61,
               centiles: Sequence[float] = CURVE_CENTILES) -> CentileCurves:
        """Centile curves over the fitted ages for this person's sex, BMI and site."""
        ages = np.linspace(self.age_range[0], self.age_range[1], points)
        mu, sigma, epsilon, delta = self.parameters(ages, who.sex, who.bmi, who.site)
        values = [from_model_scale(shash_quantile(ndtri(c / 100.0), mu, sigma, epsilon, delta), self.transform)
                  for c in centiles]
        sex = {Sex.FEMALE.value: "women", Sex.MALE.value: "men"}.get(who.sex, who.sex)
        where = f", site {who.site}" if who.site else (", average of the sites" if len(self.sites) > 1 else "")
        return CentileCurves(tuple(float(a) for a in ages), tuple(float(c) for c in centiles),
                             tuple(tuple(float(v) for v in row) for row in values),
                             f"{sex}, BMI {who.bmi:.1f}{where}", float(who.age))

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def site_code(site: str | None, column: str, sites: Sequence[str]) -> float:
    """Deviation coding: 1 for the column's site, −1 for the last site, 0 otherwise or unnamed."""
    if site is None or site not in sites:
        return 0.0
    if site == column:
        return 1.0
    return -1.0 if site == sites[-1] else 0.0


# ---------------------------------------------------------------------------------------------
# The file


@dataclass(frozen=True)
class SiteReference:
    """A site reference file: name, version, cohort, models; and the site this node is at.

    ``site`` (setting ``reference.site_name``) names the site or scanner of this node among the
    cohort's; None compares with the average of the sites.
    """

    name: str
    version: str
    models: tuple[CentileModel, ...]
    cohort: dict[str, Any] = field(default_factory=dict)
    software: dict[str, str] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()
    site: str | None = None

    @property
    def title(self) -> str:
        """How results name the model: ``NAME version V``."""
        return f"{self.name} version {self.version}"

    def find(self, method: str, muscle: str, measurement: str, levels: str | None) -> CentileModel | None:
        """The model for exactly these levels, else one fitted without levels, else None."""
        exact = unlevelled = None
        for model in self.models:
            if (model.method, model.muscle, model.measurement) != (method, muscle, measurement):
                continue
            if model.levels is not None and model.levels == levels:
                exact = exact or model
            elif model.levels is None:
                unlevelled = unlevelled or model
        return exact or unlevelled

    def at_site(self, site: str | None) -> "SiteReference":
        """This reference as used at ``site`` (checked against the cohort's sites)."""
        if site is not None:
            known = sorted({s for m in self.models for s in m.sites})
            if site not in known:
                raise ModelFileError(f"site reference {self.title} has no site {site!r}"
                                     + (f" (its sites: {', '.join(known)})" if known else " (its cohort had one site)"))
        return replace(self, site=site)


def save_site_reference(reference: SiteReference, path: str | Path) -> None:
    """Write the reference as JSON (:data:`SCHEMA`)."""
    document = {"schema": SCHEMA, "name": reference.name, "version": reference.version,
                "software": reference.software, "cohort": reference.cohort,
                "models": [m.as_json() for m in reference.models], "skipped": list(reference.skipped)}
    Path(path).write_text(json.dumps(document, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def load_site_reference(path: str | Path, site: str | None = None) -> SiteReference:
    """Read a site reference written by :func:`save_site_reference`.

    Raises
    ------
    ModelFileError
        When the file is not a site reference of this schema (for example a linear reference
        of musclenode before centile curves: fit it again), or a model in it does not validate.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"{path}: not a site reference (JSON of schema {SCHEMA}); a CSV site reference "
                             "of an earlier musclenode holds linear models: fit the cohort again with "
                             "musclenode reference fit") from None
    if not isinstance(document, Mapping) or document.get("schema") != SCHEMA:
        raise ModelFileError(f"{path}: schema {document.get('schema') if isinstance(document, Mapping) else None!r}"
                             f" is not {SCHEMA}")
    try:
        models = tuple(CentileModel(**m) for m in document["models"])
        reference = SiteReference(str(document["name"]), str(document["version"]), models,
                                  dict(document.get("cohort", {})), dict(document.get("software", {})),
                                  tuple(document.get("skipped", ())))
    except (KeyError, TypeError) as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    except ModelFileError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    keys = [(m.method, m.muscle, m.measurement, m.levels) for m in models]
    if len(set(keys)) != len(keys):
        raise ModelFileError(f"{path}: two models for the same method, muscle, measurement and levels")
    return reference.at_site(site)


def centile(z: float) -> float:
    """100 Φ(z), in percent."""
    return float(100.0 * ndtr(z))
