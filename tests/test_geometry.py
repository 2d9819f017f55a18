"""Series geometry and canonical resampling: synthetic series, then the real Dixon studies.

Expected positions come from ``tests.studies`` (the affines the writers used), never from
:mod:`inference.geometry` itself.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import ndimage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from inference.card import LabelInfo
from inference.geometry import (
    FrameGeometry,
    GeometryError,
    LabelMap,
    group_stacks,
    pair_frames,
    read_series,
    series_from_datasets,
)
from inference.resample import canonical_grid, resample
from tests import studies

LPS_TOLERANCE_MM = 1e-4
AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))


def _rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def _frame(row_cosine, column_cosine, centre=(0.0, 0.0, 0.0), size=(48, 48), spacing=(1.0, 1.0),
           uid="", number=0) -> FrameGeometry:
    """A frame of ``size`` pixels centred on ``centre``."""
    row_c, col_c = np.asarray(row_cosine, float), np.asarray(column_cosine, float)
    origin = (np.asarray(centre) - (size[1] - 1) / 2 * spacing[1] * row_c
              - (size[0] - 1) / 2 * spacing[0] * col_c)
    return FrameGeometry(tuple(origin), tuple(row_c), tuple(col_c), spacing, size[0], size[1], uid, number)


def _oblique() -> tuple[np.ndarray, np.ndarray]:
    """Axial rotated 30 degrees in-plane, then tilted 20 degrees about patient left-right."""
    rotation = _rotation("x", 20) @ _rotation("z", 30)
    return rotation @ np.array(AXIAL[0]), rotation @ np.array(AXIAL[1])


# ---------------------------------------------------------------------------------------------
# Synthetic DICOM
# ---------------------------------------------------------------------------------------------

_SERIES = generate_uid()
_FOR = generate_uid()


def _common(ds: Dataset, sop_class: str) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = _SERIES
    ds.FrameOfReferenceUID = _FOR
    ds.Modality = "MR"
    ds.PatientName = "SECRET^NAME"
    ds.PatientAge = "051Y"
    ds.PatientSex = "F"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _classic(frame: FrameGeometry, stored: np.ndarray, number: int, slope: float | None = None,
             intercept: float | None = None) -> Dataset:
    ds = _common(Dataset(), studies.MR_IMAGE_STORAGE)
    ds.InstanceNumber = number
    ds.ImagePositionPatient = list(frame.position)
    ds.ImageOrientationPatient = list(frame.row_cosine + frame.column_cosine)
    ds.PixelSpacing = list(frame.pixel_spacing)
    ds.Rows, ds.Columns = frame.shape
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    return ds


def _pixels(seed: int, shape=(48, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, size=shape).astype(np.uint16)


def test_frame_geometry_round_trip_on_an_oblique_frame() -> None:
    row_c, col_c = _oblique()
    frame = _frame(row_c, col_c, centre=(10.0, -20.0, 35.0), size=(40, 56), spacing=(0.8, 1.3))
    rows, columns = np.meshgrid(np.linspace(-3, 45, 7), np.linspace(-2, 60, 9), indexing="ij")
    points = frame.pixel_to_lps(rows, columns)
    # The DICOM equation, written out independently.
    expected = (np.asarray(frame.position) + columns[..., None] * 1.3 * row_c + rows[..., None] * 0.8 * col_c)
    np.testing.assert_allclose(points, expected, atol=1e-9)
    np.testing.assert_allclose(frame.affine @ np.array([5.0, 7.0, 0.0, 1.0]), np.append(frame.pixel_to_lps(7, 5), 1))
    back = frame.lps_to_pixel(points + 2.5 * frame.normal)
    np.testing.assert_allclose(back[..., 0], rows, atol=1e-9)
    np.testing.assert_allclose(back[..., 1], columns, atol=1e-9)
    np.testing.assert_allclose(back[..., 2], 2.5, atol=1e-9)
    np.testing.assert_allclose(frame.normal, np.cross(row_c, col_c), atol=1e-12)


def test_frame_geometry_rejects_bad_orientation_and_spacing() -> None:
    with pytest.raises(GeometryError, match="orthogonal"):
        FrameGeometry((0, 0, 0), (1, 0, 0), (0.5, 0.5, 0), (1, 1), 4, 4)
    with pytest.raises(GeometryError, match="spacing"):
        FrameGeometry((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 1), 4, 4)
    with pytest.raises(GeometryError, match="6 finite"):
        series_from_datasets([_bad_iop()])


def _bad_iop() -> Dataset:
    ds = _classic(_frame(*AXIAL), _pixels(0), 1)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1]
    return ds


def test_classic_series_order_stacks_and_rescale() -> None:
    # Two stacks: 5 axial slices listed head to feet, 3 slices of a slab tilted 15 degrees.
    tilt = _rotation("x", 15)
    axial = [_frame(*AXIAL, centre=(0, 0, 40.0 - 4 * k), uid="") for k in range(5)]
    slab = [_frame(tilt @ AXIAL[0], tilt @ AXIAL[1], centre=(0, 0, -30.0 + 4 * k)) for k in range(3)]
    frames = axial + slab
    stored = [_pixels(k) for k in range(len(frames))]
    datasets = [_classic(f, p, number=k + 1, slope=0.5, intercept=-100) for k, (f, p) in enumerate(zip(frames, stored))]
    shuffled = datasets[:]
    random.Random(3).shuffle(shuffled)
    series = series_from_datasets(shuffled)

    # Source order follows InstanceNumber, whatever order the files came in.
    assert [g.sop_instance_uid for g in series.geometry] == [str(d.SOPInstanceUID) for d in datasets]
    assert all(g.frame_number == 1 for g in series.geometry)
    for k, pixels in enumerate(series.frames):
        assert pixels.dtype == np.float32 and not pixels.flags.writeable
        np.testing.assert_allclose(pixels, stored[k] * 0.5 - 100)
    # Stacks: ascending along row x column cosine (+z for axial), so the axial list is reversed.
    assert series.stacks == ((4, 3, 2, 1, 0), (5, 6, 7))
    assert np.all(np.diff(series.stack_offsets(0)) > 0) and np.all(np.diff(series.stack_offsets(1)) > 0)
    np.testing.assert_allclose(series.stack_volume(0)[0], stored[4] * 0.5 - 100)
    assert series.frame_index(str(datasets[6].SOPInstanceUID)) == 6
    assert series.patient.age_years == 51 and series.patient.sex == "F"
    assert "SECRET" not in repr(series.patient)


def test_stacks_split_by_grid_and_keep_source_order_for_equal_positions() -> None:
    small = _frame(*AXIAL, size=(32, 32))
    frames = [_frame(*AXIAL, centre=(0, 0, 0)), small, _frame(*AXIAL, centre=(0, 0, 0))]
    assert group_stacks(frames) == ((0, 2), (1,))


def test_enhanced_per_frame_rescale_overrides_shared() -> None:
    frames = [_frame(*AXIAL, centre=(0, 0, 8.0 - 4 * k), uid="", number=k + 1) for k in range(3)]
    stored = np.stack([_pixels(10 + k) for k in range(3)])
    ds = _common(Dataset(), studies.ENHANCED_MR_IMAGE_STORAGE)
    ds.NumberOfFrames = 3
    ds.Rows, ds.Columns = 48, 48
    shared = Dataset()
    orientation, measures, transform = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = list(AXIAL[0] + AXIAL[1])
    measures.PixelSpacing = [1.0, 1.0]
    measures.SliceThickness = 4.0
    transform.RescaleSlope, transform.RescaleIntercept = 2.0, 0.0
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for k, frame in enumerate(frames):
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = list(frame.position)
        item.PlanePositionSequence = DicomSequence([position])
        if k == 1:  # this frame alone has its own rescale
            own = Dataset()
            own.RescaleSlope, own.RescaleIntercept = 0.25, 10.0
            item.PixelValueTransformationSequence = DicomSequence([own])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = stored.astype("<u2").tobytes()

    series = series_from_datasets([ds])
    assert [g.frame_number for g in series.geometry] == [1, 2, 3]
    np.testing.assert_allclose(series.frames[0], stored[0] * 2.0)
    np.testing.assert_allclose(series.frames[1], stored[1] * 0.25 + 10)
    np.testing.assert_allclose(series.frames[2], stored[2] * 2.0)
    assert series.stacks == ((2, 1, 0),)
    assert series.geometry[0].slice_thickness == 4.0


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_transfer_syntaxes_decode(tmp_path, syntax: str) -> None:
    stored = _pixels(7)
    ds = _classic(_frame(*AXIAL), stored, 1, slope=1.5, intercept=0)
    ds.BitsStored, ds.HighBit = 12, 11
    stored = stored % 4096
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.compress(syntax)
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    series = read_series([path])
    np.testing.assert_array_equal(series.frames[0], stored * 1.5)
    assert series.source_paths == {str(ds.SOPInstanceUID): path}


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
                                  "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_pydicom_reference_files_in_other_transfer_syntaxes(name: str) -> None:
    """pydicom's own real MR slice reads the same in every transfer syntax it ships in."""
    from pydicom.data import get_testdata_file

    reference = read_series([get_testdata_file("MR_small.dcm")])
    other = read_series([get_testdata_file(name)])
    np.testing.assert_array_equal(other.frames[0], reference.frames[0])
    assert other.geometry[0].position == reference.geometry[0].position
    assert reference.frames[0].max() == 2145 and reference.frames[0].min() == 127


def test_read_series_refuses_mixed_series(tmp_path) -> None:
    first = _classic(_frame(*AXIAL), _pixels(1), 1)
    other = _classic(_frame(*AXIAL, centre=(0, 0, 4)), _pixels(2), 2)
    other.SeriesInstanceUID = generate_uid()
    with pytest.raises(GeometryError, match="SeriesInstanceUID"):
        series_from_datasets([first, other])


def test_pair_frames_matches_by_position_and_refuses_mismatch() -> None:
    frames = [_frame(*AXIAL, centre=(0, 0, 4.0 * k)) for k in range(4)]
    water = series_from_datasets([_classic(f, _pixels(k), k + 1) for k, f in enumerate(frames)])
    # The fat series lists the same positions in another order.
    order = [2, 0, 3, 1]
    fat = series_from_datasets([_classic(frames[j], _pixels(20 + j), n + 1) for n, j in enumerate(order)])
    pairs = pair_frames(water, fat)
    assert pairs == (1, 3, 0, 2)
    for k, j in enumerate(pairs):
        np.testing.assert_allclose(fat.geometry[j].position, water.geometry[k].position)

    moved = frames[:3] + [_frame(*AXIAL, centre=(0, 0, 13.0))]  # 1 mm off
    shifted = series_from_datasets([_classic(f, _pixels(k), k + 1) for k, f in enumerate(moved)])
    with pytest.raises(GeometryError, match=r"frame 3 .* no partner .* 1\.000 mm"):
        pair_frames(water, shifted)
    fewer = series_from_datasets([_classic(f, _pixels(k), k + 1) for k, f in enumerate(frames[:3])])
    with pytest.raises(GeometryError, match="3 frames against 4"):
        pair_frames(water, fewer)


def test_label_map_validates_its_arrays() -> None:
    series = series_from_datasets([_classic(_frame(*AXIAL), _pixels(1), 1)])
    meaning = {1: LabelInfo("multifidus", "left")}
    good = np.zeros((48, 48), np.uint8)
    good[3, 3] = 1
    labels = LabelMap(series, (good,), meaning, "m", "1")
    assert labels.values_present() == [1] and labels.value_of("multifidus", "left") == 1
    with pytest.raises(GeometryError, match="uint8"):
        LabelMap(series, (good.astype(np.int16),), meaning)
    with pytest.raises(GeometryError, match=r"\[2\] have no meaning"):
        LabelMap(series, (good * 2,), meaning)
    with pytest.raises(GeometryError, match="2 label frames for a series of 1"):
        LabelMap(series, (good, good), meaning)


# ---------------------------------------------------------------------------------------------
# Canonical resampling
# ---------------------------------------------------------------------------------------------


def _x_image(frame: FrameGeometry) -> np.ndarray:
    """Pixel value = patient x (LPS, +x towards the patient's left)."""
    rows, columns = np.meshgrid(np.arange(frame.rows), np.arange(frame.columns), indexing="ij")
    return frame.pixel_to_lps(rows, columns)[..., 0]


def _smooth_image(frame: FrameGeometry) -> np.ndarray:
    """Smooth blobs defined in patient space, so every orientation shows the same anatomy."""
    rows, columns = np.meshgrid(np.arange(frame.rows), np.arange(frame.columns), indexing="ij")
    p = frame.pixel_to_lps(rows, columns)
    blobs = [((8.0, 4.0, 0.0), 100.0), ((-9.0, -3.0, 0.0), 60.0), ((0.0, 10.0, 0.0), 30.0)]
    return sum(a * np.exp(-np.sum((p - np.array(c)) ** 2, axis=-1) / (2 * 6.0 ** 2)) for c, a in blobs)


MIRRORED = ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0))  # columns run from patient left to right
ROTATED = ((0.0, 1.0, 0.0), (-1.0, 0.0, 0.0))  # axial turned 90 degrees in-plane
ORIENTATIONS = {"axial": AXIAL, "oblique": _oblique(), "mirrored": MIRRORED, "rotated": ROTATED}


def test_canonical_grid_of_an_axial_frame_is_the_frame() -> None:
    frame = _frame(*AXIAL, centre=(3, 4, 5), size=(40, 50), spacing=(0.9, 0.9))
    grid = canonical_grid(frame, ["P", "L"], [0.9, 0.9])
    assert grid.shape == frame.shape
    np.testing.assert_allclose(grid.position, frame.position, atol=1e-9)
    np.testing.assert_allclose(grid.row_cosine, AXIAL[0], atol=1e-12)
    image = _smooth_image(frame)
    np.testing.assert_allclose(resample(image, frame, grid), image, atol=1e-4)


@pytest.mark.parametrize("name", ["axial", "oblique", "mirrored", "rotated"])
def test_canonical_array_puts_patient_left_where_the_card_says(name: str) -> None:
    frame = _frame(*ORIENTATIONS[name], size=(40, 56))
    for axes, axis, sign in ((["P", "L"], 1, 1), (["R", "A"], 0, -1)):
        grid = canonical_grid(frame, axes, [1.0, 1.0])
        canonical = resample(_x_image(frame), frame, grid)
        # Only where the frame covers the grid (a rotated frame leaves corners empty).
        covered = ndimage.binary_erosion(resample(np.ones(frame.shape), frame, grid, fill=0) == 1, iterations=2)
        both = covered[:-1, :] & covered[1:, :] if axis == 0 else covered[:, :-1] & covered[:, 1:]
        other = covered[:, :-1] & covered[:, 1:] if axis == 0 else covered[:-1, :] & covered[1:, :]
        assert both.sum() > 500
        # ["P", "L"]: patient x (towards the left) grows by 1 mm per column and not down a
        # column; ["R", "A"] (a RAS volume's slice): x falls by 1 mm per row.
        np.testing.assert_allclose(sign * np.diff(canonical, axis=axis)[both], 1.0, atol=0.02)
        assert np.max(np.abs(np.diff(canonical, axis=1 - axis)[other])) < 0.02


def test_tilted_slab_keeps_left_right_exactly() -> None:
    tilt = _rotation("x", 12)
    frame = _frame(tilt @ AXIAL[0], tilt @ AXIAL[1])
    grid = canonical_grid(frame, ["P", "L"], [1.0, 1.0])
    np.testing.assert_allclose(grid.row_cosine, (1, 0, 0), atol=1e-12)
    np.testing.assert_allclose(grid.column_cosine, tilt @ np.array([0, 1.0, 0]), atol=1e-12)


@pytest.mark.parametrize("name", ["axial", "oblique", "mirrored", "rotated"])
@pytest.mark.parametrize("spacing", [1.0, 0.7])
def test_resampling_to_canonical_and_back_is_the_identity(name: str, spacing: float) -> None:
    frame = _frame(*ORIENTATIONS[name], size=(50, 60), spacing=(0.9, 1.1))
    image = _smooth_image(frame)
    grid = canonical_grid(frame, ["P", "L"], [spacing, spacing])
    back = resample(resample(image, frame, grid), grid, frame)
    # Two bilinear passes at about 1 mm over blobs of sigma 6 mm err by about 1 % of the peak;
    # a geometry off by one pixel would err by about 10 %.
    assert np.max(np.abs(back - image)) < 0.015 * image.max()
    # ...and not by accident: the canonical array is not the source array for rotated frames.
    if name != "axial":
        canonical = resample(image, frame, grid)
        assert canonical.shape != image.shape or np.max(np.abs(canonical - image)) > 0.1 * image.max()


def test_a_plane_far_from_the_models_plane_is_refused() -> None:
    sagittal = _frame((0, 1, 0), (0, 0, -1))
    with pytest.raises(GeometryError, match="90 degrees"):
        canonical_grid(sagittal, ["P", "L"], [1, 1])


# ---------------------------------------------------------------------------------------------
# Real series from the MyoSegmenTUM volumes
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, studies.Study]:
    studies.require_data()
    root = tmp_path_factory.mktemp("geometry")
    # One seed: the studies share their frame of reference, as series of one exam do.
    return {
        "classic": studies.write_dixon_study(root / "classic", contrasts=("water", "fat"), seed="geometry"),
        "enhanced": studies.write_enhanced_study(root / "enhanced", contrasts=("water", "fat"), seed="geometry"),
        # Compressed writes get a new SOPInstanceUID from pydicom's compress(), which SeriesInfo
        # does not record: used for pixels only.
        "enhanced_j2k": studies.write_enhanced_study(root / "enhanced_j2k", contrasts=("fat",),
                                                     transfer_syntax=JPEG2000Lossless, seed="geometry"),
        "two_slab": studies.write_two_slab_study(root / "two_slab", seed="geometry"),
        "sagittal": studies.write_sagittal_series(root / "sagittal", seed="geometry"),
    }


def _check_against_truth(series, info: studies.SeriesInfo) -> None:
    assert len(series) == info.number_of_frames
    rng = np.random.default_rng(0)
    for geometry, truth in zip(series.geometry, info.frame_affines):
        rows = rng.uniform(0, geometry.rows - 1, 20)
        columns = rng.uniform(0, geometry.columns - 1, 20)
        expected = (truth @ np.stack([columns, rows, np.zeros(20), np.ones(20)]))[:3].T
        np.testing.assert_allclose(geometry.pixel_to_lps(rows, columns), expected, atol=LPS_TOLERANCE_MM)
        back = geometry.lps_to_pixel(expected)
        np.testing.assert_allclose(back[:, 0], rows, atol=1e-6)
        np.testing.assert_allclose(back[:, 1], columns, atol=1e-6)


@pytest.mark.parametrize("kind,role", [("classic", "water"), ("classic", "fat"), ("enhanced", "fat"),
                                       ("two_slab", "water"), ("sagittal", "sagittal")])
def test_real_series_geometry_matches_ground_truth(real, kind: str, role: str) -> None:
    info = real[kind].series[role]
    files = list(info.files)
    random.Random(1).shuffle(files)  # a store lists files in its own order
    series = read_series(files)
    _check_against_truth(series, info)
    assert series.frame_of_reference_uid == real[kind].frame_of_reference_uid
    assert series.series_instance_uid == info.series_uid
    # Source order: instances by InstanceNumber, frames in frame order (as the writers listed them).
    assert list(dict.fromkeys(g.sop_instance_uid for g in series.geometry)) == info.sop_instance_uids


def test_real_classic_and_enhanced_pixels_and_rescale(real) -> None:
    fat = studies.contrast_volume("fat")
    classic = read_series(real["classic"].series["fat"].files)
    enhanced = read_series(real["enhanced_j2k"].series["fat"].files)
    assert real["classic"].series["fat"].rescale_slope != 1.0  # the fat lattice needs a slope
    assert len(enhanced.source_paths) == 1 and [g.frame_number for g in enhanced.geometry] == list(range(1, 30))
    for k in range(fat.shape[2]):
        expected = fat[:, :, k].T  # slice k is data[:, :, k].T (see tests.studies)
        np.testing.assert_allclose(classic.frames[k], expected, rtol=1e-6, atol=1e-3)
        np.testing.assert_array_equal(enhanced.frames[k], classic.frames[k])
    assert classic.stacks == enhanced.stacks == (tuple(range(29)),)
    assert classic.patient.age_years == 34 and classic.patient.bmi == pytest.approx(74 / 1.78 ** 2)


def test_real_two_slab_series_forms_two_stacks_along_their_normals(real) -> None:
    info = real["two_slab"].series["water"]
    series = read_series(info.files)
    assert series.stacks == (tuple(range(8)), tuple(range(8, 16)))
    for stack, truth in zip(range(2), info.stacks):
        np.testing.assert_allclose(series.geometry[series.stacks[stack][0]].normal, truth.normal, atol=1e-6)
        np.testing.assert_allclose(np.diff(series.stack_offsets(stack)), truth.slice_spacing, atol=1e-4)


def test_real_sagittal_series_is_ordered_left_to_right(real) -> None:
    series = read_series(real["sagittal"].series["sagittal"].files)
    xs = [series.geometry[i].position[0] for i in series.stacks[0]]
    normal = series.geometry[0].normal
    assert abs(normal[0]) > 0.99
    assert np.all(np.diff(xs) * np.sign(normal[0]) > 0)


def test_real_dixon_frames_pair_across_series_and_refuse_other_geometry(real) -> None:
    water = read_series(real["classic"].series["water"].files)
    fat_enhanced = read_series(real["enhanced"].series["fat"].files)
    assert pair_frames(water, fat_enhanced) == tuple(range(29))
    two_slab = read_series(real["two_slab"].series["fat"].files)
    with pytest.raises(GeometryError, match="16 frames against 29"):
        pair_frames(water, two_slab)
    slab_water = read_series(real["two_slab"].series["water"].files)
    assert pair_frames(slab_water, two_slab) == tuple(range(16))
