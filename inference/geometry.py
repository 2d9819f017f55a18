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

Images that cannot be used are set aside rather than failing the series
(:mod:`inference.set_aside`): an instance whose file or pixel data cannot be read, a frame without
a valid position, orientation or pixel spacing, and all but the latest acquisition of frames that
lie in the same plane (a repeated slice). :func:`set_aside_off_plane` and :func:`pair_components`
set aside further frames for the pipeline (a localizer inside an axial series; a Dixon image
without a partner). The series records each with its reason (:attr:`SeriesImage.set_aside`).

Nothing here reads or writes anything but the given DICOM files; everything after reading is a
pure function of the headers and pixels.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pydicom.valuerep import DA, DT, TM

from .card import LabelInfo
from .functional_groups import functional_group, is_enhanced
from .patient import PatientContext, from_dataset
from .set_aside import SetAside, SetAsideKind
from .vocabulary import Muscle, Side

__all__ = [
    "GeometryError",
    "MAX_OBLIQUE_DEGREES",
    "FrameGeometry",
    "StudyInfo",
    "SeriesImage",
    "LateralityFinding",
    "LabelMap",
    "orientation_normal",
    "read_series",
    "series_from_datasets",
    "group_stacks",
    "pair_frames",
    "pair_components",
    "set_aside_off_plane",
    "axial_tilt_degrees",
    "plane_name",
]

#: Largest difference between direction cosines still treated as the same orientation
#: (about 0.06 degrees: scanners write IOP to at least six decimals).
ORIENTATION_TOLERANCE = 1e-3
#: Largest distance between two frames' positions still treated as the same place (mm).
POSITION_TOLERANCE_MM = 0.05
#: Default largest angle (degrees) between a slice's normal and the head-foot axis for the slice
#: to count as axial: angled slabs along the lumbar discs reach about 30 degrees; a sagittal or
#: coronal localizer is at 90. The node's ``rules.max_oblique_degrees``.
MAX_OBLIQUE_DEGREES = 40.0


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
    set_aside : tuple of SetAside
        Images of the series that are not among :attr:`frames`, each with its reason.
    instance_numbers : dict of str to int
        InstanceNumber by SOP Instance UID, where the instances have one (to name images for
        people).
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
    set_aside: tuple[SetAside, ...] = ()
    instance_numbers: dict[str, int] = field(default_factory=dict)

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
        object.__setattr__(self, "set_aside", tuple(self.set_aside))

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

    def set_aside_record(self, index: int, kind: SetAsideKind, detail: str) -> SetAside:
        """The record that sets frame ``index`` of this series aside."""
        geometry = self.geometry[index]
        count = sum(1 for g in self.geometry if g.sop_instance_uid == geometry.sop_instance_uid)
        multi_frame = count > 1 or geometry.frame_number > 1 or any(
            item.sop_instance_uid == geometry.sop_instance_uid for item in self.set_aside)
        return SetAside(self.series_instance_uid, geometry.sop_instance_uid, geometry.frame_number, kind, detail,
                        self.instance_numbers.get(geometry.sop_instance_uid), multi_frame)

    def without(self, set_aside: Mapping[int, SetAside]) -> "SeriesImage":
        """This series less the frames of ``set_aside`` (frame index to its record).

        Returns
        -------
        SeriesImage
            The remaining frames in source order, regrouped into stacks, with the records added to
            :attr:`set_aside`; ``self`` when nothing is set aside.

        Raises
        ------
        GeometryError
            When every frame would be set aside.
        """
        if not set_aside:
            return self
        keep = [i for i in range(len(self)) if i not in set_aside]
        if not keep:
            raise GeometryError(f"every frame of series {self.series_instance_uid} is set aside: "
                                + "; ".join(sorted({str(item.kind) for item in set_aside.values()})))
        return self.select(keep, self.set_aside + tuple(set_aside[i] for i in sorted(set_aside)))

    def select(self, indices: Sequence[int], set_aside: Sequence[SetAside] | None = None) -> "SeriesImage":
        """The frames ``indices`` (in the order given) as a series of their own.

        Parameters
        ----------
        indices : sequence of int
            Frame indices of this series.
        set_aside : sequence of SetAside, optional
            The new series' :attr:`set_aside` (default: this series').
        """
        geometry = tuple(self.geometry[i] for i in indices)
        uids = {g.sop_instance_uid for g in geometry}
        return SeriesImage(
            frames=tuple(self.frames[i] for i in indices), geometry=geometry, stacks=group_stacks(geometry),
            series_instance_uid=self.series_instance_uid, frame_of_reference_uid=self.frame_of_reference_uid,
            sop_class_uid=self.sop_class_uid, study=self.study, patient=self.patient, modality=self.modality,
            series_description=self.series_description, series_number=self.series_number,
            image_type=self.image_type,
            source_paths={uid: path for uid, path in self.source_paths.items() if uid in uids},
            set_aside=self.set_aside if set_aside is None else tuple(set_aside),
            instance_numbers={uid: n for uid, n in self.instance_numbers.items() if uid in uids})


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
    set_aside : tuple of SetAside
        Images of the acquisition that have no labels here, and why: those of ``series`` and of
        the other series it was segmented or measured with (Dixon components).
    uncertainty : tuple of dict of int to float
        Per frame, label value -> the model's mean normalised softmax entropy inside that
        label's mask (0 certain, 1 no idea; :func:`inference.runtime.mask_uncertainty`). Empty
        when unknown (labels read from a SEG, drawn by hand).
    """

    series: SeriesImage
    labels: tuple[np.ndarray, ...]
    meaning: dict[int, LabelInfo]
    model_name: str = ""
    model_version: str = ""
    findings: tuple[LateralityFinding, ...] = ()
    set_aside: tuple[SetAside, ...] = ()
    uncertainty: tuple[dict[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.uncertainty and len(self.uncertainty) != len(self.series.frames):
            raise GeometryError(f"{len(self.uncertainty)} uncertainty frames for a series of {len(self.series)} frames")
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
        object.__setattr__(self, "set_aside", tuple(self.set_aside))
        object.__setattr__(self, "uncertainty", tuple(dict(u) for u in self.uncertainty))

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
        The usable frames; every file, instance or frame that cannot be used is in
        :attr:`SeriesImage.set_aside` with its reason (see :func:`series_from_datasets`).

    Raises
    ------
    GeometryError
        When a file cannot be opened, the files are not one series, or no frame is usable.
    """
    datasets = []
    unreadable = []
    for path in paths:
        try:
            datasets.append((pydicom.dcmread(path), Path(path)))
        except OSError as exc:
            raise GeometryError(f"cannot read {path}: {exc}") from None
        except Exception as exc:  # pydicom raises several types for files that are not DICOM
            unreadable.append(f"{Path(path).name}: {_short(exc)}")
    if not datasets:
        raise GeometryError("no readable DICOM file among the series' files"
                            + (f" ({'; '.join(unreadable)})" if unreadable else ""))
    return _build([d for d, _ in datasets], [p for _, p in datasets], unreadable)


def series_from_datasets(datasets: Sequence[Dataset]) -> SeriesImage:
    """Build a :class:`SeriesImage` from datasets already in memory (pixels included).

    What is set aside, and why (each instance or frame once, in source order):

    - an instance whose pixel data is missing, empty, shorter than its Rows, Columns, frames and
      BitsAllocated need, or cannot be decoded (:attr:`SetAsideKind.UNDECODABLE`), or that is
      not greyscale;
    - a frame without ImagePositionPatient, ImageOrientationPatient or PixelSpacing (or their
      enhanced functional groups), or with values that are not numbers, not orthogonal unit
      vectors or not positive;
    - of frames in the same plane (same stack, positions along its normal within
      :data:`POSITION_TOLERANCE_MM`), all but the latest acquisition: the latest by
      AcquisitionDateTime (enhanced: FrameAcquisitionDateTime; classic without it:
      AcquisitionDate and AcquisitionTime) when every one of them has it, then the highest
      InstanceNumber, then the last in source order.
    """
    return _build(list(datasets), [None] * len(datasets), [])


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@dataclass
class _Read:
    """One usable frame while a series is read."""

    pixels: np.ndarray
    geometry: FrameGeometry
    acquired: datetime.datetime | None
    instance_number: int | None
    order: int


def _build(datasets: list[Dataset], paths: list[Path | None], unreadable: list[str]) -> SeriesImage:
    if not datasets:
        raise GeometryError("no instances given")
    first = datasets[0]
    for attribute in ("SeriesInstanceUID", "SOPClassUID"):
        values = {str(ds.get(attribute, "")) for ds in datasets}
        if len(values) != 1:
            raise GeometryError(f"instances differ in {attribute}: not one series of one kind")
    series_uid = str(first.SeriesInstanceUID)
    set_aside = [SetAside(series_uid, "", None, SetAsideKind.UNREADABLE, detail) for detail in unreadable]
    # Source order does not depend on how the files were listed.
    order = sorted(range(len(datasets)),
                   key=lambda i: (_int_or(datasets[i].get("InstanceNumber"), 1 << 31), i))
    read: list[_Read] = []
    source_paths: dict[str, Path] = {}
    numbers: dict[str, int] = {}
    seen: set[str] = set()
    for index in order:
        ds = datasets[index]
        uid = str(ds.get("SOPInstanceUID", ""))
        if not uid or uid in seen:
            raise GeometryError(f"instance {index} has a missing or repeated SOPInstanceUID")
        seen.add(uid)
        number = _int_or(ds.get("InstanceNumber"), None)
        if number is not None:
            numbers[uid] = number
        multi_frame = _int_or(ds.get("NumberOfFrames"), 1) > 1
        try:
            frames = _instance_frames(ds)
        except _Unusable as exc:
            set_aside.append(SetAside(series_uid, uid, None, exc.kind, exc.detail, number, multi_frame))
            continue
        used = False
        for frame_number, found in frames:
            if isinstance(found, _Unusable):
                set_aside.append(SetAside(series_uid, uid, frame_number, found.kind, found.detail, number,
                                          multi_frame))
                continue
            pixels, geometry, acquired = found
            read.append(_Read(pixels, geometry, acquired, number, len(read)))
            used = True
        if used and paths[index] is not None:
            source_paths[uid] = paths[index]
    if not read:
        kinds = "; ".join(sorted({f"{item.kind} ({item.detail})" for item in set_aside}))
        raise GeometryError(f"none of the {len(datasets)} instances has a usable image: {kinds}")
    frame_of_reference = {str(ds.get("FrameOfReferenceUID", "")) for ds in datasets}
    if len(frame_of_reference) != 1:
        raise GeometryError("instances of the series have different FrameOfReferenceUIDs")
    read, repeated = _latest_per_plane(read, series_uid, numbers)
    set_aside.extend(repeated)
    used_uids = {r.geometry.sop_instance_uid for r in read}
    geometry = [r.geometry for r in read]
    return SeriesImage(
        frames=tuple(r.pixels for r in read),
        geometry=tuple(geometry),
        stacks=group_stacks(geometry),
        series_instance_uid=series_uid,
        frame_of_reference_uid=frame_of_reference.pop(),
        sop_class_uid=str(first.SOPClassUID),
        study=_study_info(first),
        patient=from_dataset(first),
        modality=str(first.get("Modality", "")),
        series_description=str(first.get("SeriesDescription", "")),
        series_number=_int_or(first.get("SeriesNumber"), None),
        image_type=tuple(str(v) for v in (first.get("ImageType") or ())),
        source_paths={uid: path for uid, path in source_paths.items() if uid in used_uids},
        set_aside=tuple(set_aside),
        instance_numbers=numbers,
    )


def _latest_per_plane(read: list[_Read], series_uid: str,
                      numbers: Mapping[str, int]) -> tuple[list[_Read], list[SetAside]]:
    """Keep the latest acquisition of frames in one plane (see :func:`series_from_datasets`)."""
    geometry = [r.geometry for r in read]
    dropped: dict[int, SetAside] = {}
    for stack in group_stacks(geometry):
        normal = geometry[stack[0]].normal
        offsets = {i: float(np.dot(geometry[i].position, normal)) for i in stack}
        groups: list[list[int]] = []
        for i in stack:  # ascending along the normal: neighbours in one plane are adjacent
            if groups and abs(offsets[i] - offsets[groups[-1][0]]) <= POSITION_TOLERANCE_MM:
                groups[-1].append(i)
            else:
                groups.append([i])
        for group in groups:
            if len(group) < 2:
                continue
            timed = all(read[i].acquired is not None for i in group)

            def later(i: int) -> tuple:
                stamp = read[i].acquired.timestamp() if timed else 0.0
                number = read[i].instance_number if read[i].instance_number is not None else -(1 << 31)
                return stamp, number, read[i].order

            kept = max(group, key=later)
            kept_geometry = read[kept].geometry
            by = "acquisition time" if timed and len({read[i].acquired for i in group}) == len(group) else (
                "InstanceNumber" if len({read[i].instance_number for i in group}) == len(group) else "source order")
            kept_name = (f"instance {numbers[kept_geometry.sop_instance_uid]}"
                         if kept_geometry.sop_instance_uid in numbers else kept_geometry.sop_instance_uid)
            if sum(1 for r in read if r.geometry.sop_instance_uid == kept_geometry.sop_instance_uid) > 1:
                kept_name += f", frame {kept_geometry.frame_number}"
            when = f", acquired {read[kept].acquired:%H:%M:%S}" if timed else ""
            for i in group:
                if i == kept:
                    continue
                g = read[i].geometry
                when_this = f" at {read[i].acquired:%H:%M:%S}" if timed else ""
                dropped[i] = SetAside(
                    series_uid, g.sop_instance_uid, g.frame_number, SetAsideKind.REPEATED,
                    f"acquired{when_this} in the plane {offsets[i]:.2f} mm along the normal; "
                    f"the later {kept_name}{when} in the same plane is used (latest by {by})",
                    read[i].instance_number, g.frame_number > 1 or sum(
                        1 for r in read if r.geometry.sop_instance_uid == g.sop_instance_uid) > 1)
    kept_frames = [r for i, r in enumerate(read) if i not in dropped]
    return kept_frames, [dropped[i] for i in sorted(dropped, key=lambda i: read[i].order)]


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


class _Unusable(Exception):
    """An instance or frame that is set aside, with its kind and detail."""

    def __init__(self, kind: SetAsideKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _acquired(ds: Dataset, frame_index: int | None) -> datetime.datetime | None:
    """When a frame was acquired: FrameAcquisitionDateTime, AcquisitionDateTime, or date and time."""
    values = []
    if frame_index is not None:
        content = functional_group(ds, frame_index, "FrameContentSequence")
        if content is not None:
            values.append(content.get("FrameAcquisitionDateTime"))
    values.append(ds.get("AcquisitionDateTime"))
    for value in values:
        if value:
            try:
                stamp = DT(str(value))
            except ValueError:
                continue
            return stamp.replace(tzinfo=None) if stamp is not None else None
    time_value = ds.get("AcquisitionTime")
    if not time_value:
        return None
    try:
        day = DA(str(ds.get("AcquisitionDate") or ds.get("SeriesDate") or ds.get("StudyDate") or "19000101"))
        clock = TM(str(time_value))
    except ValueError:
        return None
    if day is None or clock is None:
        return None
    return datetime.datetime.combine(day, clock.replace(tzinfo=None))


def _pixel_problem(ds: Dataset) -> str | None:
    """Why the pixel data cannot be decoded, found before decoding, in words; None when it looks whole."""
    if "PixelData" not in ds:
        return "the instance has no Pixel Data element"
    value = ds.get("PixelData")
    if value is None or len(value) == 0:
        return "the Pixel Data element is empty"
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if syntax and UID(syntax).is_compressed:
        return None  # encapsulated: the decoder says what is wrong
    rows, columns, bits = (_int_or(ds.get(k), None) for k in ("Rows", "Columns", "BitsAllocated"))
    if not rows or not columns or not bits:
        return "Rows, Columns or BitsAllocated is missing, so the Pixel Data cannot be read"
    frames = _int_or(ds.get("NumberOfFrames"), 1) or 1
    samples = _int_or(ds.get("SamplesPerPixel"), 1) or 1
    needed = (rows * columns * frames * samples * bits + 7) // 8
    if len(value) < needed:
        return (f"the Pixel Data holds {len(value)} bytes, but {frames} frame{'s' if frames > 1 else ''} of "
                f"{rows} x {columns} pixels at {bits} bits need {needed} (the instance is truncated)")
    return None


def _instance_frames(ds: Dataset) -> list[tuple[int, tuple[np.ndarray, FrameGeometry, datetime.datetime | None]
                                                 | _Unusable]]:
    """Every frame of an instance: its pixels, geometry and acquisition time, or why it is unusable.

    Raises
    ------
    _Unusable
        When the whole instance is unusable (its pixel data, or not greyscale).
    """
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise _Unusable(SetAsideKind.NOT_GREYSCALE,
                        f"SamplesPerPixel {ds.get('SamplesPerPixel')}, {ds.get('PhotometricInterpretation', '')}")
    problem = _pixel_problem(ds)
    if problem is not None:
        raise _Unusable(SetAsideKind.UNDECODABLE, problem)
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises several types for missing decoders and bad data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = UID(str(syntax)).name if syntax else "its transfer syntax"
        raise _Unusable(SetAsideKind.UNDECODABLE,
                        f"the Pixel Data ({name}) could not be decoded: {_short(exc)}") from None
    count = _int_or(ds.get("NumberOfFrames"), 1) or 1
    try:
        stored = stored.reshape(count, int(ds.Rows), int(ds.Columns))
    except ValueError:
        raise _Unusable(SetAsideKind.UNDECODABLE,
                        f"the decoded pixels {stored.shape} are not {count} frame(s) of {ds.Rows} x {ds.Columns}") from None
    enhanced = is_enhanced(ds)
    if not enhanced and count > 1:
        raise _Unusable(SetAsideKind.NO_GEOMETRY, f"{count} frames but no functional groups to place them")
    out: list = []
    for k in range(count):
        try:
            if enhanced:
                frame, slope, intercept = _enhanced_frame(ds, k)
            else:
                frame, slope, intercept = _classic_frame(ds)
        except _Unusable as exc:
            out.append((k + 1, exc))
            continue
        # float64 for the arithmetic so that exact lattices (slope 488/315) stay exact to float32.
        pixels = (stored[k].astype(np.float64) * slope + intercept).astype(np.float32)
        out.append((k + 1, (pixels, frame, _acquired(ds, k if enhanced else None))))
    return out


def _classic_frame(ds: Dataset) -> tuple[FrameGeometry, float, float]:
    uid = str(ds.SOPInstanceUID)
    missing = [a for a in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
               if ds.get(a) in (None, "", [])]
    if missing:
        raise _Unusable(SetAsideKind.NO_GEOMETRY, f"no {', '.join(missing)}")
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
    missing = [name for name, item, keyword in (
        ("plane position", position, "ImagePositionPatient"),
        ("plane orientation", orientation, "ImageOrientationPatient"),
        ("pixel measures", measures, "PixelSpacing")) if item is None or item.get(keyword) in (None, "", [])]
    if missing:
        raise _Unusable(SetAsideKind.NO_GEOMETRY, f"no {', '.join(missing)}")
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
        raise _Unusable(SetAsideKind.INVALID_GEOMETRY, str(exc)) from None


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
    pairs = _partners(reference, other, position_tolerance_mm, orientation_tolerance)
    for index, partner in enumerate(pairs):
        if partner is None:
            frame = reference.geometry[index]
            nearest = float(np.linalg.norm(np.array([g.position for g in other.geometry])
                                           - np.asarray(frame.position), axis=1).min())
            raise GeometryError(
                f"{where}: frame {index} at {np.round(frame.position, 3).tolist()} has no partner "
                f"with the same orientation and grid within {position_tolerance_mm} mm "
                f"(nearest position {nearest:.3f} mm away)")
    return tuple(int(p) for p in pairs)


def _partners(reference: SeriesImage, other: SeriesImage, position_tolerance_mm: float,
              orientation_tolerance: float) -> list[int | None]:
    """For each frame of ``reference``, the unclaimed frame of ``other`` at the same place, or None."""
    positions = np.array([g.position for g in other.geometry])
    taken: set[int] = set()
    found: list[int | None] = []
    for frame in reference.geometry:
        distances = np.linalg.norm(positions - np.asarray(frame.position), axis=1)
        candidates = [int(j) for j in np.argsort(distances, kind="stable")
                      if distances[j] <= position_tolerance_mm
                      and other.geometry[j].same_grid(frame, orientation_tolerance) and int(j) not in taken]
        found.append(candidates[0] if candidates else None)
        if candidates:
            taken.add(candidates[0])
    return found


def pair_components(components: Mapping[str, SeriesImage],
                    position_tolerance_mm: float = POSITION_TOLERANCE_MM,
                    orientation_tolerance: float = ORIENTATION_TOLERANCE) -> dict[str, SeriesImage]:
    """Keep the frames that every Dixon component has; set the others aside.

    A component series may lack a frame that the others have (an instance set aside while
    reading it, or never sent). The frames at a place where any component has no frame with the
    same orientation, matrix and spacing (:func:`pair_frames`' criterion) are set aside in every
    component that has one (:attr:`SetAsideKind.UNPAIRED`), so that what remains pairs one for
    one.

    Parameters
    ----------
    components : mapping of str to SeriesImage
        Role (``"water"``, ``"fat"``, ...) to series, of one acquisition.

    Returns
    -------
    dict of str to SeriesImage
        The same roles, each series less its unpaired frames (the same object where nothing is
        set aside).

    Raises
    ------
    GeometryError
        When the series do not share a frame of reference, or no frame is common to all.
    """
    roles = list(components)
    if len(roles) < 2:
        return dict(components)
    reference = components[roles[0]]
    for role in roles[1:]:
        other = components[role]
        if (reference.frame_of_reference_uid and other.frame_of_reference_uid
                and reference.frame_of_reference_uid != other.frame_of_reference_uid):
            raise GeometryError(f"the {role} series and the {roles[0]} series have different "
                                "FrameOfReferenceUIDs: their frames cannot be paired")
    partners = {role: _partners(reference, components[role], position_tolerance_mm, orientation_tolerance)
                for role in roles[1:]}
    missing_at = {i: [role for role in roles[1:] if partners[role][i] is None] for i in range(len(reference))}
    drop: dict[str, dict[int, SetAside]] = {role: {} for role in roles}
    for i, missing in missing_at.items():
        if not missing:
            continue
        detail = f"the {' and '.join(missing)} series {'has' if len(missing) == 1 else 'have'} no image at this position"
        drop[roles[0]][i] = reference.set_aside_record(i, SetAsideKind.UNPAIRED, detail)
        for role in roles[1:]:
            j = partners[role][i]
            if j is not None:
                drop[role][j] = components[role].set_aside_record(j, SetAsideKind.UNPAIRED, detail)
    for role in roles[1:]:
        matched = {j for j in partners[role] if j is not None}
        for j in range(len(components[role])):
            if j not in matched:
                drop[role][j] = components[role].set_aside_record(
                    j, SetAsideKind.UNPAIRED, f"the {roles[0]} series has no image at this position")
    if len(drop[roles[0]]) == len(reference):
        raise GeometryError(f"no image position is common to the {', '.join(roles)} series: they cannot be paired")
    return {role: components[role].without(drop[role]) for role in roles}


def orientation_normal(orientation: Sequence[float]) -> np.ndarray | None:
    """The unit normal (LPS) of a plane given by its ImageOrientationPatient (row cosine, then
    column cosine): their cross product, normalised; None for a degenerate orientation (parallel
    or zero cosines)."""
    normal = np.cross(np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:6], dtype=float))
    length = float(np.linalg.norm(normal))
    return None if length < 1e-6 else normal / length


def axial_tilt_degrees(orientation: Sequence[float]) -> float | None:
    """Angle (degrees) between a plane's normal and the patient's head-foot (LPS z) axis.

    Parameters
    ----------
    orientation : sequence of 6 float
        ImageOrientationPatient (row cosine, then column cosine).

    Returns
    -------
    float or None
        0 for an axial plane, 90 for a sagittal or coronal one; None for a degenerate
        orientation (parallel or zero cosines).
    """
    normal = orientation_normal(orientation)
    if normal is None:
        return None
    return math.degrees(math.acos(min(1.0, abs(float(normal[2])))))


def plane_name(orientation: Sequence[float]) -> str:
    """``"axial"``, ``"coronal"`` or ``"sagittal"``: the plane a slice is closest to (or ``"degenerate"``)."""
    normal = orientation_normal(orientation)
    if normal is None:
        return "degenerate"
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


def set_aside_off_plane(series: SeriesImage, max_tilt_degrees: float) -> SeriesImage:
    """Set aside the frames of an axial series that are not axial (a localizer, another plane).

    Parameters
    ----------
    series : SeriesImage
    max_tilt_degrees : float
        A frame whose normal is further than this from the head-foot axis is set aside
        (:attr:`SetAsideKind.OFF_PLANE`); the node's ``rules.max_oblique_degrees``.

    Returns
    -------
    SeriesImage
        The series less its off-plane frames (``series`` itself when every frame is axial).

    Raises
    ------
    GeometryError
        When no frame is axial.
    """
    drop = {}
    for index, frame in enumerate(series.geometry):
        orientation = frame.row_cosine + frame.column_cosine
        tilt = axial_tilt_degrees(orientation)
        if tilt is not None and tilt > max_tilt_degrees:
            drop[index] = series.set_aside_record(
                index, SetAsideKind.OFF_PLANE,
                f"{plane_name(orientation)}, {tilt:.0f} degrees from the axial plane (at most "
                f"{max_tilt_degrees:g} accepted)")
    return series.without(drop)
