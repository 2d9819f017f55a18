"""DICOM SEG of the real TUM01 study with its manual labels, checked by independent tools.

The label map is the manual segmentation of the MyoSegmenTUM subject on the DICOM water series
(as in test_metrics), not a model's output, so that every check compares with known labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from inference.card import LabelInfo
from inference.geometry import LabelMap, SeriesImage, read_series
from inference.vocabulary import Muscle
from reports import codes
from reports.seg import build_segmentation, segment_frames, segment_numbers, segments, source_datasets_of
from reports.uids import ResultIdentity
from tests import studies, validators

MEANING = {
    1: LabelInfo("erector_spinae", "right"),
    2: LabelInfo("multifidus", "right"),
    3: LabelInfo("multifidus", "left"),
    4: LabelInfo("erector_spinae", "left"),
}
CARD = ("musclenode-lumbar-dixon", "1.0.0")
SOFTWARE = "0.1.0"


@dataclass
class Tum01:
    """The written study, its series and the manual label map on the water series."""

    folder: Path
    study: studies.Study
    water: SeriesImage
    fat: SeriesImage
    label_map: LabelMap

    def identity(self, model_version: str = CARD[1]) -> ResultIdentity:
        return ResultIdentity([self.water.series_instance_uid, self.fat.series_instance_uid],
                              f"{CARD[0]} {model_version}", SOFTWARE)

    @property
    def source_files(self) -> list[Path]:
        return [Path(p) for info in self.study.series.values() for p in info.files]


def manual_label_map(water: SeriesImage) -> LabelMap:
    """TUM01's manual labels on the DICOM water series: slice k of the NIfTI is frame k's labels."""
    volumes = studies.load_volumes()
    first = water.geometry[water.stacks[0][0]].position[2]
    step = water.stack_offsets(0)[1] - water.stack_offsets(0)[0]
    labels = []
    for geometry in water.geometry:
        k = int(round((geometry.position[2] - first) / step))
        labels.append(volumes.labels[:, :, k].T.astype(np.uint8))
    return LabelMap(water, tuple(labels), MEANING, model_name=CARD[0], model_version=CARD[1])


def write_tum01(folder: Path) -> Tum01:
    """Write the Dixon water and fat series of TUM01 and label the water series by hand."""
    studies.require_data()
    study = studies.write_dixon_study(folder, seed="report-tests", contrasts=("water", "fat"))
    water = read_series(study.series["water"].files)
    fat = read_series(study.series["fat"].files)
    return Tum01(folder, study, water, fat, manual_label_map(water))


@pytest.fixture(scope="module")
def tum01(tmp_path_factory: pytest.TempPathFactory) -> Tum01:
    return write_tum01(tmp_path_factory.mktemp("tum01"))


@pytest.fixture(scope="module")
def seg_file(tum01: Tum01) -> Path:
    seg = build_segmentation(tum01.label_map, *CARD, tum01.identity(), SOFTWARE)
    path = tum01.folder / "seg.dcm"
    seg.save_as(path)
    return path


def test_one_binary_frame_per_source_frame_and_segment(tum01: Tum01, seg_file: Path) -> None:
    seg = pydicom.dcmread(seg_file)
    assert seg.SegmentationType == "BINARY"
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert len(seg.SegmentSequence) == 4
    assert int(seg.NumberOfFrames) == len(tum01.water) * 4
    by_segment: dict[int, list[str]] = {}
    for item in seg.PerFrameFunctionalGroupsSequence:
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        sources = item.DerivationImageSequence[0].SourceImageSequence
        assert len(sources) == 1
        by_segment.setdefault(number, []).append(str(sources[0].ReferencedSOPInstanceUID))
    water_uids = sorted(g.sop_instance_uid for g in tum01.water.geometry)
    assert {n: sorted(u) for n, u in by_segment.items()} == {n: water_uids for n in range(1, 5)}


def test_empty_frames_are_kept(tum01: Tum01) -> None:
    # TUM01 is labelled on every slice; clear three so that some frames have nothing in them.
    cleared = {0, 1, 28}
    labels = tuple(np.zeros_like(l) if i in cleared else l for i, l in enumerate(tum01.label_map.labels))
    label_map = LabelMap(tum01.water, labels, MEANING)
    seg = build_segmentation(label_map, *CARD, tum01.identity(), SOFTWARE, source_datasets_of(label_map))
    assert int(seg.NumberOfFrames) == len(tum01.water) * 4
    uids = [tum01.water.geometry[i].sop_instance_uid for i in sorted(cleared)]
    assert not seg.get_pixels_by_source_instance(uids, combine_segments=True).any()


def test_segments_are_coded_with_laterality_inside_the_property_type(seg_file: Path) -> None:
    seg = pydicom.dcmread(seg_file)
    found = {}
    for item in seg.SegmentSequence:
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert "SegmentedPropertyTypeModifierCodeSequence" not in item, "laterality at segment level"
        side = kind.SegmentedPropertyTypeModifierCodeSequence[0]
        found[str(item.SegmentLabel)] = (kind.CodeValue, kind.CodingSchemeDesignator, side.CodeValue)
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("91723000", "SCT")
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == CARD
        assert algorithm.AlgorithmSource == f"musclenode {SOFTWARE}"
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.TrackingID == item.SegmentLabel and item.TrackingUID.startswith("2.25.")
    assert found == {
        "left multifidus": ("5709001", "SCT", "7771000"),
        "right multifidus": ("5709001", "SCT", "24028007"),
        "left erector spinae": ("44947003", "SCT", "7771000"),
        "right erector spinae": ("44947003", "SCT", "24028007"),
    }


def test_files_into_the_source_study_and_frame_of_reference(tum01: Tum01, seg_file: Path) -> None:
    seg = pydicom.dcmread(seg_file)
    source = pydicom.dcmread(tum01.study.series["water"].files[0], stop_before_pixels=True)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "FrameOfReferenceUID"):
        assert seg.get(keyword) == source.get(keyword), keyword
    assert seg.Manufacturer == "musclenode" and seg.ManufacturerModelName == "musclenode"
    assert list(seg.SoftwareVersions) == [SOFTWARE, " ".join(CARD)]
    assert seg.SeriesDescription == f"Paraspinal muscles ({' '.join(CARD)})"
    # OHIF shows a SEG only when it lists the source series and every instance in it.
    series = seg.ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in series] == [tum01.water.series_instance_uid]
    assert {r.ReferencedSOPInstanceUID for r in series[0].ReferencedInstanceSequence} == \
        {g.sop_instance_uid for g in tum01.water.geometry}


def test_masks_read_back_equal_the_label_map(tum01: Tum01, seg_file: Path) -> None:
    seg = hd.seg.segread(seg_file)
    numbers = segment_numbers(seg, tum01.label_map)
    assert sorted(numbers) == [1, 2, 3, 4] and sorted(numbers.values()) == [1, 2, 3, 4]
    uids = [g.sop_instance_uid for g in tum01.water.geometry]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    back = np.zeros(256, np.uint8)
    for value, number in numbers.items():
        back[number] = value
    for index, labels in enumerate(tum01.label_map.labels):
        np.testing.assert_array_equal(back[pixels[index]], labels, err_msg=f"frame {index}")


def test_segments_and_frames_are_found_from_the_seg(tum01: Tum01, seg_file: Path) -> None:
    seg = pydicom.dcmread(seg_file)
    found = segments(seg)
    assert sorted(found) == [("erector_spinae", "left"), ("erector_spinae", "right"),
                             ("multifidus", "left"), ("multifidus", "right")]
    frames = segment_frames(seg)
    assert len(frames) == int(seg.NumberOfFrames) == len(set(frames.values()))
    geometry = tum01.water.geometry[7]
    frame = frames[(found[("multifidus", "left")].number, geometry.sop_instance_uid, 1)]
    item = seg.PerFrameFunctionalGroupsSequence[frame - 1]
    assert item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == geometry.sop_instance_uid


def test_dciodvfy_finds_no_error_or_warning(seg_file: Path) -> None:
    result = validators.dciodvfy(seg_file)
    assert result.errors == [] and result.returncode == 0, result.describe()
    assert result.warnings == [], result.describe()


def test_dciodvfy_flags_laterality_at_segment_level(tum01: Tum01, seg_file: Path) -> None:
    """The validator notices the placement the SEG avoids, so the clean result above means something."""
    seg = pydicom.dcmread(seg_file)
    item = seg.SegmentSequence[0]
    kind = item.SegmentedPropertyTypeCodeSequence[0]
    item.SegmentedPropertyTypeModifierCodeSequence = kind.SegmentedPropertyTypeModifierCodeSequence
    del kind.SegmentedPropertyTypeModifierCodeSequence
    moved = tum01.folder / "seg-laterality-at-segment-level.dcm"
    seg.save_as(moved)
    result = validators.dciodvfy(moved)
    assert any("Segmented Property Type Modifier Code Sequence" in w for w in result.warnings), result.describe()


def test_dcmqi_reads_the_seg_with_the_labelled_voxels(tum01: Tum01, seg_file: Path) -> None:
    nibabel = pytest.importorskip("nibabel")
    out = tum01.folder / "dcmqi-seg"
    result = validators.segimage2itkimage(seg_file, out)
    assert result.returncode == 0, result.describe()
    meta = json.loads((out / "meta.json").read_text())
    # dcmqi finds the laterality where the SEG puts it, inside the property type item.
    labels = {a["labelID"]: (a["SegmentLabel"], a["SegmentedPropertyTypeCodeSequence"]["CodeValue"],
                             a["SegmentedPropertyTypeModifierCodeSequence"]["CodeValue"])
              for group in meta["segmentAttributes"] for a in group}
    volume = np.stack(tum01.label_map.labels)
    numbers = segment_numbers(pydicom.dcmread(seg_file), tum01.label_map)
    for value, number in numbers.items():
        mask = np.asarray(nibabel.load(out / f"{number}.nii.gz").dataobj)
        assert int(np.count_nonzero(mask)) == int(np.count_nonzero(volume == value)), MEANING[value]
        info = MEANING[value]
        assert labels[number] == (info.name, info.muscle.code.value, info.side.code.value)


def test_uids_are_deterministic_and_change_with_the_model_version(tum01: Tum01) -> None:
    sources = source_datasets_of(tum01.label_map)
    first = build_segmentation(tum01.label_map, *CARD, tum01.identity(), SOFTWARE, sources)
    again = build_segmentation(tum01.label_map, *CARD, tum01.identity(), SOFTWARE, sources)
    other = build_segmentation(tum01.label_map, CARD[0], "1.0.1", tum01.identity("1.0.1"), SOFTWARE, sources)

    def uids(seg):
        return (seg.SOPInstanceUID, seg.SeriesInstanceUID, *(s.TrackingUID for s in seg.SegmentSequence))

    assert uids(first) == uids(again)
    assert all(a != b for a, b in zip(uids(first), uids(other)))
    assert first.SOPInstanceUID == tum01.identity().uid("seg", "instance")


def test_refuses_what_it_cannot_encode(tum01: Tum01) -> None:
    empty = LabelMap(tum01.water, tuple(np.zeros_like(l) for l in tum01.label_map.labels), MEANING)
    with pytest.raises(ValueError, match="no muscle"):
        build_segmentation(empty, *CARD, tum01.identity(), SOFTWARE)
    sources = source_datasets_of(tum01.label_map)[1:]
    with pytest.raises(ValueError, match="lack 1 instance"):
        build_segmentation(tum01.label_map, *CARD, tum01.identity(), SOFTWARE, sources)


def test_psoas_and_quadratus_lumborum_codes() -> None:
    # The two muscles TUM01 does not label: their codes are settled in reports/CODES.md.
    assert Muscle.PSOAS_MAJOR.code == Code("0001298", "UBERON", "psoas major muscle")
    assert Muscle.QUADRATUS_LUMBORUM.code.value == "6001004"
    assert [c.value for c in codes.level_sites("L3-L5")] == ["36470004", "11994002", "49668003"]



def test_a_missing_validator_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-validator is not installed"):
        validators.find_tool("no-such-validator", "nowhere")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run every validator"):
        validators.find_tool("no-such-validator", "nowhere")


def test_a_long_model_name_still_gives_a_valid_seg(tum01: Tum01) -> None:
    name = "musclenode-lumbar-dixon-with-a-very-long-name-from-a-site-registry-2026"
    seg = build_segmentation(tum01.label_map, name, "1.0.0", tum01.identity(), SOFTWARE,
                             source_datasets_of(tum01.label_map))
    assert len(seg.SeriesDescription) == 64 and seg.SeriesDescription.endswith("...")
    path = tum01.folder / "seg-long-name.dcm"
    seg.save_as(path)
    result = validators.dciodvfy(path)
    assert result.errors == [] and result.warnings == [], result.describe()
