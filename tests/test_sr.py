"""TID 1500 SR of the real TUM01 study's manual labels, checked by independent tools."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from inference.geometry import LabelMap, read_series
from inference.patient import from_dataset
from inference.vocabulary import PRIVATE_SCHEME, FatMethod, Laterality, Muscle, vertebra_range
from reports import codes
from reports.assessment import Assessment, assess
from reports.equipment import ResultSeries
from reports.levels import LEVEL_RANGES, levels_by_height
from reports.metrics import ALL_LEVELS, FatSource, measure
from reports.seg import build_segmentation, segment_frames, segment_numbers, segments, source_datasets_of
from reports.sr import RESEARCH_STATEMENT, build_report
from reports.uids import ResultIdentity
from tests import studies, validators
from tests.test_seg import CARD, MEANING, SOFTWARE, Tum01, manual_label_map, write_tum01

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@dataclass
class Results:
    tum01: Tum01
    assessments: list[Assessment]
    seg_path: Path
    sr_path: Path


def _results(tum01: Tum01, label_map: LabelMap, name: str) -> Results:
    patient = from_dataset(pydicom.dcmread(tum01.study.series["water"].files[0], stop_before_pixels=True))
    assessments = assess(measure(label_map, FatSource(water=tum01.water, fat=tum01.fat)), patient)
    sources = source_datasets_of(label_map)
    seg = build_segmentation(label_map, *CARD, tum01.identity(), SOFTWARE, sources)
    sr = build_report(label_map, seg, assessments, tum01.identity(), *CARD, SOFTWARE, patient=patient,
                      source_datasets=sources)
    seg_path, sr_path = tum01.folder / f"{name}-seg.dcm", tum01.folder / f"{name}-sr.dcm"
    seg.save_as(seg_path)
    sr.save_as(sr_path)
    return Results(tum01, assessments, seg_path, sr_path)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Results:
    tum01 = write_tum01(tmp_path_factory.mktemp("tum01-sr"))
    return _results(tum01, tum01.label_map, "full")


def _groups(sr: Dataset, template: str) -> list:
    """The measurement groups of one template (1410, 1411 or 1501), read by highdicom."""
    report = sr.content if isinstance(getattr(sr, "content", None), hd.sr.MeasurementReport) \
        else hd.sr.Comprehensive3DSR.from_dataset(sr, copy=True).content
    return {"1410": report.get_planar_roi_measurement_groups,
            "1411": report.get_volumetric_roi_measurement_groups,
            "1501": report.get_image_measurement_groups}[template]()


def _by_tracking_id(groups) -> dict[str, object]:
    return {str(g.tracking_identifier): g for g in groups}


def _measurement(group, concept) -> hd.sr.Measurement:
    found = [m for m in group.get_measurements() if m.name == concept]
    assert len(found) == 1, f"{concept.meaning}: {len(found)} measurements"
    return found[0]


def _assessment(results: Results, muscle: str, side: str) -> Assessment:
    return next(a for a in results.assessments
                if (a.metrics.muscle, a.metrics.side, a.metrics.level) == (muscle, side, ALL_LEVELS))


def test_report_files_into_the_study_and_says_what_it_is(results: Results) -> None:
    sr = pydicom.dcmread(results.sr_path)
    source = pydicom.dcmread(results.tum01.study.series["water"].files[0], stop_before_pixels=True)
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber"):
        assert sr.get(keyword) == source.get(keyword), keyword
    assert sr.SeriesDescription == ResultSeries.SR.description() and "research" in sr.SeriesDescription
    assert (sr.Manufacturer, sr.CompletionFlag, sr.VerificationFlag) == ("musclenode", "COMPLETE", "UNVERIFIED")
    scheme = sr.CodingSchemeIdentificationSequence
    assert [s.CodingSchemeDesignator for s in scheme if s.CodingSchemeDesignator == PRIVATE_SCHEME] == [PRIVATE_SCHEME]
    report = hd.sr.srread(results.sr_path)
    notes = next(i for i in report.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375")
    texts = [item.TextValue for item in notes.ContentSequence if item.ValueType == "TEXT"]
    assert any(RESEARCH_STATEMENT in t for t in texts)
    assert any("age 34.0 years (PatientAge), sex M, height 1.78 m, weight 74 kg, BMI 23.4" in t for t in texts)
    # The age and sex the comparisons used are the subject's context (TID 1006/1007).
    context = {item.ConceptNameCodeSequence[0].CodeValue: item for item in report.ContentSequence
               if item.RelationshipType == "HAS OBS CONTEXT"}
    assert context["121024"].ConceptCodeSequence[0].CodeValue == "121025"  # subject class: patient
    assert context["121032"].ConceptCodeSequence[0].CodeValue == "M"
    age = context["121033"].MeasuredValueSequence[0]
    assert float(age.NumericValue) == 34.0 and age.MeasurementUnitsCodeSequence[0].CodeValue == "a"
    assert any(t.startswith("left multifidus: fat infiltration grade: grade 0") and "Kjaer P" in t for t in texts)
    procedure = [i for i in report.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "25056-3"
    observer = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in report.ContentSequence}
    assert observer["Device Observer Model Name"].TextValue == " ".join(CARD)


def test_volumetric_groups_reference_their_segments_with_the_segs_tracking(results: Results) -> None:
    sr = hd.sr.srread(results.sr_path)
    seg = pydicom.dcmread(results.seg_path)
    groups = _by_tracking_id(_groups(sr, "1411"))
    by_key = segments(seg)
    assert sorted(groups) == sorted(s.tracking_id for s in by_key.values())
    for (muscle, side), segment in by_key.items():
        group = groups[segment.tracking_id]
        assert str(group.tracking_uid) == segment.tracking_uid
        reference = group.referenced_segment
        assert reference[0].referenced_sop_instance_uid == seg.SOPInstanceUID
        assert int(reference[0].ReferencedSOPSequence[0].ReferencedSegmentNumber) == segment.number
        metrics = _assessment(results, muscle, side).metrics
        assert _measurement(group, codes.VOLUME).value == pytest.approx(metrics.volume_cm3)
        area = _measurement(group, codes.AREA)
        assert area.value == pytest.approx(metrics.mean_csa_mm2) and area.derivation == codes.MEAN
        fat = _measurement(group, codes.FAT_FRACTION)
        assert fat.value == pytest.approx(metrics.fat.mean_percent)
        assert fat.method == FatMethod.DIXON_FF.code
        assert _measurement(group, codes.FUNCTIONAL_CSA).value == pytest.approx(metrics.functional_csa_mm2)
        sites = group.finding_sites
        assert sites[0].value == Muscle(muscle).code
        assert sites[0].laterality == Laterality(side).code


def test_z_score_and_percentile_name_their_measurement_and_reference(results: Results) -> None:
    sr = hd.sr.srread(results.sr_path)
    group = _by_tracking_id(_groups(sr, "1411"))["left multifidus"]
    assessment = _assessment(results, "multifidus", "left")
    assert assessment.fat.z is not None, "TUM01 (34-year-old man) has a published fat fraction reference"
    z = _measurement(group, codes.Z_SCORE)
    percentile = _measurement(group, codes.PERCENTILE)
    assert z.value == pytest.approx(assessment.fat.z)
    assert percentile.value == pytest.approx(assessment.fat.percentile)
    for derived in (z, percentile):
        items = {i.ConceptNameCodeSequence[0].CodeValue: i for i in derived[0].ContentSequence}
        assert items["129100"].RelationshipType == "INFERRED FROM"
        assert float(items["129100"].MeasuredValueSequence[0].NumericValue) == pytest.approx(
            assessment.fat.value, rel=1e-6)
        citation = items["121422"].TextValue
        assert assessment.fat.stratum.citation in citation and assessment.fat.stratum.description in citation
    # No CSA reference exists for this stratum: no CSA z-score, and the report says why.
    assert assessment.csa.z is None
    assert len([m for m in group.get_measurements() if m.name == codes.Z_SCORE]) == 1


def test_grades_are_coded_qualitative_evaluations(results: Results) -> None:
    sr = hd.sr.srread(results.sr_path)
    groups = _by_tracking_id(_groups(sr, "1411"))
    for side in ("left", "right"):
        assessment = _assessment(results, "multifidus", side)
        evaluations = {e.name.value: e.value for e in groups[f"{side} multifidus"].get_qualitative_evaluations()}
        assert evaluations[codes.FAT_GRADE.value] == codes.grade_value(assessment.grade.value)
        assert evaluations[codes.SEVERE_MULTIFIDUS_FAT.value] == codes.yes_no(assessment.severe.value)
    # The grade is defined for the multifidus only: other muscles carry no "not graded" noise.
    assert groups["left erector spinae"].get_qualitative_evaluations() == []


def test_both_sides_groups_carry_the_asymmetry(results: Results) -> None:
    sr = hd.sr.srread(results.sr_path)
    groups = _by_tracking_id(_groups(sr, "1501"))
    assert sorted(groups) == ["erector spinae, both sides", "multifidus, both sides"]
    metrics = _assessment(results, "multifidus", "both").metrics
    group = groups["multifidus, both sides"]
    assert _measurement(group, codes.ASYMMETRY).value == pytest.approx(metrics.asymmetry_percent)
    assert group.finding_sites[0].laterality == Laterality.BOTH.code


def test_planar_groups_give_each_slices_area_on_its_seg_frame(results: Results) -> None:
    sr = hd.sr.srread(results.sr_path)
    seg = pydicom.dcmread(results.seg_path)
    planar = _groups(sr, "1410")
    slices = [(a, s) for a in results.assessments if a.metrics.level == ALL_LEVELS and a.metrics.side != "both"
              for s in a.metrics.slices]
    assert len(planar) == len(slices) == 4 * len(results.tum01.water)
    frames = {number: key for key, number in segment_frames(seg).items()}
    by_key = segments(seg)
    groups = _by_tracking_id(planar)
    for assessment, area in slices[::9]:
        segment = by_key[(assessment.metrics.muscle, assessment.metrics.side)]
        group = groups[f"{segment.tracking_id}, slice {area.frame_index + 1}"]
        assert _measurement(group, codes.AREA).value == pytest.approx(area.area_mm2)
        assert _measurement(group, codes.FAT_FRACTION).value == pytest.approx(area.fat_percent)
        frame_item = next(i for i in group[0].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121214")
        reference = frame_item.ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert frames[int(reference.ReferencedFrameNumber)] == (segment.number, area.sop_instance_uid, 1)
        assert "ReferencedSegmentNumber" not in reference


def test_dciodvfy_finds_no_error(results: Results) -> None:
    result = validators.dciodvfy(results.sr_path)
    assert result.errors == [], result.describe()
    # The only warnings: dciodvfy does not know musclenode's private scheme, which the SR
    # declares in its CodingSchemeIdentificationSequence.
    assert all(f"<{PRIVATE_SCHEME}>" in w for w in result.warnings), result.describe()


def test_dcentvfy_finds_source_seg_and_sr_consistent(results: Results) -> None:
    files = [*results.tum01.source_files, results.seg_path, results.sr_path]
    result = validators.dcentvfy(files)
    assert result.errors == [] and result.returncode == 0, result.describe()


def test_dcmqi_reads_the_report(results: Results) -> None:
    out = results.tum01.folder / "sr.json"
    result = validators.tid1500reader(results.sr_path, out)
    assert result.returncode == 0, result.describe()
    groups = {g.get("TrackingIdentifier"): g for g in json.loads(out.read_text())["Measurements"]}
    group = groups["left multifidus"]
    assert group["ReferencedSegment"] == segments(pydicom.dcmread(results.seg_path))[("multifidus", "left")].number
    values = {item["quantity"]["CodeValue"]: float(item["value"]) for item in group["measurementItems"]}
    metrics = _assessment(results, "multifidus", "left").metrics
    assert values["129100"] == pytest.approx(metrics.fat.mean_percent, rel=1e-9)
    assert values["118565006"] == pytest.approx(metrics.volume_cm3, rel=1e-9)


def test_pixelmed_finds_no_error_but_its_template_mixups(results: Results) -> None:
    """PixelMed on a report of the same study with the labels of one slice.

    The validator reloads its context group file for every content item it checks and keeps
    every copy: the full report (one planar group per slice and muscle) needs minutes and
    gigabytes, so this checks the same kinds of groups on one slice.
    """
    tum01 = results.tum01
    keep = 14
    labels = tuple(l if i == keep else np.zeros_like(l) for i, l in enumerate(tum01.label_map.labels))
    small = _results(tum01, LabelMap(tum01.water, labels, MEANING), "one-slice")
    result = validators.sr_validator(small.sr_path)
    assert "Found Root Template TID_1500" in result.output, result.describe()
    assert "OutOfMemoryError" not in result.output, result.describe()
    mixups, others = validators.pixelmed_template_mixups(result, pydicom.dcmread(small.sr_path))
    assert others == [], "\n".join(others[:20])


def test_uids_are_deterministic_and_change_with_the_model_version(results: Results) -> None:
    tum01 = results.tum01
    sources = source_datasets_of(tum01.label_map)

    def build(version: str) -> hd.sr.Comprehensive3DSR:
        identity = tum01.identity(version)
        seg = build_segmentation(tum01.label_map, CARD[0], version, identity, SOFTWARE, sources)
        return build_report(tum01.label_map, seg, results.assessments, identity, CARD[0], version, SOFTWARE,
                            source_datasets=sources)

    first, again, other = build(CARD[1]), build(CARD[1]), build("1.0.1")

    def uids(sr) -> list[str]:
        groups = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
        tracking = [str(item.UID) for group in groups.ContentSequence for item in group.ContentSequence
                    if item.ConceptNameCodeSequence[0].CodeValue == "112040"]
        assert len(tracking) == len(groups.ContentSequence)
        return [sr.SOPInstanceUID, sr.SeriesInstanceUID, *tracking]

    assert uids(first) == uids(again)
    assert all(a != b for a, b in zip(uids(first), uids(other)))


def test_fat_infiltration_is_not_reported_as_a_fat_fraction(results: Results) -> None:
    tum01 = results.tum01
    # Clustering every slice takes minutes on two cores; one slice shows the same coding.
    labels = tuple(l if i == 14 else np.zeros_like(l) for i, l in enumerate(tum01.label_map.labels))
    label_map = LabelMap(tum01.water, labels, MEANING)
    assessments = assess(measure(label_map, FatSource(cluster="kmeans2")),
                         from_dataset(pydicom.dcmread(tum01.study.series["water"].files[0], stop_before_pixels=True)))
    seg = build_segmentation(label_map, *CARD, tum01.identity(), SOFTWARE)
    sr = build_report(label_map, seg, assessments, tum01.identity(), *CARD, SOFTWARE)
    group = _by_tracking_id(_groups(sr, "1411"))["left multifidus"]
    names = [m.name for m in group.get_measurements()]
    assert codes.FAT_FRACTION not in names and codes.FAT_INFILTRATION in names
    assert _measurement(group, codes.FAT_INFILTRATION).method == FatMethod.KMEANS2.code
    # The published references are Dixon fat fractions: a T1/T2 value gets no z-score.
    assert codes.Z_SCORE not in names


def test_refuses_a_seg_without_the_assessed_segment(results: Results) -> None:
    tum01 = results.tum01
    only_multifidus = tuple(np.where(np.isin(l, (2, 3)), l, 0).astype(np.uint8) for l in tum01.label_map.labels)
    seg = build_segmentation(LabelMap(tum01.water, only_multifidus, MEANING), *CARD, tum01.identity(), SOFTWARE)
    with pytest.raises(ValueError, match="no segment for the left erector_spinae"):
        build_report(tum01.label_map, seg, results.assessments, tum01.identity(), *CARD, SOFTWARE)


def test_level_groups_name_their_vertebrae(results: Results) -> None:
    tum01 = results.tum01
    heights = sorted(float(g.centre[2]) for g in tum01.water.geometry)
    middle = (heights[14] + heights[15]) / 2
    level_of = levels_by_height({"L4": (heights[0] - 1, middle), "L3": (middle, heights[-1] + 1)})
    patient = from_dataset(pydicom.dcmread(tum01.study.series["water"].files[0], stop_before_pixels=True))
    assessments = assess(measure(tum01.label_map, FatSource(water=tum01.water, fat=tum01.fat), level_of), patient)
    seg = pydicom.dcmread(results.seg_path)
    sr = build_report(tum01.label_map, seg, assessments, tum01.identity(), *CARD, SOFTWARE,
                      source_datasets=source_datasets_of(tum01.label_map))
    groups = _by_tracking_id(_groups(sr, "1501"))
    group = groups["left multifidus, L3"]
    sites = [site.value for site in group.finding_sites]
    assert sites == [Muscle.MULTIFIDUS.code, codes.level_sites("L3")[0]]
    metrics = next(a.metrics for a in assessments
                   if (a.metrics.muscle, a.metrics.side, a.metrics.level) == ("multifidus", "left", "L3"))
    assert _measurement(group, codes.AREA).value == pytest.approx(metrics.mean_csa_mm2)
    # Per-level values add up: the slices of L3 and L4 are those of the whole series.
    assert metrics.n_slices + next(a.metrics.n_slices for a in assessments if (
        a.metrics.muscle, a.metrics.side, a.metrics.level) == ("multifidus", "left", "L4")) == len(tum01.water)


def test_enhanced_multiframe_source(tmp_path: Path) -> None:
    """One 29-frame Enhanced MR instance: SEG frames and SR slices point at its frames."""
    studies.require_data()
    study = studies.write_enhanced_study(tmp_path, seed="report-tests-enhanced", contrasts=("water", "fat"))
    water, fat = (read_series(study.series[c].files) for c in ("water", "fat"))
    label_map = manual_label_map(water)
    identity = ResultIdentity([water.series_instance_uid, fat.series_instance_uid], " ".join(CARD), SOFTWARE)
    seg = build_segmentation(label_map, *CARD, identity, SOFTWARE)
    patient = from_dataset(pydicom.dcmread(study.series["water"].files[0], stop_before_pixels=True))
    assessments = assess(measure(label_map, FatSource(water=water, fat=fat)), patient)
    sr = build_report(label_map, seg, assessments, identity, *CARD, SOFTWARE, patient=patient)
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg.save_as(seg_path)
    sr.save_as(sr_path)
    for path in (seg_path, sr_path):
        result = validators.dciodvfy(path)
        assert result.errors == [], result.describe()
    source_uid = water.geometry[0].sop_instance_uid
    read = hd.seg.segread(seg_path)
    pixels = read.get_pixels_by_source_frame(source_uid, list(range(1, len(water) + 1)), combine_segments=True)
    numbers = segment_numbers(read, label_map)
    assert sorted(numbers.values()) == [1, 2, 3, 4]
    back = np.zeros(256, np.uint8)
    for value, number in numbers.items():
        back[number] = value
    for index, labels in enumerate(label_map.labels):
        np.testing.assert_array_equal(back[pixels[index]], labels, err_msg=f"frame {index + 1}")
    planar = _groups(sr, "1410")
    assert len(planar) == 4 * len(water)
    sources = [i for g in planar for i in g[0].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121233"]
    assert {int(s.ReferencedSOPSequence[0].ReferencedFrameNumber) for s in sources} == set(range(1, len(water) + 1))
    assert {s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for s in sources} == {source_uid}


def test_slice_levels_are_coded_as_the_body_or_the_disc() -> None:
    """A slice level from the level model names one body (L3) or one disc (L5-S1: CID 7304's
    SCT 715056000, as no S1 vertebra code is verified); a reference range names its bodies."""
    from reports.sr import finding_sites

    def located(level: str) -> list[str]:
        return [site.value.value for site in finding_sites(Muscle.MULTIFIDUS, Laterality.LEFT, level)[1:]]

    assert located("L5-S1") == ["715056000"]
    assert located("L3-L4") == ["62551000"]
    assert located("L3") == ["36470004"]
    assert located("L1-L5") == [v.code.value for v in vertebra_range("L1-L5")]


def _key_slice_report(results: Results, label_map: LabelMap | None = None, slice_levels: bool = True,
                      muscles: tuple[str, ...] = ("multifidus", "erector_spinae")):
    """A report of TUM01's manual labels with levels L5 (slices 0-3), L4-L5 (4-5), L4 (6-9), L3-L4
    (10-12) and L3 (13-28) by height, L3-L4's key slice the middle one, and the range L3-L5 (all of
    them, as :data:`reports.levels.LEVEL_RANGES` has it); the assessments (of ``muscles``) and the
    report."""
    tum01 = results.tum01
    label_map = label_map or tum01.label_map
    order = sorted(range(len(tum01.water)), key=lambda i: float(tum01.water.geometry[i].centre[2]))
    heights = [float(tum01.water.geometry[i].centre[2]) for i in order]
    level_of = levels_by_height({"L5": (heights[0] - 1, heights[3] + 0.1), "L4-L5": (heights[4] - 0.1, heights[5] + 0.1),
                                 "L4": (heights[6] - 0.1, heights[9] + 0.1), "L3-L4": (heights[10] - 0.1, heights[12] + 0.1),
                                 "L3": (heights[13] - 0.1, heights[-1] + 1)}) if slice_levels else None
    patient = from_dataset(pydicom.dcmread(tum01.study.series["water"].files[0], stop_before_pixels=True))
    assessments = assess(measure(label_map, FatSource(water=tum01.water, fat=tum01.fat), level_of,
                                 key_frames={"L3-L4": order[11]} if slice_levels else None,
                                 level_ranges=LEVEL_RANGES), patient)
    assessments = [a for a in assessments if a.metrics.muscle in muscles]
    sources = source_datasets_of(label_map)
    seg = build_segmentation(label_map, *CARD, tum01.identity(), SOFTWARE, sources)
    sr = build_report(label_map, seg, assessments, tum01.identity(), *CARD, SOFTWARE, patient=patient,
                      source_datasets=sources)
    return assessments, sr


def _outlines(sr) -> dict[str, object]:
    """The TID 1410 groups with an image region (the key slices' outlines), by tracking identifier."""
    return _by_tracking_id(g for g in _groups(sr, "1410") if g.roi is not None)


def test_key_slice_outlines_are_closed_polylines_on_the_source_image(results: Results) -> None:
    from matplotlib.path import Path as Polygon

    assessments, sr = _key_slice_report(results)
    water = results.tum01.water
    keyed = [a.metrics for a in assessments if a.metrics.key_slice is not None and a.metrics.side != "both"]
    assert len(keyed) == 4 and {m.level for m in keyed} == {"L3-L4"}
    outlines = _outlines(sr)
    assert sorted(outlines) == sorted(f"{m.side} {m.muscle.words}, L3-L4, key slice" for m in keyed)
    for metrics in keyed:
        key = metrics.key_slice
        group = outlines[f"{metrics.side} {metrics.muscle.words}, L3-L4, key slice"]
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        points = region.value
        np.testing.assert_array_equal(points[0], points[-1])  # closed
        frame = water.geometry[key.frame_index]
        assert (points >= 0).all() and (points[:, 0] <= frame.columns).all() and (points[:, 1] <= frame.rows).all()
        # The image it lies on: the key slice's instance (single-frame: no frame number).
        reference = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == key.sop_instance_uid == frame.sop_instance_uid
        assert reference.ReferencedSOPClassUID == water.sop_class_uid and "ReferencedFrameNumber" not in reference
        # The outline encloses exactly the muscle's pixels (centres at column + 0.5, row + 0.5).
        mask = np.isin(results.tum01.label_map.labels[key.frame_index], metrics.label_values)
        rows, columns = np.nonzero(np.ones_like(mask))
        inside = Polygon(points).contains_points(np.column_stack([columns + 0.5, rows + 0.5])).reshape(mask.shape)
        assert (inside != mask).sum() <= 0.01 * mask.sum(), (int((inside != mask).sum()), int(mask.sum()))
        # The numbers of that slice, as the cohort's key_slice columns give them.
        assert _measurement(group, codes.AREA).value == pytest.approx(key.area_mm2)
        fat = _measurement(group, codes.FAT_FRACTION)
        assert fat.value == pytest.approx(key.fat_percent) and fat.method == FatMethod.DIXON_FF.code
        sites = [site.value for site in group.finding_sites]
        assert len(sites) == 2 and sites[0] == metrics.muscle.code
        assert sites[1].value == "62551000"  # the L3-L4 disc (CID 7304), as the level groups code it
        assert group.finding_sites[0].laterality == Laterality(metrics.side).code
        assert group.finding_type == metrics.muscle.code


def test_key_slice_outlines_only_for_disc_levels_with_a_key_slice(results: Results) -> None:
    assessments, sr = _key_slice_report(results, slice_levels=False)
    assert _outlines(sr) == {}
    assessments, sr = _key_slice_report(results)
    tracking = {str(g.tracking_uid) for g in _outlines(sr).values()}
    again = {str(g.tracking_uid) for g in _outlines(_key_slice_report(results)[1]).values()}
    others = {str(g.tracking_uid) for template in ("1410", "1411", "1501") for g in _groups(sr, template)
              if getattr(g, "roi", None) is None}
    assert len(tracking) == 4 and tracking == again and not tracking & others


def test_an_outline_keeps_the_largest_piece_and_closes_at_the_image_edge() -> None:
    from reports.sr import outline

    mask = np.zeros((10, 12), bool)
    mask[0:4, 0:5] = True  # touches the top and left edges
    mask[7:9, 9:11] = True  # a smaller piece
    points = outline(mask)
    np.testing.assert_array_equal(points[0], points[-1])
    assert points[:, 0].min() == 0 and points[:, 0].max() == 5 and points[:, 1].min() == 0 and points[:, 1].max() == 4
    assert outline(np.zeros((4, 4), bool)) is None


def test_the_report_with_key_slice_outlines_passes_dciodvfy_and_pixelmed(results: Results) -> None:
    """dciodvfy on the full report; PixelMed (minutes and gigabytes for a full report, see above)
    on the report of one muscle on one labelled slice that is the key slice of its disc."""
    _, sr = _key_slice_report(results)
    path = results.tum01.folder / "key-slices-sr.dcm"
    sr.save_as(path)
    result = validators.dciodvfy(path)
    assert result.errors == [], result.describe()
    assert all(f"<{PRIVATE_SCHEME}>" in w for w in result.warnings), result.describe()

    tum01 = results.tum01
    order = sorted(range(len(tum01.water)), key=lambda i: float(tum01.water.geometry[i].centre[2]))
    keep = order[11]
    labels = tuple(l if i == keep else np.zeros_like(l) for i, l in enumerate(tum01.label_map.labels))
    # One muscle: the validator runs out of 4 GB on both muscles' groups with their level groups.
    _, small = _key_slice_report(results, LabelMap(tum01.water, labels, MEANING), muscles=("multifidus",))
    assert len(_outlines(small)) == 2
    # The range L3-L5 is among the groups validated, its finding sites the bodies L3, L4 and L5.
    ranges = {k: g for k, g in _by_tracking_id(_groups(small, "1501")).items() if k.endswith(", L3-L5")}
    assert ranges and all([s.value for s in g.finding_sites][1:] == codes.level_sites("L3-L5")
                          for g in ranges.values())
    path = results.tum01.folder / "key-slices-one-slice-sr.dcm"
    small.save_as(path)
    result = validators.sr_validator(path)
    assert "Found Root Template TID_1500" in result.output, result.describe()
    mixups, others = validators.pixelmed_template_mixups(result, pydicom.dcmread(path))
    assert others == [], "\n".join(others[:20])


def test_key_slice_outlines_on_an_enhanced_source_name_their_frame(tmp_path: Path) -> None:
    """On one multi-frame Enhanced MR instance the outline's image is that instance and its frame."""
    studies.require_data()
    study = studies.write_enhanced_study(tmp_path, seed="report-tests-enhanced-key", contrasts=("water", "fat"))
    water, fat = (read_series(study.series[c].files) for c in ("water", "fat"))
    label_map = manual_label_map(water)
    order = sorted(range(len(water)), key=lambda i: float(water.geometry[i].centre[2]))
    heights = [float(water.geometry[i].centre[2]) for i in order]
    level_of = levels_by_height({"L3-L4": (heights[10] - 0.1, heights[12] + 0.1)})
    identity = ResultIdentity([water.series_instance_uid, fat.series_instance_uid], " ".join(CARD), SOFTWARE)
    seg = build_segmentation(label_map, *CARD, identity, SOFTWARE)
    patient = from_dataset(pydicom.dcmread(study.series["water"].files[0], stop_before_pixels=True))
    assessments = assess(measure(label_map, FatSource(water=water, fat=fat), level_of, key_frames={"L3-L4": order[11]}),
                         patient)
    sr = build_report(label_map, seg, assessments, identity, *CARD, SOFTWARE)
    outlines = _outlines(sr)
    assert len(outlines) == 4
    for group in outlines.values():
        reference = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == water.geometry[order[11]].sop_instance_uid
        assert int(reference.ReferencedFrameNumber) == water.geometry[order[11]].frame_number
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    result = validators.dciodvfy(path)
    assert result.errors == [], result.describe()
