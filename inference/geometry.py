"""Series geometry: DICOM instances to per-frame images with exact patient-space geometry.

Coordinate conventions
----------------------
Patient coordinates are DICOM LPS millimetres: +x towards the patient's **left**, +y towards
posterior, +z towards the head. A pixel is addressed NumPy-style as ``(row, column)``; its
centre lies at ``position + column * spacing_c * row_cosine + row * spacing_r * column_cosine``
(PS3.3 C.7.6.2.1.1), where ``row_cosine`` is the first ImageOrientationPatient triplet (the
direction in which the column index grows) and ``PixelSpacing`` is ``(between rows, between
columns)``. Left and right are read from these coordinates only, never from image columns.

Frames keep the order of the source: instances by InstanceNumber (ties in the order the files
were given), frames of a multi-frame instance in frame order. Stacks list frame indices
ascending along the stack's own normal ``row_cosine x column_cosine``.

Nothing here reads or writes anything but the given DICOM files; everything after reading is a
pure function of the headers and pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .card import LabelInfo
from .functional_groups import functional_group, is_enhanced
from .patient import PatientContext, from_dataset
from .vocabulary import Muscle, Side

__all__ = [
    "GeometryError",
    "FrameGeometry",
    "StudyInfo",
    "SeriesImage",
    "LateralityFinding",
    "LabelMap",
    "read_series",
    "series_from_datasets",
    "group_stacks",
    "pair_frames",
]

#: Largest difference between direction cosines still treated as the same orientation
#: (about 0.06 degrees: scanners write IOP to at least six decimals).
ORIENTATION_TOLERANCE = 1e-3
#: Largest distance between two frames' positions still treated as the same place (mm).
POSITION_TOLERANCE_MM = 0.05


class GeometryError(ValueError):
    """A series' headers do not describe images that can be placed in patient space."""


def _vector(values: Sequence[float], length: int, what: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise GeometryError(f"{what} is not numeric: {values!r}") from None
    if len(out) != length or not all(math.isfinite(v) for v in out):
        raise GeometryError(f"{what} must be {length} finite numbers, not {values!r}")
    return out


@dataclass(frozen=True)
class FrameGeometry:
    """Where one 2D frame lies in patient space (LPS).

    Attributes
    ----------
    position : tuple of 3 float
        ImagePositionPatient: LPS position (mm) of the centre of pixel (0, 0).
    row_cosine : tuple of 3 float
        Unit LPS direction in which the column index grows (first IOP triplet).
    column_cosine : tuple of 3 float
        Unit LPS direction in which the row index grows (second IOP triplet).
    pixel_spacing : tuple of 2 float
        ``(between rows, between columns)`` in mm, as PixelSpacing.
    rows, columns : int
        Matrix size.
    sop_instance_uid : str
        The source instance ("" for a grid that is not a DICOM frame, such as a model's
        canonical array).
    frame_number : int
        1-based frame number within the instance (1 for single-frame instances, 0 for a grid
        that is not a DICOM frame).
    slice_thickness : float or None
        Nominal slice thickness (mm) when the header gives one.
    """

    position: tuple[float, float, float]
    row_cosine: tuple[float, float, float]
    column_cosine: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    sop_instance_uid: str = ""
    frame_number: int = 0
    slice_thickness: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "position", _vector(self.position, 3, "position"))
        row = np.asarray(_vector(self.row_cosine, 3, "row cosine"))
        col = np.asarray(_vector(self.column_cosine, 3, "column cosine"))
        spacing = _vector(self.pixel_spacing, 2, "pixel spacing")
        if min(spacing) <= 0:
            raise GeometryError(f"pixel spacing must be positive, not {spacing}")
        norms = (float(np.linalg.norm(row)), float(np.linalg.norm(col)))
        # Scanners round IOP; a few 1e-4 off unit length or orthogonality is ordinary.
        if abs(norms[0] - 1) > 1e-2 or abs(norms[1] - 1) > 1e-2 or abs(float(row @ col)) > 1e-2:
            raise GeometryError(
                f"image orientation {tuple(row) + tuple(col)} is not two orthogonal unit vectors")
        row = row / norms[0]
        # Re-orthogonalise so that pixel_to_lps and lps_to_pixel are exact inverses.
        col = col - (col @ row) * row
        col = col / np.linalg.norm(col)
        object.__setattr__(self, "row_cosine", tuple(float(v) for v in row))
        object.__setattr__(self, "column_cosine", tuple(float(v) for v in col))
        object.__setattr__(self, "pixel_spacing", spacing)
        if int(self.rows) < 1 or int(self.columns) < 1:
            raise GeometryError(f"frame size must be positive, not {self.rows} x {self.columns}")
        object.__setattr__(self, "rows", int(self.rows))
        object.__setattr__(self, "columns", int(self.columns))
        object.__setattr__(self, "frame_number", int(self.frame_number))

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)``, the shape of the frame's pixel array."""
        return self.rows, self.columns

    @property
    def normal(self) -> np.ndarray:
        """Unit normal ``row_cosine x column_cosine`` (LPS)."""
        return np.cross(self.row_cosine, self.column_cosine)

    @property
    def affine(self) -> np.ndarray:
        """4 x 4 matrix mapping ``(column, row, 0, 1)`` to LPS mm (the DICOM equation's order).

        The third column is the unit normal, so the matrix is invertible and its inverse gives
        the signed distance from the plane as the third coordinate.
        """
        matrix = np.eye(4)
        matrix[:3, 0] = np.asarray(self.row_cosine) * self.pixel_spacing[1]
        matrix[:3, 1] = np.asarray(self.column_cosine) * self.pixel_spacing[0]
        matrix[:3, 2] = self.normal
        matrix[:3, 3] = self.position
        return matrix

    def pixel_to_lps(self, row: Any, column: Any) -> np.ndarray:
        """LPS positions (mm) of pixel coordinates.

        Parameters
        ----------
        row, column : float or array_like
            Pixel coordinates (fractional allowed), broadcast against each other.

        Returns
        -------
        numpy.ndarray
            Shape ``broadcast(row, column).shape + (3,)``.
        """
        row, column = np.broadcast_arrays(np.asarray(row, dtype=np.float64),
                                          np.asarray(column, dtype=np.float64))
        return (np.asarray(self.position)
                + column[..., None] * (self.pixel_spacing[1] * np.asarray(self.row_cosine))
                + row[..., None] * (self.pixel_spacing[0] * np.asarray(self.column_cosine)))

    def lps_to_pixel(self, points: Any) -> np.ndarray:
        """Pixel coordinates of LPS points.

        Parameters
        ----------
        points : array_like
            ``(..., 3)`` LPS mm.

        Returns
        -------
        numpy.ndarray
            ``(..., 3)``: fractional row, fractional column, and the signed distance (mm) of
            each point from the frame's plane along :attr:`normal`.
        """
        offset = np.asarray(points, dtype=np.float64) - np.asarray(self.position)
        return np.stack([
            offset @ np.asarray(self.column_cosine) / self.pixel_spacing[0],
            offset @ np.asarray(self.row_cosine) / self.pixel_spacing[1],
            offset @ self.normal,
        ], axis=-1)

    def crop(self, rows: slice, columns: slice) -> "FrameGeometry":
        """The grid of a rectangle of this frame's pixels (``rows`` and ``columns``, step 1).

        Pixel ``(r, c)`` of the result is pixel ``(rows.start + r, columns.start + c)`` of this
        frame; the result is not a DICOM frame (no SOP Instance UID).
        """
        r0, r1, _ = rows.indices(self.rows)
        c0, c1, _ = columns.indices(self.columns)
        if r1 <= r0 or c1 <= c0:
            raise GeometryError(f"empty crop {rows}, {columns} of a {self.rows} x {self.columns} frame")
        return FrameGeometry(position=tuple(self.pixel_to_lps(r0, c0)), row_cosine=self.row_cosine,
                             column_cosine=self.column_cosine, pixel_spacing=self.pixel_spacing,
                             rows=r1 - r0, columns=c1 - c0)

    @property
    def centre(self) -> np.ndarray:
        """LPS position of the frame's centre."""
        return self.pixel_to_lps((self.rows - 1) / 2, (self.columns - 1) / 2)

    def same_orientation(self, other: "FrameGeometry", tolerance: float = ORIENTATION_TOLERANCE) -> bool:
        """Whether both frames have the same row and column directions."""
        return bool(np.max(np.abs(np.subtract(self.row_cosine + self.column_cosine,
                                              other.row_cosine + other.column_cosine))) <= tolerance)

    def same_grid(self, other: "FrameGeometry", tolerance: float = ORIENTATION_TOLERANCE) -> bool:
        """Whether both frames have the same orientation, matrix size and pixel spacing."""
        return (self.shape == other.shape and self.same_orientation(other, tolerance)
                and bool(np.allclose(self.pixel_spacing, other.pixel_spacing, rtol=0, atol=1e-3)))


@dataclass(frozen=True)
class StudyInfo:
    """Study attributes the result objects repeat."""

    study_instance_uid: str
    study_date: str = ""
    study_time: str = ""
    accession_number: str = field(default="", repr=False)
    study_id: str = ""
    referring_physician_name: str = field(default="", repr=False)
    study_description: str = ""


def _readonly(array: Any, dtype: Any) -> np.ndarray:
    """A read-only copy, so that neither the caller nor a consumer can change what others share."""
    out = np.array(array, dtype=dtype, copy=True)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class SeriesImage:
    """One series as float images with per-frame geometry.

    Attributes
    ----------
    frames : tuple of numpy.ndarray
        One read-only float32 ``(rows, columns)`` array per source frame, in source order,
        rescale slope and intercept applied.
    geometry : tuple of FrameGeometry
        One per frame, same order.
    stacks : tuple of tuple of int
        Frames grouped by orientation and pixel grid; each stack lists frame indices ascending
        along its normal. Stacks are ordered by their first frame in source order.
    series_instance_uid, frame_of_reference_uid, sop_class_uid : str
        Identity; FrameOfReferenceUID says which series share patient coordinates.
    study : StudyInfo
    patient : PatientContext
        Age, sex, height, weight and BMI as the node reads them (:mod:`inference.patient`), and
        the patient's identity as recorded.
    modality, series_description : str
    series_number : int or None
    image_type : tuple of str
        ImageType of the first instance (FrameType is not repeated here).
    source_paths : dict of str to Path
        SOP Instance UID to the file it was read from (empty when built from datasets).
    """

    frames: tuple[np.ndarray, ...]
    geometry: tuple[FrameGeometry, ...]
    stacks: tuple[tuple[int, ...], ...]
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    study: StudyInfo
    patient: PatientContext = field(default_factory=lambda: from_dataset({}))
    modality: str = ""
    series_description: str = ""
    series_number: int | None = None
    image_type: tuple[str, ...] = ()
    source_paths: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.frames) != len(self.geometry) or not self.frames:
            raise GeometryError(
                f"series {self.series_instance_uid}: {len(self.frames)} frames but "
                f"{len(self.geometry)} geometries (need the same positive number)")
        frames = []
        for index, (pixels, geometry) in enumerate(zip(self.frames, self.geometry)):
            if np.shape(pixels) != geometry.shape:
                raise GeometryError(f"frame {index}: pixels {np.shape(pixels)} but geometry {geometry.shape}")
            frames.append(_readonly(pixels, np.float32))
        object.__setattr__(self, "frames", tuple(frames))
        object.__setattr__(self, "geometry", tuple(self.geometry))
        listed = sorted(i for stack in self.stacks for i in stack)
        if listed != list(range(len(self.frames))):
            raise GeometryError("stacks must list every frame index exactly once")
        object.__setattr__(self, "stacks", tuple(tuple(int(i) for i in s) for s in self.stacks))

    def __len__(self) -> int:
        return len(self.frames)

    def frame_index(self, sop_instance_uid: str, frame_number: int = 1) -> int:
        """Index of the frame that came from this instance and (1-based) frame number."""
        for index, geometry in enumerate(self.geometry):
            if geometry.sop_instance_uid == sop_instance_uid and geometry.frame_number == frame_number:
                return index
        raise KeyError(f"no frame {frame_number} of instance {sop_instance_uid} in this series")

    def stack_offsets(self, stack: int) -> np.ndarray:
        """Positions (mm) of a stack's frames along its normal, ascending."""
        indices = self.stacks[stack]
        normal = self.geometry[indices[0]].normal
        return np.array([np.dot(self.geometry[i].position, normal) for i in indices])

    def stack_volume(self, stack: int) -> np.ndarray:
        """A stack's frames as one ``(slices, rows, columns)`` float32 array, along its normal."""
        return np.stack([self.frames[i] for i in self.stacks[stack]])


@dataclass(frozen=True)
class LateralityFinding:
    """A label whose side disagrees with patient coordinates on one frame.

    Attributes
    ----------
    frame_index : int
        Index of the frame in its series (source order).
    muscle : Muscle
    action : str
        ``"swapped"`` (both sides were on the wrong side: the pair's values were exchanged) or
        ``"kept"`` (only one side was wrong, or the pair was incomplete: labels left as the
        model gave them, for a person to review).
    detail : str
        What was measured, in words (no patient data).
    """

    frame_index: int
    muscle: Muscle
    action: str
    detail: str


@dataclass(frozen=True, eq=False)
class LabelMap:
    """A segmentation on the source grid of one series, one label array per source frame.

    Attributes
    ----------
    series : SeriesImage
        The series whose frames the labels lie on, pixel for pixel (its geometry and UIDs are
        what results reference).
    labels : tuple of numpy.ndarray
        One read-only uint8 ``(rows, columns)`` array per frame of ``series``, same order.
    meaning : dict of int to LabelInfo
        Label value to canonical muscle and side; 0 is background and not listed.
    model_name, model_version : str
        The model that produced it (the version enters result UIDs).
    findings : tuple of LateralityFinding
        Left/right inconsistencies found after inference, and what was done about them.
    """

    series: SeriesImage
    labels: tuple[np.ndarray, ...]
    meaning: dict[int, LabelInfo]
    model_name: str = ""
    model_version: str = ""
    findings: tuple[LateralityFinding, ...] = ()

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.series.frames):
            raise GeometryError(f"{len(self.labels)} label frames for a series of {len(self.series)} frames")
        if 0 in self.meaning or any(not 0 < v < 256 for v in self.meaning):
            raise GeometryError("label values must be 1..255 (0 is the background)")
        arrays = []
        for index, (labels, geometry) in enumerate(zip(self.labels, self.series.geometry)):
            labels = np.asarray(labels)
            if labels.dtype != np.uint8 or labels.shape != geometry.shape:
                raise GeometryError(
                    f"label frame {index} must be uint8 {geometry.shape}, not {labels.dtype} {labels.shape}")
            arrays.append(_readonly(labels, np.uint8))
        present = set(np.unique(np.concatenate([a.ravel() for a in arrays]))) - {0}
        unknown = sorted(int(v) for v in present if int(v) not in self.meaning)
        if unknown:
            raise GeometryError(f"label values {unknown} have no meaning")
        object.__setattr__(self, "labels", tuple(arrays))
        object.__setattr__(self, "meaning", dict(sorted(self.meaning.items())))
        object.__setattr__(self, "findings", tuple(self.findings))

    def values_present(self) -> list[int]:
        """Label values that occur in at least one frame, ascending."""
        found = set()
        for labels in self.labels:
            found.update(int(v) for v in np.unique(labels))
        return sorted(found - {0})

    def value_of(self, muscle: Muscle | str, side: Side | str) -> int:
        """The label value of a muscle and side."""
        for value, info in self.meaning.items():
            if info.muscle == muscle and info.side == side:
                return value
        raise KeyError(f"no label for {side} {muscle}")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_series(paths: Iterable[str | Path]) -> SeriesImage:
    """Read one series from its DICOM files.

    Parameters
    ----------
    paths : iterable of path-like
        The series' instances, in any order; classic single-frame or enhanced multi-frame, in
        any transfer syntax pydicom decodes (the pylibjpeg plugins cover JPEG, JPEG-LS, JPEG
        2000 and RLE).

    Returns
    -------
    SeriesImage

    Raises
    ------
    GeometryError
        When the files are not one series, or a frame lacks position, orientation or spacing.
    """
    datasets = []
    for path in paths:
        try:
            datasets.append((pydicom.dcmread(path), Path(path)))
        except (OSError, InvalidDicomError) as exc:
            raise GeometryError(f"cannot read {path}: {exc}") from None
    return _build([d for d, _ in datasets], [p for _, p in datasets])


def series_from_datasets(datasets: Sequence[Dataset]) -> SeriesImage:
    """Build a :class:`SeriesImage` from datasets already in memory (pixels included)."""
    return _build(list(datasets), [None] * len(datasets))


def _build(datasets: list[Dataset], paths: list[Path | None]) -> SeriesImage:
    if not datasets:
        raise GeometryError("no instances given")
    first = datasets[0]
    for attribute in ("SeriesInstanceUID", "SOPClassUID"):
        values = {str(ds.get(attribute, "")) for ds in datasets}
        if len(values) != 1:
            raise GeometryError(f"instances differ in {attribute}: not one series of one kind")
    # Source order does not depend on how the files were listed.
    order = sorted(range(len(datasets)),
                   key=lambda i: (_int_or(datasets[i].get("InstanceNumber"), 1 << 31), i))
    frames: list[np.ndarray] = []
    geometry: list[FrameGeometry] = []
    source_paths: dict[str, Path] = {}
    seen: set[str] = set()
    for index in order:
        ds = datasets[index]
        uid = str(ds.get("SOPInstanceUID", ""))
        if not uid or uid in seen:
            raise GeometryError(f"instance {index} has a missing or repeated SOPInstanceUID")
        seen.add(uid)
        if paths[index] is not None:
            source_paths[uid] = paths[index]
        for pixels, frame in _instance_frames(ds):
            frames.append(pixels)
            geometry.append(frame)
    frame_of_reference = {str(ds.get("FrameOfReferenceUID", "")) for ds in datasets}
    if len(frame_of_reference) != 1:
        raise GeometryError("instances of the series have different FrameOfReferenceUIDs")
    return SeriesImage(
        frames=tuple(frames),
        geometry=tuple(geometry),
        stacks=group_stacks(geometry),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=frame_of_reference.pop(),
        sop_class_uid=str(first.SOPClassUID),
        study=_study_info(first),
        patient=from_dataset(first),
        modality=str(first.get("Modality", "")),
        series_description=str(first.get("SeriesDescription", "")),
        series_number=_int_or(first.get("SeriesNumber"), None),
        image_type=tuple(str(v) for v in (first.get("ImageType") or ())),
        source_paths=source_paths,
    )


def _int_or(value: Any, default: Any) -> Any:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _instance_frames(ds: Dataset) -> list[tuple[np.ndarray, FrameGeometry]]:
    uid = str(ds.SOPInstanceUID)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise GeometryError(f"instance {uid} is not a greyscale image")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises several types for missing decoders and bad data
        raise GeometryError(f"cannot decode the pixels of instance {uid}: {exc}") from None
    count = _int_or(ds.get("NumberOfFrames"), 1)
    stored = stored.reshape(count, int(ds.Rows), int(ds.Columns))
    enhanced = is_enhanced(ds)
    if not enhanced and count > 1:
        raise GeometryError(f"instance {uid} has {count} frames but no functional groups to place them")
    out = []
    for k in range(count):
        if enhanced:
            frame, slope, intercept = _enhanced_frame(ds, k)
        else:
            frame, slope, intercept = _classic_frame(ds)
        # float64 for the arithmetic so that exact lattices (slope 488/315) stay exact to float32.
        pixels = (stored[k].astype(np.float64) * slope + intercept).astype(np.float32)
        out.append((pixels, frame))
    return out


def _classic_frame(ds: Dataset) -> tuple[FrameGeometry, float, float]:
    uid = str(ds.SOPInstanceUID)
    missing = [a for a in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if a not in ds]
    if missing:
        raise GeometryError(f"instance {uid} lacks {', '.join(missing)}")
    frame = _frame(uid, 1, ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing,
                   ds.Rows, ds.Columns, ds.get("SliceThickness"))
    slope = _float_or_none(ds.get("RescaleSlope"))
    intercept = _float_or_none(ds.get("RescaleIntercept"))
    return frame, 1.0 if slope is None else slope, 0.0 if intercept is None else intercept


def _enhanced_frame(ds: Dataset, k: int) -> tuple[FrameGeometry, float, float]:
    uid = str(ds.SOPInstanceUID)
    position = functional_group(ds, k, "PlanePositionSequence")
    orientation = functional_group(ds, k, "PlaneOrientationSequence")
    measures = functional_group(ds, k, "PixelMeasuresSequence")
    if position is None or orientation is None or measures is None:
        raise GeometryError(f"frame {k + 1} of instance {uid} lacks plane position, orientation or pixel measures")
    frame = _frame(uid, k + 1, position.ImagePositionPatient, orientation.ImageOrientationPatient,
                   measures.PixelSpacing, ds.Rows, ds.Columns, measures.get("SliceThickness"))
    transform = functional_group(ds, k, "PixelValueTransformationSequence")
    slope = _float_or_none(transform.get("RescaleSlope")) if transform is not None else None
    intercept = _float_or_none(transform.get("RescaleIntercept")) if transform is not None else None
    return frame, 1.0 if slope is None else slope, 0.0 if intercept is None else intercept


def _frame(uid: str, number: int, position: Any, orientation: Any, spacing: Any, rows: Any,
           columns: Any, thickness: Any) -> FrameGeometry:
    try:
        iop = _vector(orientation, 6, "ImageOrientationPatient")
        return FrameGeometry(
            position=_vector(position, 3, "ImagePositionPatient"),
            row_cosine=iop[:3], column_cosine=iop[3:],
            pixel_spacing=_vector(spacing, 2, "PixelSpacing"),
            rows=int(rows), columns=int(columns), sop_instance_uid=uid, frame_number=number,
            slice_thickness=_float_or_none(thickness))
    except GeometryError as exc:
        raise GeometryError(f"frame {number} of instance {uid}: {exc}") from None


def _study_info(ds: Dataset) -> StudyInfo:
    return StudyInfo(
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        study_date=str(ds.get("StudyDate", "")),
        study_time=str(ds.get("StudyTime", "")),
        accession_number=str(ds.get("AccessionNumber", "")),
        study_id=str(ds.get("StudyID", "")),
        referring_physician_name=str(ds.get("ReferringPhysicianName", "")),
        study_description=str(ds.get("StudyDescription", "")),
    )


# ---------------------------------------------------------------------------------------------
# Stacks and pairing
# ---------------------------------------------------------------------------------------------


def group_stacks(geometry: Sequence[FrameGeometry],
                 tolerance: float = ORIENTATION_TOLERANCE) -> tuple[tuple[int, ...], ...]:
    """Group frames into stacks of one orientation and pixel grid, each ordered along its normal.

    Parameters
    ----------
    geometry : sequence of FrameGeometry
        Frames in source order.
    tolerance : float
        Largest difference between direction cosines within one stack.

    Returns
    -------
    tuple of tuple of int
        Frame indices per stack, ascending along ``row_cosine x column_cosine`` of the stack's
        first frame; frames at the same position keep their source order. Stacks come in the
        source order of their first frame.
    """
    stacks: list[list[int]] = []
    for index, frame in enumerate(geometry):
        for stack in stacks:
            if geometry[stack[0]].same_grid(frame, tolerance):
                stack.append(index)
                break
        else:
            stacks.append([index])
    ordered = []
    for stack in stacks:
        normal = geometry[stack[0]].normal
        ordered.append(tuple(sorted(stack, key=lambda i: (float(np.dot(geometry[i].position, normal)), i))))
    return tuple(ordered)


def pair_frames(reference: SeriesImage, other: SeriesImage,
                position_tolerance_mm: float = POSITION_TOLERANCE_MM,
                orientation_tolerance: float = ORIENTATION_TOLERANCE) -> tuple[int, ...]:
    """Match every frame of ``other`` to the frame of ``reference`` at the same place.

    Dixon components of one acquisition (water, fat, in-phase, opposed-phase) are separate
    series whose frames coincide; this finds, frame by frame, which is which, so that pixels
    can be combined one for one.

    Parameters
    ----------
    reference, other : SeriesImage
    position_tolerance_mm : float
        Largest distance between matched frames' ImagePositionPatient.
    orientation_tolerance : float
        Largest difference between matched frames' direction cosines.

    Returns
    -------
    tuple of int
        For each frame of ``reference`` (source order), the index of the matching frame of
        ``other``.

    Raises
    ------
    GeometryError
        When the series do not share a frame of reference or a frame count, or a frame has no
        partner at the same position with the same orientation, matrix and spacing.
    """
    where = f"series {other.series_instance_uid} against {reference.series_instance_uid}"
    if (reference.frame_of_reference_uid and other.frame_of_reference_uid
            and reference.frame_of_reference_uid != other.frame_of_reference_uid):
        raise GeometryError(f"{where}: different FrameOfReferenceUIDs, frames cannot be paired")
    if len(reference) != len(other):
        raise GeometryError(f"{where}: {len(other)} frames against {len(reference)}")
    positions = np.array([g.position for g in other.geometry])
    taken: dict[int, int] = {}
    pairs = []
    for index, frame in enumerate(reference.geometry):
        distances = np.linalg.norm(positions - np.asarray(frame.position), axis=1)
        candidates = [j for j in np.argsort(distances, kind="stable")
                      if distances[j] <= position_tolerance_mm
                      and other.geometry[j].same_grid(frame, orientation_tolerance) and j not in taken]
        if not candidates:
            nearest = float(distances.min())
            raise GeometryError(
                f"{where}: frame {index} at {np.round(frame.position, 3).tolist()} has no partner "
                f"with the same orientation and grid within {position_tolerance_mm} mm "
                f"(nearest position {nearest:.3f} mm away)")
        taken[int(candidates[0])] = index
        pairs.append(int(candidates[0]))
    return tuple(pairs)
