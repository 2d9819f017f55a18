"""The key-slice outlines document (reports.outline_report) of TUM01's manual labels.

Levels by height as in tests/test_sr.py (``_key_slice_report``: L3-L4 with its key slice in the
middle of three slices): four outlines, left and right multifidus and erector spinae.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest

from inference.geometry import LabelMap
from inference.vocabulary import PRIVATE_SCHEME, FatMethod, Laterality
from reports import codes
from reports.equipment import ResultSeries
from reports.outline_report import CORNERSTONE_FREEHAND, build_outline_report
from reports.seg import source_datasets_of
from reports.sr import RESEARCH_STATEMENT
from tests import validators
from tests.test_seg import CARD, SOFTWARE
from tests.test_sr import Results, _key_slice_report, _outlines, results  # noqa: F401 (fixture)

AREA_CODE, FAT_CODE = "42798000", "129100"


def _outline_report(results: Results, label_map: LabelMap | None = None, **kwargs):
    assessments, sr = _key_slice_report(results, label_map, **kwargs)
    tum01 = results.tum01
    label_map = label_map or tum01.label_map
    document = build_outline_report(label_map, assessments, tum01.identity(), *CARD, SOFTWARE)
    return assessments, sr, document


def _imaging_groups(document) -> list:
    container = next(i for i in document.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    return list(container.ContentSequence)


def _named(group) -> dict[str, list]:
    found: dict[str, list] = {}
    for item in group.ContentSequence:
        found.setdefault(item.ConceptNameCodeSequence[0].CodeValue, []).append(item)
    return found


def test_one_tool_like_group_per_outline_with_the_outline_under_the_area(results: Results) -> None:
    from matplotlib.path import Path as Polygon

    assessments, sr, document = _outline_report(results)
    water = results.tum01.water
    keyed = [a.metrics for a in assessments if a.metrics.key_slice is not None and a.metrics.side != "both"]
    groups = _imaging_groups(document)
    assert len(keyed) == 4 and len(groups) == 4
    # Only TID 1501 groups: nothing without coordinates, which stops OHIF.
    assert {g.ContentTemplateSequence[0].TemplateIdentifier for g in groups} == {"1501"}
    main = _outlines(sr)
    seen_uids = set()
    for group, metrics in zip(groups, keyed):
        named = _named(group)
        assert named["112039"][0].TextValue == CORNERSTONE_FREEHAND
        seen_uids.add(named["112040"][0].UID)
        # The first NUM is the area, with the outline INFERRED FROM it; nothing else has coordinates.
        nums = [i for i in group.ContentSequence if i.ValueType == "NUM"]
        assert nums[0].ConceptNameCodeSequence[0].CodeValue == AREA_CODE
        assert not [i for i in group.ContentSequence if i.ValueType == "SCOORD"]
        (scoord,) = [i for i in nums[0].ContentSequence if i.ValueType == "SCOORD"]
        assert scoord.RelationshipType == "INFERRED FROM" and scoord.GraphicType == "POLYLINE"
        points = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)
        np.testing.assert_array_equal(points[0], points[-1])  # closed
        (image,) = scoord.ContentSequence
        assert image.RelationshipType == "SELECTED FROM"
        reference = image.ReferencedSOPSequence[0]
        key = metrics.key_slice
        assert reference.ReferencedSOPInstanceUID == key.sop_instance_uid
        assert reference.ReferencedSOPClassUID == water.sop_class_uid and "ReferencedFrameNumber" not in reference
        mask = np.isin(results.tum01.label_map.labels[key.frame_index], metrics.label_values)
        rows, columns = np.nonzero(np.ones_like(mask))
        inside = Polygon(points).contains_points(np.column_stack([columns + 0.5, rows + 0.5])).reshape(mask.shape)
        assert (inside != mask).sum() <= 0.01 * mask.sum()
        # The key slice's values, as the main report's TID 1410 outline has them.
        area = float(nums[0].MeasuredValueSequence[0].NumericValue)
        fat_item = named[FAT_CODE][0]
        fat = float(fat_item.MeasuredValueSequence[0].NumericValue)
        assert area == pytest.approx(key.area_mm2) and fat == pytest.approx(key.fat_percent)
        method = next(i for i in fat_item.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "370129005")
        assert method.ConceptCodeSequence[0].CodeValue == FatMethod.DIXON_FF.code.value
        twin = main[f"{metrics.side} {metrics.muscle.words}, L3-L4, key slice"]
        assert area == pytest.approx(next(m.value for m in twin.get_measurements() if m.name == codes.AREA))
        np.testing.assert_allclose(points, twin.roi.value)
        # Finding sites as the main report codes them: muscle with laterality, then the disc.
        sites = named["363698007"]
        assert [s.ConceptCodeSequence[0].CodeValue for s in sites] == [metrics.muscle.code.value, "62551000"]
        laterality = sites[0].ContentSequence[0].ConceptCodeSequence[0]
        assert laterality.CodeValue == Laterality(metrics.side).code.value
        assert named["121071"][0].ConceptCodeSequence[0].CodeValue == metrics.muscle.code.value  # finding
    assert len(seen_uids) == 4


def test_the_document_is_its_own_series_with_the_key_slices_as_evidence(results: Results) -> None:
    assessments, sr, document = _outline_report(results)
    tum01 = results.tum01
    assert document.SeriesInstanceUID == tum01.identity().uid("outlines", "series")
    assert document.SOPInstanceUID == tum01.identity().uid("outlines", "instance")
    assert document.SeriesInstanceUID != sr.SeriesInstanceUID and document.StudyInstanceUID == sr.StudyInstanceUID
    assert document.SeriesDescription == ResultSeries.OUTLINES.description()
    assert document.SeriesNumber == sr.SeriesNumber + 2 == tum01.water.series_number * 100 + 94
    assert document.PatientID == sr.PatientID
    (evidence,) = document.CurrentRequestedProcedureEvidenceSequence
    referenced = {i.ReferencedSOPInstanceUID for s in evidence.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
    keyed = {a.metrics.key_slice.sop_instance_uid for a in assessments if a.metrics.key_slice is not None}
    assert referenced == keyed
    texts = [i.TextValue for c in document.ContentSequence if c.ValueType == "CONTAINER"
             for i in getattr(c, "ContentSequence", []) if i.ValueType == "TEXT"]
    assert any(RESEARCH_STATEMENT in t for t in texts) and any(sr.SOPInstanceUID in t for t in texts)
    again = _outline_report(results)[2]
    assert [_named(g)["112040"][0].UID for g in _imaging_groups(again)] == \
        [_named(g)["112040"][0].UID for g in _imaging_groups(document)]
    # Sources passed in: the same document.
    passed = build_outline_report(tum01.label_map, assessments, tum01.identity(), *CARD, SOFTWARE,
                                  source_datasets=source_datasets_of(tum01.label_map))
    assert passed.CurrentRequestedProcedureEvidenceSequence == document.CurrentRequestedProcedureEvidenceSequence


def test_no_document_without_key_slices(results: Results) -> None:
    _, _, document = _outline_report(results, slice_levels=False)
    assert document is None


def test_highdicom_reads_the_groups_back(results: Results, tmp_path) -> None:
    _, _, document = _outline_report(results)
    path = tmp_path / "outlines.dcm"
    document.save_as(path)
    content = hd.sr.srread(path).content
    groups = content.get_image_measurement_groups()
    assert len(groups) == 4 and {str(g.tracking_identifier) for g in groups} == {CORNERSTONE_FREEHAND}
    assert all(m.name == codes.AREA for g in groups for m in g.get_measurements()[:1])


def test_dciodvfy_and_pixelmed_accept_it(results: Results) -> None:
    _, _, document = _outline_report(results)
    path = results.tum01.folder / "outlines.dcm"
    document.save_as(path)
    result = validators.dciodvfy(path)
    assert result.errors == [], result.describe()
    assert all(f"<{PRIVATE_SCHEME}>" in w for w in result.warnings), result.describe()
    result = validators.dcentvfy([*results.tum01.source_files, path])
    assert result.errors == [] and result.returncode == 0, result.describe()
    result = validators.sr_validator(path)
    assert "Found Root Template TID_1500" in result.output, result.describe()
    assert "OutOfMemoryError" not in result.output, result.describe()
    assert result.errors == [], result.describe()
