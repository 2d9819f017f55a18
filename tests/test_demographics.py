"""Odd demographics in real headers: the reference uses what is usable, and the results stay valid.

The real TUM01 Dixon study is written with the patient values headers were seen to carry:
PatientAge "34" (no unit), PatientSize 178 (centimetres), PatientWeight 0 ("not entered"),
PatientSex "O", and a PatientBirthDate that is no DICOM date. The SEG, the SR and the summary
built from it must pass dciodvfy, carry the values as the node read them, and say in the SR
what the comparisons used.
"""

from __future__ import annotations

import warnings
from datetime import datetime
from pathlib import Path

import pydicom
import pytest

from inference.geometry import read_series
from inference.patient import from_dataset
from inference.vocabulary import Sex
from reports.assessment import assess
from reports.metrics import FatSource, measure
from reports.pipeline import Results, cohort_rows
from reports.seg import build_segmentation, source_datasets_of
from reports.sr import build_report
from reports.summary import build_summary
from tests import studies, validators
from tests.test_seg import CARD, SOFTWARE, Tum01, manual_label_map

ODD = {"PatientAge": "34", "PatientSize": "178", "PatientWeight": "0", "PatientSex": "O",
       "PatientBirthDate": "1990-01-01"}


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> Tum01:
    studies.require_data()
    folder = tmp_path_factory.mktemp("odd-demographics")
    study = studies.write_dixon_study(folder, seed="odd-demographics", contrasts=("water", "fat"))
    for info in study.series.values():
        for path in info.files:
            ds = pydicom.dcmread(path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # pydicom warns about the odd values: the point
                for keyword, value in ODD.items():
                    setattr(ds, keyword, value)
                ds.save_as(path)
    water, fat = read_series(study.series["water"].files), read_series(study.series["fat"].files)
    return Tum01(folder, study, water, fat, manual_label_map(water))


@pytest.fixture(scope="module")
def results(odd: Tum01) -> dict[str, list[Path]]:
    patient = odd.water.patient
    assessments = assess(measure(odd.label_map, FatSource(water=odd.water, fat=odd.fat)), patient)
    sources = source_datasets_of(odd.label_map)
    seg = build_segmentation(odd.label_map, *CARD, odd.identity(), SOFTWARE, sources)
    sr = build_report(odd.label_map, seg, assessments, odd.identity(), *CARD, SOFTWARE, patient=patient,
                      source_datasets=sources)
    pages = build_summary(odd.label_map, assessments, patient, odd.identity(), *CARD, SOFTWARE, sources[0],
                          created=datetime(2024, 6, 12, 10, 30))
    written: dict[str, list[Path]] = {"seg": [odd.folder / "seg.dcm"], "sr": [odd.folder / "sr.dcm"],
                                      "summary": [odd.folder / f"page{n}.dcm" for n in range(1, len(pages) + 1)]}
    seg.save_as(written["seg"][0])
    sr.save_as(written["sr"][0])
    for page, path in zip(pages, written["summary"]):
        page.save_as(path, enforce_file_format=True)
    return written


def test_the_parser_uses_what_is_usable_and_says_why_not_the_rest(odd: Tum01) -> None:
    patient = odd.water.patient
    assert patient.age_years == 34 and patient.age_source == "PatientAge"
    assert patient.sex is Sex.OTHER and patient.height_m == pytest.approx(1.78)
    assert patient.weight_kg is None and "is 0" in patient.why_missing("weight_kg")
    assert patient.bmi is None and "weight missing" in patient.why_missing("bmi")
    assert any("no unit" in note for note in patient.notes) and any("centimetres" in note for note in patient.notes)
    assert patient.birth_date == ""


def test_the_reference_comparison_uses_only_the_usable_values(odd: Tum01) -> None:
    assessments = assess(measure(odd.label_map, FatSource(water=odd.water, fat=odd.fat)), odd.water.patient)
    fat = [a.fat for a in assessments if a.fat is not None]
    assert len(fat) == 6
    # Age 34 from the unit-less PatientAge picks the 30-39 band; sex O matches no sex-specific
    # group, so the group of women and men together is used.
    for comparison in fat:
        assert comparison.z is not None, comparison.reason
        assert comparison.stratum.description.endswith("women and men, 30-39 y"), comparison.stratum.description


def test_the_source_is_what_dciodvfy_would_flag(odd: Tum01) -> None:
    result = validators.dciodvfy(Path(odd.study.series["water"].files[0]))
    assert any("Age" in line for line in result.errors + result.warnings), result.describe()


@pytest.mark.parametrize("kind", ["seg", "sr", "summary"])
def test_results_are_valid_and_carry_the_values_as_read(results: dict[str, list[Path]], kind: str) -> None:
    for path in results[kind]:
        result = validators.dciodvfy(path)
        assert result.errors == [], result.describe()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.PatientAge == "034Y" and float(ds.PatientSize) == pytest.approx(1.78)
        assert "PatientWeight" not in ds
        assert ds.PatientSex == "O" and ds.PatientBirthDate == ""


def test_results_agree_and_differ_from_the_source_only_where_it_was_odd(odd: Tum01,
                                                                       results: dict[str, list[Path]]) -> None:
    made = [path for paths in results.values() for path in paths]
    among_results = validators.dcentvfy(made)
    # Alone, the results reference source instances dcentvfy is not given; nothing else differs.
    assert [e for e in among_results.errors if "Missing SOPInstanceUID that was referenced" not in e] == [], \
        among_results.describe()
    with_source = validators.dcentvfy(made + odd.source_files)
    # Against the source, only the repaired values differ (the left-out weight and the emptied
    # birth date are warnings).
    assert with_source.errors, with_source.describe()
    assert all("<PatientAge>" in e or "<PatientSize>" in e for e in with_source.errors), with_source.describe()


def test_the_report_says_what_the_comparisons_used(results: dict[str, list[Path]]) -> None:
    sr = pydicom.dcmread(results["sr"][0])
    context = {item.ConceptNameCodeSequence[0].CodeValue: item for item in sr.ContentSequence
               if item.RelationshipType == "HAS OBS CONTEXT"}
    assert float(context["121033"].MeasuredValueSequence[0].NumericValue) == 34.0
    assert context["121032"].ConceptCodeSequence[0].CodeValue == "121102"  # other sex
    notes = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375")
    text = next(item.TextValue for item in notes.ContentSequence
                if item.TextValue.startswith("Patient values used for the reference comparison"))
    assert "age 34.0 years (PatientAge), sex O, height 1.78 m" in text and "weight" not in text.split(";")[0]
    assert "PatientWeight is 0" in text and "centimetres" in text


def test_cohort_rows_give_ages_in_whole_years_and_only_usable_values(odd: Tum01) -> None:
    metrics = measure(odd.label_map, FatSource(water=odd.water, fat=odd.fat))
    # Born 15 June 1980, scanned 14 June 2021: 40.997 years, which the field reports as 40.
    patient = from_dataset({"PatientBirthDate": "19800615", "StudyDate": "20210614", "PatientSex": "F",
                            "PatientSize": "170", "PatientWeight": "0"})
    assert 40.99 < patient.age_years < 41
    results = Results(odd.label_map, metrics, assess(metrics, patient), patient, None, None, [])
    rows = cohort_rows(results, "study-1")
    assert rows and all(row["age"] == 40 and row["sex"] == "F" and row["bmi"] is None for row in rows)
    assert {row["muscle"] for row in rows} == {"multifidus", "erector_spinae"}
    assert {row["side"] for row in rows} == {"left", "right", "both"}
