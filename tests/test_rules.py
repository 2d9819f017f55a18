"""Selection rules on header summaries: each series gets one decision with a reason."""

from __future__ import annotations

import math

from node.config import load_config
from node.orchestration.rules import SeriesHeaders, decide_study, dixon_role, orientation_name

RULES = load_config(environ={}).rules
AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]


def _tilted(degrees: float) -> list[float]:
    """An axial plane tilted about the patient's left-right axis, like a slab along a disc."""
    a = math.radians(degrees)
    return [1.0, 0.0, 0.0, 0.0, math.cos(a), math.sin(a)]


def series(uid: str, *, image_type=("ORIGINAL", "PRIMARY", "M", "ND"), description="t1_tse_tra",
           body_part="LSPINE", orientations=None, tr=600.0, te=12.0, modality="MR",
           sop_class="1.2.840.10008.5.1.4.1.1.4", frame_of_reference="1.2.3", study_description="MR LWS",
           scan_options=(), **extra) -> SeriesHeaders:
    orientations = orientations or [AXIAL] * 3
    headers = []
    for index, orientation in enumerate(orientations):
        headers.append({
            "Modality": modality, "SOPClassUID": sop_class, "SeriesDescription": description,
            "StudyDescription": study_description, "ProtocolName": "", "BodyPartExamined": body_part,
            "ImageType": list(image_type), "RepetitionTime": tr, "EchoTime": te, "ScanOptions": list(scan_options),
            "FrameOfReferenceUID": frame_of_reference,
            "frames": [{"orientation": orientation, "position": [0.0, 0.0, 4.0 * index], "spacing": [1.0, 1.0]}],
            **extra,
        })
    return SeriesHeaders(uid, "1.9", 1, tuple(headers))


def decide(*items: SeriesHeaders) -> dict:
    return {d.series_uid: d for d in decide_study(items, RULES)}


def test_dixon_water_and_fat_are_paired_with_in_phase() -> None:
    dixon = dict(tr=6.5, te=2.46, description="t1_vibe_dixon_tra")
    got = decide(
        series("w", image_type=("DERIVED", "PRIMARY", "DIXON", "WATER"), **dixon),
        series("f", image_type=("DERIVED", "PRIMARY", "DIXON", "FAT"), **dixon),
        series("ip", image_type=("DERIVED", "PRIMARY", "DIXON", "IN_PHASE"), **dixon),
    )
    assert all(d.selected and d.kind == "dixon" for d in got.values())
    assert {d.role for d in got.values()} == {"water", "fat", "in_phase"}
    assert len({d.grouping for d in got.values()}) == 1
    assert "paired with fat, in_phase, water" in got["w"].reason


def test_dixon_components_of_different_acquisitions_are_not_paired() -> None:
    got = decide(
        series("w", image_type=("DERIVED", "PRIMARY", "DIXON", "WATER"), frame_of_reference="1.1"),
        series("f", image_type=("DERIVED", "PRIMARY", "DIXON", "FAT"), frame_of_reference="2.2"),
    )
    assert not got["w"].selected and "without a water and fat pair" in got["w"].reason


def test_philips_tokens_and_vendor_descriptions() -> None:
    assert dixon_role(["DERIVED", "PRIMARY", "W", "W"], "")[0] == "water"
    assert dixon_role(["ORIGINAL", "PRIMARY", "FF"], "")[0] == "fat_fraction"
    assert dixon_role(["DERIVED", "PRIMARY", "M", "ND"], "T2_TSE_DIXON_TRA_OPP")[0] == "opposed_phase"
    assert dixon_role(["DERIVED", "PRIMARY", "M", "ND"], "mDixon W")[0] == "water"
    assert dixon_role(["ORIGINAL", "PRIMARY", "M", "ND"], "t2_tse_tra")[0] is None


def test_fat_fraction_map_alone_is_usable() -> None:
    got = decide(series("ff", image_type=("DERIVED", "PRIMARY", "FF")))
    assert got["ff"].selected and got["ff"].role == "fat_fraction"


def test_t1_and_t2_from_headers() -> None:
    got = decide(
        series("t1", tr=550, te=10),
        series("t2", tr=3500, te=95, description="t2_tse_tra"),
        series("pd", tr=2500, te=30, description="pd_tse_tra"),
        series("enh", tr=None, te=None, description="tra", AcquisitionContrast="T2"),
    )
    assert got["t1"].selected and got["t1"].kind == "t1" and "TR 550 ms, TE 10 ms" in got["t1"].reason
    assert got["t2"].selected and got["t2"].kind == "t2"
    assert not got["pd"].selected and "neither a Dixon component nor T1- or T2-weighted" in got["pd"].reason
    assert got["enh"].kind == "t2" and "AcquisitionContrast" in got["enh"].reason


def test_skips_with_reasons() -> None:
    got = decide(
        series("sag", orientations=[SAGITTAL] * 3, description="t2_tse_sag", tr=3500, te=95),
        series("head", body_part="HEAD", description="t1_se_tra", study_description="MR BRAIN"),
        series("ct", modality="CT"),
        series("seg", sop_class="1.2.840.10008.5.1.4.1.1.66.4"),
        series("stir", description="t2_stir_tra", tr=4000, te=60),
        series("fs", scan_options=("FS",), tr=4000, te=90),
        series("loc", description="localizer"),
        series("spine", body_part="SPINE", study_description="MR HWS", description="t2_tse_tra"),
    )
    assert "not axial" in got["sag"].reason and "sagittal" in got["sag"].reason
    assert got["head"].reason == "not lumbar: BodyPartExamined HEAD is not a lumbar body part"
    assert "modality CT" in got["ct"].reason
    assert "not an MR image" in got["seg"].reason
    assert "fat-suppressed" in got["stir"].reason and "fat-suppressed" in got["fs"].reason
    assert "localizer" in got["loc"].reason
    assert "hws" in got["spine"].reason
    assert not any(d.selected for d in got.values())


def test_ambiguous_body_part_decided_by_description() -> None:
    got = decide(series("a", body_part="", study_description="MR Lendenwirbelsäule"),
                 series("b", body_part="SPINE", study_description="MR L-Spine"),
                 series("c", body_part="", study_description="MR ABDOMEN", description="t1_tra"))
    assert got["a"].selected and got["b"].selected
    assert not got["c"].selected and "no description matches a lumbar pattern" in got["c"].reason


def test_angled_slabs_are_still_axial_and_tilt_is_judged_per_slice() -> None:
    slabs = [_tilted(12)] * 3 + [_tilted(-25)] * 3
    got = decide(series("slabs", orientations=slabs))
    assert got["slabs"].selected and "2 orientations (angled slabs)" in got["slabs"].reason
    # A minority of off-plane slices (a localizer) is set aside, not a reason to skip the series.
    one_too_steep = [_tilted(12)] * 3 + [_tilted(55)]
    got = decide(series("steep", orientations=one_too_steep))
    assert got["steep"].selected and "1 off-plane (coronal) of 4 slices will be set aside" in got["steep"].reason
    mostly_steep = [_tilted(12)] * 2 + [_tilted(55)] * 2
    got = decide(series("steep", orientations=mostly_steep))
    assert not got["steep"].selected and "not axial: 2 of 4 slices" in got["steep"].reason


def test_slices_without_geometry_are_counted_and_too_few_axial_slices_skip() -> None:
    headers = series("gap", orientations=[AXIAL] * 4)
    frames = [dict(h) for h in headers.headers]
    frames[1] = {**frames[1], "frames": [{"orientation": AXIAL, "position": None, "spacing": [1.0, 1.0]}]}
    got = decide(SeriesHeaders("gap", "1.9", 1, tuple(frames)))
    assert got["gap"].selected
    assert "1 without position, orientation or pixel spacing of 4 slices will be set aside" in got["gap"].reason
    got = decide(series("two", orientations=[AXIAL] * 2))
    assert not got["two"].selected and "too few usable axial slices: 2 of 2 (at least 3 needed" in got["two"].reason


def test_dixon_components_pair_when_one_lacks_a_slice() -> None:
    dixon = dict(tr=6.5, te=2.46, description="t1_vibe_dixon_tra", orientations=[AXIAL] * 10)
    water = series("w", image_type=("DERIVED", "PRIMARY", "DIXON", "WATER"), **dixon)
    fat = series("f", image_type=("DERIVED", "PRIMARY", "DIXON", "FAT"), **dixon)
    fat = SeriesHeaders("f", fat.study_uid, 1, fat.headers[:9])
    other = series("w2", image_type=("DERIVED", "PRIMARY", "DIXON", "WATER"), **dixon)
    # Another station: the same slice pattern 200 mm further down shares no position.
    other = SeriesHeaders("w2", other.study_uid, 1, tuple(
        {**h, "frames": [{**h["frames"][0], "position": [0.0, 0.0, h["frames"][0]["position"][2] - 200]}]}
        for h in other.headers))
    got = decide(water, fat, other)
    assert got["w"].selected and got["f"].selected and got["w"].grouping == got["f"].grouping
    assert not got["w2"].selected and "without a water and fat pair" in got["w2"].reason


def test_orientation_names() -> None:
    assert orientation_name(AXIAL) == "axial"
    assert orientation_name(SAGITTAL) == "sagittal"
    assert orientation_name([1, 0, 0, 0, 0, -1]) == "coronal"
