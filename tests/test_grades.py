"""Fat infiltration grades and the severe-multifidus flag: boundaries, citations, refusals."""

from __future__ import annotations

import math

import pytest

from reports.grades import (
    CITATION_WESSELINK_2024,
    fat_infiltration_grade,
    fat_unreliable_reason,
    severe_multifidus_fat,
)


@pytest.mark.parametrize("fat, grade", [
    (0.0, 0), (19.999, 0), (20.0, 1), (35.0, 1), (50.0, 1), (50.001, 2), (100.0, 2),
])
def test_grade_boundaries(fat, grade):
    result = fat_infiltration_grade(fat, method="t1t2_threshold", muscle="multifidus")
    assert result.value == grade and result.graded
    assert result.label.startswith(f"grade {grade} ")
    assert "BMC Med 2007;5:2" in result.citation and "2017;18:145" in result.citation


@pytest.mark.parametrize("fat, severe", [(0.0, False), (49.999, False), (50.0, True), (80.0, True)])
def test_severe_flag_boundary(fat, severe):
    result = severe_multifidus_fat(fat, method="t1t2_threshold", muscle="multifidus")
    assert result.value is severe
    assert "10.1097/BRS.0000000000005408" in result.citation


def test_exactly_50_percent_is_grade_1_yet_severe():
    assert fat_infiltration_grade(50.0, method="dixon_ff", muscle="multifidus").value == 1
    assert severe_multifidus_fat(50.0, method="dixon_ff", muscle="multifidus").value is True


@pytest.mark.parametrize("muscle", ["psoas_major", "multifidus+psoas_major", ["psoas_major", "erector_spinae"]])
def test_threshold_psoas_is_never_graded(muscle):
    for grade in (fat_infiltration_grade(60.0, method="t1t2_threshold", muscle=muscle),
                  severe_multifidus_fat(60.0, method="t1t2_threshold", muscle=muscle)):
        assert grade.value is None and not grade.graded and grade.label == "not graded"
        assert grade.citation == CITATION_WESSELINK_2024 and "ICC <= 0.01" in grade.note
    assert fat_unreliable_reason("t1t2_threshold", muscle) is not None


def test_pipeline_cluster_methods_count_as_thresholding():
    assert fat_infiltration_grade(30.0, method="gmm3", muscle="psoas_major").value is None
    assert fat_infiltration_grade(30.0, method="gmm3", muscle="multifidus").value == 1
    assert "Dixon" in fat_infiltration_grade(30.0, method="dixon_vendor_ff", muscle="multifidus").note


def test_dixon_psoas_is_not_unreliable_but_not_graded_either():
    assert fat_unreliable_reason("dixon_ff", "psoas_major") is None
    grade = fat_infiltration_grade(60.0, method="dixon_ff", muscle="psoas_major")
    assert grade.value is None and "multifidus only" in grade.note


def test_other_muscles_are_not_graded():
    grade = severe_multifidus_fat(70.0, method="t1t2_threshold", muscle="erector_spinae")
    assert grade.value is None and "multifidus only" in grade.note


def test_dixon_values_carry_a_note_threshold_values_do_not():
    assert "Dixon fat fraction" in fat_infiltration_grade(30.0, method="dixon_ff", muscle="multifidus").note
    assert "Dixon" not in fat_infiltration_grade(30.0, method="t1t2_threshold", muscle="multifidus").note


@pytest.mark.parametrize("fat", [-0.1, 100.1, math.nan, math.inf])
def test_out_of_range_values_are_refused(fat):
    with pytest.raises(ValueError):
        fat_infiltration_grade(fat, method="dixon_ff", muscle="multifidus")


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method"):
        severe_multifidus_fat(30.0, method="t2_gmm", muscle="multifidus")
