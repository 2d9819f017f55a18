"""Per-level results end to end: a real Dixon study with a sagittal level reference of the same
subject (tests/studies.py ``write_dixon_study_with_sagittal``: TUM01 with the registered
``myosegmentum-01`` vertebrae volume resliced sagittally in its frame of reference) through
``musclenode process``: per-level cohort rows, key slices of the disc levels, levels in
``slices.csv``, per-level groups and the key slices' planar outlines in the SR, which passes the
validators, and the same outlines in the key-slice outline document (reports.outline_report).

The study is written and processed once for the module (the model runs on 29 slices).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests import studies
from tests.test_level_wiring import _process

BODIES = {"L1", "L2", "L3", "L4", "L5"}
DISCS = {"L1-L2", "L2-L3", "L3-L4", "L4-L5"}


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    studies.require_data()
    studies.require_data(studies.vertebrae_files(studies.TUM01_VERTEBRAE_SUBJECT))
    root = tmp_path_factory.mktemp("level-results")
    study, volume = studies.write_dixon_study_with_sagittal(root / "in", seed="level-results")
    run = _process(root / "in", root / "out")
    assert run.returncode == 0, run.stdout + run.stderr
    return study, volume, root / "out"


def _table(out: Path, name: str) -> list[dict]:
    with open(out / f"{name}.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _sr(out: Path, study):
    import pydicom

    record = json.loads((out / study.study_uid / "study.json").read_text())
    (group,) = record["groups"]
    (name,) = [n for n in group["results"] if n.startswith("sr-")]
    return record, group, out / study.study_uid / name, pydicom.dcmread(out / study.study_uid / name)


def _walk(items):
    for item in items:
        yield item
        yield from _walk(getattr(item, "ContentSequence", []))


def test_the_levels_of_the_axial_slices_are_the_true_levels(processed) -> None:
    """The level reference is the sagittal series, and the slices' levels agree with the vertebrae
    labels (all but those on an end plate, which are within half a level)."""
    from inference.geometry import read_series
    from inference.training.vertebrae_eval import true_level

    study, volume, out = processed
    record, group, _, _ = _sr(out, study)
    assert record["level_reference"]["series"] == study.series["sagittal"].series_uid
    rows = _table(out, "slices")
    water = read_series(study.series["water"].files)
    truth = {uid: true_level(volume, geometry)[0]
             for uid, geometry in zip(study.series["water"].sop_instance_uids, water.geometry)}
    levels = {r["sop_instance_uid"]: r["level"] for r in rows}
    assert set(levels.values()) <= BODIES | DISCS, set(levels.values())
    agree = sum(levels[uid] == truth[uid] for uid in levels)
    print(f"TUM01 slices at the labels' level: {agree}/{len(levels)}")
    assert agree >= 0.85 * len(levels), (agree, len(levels))


def test_cohort_rows_per_level_with_key_slices_of_the_discs(processed) -> None:
    study, _, out = processed
    rows = [r for r in _table(out, "cohort") if r["study"] == study.study_uid]
    levels = {r["level"] for r in rows}
    assert "all" in levels
    assert {"L2", "L3", "L4", "L2-L3", "L3-L4", "L4-L5"} <= levels, levels
    assert levels <= BODIES | DISCS | {"all", "L3-L5"}, levels
    slice_uids = set(study.series["water"].sop_instance_uids)
    for row in rows:
        if row["level"] in DISCS:
            assert row["key_slice_sop_instance_uid"] in slice_uids, row
            assert float(row["key_slice_csa_mm2"]) > 0, row
            assert 0 < float(row["key_slice_fat_percent"]) < 50, row
        else:
            assert not row["key_slice_sop_instance_uid"] and not row["key_slice_csa_mm2"], row
    sides = {(r["muscle"], r["side"]) for r in rows if r["level"] == "L3-L4"}
    assert {("multifidus", "left"), ("multifidus", "right"), ("erector_spinae", "left"),
            ("erector_spinae", "right")} <= sides, sides


def test_a_range_of_levels_is_compared_with_the_reference_over_that_range(processed) -> None:
    """The series covers L3 to L5 (bodies and discs), not L1: the group L3-L5 is measured (its
    volume, CSA and fat over the range) and erector spinae is compared with reference-v1's rows
    over L3-L5 (Sollmann 2020, the age band of this 34-year-old), the first comparison of levels with a published reference; the
    multifidus has no reference over L3-L5 and says so."""
    study, _, out = processed
    rows = [r for r in _table(out, "cohort") if r["study"] == study.study_uid]
    over = {(r["muscle"], r["side"]): r for r in rows if r["level"] == "L3-L5"}
    assert not [r for r in rows if r["level"] == "L1-L5"]  # L1 is not covered
    slices = [r for r in _table(out, "slices") if r["study"] == study.study_uid and r["muscle"] == "erector_spinae"
              and r["side"] == "right" and r["level"] in {"L3", "L3-L4", "L4", "L4-L5", "L5"}]
    erector = over[("erector_spinae", "right")]
    assert int(erector["slices"]) == len(slices)
    assert float(erector["volume_cm3"]) > 0
    assert erector["fat_z"] and "erector_spinae fat_fraction_percent L3-L5" in erector["reference"], erector
    assert not over[("multifidus", "right")]["fat_z"]
    assert "over L3-L5" in over[("multifidus", "right")]["no_reference_reason"]


def test_slices_csv_rows_carry_levels(processed) -> None:
    study, _, out = processed
    rows = [r for r in _table(out, "slices") if r["study"] == study.study_uid]
    assert rows and all(r["level"] in BODIES | DISCS for r in rows), {r["level"] for r in rows}


def test_the_sr_has_per_level_groups(processed) -> None:
    from inference.vocabulary import Level

    study, _, out = processed
    _, _, _, sr = _sr(out, study)
    sites = set()
    for item in _walk(sr.ContentSequence):
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "363698007":
            code = item.ConceptCodeSequence[0]
            sites.add((code.CodingSchemeDesignator, code.CodeValue))
    for level in ("L3", "L3-L4", "L4-L5"):
        code = Level.parse(level).code
        assert (code.scheme_designator, code.value) in sites, level


def test_the_sr_outlines_each_muscle_at_each_disc_levels_key_slice(processed) -> None:
    """A TID 1410 group with a closed POLYLINE on the key slice per disc level, muscle and side,
    its area and fat those of the cohort's key_slice columns; the report passes dciodvfy."""
    import highdicom as hd

    from inference.vocabulary import PRIVATE_SCHEME
    from reports import codes
    from tests import validators

    study, _, out = processed
    _, _, path, _ = _sr(out, study)
    report = hd.sr.srread(path).content
    outlines = {str(g.tracking_identifier): g for g in report.get_planar_roi_measurement_groups() if g.roi is not None}
    rows = [r for r in _table(out, "cohort") if r["study"] == study.study_uid and r["level"] in DISCS
            and r["side"] in ("left", "right") and r["key_slice_sop_instance_uid"]]
    assert rows and len(outlines) == len(rows), (sorted(outlines), len(rows))
    for row in rows:
        group = outlines[f"{row['side']} {row['muscle'].replace('_', ' ')}, {row['level']}, key slice"]
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        points = group.roi.value
        assert len(points) > 8 and (points[0] == points[-1]).all()
        assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID \
            == row["key_slice_sop_instance_uid"]
        values = {m.name: m.value for m in group.get_measurements()}
        assert round(values[codes.AREA], 2) == float(row["key_slice_csa_mm2"])
        assert round(values[codes.FAT_FRACTION], 2) == float(row["key_slice_fat_percent"])
    result = validators.dciodvfy(path)
    assert result.errors == [], result.describe()
    assert all(f"<{PRIVATE_SCHEME}>" in w for w in result.warnings), result.describe()


def test_the_outline_document_has_the_key_slice_outlines_for_viewers(processed) -> None:
    """``process`` writes the key-slice outlines document (reports.outline_report) beside the SR:
    one tool-like TID 1501 group per disc level, muscle and side, its SCOORD under the area NUM,
    its area and fat those of the cohort's key_slice columns."""
    import pydicom

    from inference.vocabulary import Level, Muscle
    from reports.equipment import ResultSeries
    from reports.outline_report import CORNERSTONE_FREEHAND

    study, _, out = processed
    _, group, _, sr = _sr(out, study)
    (name,) = [n for n in group["results"] if n.startswith("outlines-")]
    document = pydicom.dcmread(out / study.study_uid / name)
    assert document.SeriesDescription == ResultSeries.OUTLINES.description()
    assert document.SeriesNumber == sr.SeriesNumber + 2 and document.StudyInstanceUID == sr.StudyInstanceUID
    container = next(i for i in document.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    rows = {(r["muscle"], r["side"], r["level"]): r for r in _table(out, "cohort")
            if r["study"] == study.study_uid and r["level"] in DISCS and r["side"] in ("left", "right")
            and r["key_slice_sop_instance_uid"]}
    muscles = {Muscle(m).code.value: m for m in ("multifidus", "erector_spinae")}
    discs = {Level.parse(level).code.value: level for level in DISCS}
    found = set()
    for group_item in container.ContentSequence:
        named = {}
        for item in group_item.ContentSequence:
            named.setdefault(item.ConceptNameCodeSequence[0].CodeValue, []).append(item)
        assert named["112039"][0].TextValue == CORNERSTONE_FREEHAND
        muscle_site, disc_site = named["363698007"]
        side = {"7771000": "left", "24028007": "right"}[muscle_site.ContentSequence[0].ConceptCodeSequence[0].CodeValue]
        key = (muscles[muscle_site.ConceptCodeSequence[0].CodeValue], side, discs[disc_site.ConceptCodeSequence[0].CodeValue])
        row = rows[key]
        area, fat = named["42798000"][0], named["129100"][0]
        (scoord,) = [i for i in area.ContentSequence if i.ValueType == "SCOORD"]
        assert scoord.RelationshipType == "INFERRED FROM" and scoord.GraphicType == "POLYLINE"
        assert list(scoord.GraphicData[:2]) == list(scoord.GraphicData[-2:])  # closed
        assert scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID \
            == row["key_slice_sop_instance_uid"]
        assert round(float(area.MeasuredValueSequence[0].NumericValue), 2) == float(row["key_slice_csa_mm2"])
        assert round(float(fat.MeasuredValueSequence[0].NumericValue), 2) == float(row["key_slice_fat_percent"])
        found.add(key)
    assert found == set(rows) and len(container.ContentSequence) == len(rows)
