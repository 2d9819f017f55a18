"""Series as scanners and archives really send them, made from the studies of tests/studies.py.

Each function changes a written study in place, the way a real series deviates from a clean
one, and keeps the :class:`tests.studies.Study` record in step (files, SOP Instance UIDs,
frame affines), so that a test knows exactly which instance is the odd one:

* :func:`repeat_slice` -- a slice acquired again at the same position (a new SOP Instance UID,
  a later AcquisitionTime, the next InstanceNumber); the first acquisition is motion-blurred, as
  the reason to repeat it usually is.
* :func:`remove_attribute` -- an instance without ImagePositionPatient, ImageOrientationPatient or
  PixelSpacing.
* :func:`insert_localizer` -- a sagittal localizer image inside the axial series (same series
  UID, resampled from the real volume).
* :func:`damage_pixel_data` -- an instance whose Pixel Data is empty or cut short.

The pixels stay the real MyoSegmenTUM voxels (or trilinear samples of them), as in
tests/studies.py.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from tests import studies
from tests.studies import Study

__all__ = ["damage_pixel_data", "insert_localizer", "remove_attribute", "repeat_slice"]


def _time_plus(hhmmss: str, seconds: int) -> str:
    total = (int(hhmmss[:2]) * 3600 + int(hhmmss[2:4]) * 60 + int(hhmmss[4:6]) + seconds) % 86400
    return f"{total // 3600:02d}{total // 60 % 60:02d}{total % 60:02d}"


def _next_instance_number(study: Study, role: str) -> int:
    return 1 + max(int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in study.series[role].files)


def _add(study: Study, role: str, ds: pydicom.Dataset, affine: np.ndarray) -> None:
    info = study.series[role]
    path = info.files[0].parent / f"ADDED{int(ds.InstanceNumber):04d}.dcm"
    if path.exists():
        raise FileExistsError(path)
    ds.save_as(path, enforce_file_format=True)
    info.files.append(path)
    info.sop_instance_uids.append(str(ds.SOPInstanceUID))
    info.frame_affines.append(affine)


def repeat_slice(study: Study, roles: tuple[str, ...], index: int, seconds_later: int = 90) -> dict[str, str]:
    """Acquire slice ``index`` of each series in ``roles`` again, ``seconds_later`` after the first.

    The repeat is a copy with a new SOP Instance UID, AcquisitionTime and ContentTime later by
    ``seconds_later``, and InstanceNumber one past the series' highest; the first acquisition's
    pixels are shifted by 12 pixels along the rows and columns (the motion that made a
    radiographer repeat it), so that a result made from the wrong one is visibly wrong.

    Returns
    -------
    dict of str to str
        Role to the repeat's SOP Instance UID (the first acquisition keeps its UID,
        ``study.series[role].sop_instance_uids[index]``).
    """
    repeats = {}
    for role in roles:
        info = study.series[role]
        first = pydicom.dcmread(info.files[index])
        repeat = pydicom.dcmread(info.files[index])
        repeat.SOPInstanceUID = generate_uid()
        repeat.file_meta.MediaStorageSOPInstanceUID = repeat.SOPInstanceUID
        repeat.InstanceNumber = _next_instance_number(study, role)
        repeat.AcquisitionTime = _time_plus(str(first.AcquisitionTime), seconds_later)
        repeat.ContentTime = _time_plus(str(first.ContentTime), seconds_later)
        moved = np.roll(first.pixel_array, (12, 12), axis=(0, 1))
        first.PixelData = np.ascontiguousarray(moved, dtype="<u2").tobytes()
        first.save_as(info.files[index], enforce_file_format=True)
        _add(study, role, repeat, info.frame_affines[index])
        repeats[role] = str(repeat.SOPInstanceUID)
    return repeats


def remove_attribute(study: Study, role: str, index: int, keyword: str) -> str:
    """Delete ``keyword`` (e.g. ``"ImagePositionPatient"``) from instance ``index``; returns its UID."""
    path = study.series[role].files[index]
    ds = pydicom.dcmread(path)
    delattr(ds, keyword)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def insert_localizer(study: Study, role: str) -> str:
    """Add a sagittal localizer image to the series of ``role``; returns its SOP Instance UID.

    The image is the middle slice of :func:`tests.studies.sagittal_geometry`, sampled from the
    series' own contrast, with the series' UIDs and rescale, InstanceNumber one past the highest
    and ImageType ``ORIGINAL\\PRIMARY\\LOCALIZER``, as scanners file a localizer taken within
    the series.
    """
    info = study.series[role]
    template = pydicom.dcmread(info.files[0])
    stack = studies.sagittal_geometry(n_slices=1)
    volumes = studies.load_volumes()
    values = studies.sample_trilinear(studies.contrast_volume(info.source),
                                      studies.lps_to_voxel(volumes.affine, stack.pixel_grid_lps()))[0]
    slope = float(template.get("RescaleSlope", 1.0))
    stored = np.clip(np.round(values / slope), 0, 65535).astype("<u2")
    ds = template
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = _next_instance_number(study, role)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in stack.position(0)]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in stack.row_cosine + stack.column_cosine]
    ds.PixelSpacing = [f"{v:.6f}" for v in stack.pixel_spacing]
    ds.SliceLocation = f"{float(np.dot(stack.position(0), stack.normal)):.4f}"
    ds.Rows, ds.Columns = stack.rows, stack.columns
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    _add(study, role, ds, stack.frame_affine(0))
    return str(ds.SOPInstanceUID)


def damage_pixel_data(study: Study, role: str, index: int, how: str) -> str:
    """Empty (``how="empty"``) or cut to a tenth (``"short"``) the Pixel Data of instance ``index``.

    Both are accepted by a storage SCP that checks only the encoding: the element is well
    formed, only its length does not match Rows, Columns and BitsAllocated.
    """
    path = study.series[role].files[index]
    ds = pydicom.dcmread(path)
    if how == "empty":
        ds.PixelData = b""
    elif how == "short":
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 10 // 2 * 2]
    else:
        raise ValueError(f"how must be 'empty' or 'short', not {how!r}")
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)
