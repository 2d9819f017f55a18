"""Selection rules on header summaries: each series gets one decision with a reason."""

from __future__ import annotations

import math

import pytest

from node.config import load_config
from node.orchestration.rules import SeriesHeaders, decide_study, dixon_role, echo_phase, orientation_name

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
    # Each is a component alone, processed as the contrast it is: areas and volumes, no fat.
    assert got["w"].grouping != got["f"].grouping
    for uid, role in (("w", "water"), ("f", "fat")):
        assert got[uid].selected and got[uid].kind == got[uid].role == role
        assert "without a water and fat pair" in got[uid].reason and "no fat" in got[uid].reason


SIEMENS_DIXON = dict(tr=6.5, te=2.46, description="t1_vibe_dixon_tra")


def _component(uid: str, value: str, **extra) -> SeriesHeaders:
    return series(uid, image_type=("ORIGINAL", "PRIMARY", "DIXON", value), **{**SIEMENS_DIXON, **extra})


def test_in_phase_and_opposed_phase_are_a_two_point_dixon_pair() -> None:
    got = decide(_component("ip", "IN_PHASE"), _component("op", "OPP_PHASE", te=1.23))
    assert all(d.selected and d.kind == "dixon" for d in got.values())
    assert {d.role for d in got.values()} == {"in_phase", "opposed_phase"}
    assert got["ip"].grouping == got["op"].grouping == "dixon:ip"
    assert "two-point Dixon" in got["op"].reason and "valid below 50 % fat" in got["op"].reason
    assert "segmented on in-phase" in got["ip"].reason


def test_water_and_fat_are_preferred_to_in_phase_and_opposed_phase() -> None:
    # One acquisition with all four components: one group, fat from water and fat, said so.
    got = decide(_component("w", "WATER"), _component("f", "FAT"), _component("ip", "IN_PHASE"),
                 _component("op", "OPP_PHASE", te=1.23))
    assert all(d.selected and d.kind == "dixon" for d in got.values()) and len({d.grouping for d in got.values()}) == 1
    assert "fat from water and fat, preferred to the two-point in-phase/opposed-phase" in got["op"].reason
    # A separate in-phase/opposed-phase acquisition in a study with a water/fat Dixon gives way to it.
    elsewhere = dict(frame_of_reference="9.9")
    got = decide(_component("w", "WATER"), _component("f", "FAT"), _component("ip", "IN_PHASE", **elsewhere),
                 _component("op", "OPP_PHASE", te=1.23, **elsewhere))
    assert got["w"].selected and got["f"].selected
    for uid in ("ip", "op"):
        assert not got[uid].selected
        assert "an in-phase/opposed-phase pair: the study's water/fat Dixon (series w) is measured instead" in \
            got[uid].reason


def test_vendor_in_phase_and_opposed_phase_pairs() -> None:
    # Philips mDixon / dual-echo FFE: ImageType ...\M_IP\M\IP and ...\M_OP\M\OP.
    got = decide(series("ip", image_type=("ORIGINAL", "PRIMARY", "M_IP", "M", "IP"), description="T1 mDixon"),
                 series("op", image_type=("ORIGINAL", "PRIMARY", "M_OP", "M", "OP"), description="T1 mDixon"))
    assert {d.role for d in got.values()} == {"in_phase", "opposed_phase"} and all(d.selected for d in got.values())
    # GE LAVA-Flex: ImageType OTHER, the component in the description.
    got = decide(series("ip", image_type=("ORIGINAL", "PRIMARY", "OTHER"), description="InPhase: Ax LAVA-Flex"),
                 series("op", image_type=("ORIGINAL", "PRIMARY", "OTHER"), description="OutPhase: Ax LAVA-Flex"))
    assert got["ip"].role == "in_phase" and got["op"].role == "opposed_phase" and got["ip"].kind == "dixon"
    # Siemens 1.5 T dual-echo FLASH: both series named "opp-in"; the echo time says which is which.
    flash = dict(image_type=("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), description="t1_fl2d_opp-in_tra", tr=150,
                 MagneticFieldStrength=1.5)
    got = decide(series("e1", te=2.38, **flash), series("e2", te=4.76, **flash))
    assert got["e1"].role == "opposed_phase" and got["e2"].role == "in_phase" and got["e1"].kind == "dixon"
    assert "TE 4.76 ms at 1.5 T" in got["e2"].reason
    # Both echoes in one series cannot be one component: said so, not taken as T1.
    both = series("both", te=2.38, **flash)
    both = SeriesHeaders("both", both.study_uid, 1, tuple({**h, "EchoTime": 2.38 + 2.38 * (i % 2)}
                                                        for i, h in enumerate(both.headers)))
    got = decide(both)
    assert not got["both"].selected and "dual-echo series holding 2 echo times (2.38, 4.76 ms)" in got["both"].reason


def test_echo_phase_at_1_5_and_3_tesla() -> None:
    assert echo_phase(2.3, 1.5) == "opposed_phase" and echo_phase(4.6, 1.5) == "in_phase"
    assert echo_phase(1.23, 3.0) == "opposed_phase" and echo_phase(2.46, 3.0) == "in_phase"
    assert echo_phase(3.5, 1.5) is None and echo_phase(2.3, None) is None


def test_a_lone_component_is_processed_as_the_contrast_it_is() -> None:
    got = decide(_component("ip", "IN_PHASE"))
    assert got["ip"].selected and got["ip"].kind == got["ip"].role == "t1"
    assert "processed as T1-weighted" in got["ip"].reason and "clustering" in got["ip"].reason
    got = decide(_component("w", "WATER"))
    assert got["w"].selected and got["w"].kind == "water" and "no fat" in got["w"].reason
    # In-phase carries fat, water does not: of the two, in-phase is processed.
    got = decide(_component("w", "WATER"), _component("ip", "IN_PHASE"))
    assert got["ip"].kind == "t1" and not got["w"].selected
    assert "the in_phase series ip of the same acquisition is processed instead" in got["w"].reason
    got = decide(_component("op", "OPP_PHASE", te=1.23))
    assert not got["op"].selected and "water and fat cancel" in got["op"].reason
    # With a water/fat Dixon in the study, a component of another acquisition gives way to it.
    got = decide(_component("w", "WATER"), _component("f", "FAT"), _component("ip", "IN_PHASE", frame_of_reference="9"))
    assert not got["ip"].selected and "the study's water/fat Dixon (series w) is measured instead" in got["ip"].reason


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
    assert got["sag"].role == "level_reference"
    assert got["head"].reason == "not lumbar: BodyPartExamined HEAD is not a lumbar body part"
    assert "modality CT" in got["ct"].reason
    assert "not an MR image" in got["seg"].reason
    assert "fat-suppressed" in got["stir"].reason and "fat-suppressed" in got["fs"].reason
    assert "localizer" in got["loc"].reason
    assert "hws" in got["spine"].reason
    assert not any(d.selected for d in got.values())


@pytest.mark.parametrize("name, fields, shown", [
    ("scan options FS", dict(scan_options=("PFP", "FS")), "ScanOptions FS"),
    ("scan options SFS", dict(scan_options=("SFS",)), "ScanOptions SFS"),
    ("water excitation", dict(scan_options=("WE",)), "ScanOptions WE"),
    ("STIR by TI at 1.5 T", dict(ScanningSequence=["SE", "IR"], InversionTime=150.0), "TI 150 ms, a STIR"),
    ("STIR by TI at 3 T", dict(ScanningSequence=["IR"], InversionTime=220.0), "TI 220 ms, a STIR"),
    ("STIR description", dict(description="t2_stir_tra"), "'t2_stir_tra'"),
    ("SPIR description", dict(description="T2W_TSE_SPIR"), "'T2W_TSE_SPIR'"),
    ("SPAIR description", dict(description="AX T2 SPAIR"), "'AX T2 SPAIR'"),
    ("FS description", dict(description="T2 FSE AX FS"), "'T2 FSE AX FS'"),
    ("fat sat description", dict(description="ax t2 fat sat"), "'ax t2 fat sat'"),
    ("fatsat protocol", dict(ProtocolName="t2_tse_fatsat_tra"), "'t2_tse_fatsat_tra'"),
    ("sequence name", dict(SequenceName="stir_tse"), "'stir_tse'"),
])
def test_fat_suppressed_series_are_skipped_from_their_headers(name: str, fields: dict, shown: str) -> None:
    description = fields.pop("description", "t2_tse_tra")
    (decision,) = decide(series("s", description=description, tr=4000, te=90, **fields)).values()
    assert not decision.selected, name
    assert decision.reason.startswith("fat-suppressed (") and shown in decision.reason, decision.reason


def test_inversion_recovery_with_a_long_ti_is_not_taken_for_stir() -> None:
    """T1-FLAIR (TI 860 ms): inversion recovery that leaves fat bright."""
    (decision,) = decide(series("flair", description="t1_tirm_tra", ScanningSequence=["IR"],
                                InversionTime=860.0)).values()
    assert decision.selected and decision.kind == "t1"


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


def test_fallbacks_wait_while_series_of_the_study_are_still_arriving() -> None:
    # The node judges a study each time one of its series is ready: a lone water series or an
    # in-phase/opposed-phase pair must not be processed while a partner may still be arriving.
    for items in ([_component("w", "WATER")], [_component("ip", "IN_PHASE"), _component("op", "OPP_PHASE", te=1.23)]):
        got = {d.series_uid: d for d in decide_study(items, RULES, still_arriving=1)}
        assert not any(d.selected for d in got.values())
        assert all("waits for the 1 series of this study still arriving" in d.reason for d in got.values())
    # A complete water/fat pair does not wait, nor does a T1 series.
    got = {d.series_uid: d for d in decide_study([_component("w", "WATER"), _component("f", "FAT"), series("t1")],
                                                 RULES, still_arriving=2)}
    assert all(d.selected for d in got.values())



def test_the_sagittal_t2_series_is_the_level_reference() -> None:
    sagittal = dict(orientations=[SAGITTAL] * 3)
    got = decide(
        series("t1sag", description="t1_tse_sag", tr=600, te=12, **sagittal),
        series("t2sag", description="t2_tse_sag", tr=3500, te=95, **sagittal),
        series("cervical", description="t2_tse_sag", tr=3500, te=95, body_part="CSPINE",
               study_description="MR HWS", **sagittal),
        series("t2tra", description="t2_tse_tra", tr=3500, te=95),
    )
    reference = got["t2sag"]
    assert reference.role == "level_reference" and not reference.selected and reference.grouping is None
    assert reference.reason.startswith("level reference: the sagittal series, T2-weighted (TR 3500 ms, TE 95 ms)")
    assert "not axial" in reference.reason
    assert got["t1sag"].role is None and "not axial" in got["t1sag"].reason
    assert got["cervical"].role is None  # not lumbar: never a level reference
    assert got["t2tra"].selected and got["t2tra"].role == "t2"
    # Without T2, the T1 series; without either weighting, another sagittal series (a PD).
    assert decide(series("t1sag", tr=600, te=12, **sagittal), series("t2tra", tr=3500, te=95))["t1sag"].role \
        == "level_reference"
    pd = decide(series("pd", description="pd_tse_sag", tr=2500, te=30, **sagittal))["pd"]
    assert pd.role == "level_reference" and "weighting unknown" in pd.reason
    # No sagittal series: no level reference.
    assert all(d.role != "level_reference" for d in decide(series("t2tra", tr=3500, te=95)).values())
