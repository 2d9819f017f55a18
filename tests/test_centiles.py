"""Site references as centile curves: the distribution, the fit, calibration, the file, the lookup,
the command line, and the SR and summary that name the model.

Synthetic cohorts are drawn from a known distribution (:func:`truth`): on the logit scale of the
fat fraction and the log scale of the CSA, a sinh-arcsinh distribution whose location rises with
age along a logistic curve (not a spline, so the fit has to approximate it), differs by sex, BMI
and site, and whose scale grows with age. The fitted centiles are judged by where they fall in the
true distribution: at ages inside the cohort (30-70 of 20-80 years), for both sexes, BMI 22 and
30 and each of three sites, the true centile of a fitted 5th, 50th or 95th centile must lie within
:data:`CENTILE_TOLERANCE` percentage points of 5, 50 or 95. With 4,000 people (3,200 fitted) the
sampling error alone is about 1 point at the 5th and 95th centiles and 2 at the median (where the
density is highest, a small shift of the curve is many people); the worst cells over three seeds
were 1.6 and 3.6 points.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import integrate, stats
from scipy.special import expit, logit, ndtr, ndtri

from inference.patient import from_sidecar
from node.cli import main
from reports.assessment import assess
from reports.centiles import (
    Covariates,
    ModelFileError,
    SiteReference,
    load_site_reference,
    save_site_reference,
    shash_logpdf,
    shash_quantile,
    shash_z,
)
from reports.reference import CENTILE_BASIS, compare
from reports.reference_fit import Observation, calibrate, fit_site_reference, held_out, read_cohort

FF, CSA = "fat_fraction_percent", "csa_mm2"
#: Largest allowed distance, in percentage points, between a fitted centile's true centile and its
#: nominal one, at ages inside the cohort.
CENTILE_TOLERANCE = {5.0: 2.5, 50.0: 5.0, 95.0: 2.5}
SITE_SHIFT = {FF: {"A": 0.0, "B": 0.25, "C": -0.15}, CSA: {"A": 0.0, "B": -0.10, "C": 0.05}}


def truth(measurement: str, age, male, bmi, site, shift: float = 0.0):
    """(μ, σ, ε, δ) of the true distribution on the model's scale."""
    age, male, bmi = np.asarray(age, float), np.asarray(male, float), np.asarray(bmi, float)
    offset = np.vectorize(SITE_SHIFT[measurement].get)(site) + shift
    if measurement == FF:
        mu = -2.3 + 1.1 * expit((age - 50) / 12) - 0.3 * male + 0.03 * (bmi - 25) + offset
        return mu, np.exp(-1.0 + 0.006 * (age - 45)), 0.3, 1.2
    mu = math.log(900) - 0.004 * (age - 50) + 0.25 * male + 0.01 * (bmi - 25) + offset
    return mu, np.full_like(mu, 0.15), -0.2, 1.1


def draw(people: int, seed: int, shift: float = 0.0, ages=(20.0, 80.0), prefix: str = "P") -> list[Observation]:
    """Both sides of ``people`` people, multifidus fat fraction and CSA, three sites."""
    rng = np.random.default_rng(seed)
    observations = []
    for i in range(people):
        age, male, bmi = rng.uniform(*ages), rng.random() < 0.5, rng.uniform(18, 35)
        site = "ABC"[rng.integers(3)]
        for _side in ("left", "right"):
            for measurement in (FF, CSA):
                mu, sigma, epsilon, delta = truth(measurement, age, male, bmi, site, shift)
                y = float(shash_quantile(rng.normal(), mu, sigma, epsilon, delta))
                value = 100 * expit(y) if measurement == FF else math.exp(y)
                observations.append(Observation(f"{prefix}{i}", "dixon_ff", "multifidus", measurement, None, age,
                                                "M" if male else "F", bmi, value, site))
    return observations


def write_cohort(path: Path, observations: list[Observation], *, process_style: bool = False) -> None:
    """A cohort CSV: hand-made columns, or those of ``musclenode process``'s cohort.csv."""
    rows: dict[tuple, dict] = {}
    seen: dict[tuple, int] = {}
    for o in observations:  # draw() gives each person's left side first, then the right
        count = seen[(o.subject, o.measurement)] = seen.get((o.subject, o.measurement), 0) + 1
        side = ("left", "right")[count - 1]
        row = rows.setdefault((o.subject, side), {"id": o.subject, "side": side, "age": o.age, "sex": o.sex,
                                                  "bmi": o.bmi, "site": o.site})
        row[o.measurement] = o.value
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if process_style:
            writer.writerow(["study", "muscle", "side", "level", "age", "sex", "bmi", "mean_csa_mm2", "fat_method",
                             "fat_percent", "site"])
            for row in rows.values():
                writer.writerow([row["id"], "multifidus", row["side"], "all", row["age"], row["sex"], row["bmi"],
                                 row[CSA], "dixon_ff", row[FF], row["site"]])
            # The two sides together, as process writes them: never fitted.
            writer.writerow(["P0", "multifidus", "both", "all", 40, "F", 25, 1.0, "dixon_ff", 99.0, "A"])
        else:
            writer.writerow(["patient_id", "muscle", "side", "age", "sex", "bmi", FF, CSA, "method", "site"])
            for row in rows.values():
                writer.writerow([row["id"], "multifidus", row["side"], row["age"], row["sex"], row["bmi"], row[FF],
                                 row[CSA], "dixon_ff", row["site"]])


@pytest.fixture(scope="module")
def cohort() -> list[Observation]:
    return draw(4000, seed=20261130)


@pytest.fixture(scope="module")
def fitted(cohort) -> SiteReference:
    return fit_site_reference(cohort, "synthetic", "3").reference


# --- the distribution ----------------------------------------------------------------------------


def test_sinh_arcsinh_density_z_and_quantile():
    z = np.linspace(-3, 3, 13)
    y = shash_quantile(z, 1.0, 2.0, 0.4, 1.3)
    np.testing.assert_allclose(shash_z(y, 1.0, 2.0, 0.4, 1.3), z, atol=1e-12)
    total, _ = integrate.quad(lambda v: math.exp(shash_logpdf(v, 1.0, 2.0, 0.4, 1.3)), -60, 60, limit=200)
    assert total == pytest.approx(1.0, abs=1e-7)
    # z is the normal quantile of the value's centile: P(Y <= y) = Φ(z).
    below, _ = integrate.quad(lambda v: math.exp(shash_logpdf(v, 1.0, 2.0, 0.4, 1.3)), -60, float(y[8]), limit=200)
    assert below == pytest.approx(ndtr(z[8]), abs=1e-7)
    # No skew and normal tails: the normal distribution.
    np.testing.assert_allclose(shash_logpdf([0.3, 2.0], 1.0, 2.0, 0.0, 1.0), stats.norm(1.0, 2.0).logpdf([0.3, 2.0]))


# --- the fit ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("measurement", [FF, CSA])
def test_fitted_centiles_are_the_true_ones_within_the_tolerance(fitted, measurement):
    model = fitted.find("dixon_ff", "multifidus", measurement, None)
    assert model.sites == ["A", "B", "C"] and model.sexes == ["F", "M"] and model.levels is None
    worst = dict.fromkeys(CENTILE_TOLERANCE, 0.0)
    for age in (30, 40, 50, 60, 70):
        for sex in "FM":
            for bmi in (22.0, 30.0):
                for site in "ABC":
                    mu, sigma, epsilon, delta = truth(measurement, age, sex == "M", bmi, site)
                    for centile in CENTILE_TOLERANCE:
                        value = float(model.value_at(ndtri(centile / 100), Covariates(age, sex, bmi, site))[0])
                        y = logit(value / 100) if measurement == FF else math.log(value)
                        true_centile = 100 * ndtr(float(shash_z(y, mu, sigma, epsilon, delta)))
                        worst[centile] = max(worst[centile], abs(true_centile - centile))
    assert all(worst[c] <= CENTILE_TOLERANCE[c] for c in worst), worst


def test_the_site_term_gives_back_the_site_shifts(fitted):
    for measurement in (FF, CSA):
        model = fitted.find("dixon_ff", "multifidus", measurement, None)
        shifts = SITE_SHIFT[measurement]
        mean = sum(shifts.values()) / 3
        assert model.mu["site:A"] == pytest.approx(shifts["A"] - mean, abs=0.04)
        assert model.mu["site:B"] == pytest.approx(shifts["B"] - mean, abs=0.04)
        # A person at an unnamed site is compared with the average of the sites.
        who = Covariates(50.0, "F", 25.0)
        at = {s: float(model.parameters(50, "F", 25, s)[0][0]) for s in "ABC"}
        assert float(model.parameters(who.age, who.sex, who.bmi, None)[0][0]) == pytest.approx(
            sum(at.values()) / 3, abs=1e-9)


def test_held_out_calibration_is_reported_and_passes(fitted, cohort):
    held = {o.subject for o in cohort if held_out(o.subject)}
    assert 0.17 < len(held) / 4000 < 0.23
    for model in fitted.models:
        c = model.calibration
        assert c["people"] == len(held) and c["calibrated"] is True, c
        assert abs(c["mean_z"]) < 0.1 and abs(c["sd_z"] - 1) < 0.1 and abs(c["inside_5_95"] - 0.9) < 0.03
        assert model.n_subjects == 4000 - len(held)


def test_calibration_detects_a_model_of_another_distribution(fitted):
    model = fitted.find("dixon_ff", "multifidus", FF, None)
    same = calibrate(model, draw(300, seed=5, prefix="S"), "site")
    assert same["calibrated"] is True, same
    shifted = calibrate(model, draw(300, seed=6, shift=0.4, prefix="T"), "site")
    assert shifted["calibrated"] is False and shifted["mean_z"] > 0.5
    assert any("mean z" in p for p in shifted["problems"])
    # Older people than the model knows are left out of the check, and counted.
    older = calibrate(model, draw(50, seed=7, ages=(81, 90), prefix="O"), "site")
    assert older["outside_range"] == 100 and older["calibrated"] is None


def test_levels_give_one_model_per_level_and_small_groups_are_reported():
    observations = [replace(o, levels="L4") for o in draw(200, seed=8) if o.measurement == FF]
    observations += [replace(o, levels="L5") for o in draw(20, seed=9) if o.measurement == FF]
    report = fit_site_reference(observations, "levels", age_df=4)
    assert [m.levels for m in report.reference.models] == ["L4"]
    assert any("L5" in g and "fewer than 30" in g for g in report.skipped_groups)
    assert report.reference.models[0].fit["age_df"] == 4


# --- the file --------------------------------------------------------------------------------------


def test_the_file_round_trips_and_carries_its_cohort(fitted, tmp_path):
    path = tmp_path / "site.json"
    save_site_reference(fitted, path)
    loaded = load_site_reference(path)
    assert loaded == fitted and loaded.title == "synthetic version 3"
    document = json.loads(path.read_text())
    assert document["schema"] == "musclenode-reference-model/1"
    cohort = document["cohort"]
    assert cohort["people"] == 4000 and cohort["sites"] == ["A", "B", "C"] and cohort["site_term"] == "site"
    assert 20 <= cohort["age"][0] < cohort["age"][1] <= 80 and 18 <= cohort["bmi"][0] < cohort["bmi"][1] <= 35
    assert {"mean_z", "sd_z", "inside_5_95"} <= set(document["models"][0]["calibration"])
    assert load_site_reference(path, "B").site == "B"
    with pytest.raises(ModelFileError, match="no site 'D'"):
        load_site_reference(path, "D")
    old = tmp_path / "old.csv"
    old.write_text("name,method,muscle\nx,dixon_ff,multifidus\n")
    with pytest.raises(ModelFileError, match="fit the cohort again"):
        load_site_reference(old)


# --- the lookup ------------------------------------------------------------------------------------


def person(age=50, sex="F", height_m=1.70, weight_kg=72.0):
    return from_sidecar({"age": age, "sex": sex, "height_m": height_m, "weight_kg": weight_kg})


def test_compare_uses_the_curves_and_names_the_model(fitted):
    site = fitted.at_site("B")
    patient = person()
    model = fitted.find("dixon_ff", "multifidus", FF, None)
    who = Covariates(patient.age_years, "F", patient.bmi, "B")
    median = float(model.value_at(0.0, who)[0])
    result = compare(median, method="dixon_ff", muscle="multifidus", measurement=FF, levels="L1-L5",
                     patient=patient, site=site)
    assert result.stratum.kind == "site" and result.reference_version == "synthetic version 3"
    assert result.z == pytest.approx(0.0, abs=1e-9) and result.percentile == pytest.approx(50.0)
    assert result.percentile_basis == CENTILE_BASIS
    assert result.stratum.mean is None and result.stratum.at(0.0) == pytest.approx(median)
    assert "synthetic version 3" in result.stratum.equation and "site B" in result.stratum.description
    assert any("fitted without levels" in n for n in result.notes)
    curves = result.stratum.curves
    assert curves.age == pytest.approx(50.0) and curves.centiles == (5.0, 25.0, 50.0, 75.0, 95.0)
    # Without a site name: the average of the sites, and the result says so.
    average = compare(median, method="dixon_ff", muscle="multifidus", measurement=FF, levels="L1-L5",
                      patient=patient, site=fitted)
    assert any("average of the site reference's 3 sites" in n for n in average.notes)


def test_outside_the_fitted_ages_or_bmis_there_is_no_z_score(fitted):
    for patient, words in ((person(85), "age 85.0 is outside the ages"),
                           (person(50, height_m=1.60, weight_kg=110.0), "BMI 43.0 is outside the BMIs")):
        result = compare(15.0, method="dixon_ff", muscle="multifidus", measurement=FF, levels="L1-L5",
                         patient=patient, site=fitted)
        assert result.z is None and result.percentile is None and result.stratum is None
        assert words in result.reason and "synthetic version 3" in result.reason
        assert result.reference_version == "synthetic version 3"  # not silently the published table


def test_missing_bmi_or_another_muscle_falls_back_to_the_published_table(fitted):
    no_bmi = from_sidecar({"age": 45, "sex": "F"})
    result = compare(20.0, method="dixon_ff", muscle="multifidus", measurement=FF, levels="L1-L5",
                     patient=no_bmi, site=fitted)
    assert result.stratum.kind == "published"
    assert any("needs age, sex and BMI" in n and "published reference-v1 used instead" in n for n in result.notes)
    other = compare(15.0, method="dixon_ff", muscle="erector_spinae", measurement=FF, levels="L1-L5",
                    patient=person(), site=fitted)
    assert other.stratum.kind == "published" and any("has no dixon_ff erector_spinae" in n for n in other.notes)
    women = replace(fitted, models=tuple(replace(m, sexes=["F"], mu={k: v for k, v in m.mu.items() if k != "male"})
                                         for m in fitted.models))
    man = compare(15.0, method="dixon_ff", muscle="multifidus", measurement=FF, levels="L1-L5",
                  patient=person(45, "M", 1.80, 80.0), site=women)
    assert man.stratum.kind == "published" and any("fitted on sex F only" in n for n in man.notes)
    threshold = compare(20.0, method="t1t2_threshold", muscle="multifidus", measurement=FF, levels="L1-L5",
                        patient=person(), site=fitted)
    assert threshold.z is None and "no reference for this method" in threshold.reason


# --- the command line ---------------------------------------------------------------------------


def test_cli_fit_show_z_and_calibrate(tmp_path, capsys):
    cohort_path = tmp_path / "cohort.csv"
    write_cohort(cohort_path, draw(400, seed=11), process_style=True)
    observations, skipped = read_cohort(cohort_path)
    assert len(observations) == 400 * 2 * 2 and not skipped  # the "both" row is not an observation
    out = tmp_path / "hospital.json"
    assert main(["reference", "fit", str(cohort_path), "--out", str(out), "--name", "hospital", "--version",
                 "2026.1"]) == 0
    printed = capsys.readouterr().out
    assert "site reference hospital version 2026.1: 2 models from 400 people" in printed
    assert "site term: site" in printed and "inside P5-P95" in printed
    assert main(["reference", "show", "--site", str(out)]) == 0
    assert "hospital version 2026.1" in capsys.readouterr().out
    assert main(["reference", "show"]) == 0
    assert "published reference reference-v1: 28 groups" in capsys.readouterr().out
    site = load_site_reference(out)
    model = site.find("dixon_ff", "multifidus", FF, None)
    median = float(model.value_at(0.0, Covariates(50.0, "M", 25.0, "A"))[0])
    assert main(["reference", "z", str(out), "--muscle", "multifidus", "--age", "50", "--sex", "M", "--bmi", "25",
                 "--value", str(median), "--site", "A"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["model"] == "hospital version 2026.1" and answer["z"] == pytest.approx(0.0, abs=1e-6)
    assert answer["centile"] == pytest.approx(50.0, abs=1e-4) and answer["p5"] < median < answer["p95"]
    assert main(["reference", "z", str(out), "--muscle", "multifidus", "--age", "95", "--sex", "M", "--bmi", "25",
                 "--value", "20"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["z"] is None and "outside the ages" in answer["reason"]
    assert main(["reference", "z", str(out), "--muscle", "psoas_major", "--age", "50", "--sex", "M", "--bmi", "25",
                 "--value", "20"]) == 2
    capsys.readouterr()
    shifted = tmp_path / "shifted.csv"
    write_cohort(shifted, draw(200, seed=12, shift=0.5, prefix="Q"))
    assert main(["reference", "calibrate", str(out), str(shifted)]) == 1
    assert "MISCALIBRATED" in capsys.readouterr().out


# --- SR and summary ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tum01_site(tmp_path_factory, fitted):
    """TUM01's manual labels, assessed against a site reference that covers its multifidus."""
    from reports.metrics import FatSource, measure
    from tests.test_seg import write_tum01

    tum01 = write_tum01(tmp_path_factory.mktemp("tum01-site"))
    source = pydicom.dcmread(tum01.study.series["water"].files[0], stop_before_pixels=True)
    from inference.patient import from_dataset

    patient = from_dataset(source)
    metrics = measure(tum01.label_map, FatSource(water=tum01.water, fat=tum01.fat))
    young = replace(fitted, models=tuple(replace(m, age_range=[50.0, 80.0]) for m in fitted.models))
    return tum01, source, patient, assess(metrics, patient, site=fitted), assess(metrics, patient, site=young)


def test_sr_names_the_model_and_refuses_outside_its_range(tum01_site, tmp_path):
    from reports import codes
    from reports.seg import build_segmentation, source_datasets_of
    from reports.sr import build_report
    from tests import validators
    from tests.test_seg import CARD, SOFTWARE

    tum01, _, patient, inside, outside = tum01_site
    sources = source_datasets_of(tum01.label_map)
    seg = build_segmentation(tum01.label_map, *CARD, tum01.identity(), SOFTWARE, sources)
    for name, assessments in (("inside", inside), ("outside", outside)):
        sr = build_report(tum01.label_map, seg, assessments, tum01.identity(), *CARD, SOFTWARE, patient=patient,
                          source_datasets=sources)
        path = tmp_path / f"{name}.dcm"
        sr.save_as(path)
        result = validators.dciodvfy(path)
        assert result.errors == [], result.describe()
        dump = "\n".join(_all_texts(pydicom.dcmread(path)))
        z_count = sum(1 for m in _all_measurements(pydicom.dcmread(path)) if m == codes.Z_SCORE.value)
        if name == "inside":
            assert "site reference synthetic version 3" in dump and z_count >= 2
        else:
            assert "no z-score from site reference synthetic version 3" in dump
            assert "outside the ages the model was fitted on (50.0-80.0 years)" in dump
            # Only the erector spinae, which the site reference has no model of, has z-scores: the
            # published table's.
            scored = [c for a in outside for c in (a.fat, a.csa) if c is not None and c.z is not None]
            assert z_count == len(scored)
            assert all(c.stratum.kind == "published" and c.muscle == "erector_spinae" for c in scored)


def _all_texts(ds) -> list[str]:
    found = []
    for item in getattr(ds, "ContentSequence", []):
        if item.ValueType == "TEXT":
            found.append(str(item.TextValue))
        found.extend(_all_texts(item))
    return found


def _all_measurements(ds) -> list[str]:
    found = []
    for item in getattr(ds, "ContentSequence", []):
        name = item.get("ConceptNameCodeSequence")
        if name and item.ValueType == "NUM":
            found.append(name[0].CodeValue)
        found.extend(_all_measurements(item))
    return found


def test_summary_names_the_model_and_draws_the_centile_chart(tum01_site, tmp_path):
    from reports.render import _Notes, _row_cells, render_pages
    from reports.summary import encode_pages
    from tests.test_seg import CARD, SOFTWARE
    from tests.test_summary import _validate

    tum01, source, patient, inside, outside = tum01_site
    left = next(a for a in inside if (a.metrics.muscle, a.metrics.side, a.metrics.level) == ("multifidus", "left", "all"))
    notes = _Notes()
    cells = _row_cells(left, notes)
    p5, p95 = left.fat.stratum.at(-1.6448536269514722), left.fat.stratum.at(1.6448536269514722)
    assert cells["reference"].text.startswith(f"{p5:.1f}\u2013{p95:.1f}")
    assert any("synthetic version 3" in text for text in notes.references)
    pages = render_pages(tum01.label_map, inside, patient, model_name=CARD[0], model_version=CARD[1],
                         software_version=SOFTWARE)
    assert pages[-1].title.startswith(f"Page {len(pages)} of {len(pages)}: Centile charts")
    # The person's points (multifidus colours) are drawn on the centile page.
    plain = render_pages(tum01.label_map, outside, patient, model_name=CARD[0], model_version=CARD[1],
                         software_version=SOFTWARE)
    assert len(plain) == len(pages) - 1
    outside_left = next(a for a in outside
                        if (a.metrics.muscle, a.metrics.side, a.metrics.level) == ("multifidus", "left", "all"))
    notes = _Notes()
    cells = _row_cells(outside_left, notes)
    assert cells["z"].text == "\u2014" and any("outside the ages" in r for r in notes.reasons)
    for number, dataset in enumerate(encode_pages(pages, tum01.label_map, tum01.identity(), source,
                                                  model_name=CARD[0], model_version=CARD[1],
                                                  software_version=SOFTWARE)):
        path = tmp_path / f"page{number}.dcm"
        dataset.save_as(path)
        _validate(path)
