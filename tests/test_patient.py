"""Patient context from DICOM headers and research sidecars: values found, or missing with a reason."""

from __future__ import annotations

import warnings
from datetime import date

import pytest
from pydicom import Dataset

from reports.patient import PatientContext, age_between, from_dataset, from_sidecar, parse_patient_age


def dataset(**attributes) -> Dataset:
    ds = Dataset()
    with warnings.catch_warnings():
        # Malformed values are the point of some tests; pydicom warns when they are set.
        warnings.simplefilter("ignore", UserWarning)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize("text, years", [
    ("034Y", 34.0), ("006M", 0.5), ("010W", 70 / 365.25), ("020D", 20 / 365.25), ("000D", 0.0), (" 045y ", 45.0),
])
def test_age_strings(text, years):
    assert parse_patient_age(text) == pytest.approx(years, abs=1e-12)


@pytest.mark.parametrize("text", ["34Y", "034", "034Z", "03.4Y", "-34Y", "0034Y", ""])
def test_malformed_age_strings_refused(text):
    with pytest.raises(ValueError):
        parse_patient_age(text)


def test_birthday_gives_whole_years_and_day_before_does_not():
    assert age_between(date(1980, 6, 15), date(2020, 6, 15)) == 40.0
    before = age_between(date(1980, 6, 15), date(2020, 6, 14))
    assert 39.99 < before < 40.0
    # 29 February birthdays fall on 28 February in common years.
    assert age_between(date(1980, 2, 29), date(2023, 2, 28)) == 43.0


def test_age_from_birth_date_and_study_date():
    context = from_dataset(dataset(PatientBirthDate="19800615", StudyDate="20200614", PatientSex="F"))
    assert context.age_completed_years == 39
    assert context.age_source == "PatientBirthDate and StudyDate"


def test_acquisition_date_used_when_study_date_absent():
    context = from_dataset(dataset(PatientBirthDate="19800615", AcquisitionDate="20200615"))
    assert context.age_years == 40.0
    assert context.age_source == "PatientBirthDate and AcquisitionDate"


def test_patient_age_preferred_and_disagreement_noted():
    context = from_dataset(dataset(PatientAge="050Y", PatientBirthDate="19800615", StudyDate="20200615"))
    assert context.age_years == 50.0 and context.age_source == "PatientAge"
    assert any("PatientAge gives 50.0" in note and "40.0" in note for note in context.notes)


def test_impossible_patient_age_falls_back_to_birth_date():
    context = from_dataset(dataset(PatientAge="999Y", PatientBirthDate="19800615", StudyDate="20200615"))
    assert context.age_years == 40.0


def test_age_000y_is_kept_with_a_note():
    context = from_dataset(dataset(PatientAge="000Y"))
    assert context.age_years == 0.0
    assert any("000Y" in note and "unknown" in note for note in context.notes)


def test_missing_age_says_why():
    context = from_dataset(dataset(PatientBirthDate="20300101", StudyDate="20200101"))
    assert context.age_years is None
    reason = context.why_missing("age_years")
    assert "PatientAge not recorded" in reason and "after StudyDate" in reason
    bare = from_dataset(dataset())
    assert "PatientAge not recorded" in bare.why_missing("age_years")
    assert "PatientBirthDate not recorded" in bare.why_missing("age_years")


def test_malformed_patient_age_is_reported():
    context = from_dataset(dataset(PatientAge="34 years"))
    assert context.age_years is None
    assert "not a DICOM age string" in context.why_missing("age_years")


@pytest.mark.parametrize("value, expected", [("M", "M"), ("F", "F"), ("O", "O"), (" f ", "F")])
def test_sex(value, expected):
    assert from_dataset(dataset(PatientSex=value)).sex == expected


def test_sex_missing_or_unknown_says_why():
    assert from_dataset(dataset()).why_missing("sex") == "PatientSex not recorded"
    assert "is not M, F or O" in from_dataset(dataset(PatientSex="U")).why_missing("sex")


def test_bmi_from_height_and_weight():
    context = from_dataset(dataset(PatientSize="1.75", PatientWeight="70"))
    assert context.height_m == 1.75 and context.weight_kg == 70.0
    assert context.bmi == pytest.approx(70 / 1.75**2)
    assert context.why_missing("bmi") is None


def test_height_in_centimetres_is_not_converted():
    context = from_dataset(dataset(PatientSize="178", PatientWeight="70"))
    assert context.height_m is None
    reason = context.why_missing("height_m")
    assert "outside 0.5-2.5 m" in reason and "centimetres" in reason and "not converted" in reason
    assert context.bmi is None and "height" in context.why_missing("bmi")


def test_zero_weight_means_not_entered():
    context = from_dataset(dataset(PatientSize="1.75", PatientWeight="0"))
    assert context.weight_kg is None and "0" in context.why_missing("weight_kg")
    assert context.bmi is None


def test_implausible_bmi_is_refused():
    context = from_dataset(dataset(PatientSize="0.6", PatientWeight="300"))
    assert context.bmi is None and "wrong unit" in context.why_missing("bmi")


def test_every_missing_value_has_one_reason():
    context = from_dataset(dataset())
    assert {m.field for m in context.missing} == {"age_years", "sex", "height_m", "weight_kg", "bmi"}
    assert "PatientSex not recorded" in context.explanation()


def test_context_refuses_a_none_without_reason():
    with pytest.raises(ValueError, match="no reason"):
        PatientContext(age_years=None, sex="F", height_m=1.7, weight_kg=60.0, bmi=20.8)


def test_sidecar():
    context = from_sidecar({"age": 34, "sex": "female", "height_m": 1.62, "weight_kg": "55"})
    assert (context.age_years, context.sex, context.height_m, context.weight_kg) == (34.0, "F", 1.62, 55.0)
    assert context.bmi == pytest.approx(55 / 1.62**2)
    assert context.missing == ()


def test_sidecar_missing_values_say_why():
    context = from_sidecar({"age": "n/a", "sex": "x", "height_m": 175})
    assert context.why_missing("age_years") == "age not in the sidecar"
    assert "is not M, F, O" in context.why_missing("sex")
    assert "centimetres" in context.why_missing("height_m")
    assert context.why_missing("weight_kg") == "sidecar weight_kg not recorded"
