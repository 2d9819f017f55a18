"""Patient data from DICOM headers and research sidecars: values used, or missing with a reason.

Every odd value a header was seen to carry has a case here: ages without unit or padding, heights
in centimetres, weights of 0, sexes outside M/F/O, dates that are no dates; and what the result
objects then carry instead of the header's value.
"""

from __future__ import annotations

from datetime import date

import pytest
from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from inference.patient import (
    PatientContext,
    age_between,
    from_dataset,
    from_sidecar,
    read_patient_age,
    result_header,
)
from inference.vocabulary import Sex


def dataset(**attributes) -> Dataset:
    """A data set with these values, stored as a file would hold them (even when malformed)."""
    ds = Dataset()
    for keyword, value in attributes.items():
        tag = Tag(keyword)
        encoded = str(value).encode("ascii")
        encoded += b" " * (len(encoded) % 2)
        ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(encoded), encoded, 0, False, True)
    return ds


@pytest.mark.parametrize("text, years", [
    ("034Y", 34.0), ("006M", 0.5), ("010W", 70 / 365.25), ("020D", 20 / 365.25), ("000D", 0.0), (" 045y ", 45.0),
])
def test_age_strings(text, years):
    reading = read_patient_age(text)
    assert reading.years == pytest.approx(years, abs=1e-12)
    assert reading.note == "" and reading.text == text.strip().upper()


@pytest.mark.parametrize("text, years, dicom, said", [
    ("34", 34.0, "034Y", "no unit"), ("034", 34.0, "034Y", "no unit"), ("6", 6.0, "006Y", "no unit"),
    ("34Y", 34.0, "034Y", "not in DICOM form"), ("6M", 0.5, "006M", "6 months"), ("34 Y", 34.0, "034Y", "34 years"),
])
def test_age_without_unit_or_padding_is_read_with_a_note(text, years, dicom, said):
    reading = read_patient_age(text)
    assert reading.years == pytest.approx(years) and reading.text == dicom and said in reading.note


@pytest.mark.parametrize("text", ["34 years", "034Z", "03.4Y", "-34Y", "0034Y", "", "Y", "1000"])
def test_malformed_age_strings_refused(text):
    with pytest.raises(ValueError, match="not a DICOM age string"):
        read_patient_age(text)


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


@pytest.mark.parametrize("value, expected", [("M", Sex.MALE), ("F", Sex.FEMALE), ("O", Sex.OTHER), (" f ", Sex.FEMALE)])
def test_sex(value, expected):
    assert from_dataset(dataset(PatientSex=value)).sex is expected


@pytest.mark.parametrize("value", ["U", "X", "male", "MF"])
def test_sex_missing_or_unknown_says_why(value):
    assert from_dataset(dataset()).why_missing("sex") == "PatientSex not recorded"
    assert from_dataset(dataset(PatientSex=value)).why_missing("sex") == f"PatientSex {value!r} is not M, F or O"


def test_bmi_from_height_and_weight():
    context = from_dataset(dataset(PatientSize="1.75", PatientWeight="70"))
    assert context.height_m == 1.75 and context.weight_kg == 70.0
    assert context.bmi == pytest.approx(70 / 1.75**2)
    assert context.why_missing("bmi") is None


def test_height_in_centimetres_is_converted_and_said():
    context = from_dataset(dataset(PatientSize="178", PatientWeight="70"))
    assert context.height_m == pytest.approx(1.78)
    assert any("PatientSize 178 is centimetres" in note and "1.78 m" in note for note in context.notes)
    assert context.bmi == pytest.approx(70 / 1.78**2)


@pytest.mark.parametrize("value, said", [
    ("0", "is 0"), ("5.9", "outside 0.5-2.5 m"), ("1780", "outside 0.5-2.5 m"), ("tall", "not a number"),
    ("-1.7", "outside"),
])
def test_unusable_height_says_why(value, said):
    context = from_dataset(dataset(PatientSize=value, PatientWeight="70"))
    assert context.height_m is None and said in context.why_missing("height_m")
    assert context.bmi is None and "height" in context.why_missing("bmi")


def test_zero_weight_means_not_entered():
    context = from_dataset(dataset(PatientSize="1.75", PatientWeight="0"))
    assert context.weight_kg is None and "is 0" in context.why_missing("weight_kg")
    assert context.bmi is None


@pytest.mark.parametrize("value, said", [("0.5", "outside 1-400 kg"), ("740", "outside 1-400 kg"),
                                         ("heavy", "not a number"), ("-70", "outside")])
def test_absurd_weight_is_missing_with_the_reason(value, said):
    context = from_dataset(dataset(PatientSize="1.75", PatientWeight=value))
    assert context.weight_kg is None and said in context.why_missing("weight_kg")


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
    context = from_sidecar({"age": "n/a", "sex": "x", "height_m": 1750})
    assert context.why_missing("age_years") == "age not in the sidecar"
    assert "is not M, F, O" in context.why_missing("sex")
    assert "outside 0.5-2.5 m" in context.why_missing("height_m")
    assert context.why_missing("weight_kg") == "sidecar weight_kg not recorded"


def test_sidecar_follows_the_header_rules():
    context = from_sidecar({"age": 34, "sex": "M", "height_m": 175, "weight_kg": 0})
    assert context.height_m == pytest.approx(1.75) and any("centimetres" in note for note in context.notes)
    assert context.weight_kg is None and "is 0" in context.why_missing("weight_kg")


# --- what result objects carry -------------------------------------------------------------------


def test_result_header_writes_the_values_used_and_leaves_out_unusable_ones():
    source = dataset(PatientName="Doe^Jane", PatientID="P1", PatientAge="34", PatientSex="U", PatientSize="178",
                     PatientWeight="0", PatientBirthDate="1980-06-15", StudyInstanceUID="1.2.3")
    header = result_header(source)
    assert header is not source
    assert header.PatientAge == "034Y" and float(header.PatientSize) == pytest.approx(1.78)
    assert "PatientWeight" not in header
    assert header.PatientSex == "" and header.PatientBirthDate == ""
    assert (header.PatientName, header.PatientID, header.StudyInstanceUID) == ("Doe^Jane", "P1", "1.2.3")
    # The source itself is untouched.
    assert (source.PatientAge, source.PatientSex, source.PatientSize, source.PatientWeight) == ("34", "U", "178", "0")


def test_result_header_drops_an_unreadable_age_even_when_dates_give_one():
    source = dataset(PatientAge="34 years", PatientBirthDate="19800615", StudyDate="20200615", PatientSex="f",
                     PatientName="", PatientID="")
    header = result_header(source)
    assert from_dataset(source).age_years == 40.0
    assert "PatientAge" not in header and header.PatientSex == "F" and header.PatientBirthDate == "19800615"


def test_result_header_is_the_source_when_nothing_is_odd():
    source = dataset(PatientName="Doe^Jane", PatientID="P1", PatientBirthDate="19800615", PatientSex="F",
                     PatientAge="040Y", PatientSize="1.70", PatientWeight="65")
    assert result_header(source) is source


def test_result_header_adds_missing_type_2_patient_attributes_empty():
    header = result_header(dataset(StudyInstanceUID="1.2.3"))
    assert all(header[k].value in ("", None) for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"))
