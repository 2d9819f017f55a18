"""NIfTI cases for training and evaluation, cut into 2D slices laid out as a model card says.

A case is a set of co-registered NIfTI volumes of one subject: one or more contrasts and,
for training, manual labels. Slices are cut along the voxel axis that points most nearly
head-to-foot and laid out so that their rows and columns increase along the card's
``array_axes`` (``["P", "L"]``: how an axial DICOM image is displayed). The layout is derived
from the NIfTI affine, never by flipping by hand, and checked against it: NIfTI affines map to
RAS+ millimetres, DICOM patient coordinates are LPS+, so x and y are negated.

Nothing here imports torch: evaluation of an exported model uses this module too.

Folder layout read by :func:`find_cases`::

    DIR/<case>_labels.nii.gz     manual labels (integer values)
    DIR/<case>_water.nii.gz      contrasts: any of water, fat, in_phase (.nii or .nii.gz)
    DIR/<case>_fat.nii.gz

In-phase is water + fat when no in-phase file is given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from inference.card import LabelInfo

__all__ = [
    "CONTRASTS",
    "MYOSEGMENTUM_LABELS",
    "Case",
    "DataError",
    "SliceLayout",
    "check_label_sides",
    "find_cases",
    "label_centroids_lps",
    "labelled_slices",
    "load_case",
    "parse_slices",
    "prepare_image",
    "prepare_labels",
    "resample_2d",
    "side_swap",
    "target_shape",
    "zscore_nonzero",
]

log = logging.getLogger(__name__)

#: Contrasts a case may hold; in-phase is derived from water and fat when absent.
CONTRASTS = ("water", "fat", "in_phase")

#: Label values of the MyoSegmenTUM lumbar labels, as established from their centroids in
#: patient space (the upstream dataset.json orders them differently).
MYOSEGMENTUM_LABELS: dict[int, LabelInfo] = {
    1: LabelInfo("erector_spinae", "right"),
    2: LabelInfo("multifidus", "right"),
    3: LabelInfo("multifidus", "left"),
    4: LabelInfo("erector_spinae", "left"),
}

# Patient direction letter -> (LPS axis, sign of that axis).
_DIRECTION = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# A voxel axis further than 45 degrees from the requested direction is not "that" axis.
_MIN_ALIGNMENT = np.cos(np.deg2rad(45.0))
# Relative tolerance when checking that two headers describe the same voxel grid: the
# MyoSegmenTUM water and fat headers differ in pixdim by 2e-5 relative (1.0185 vs 1.0185186).
_GRID_TOLERANCE = 1e-3


class DataError(ValueError):
    """A case is incomplete, inconsistent or cannot be laid out as asked."""


@dataclass(frozen=True)
class SliceLayout:
    """How 2D slices are cut from a voxel array so that they lie as a card's ``array_axes`` say.

    Attributes
    ----------
    array_axes : tuple of two str
        Patient directions (LPS letters) in which rows and columns of a laid-out slice increase.
    slice_axis, row_axis, col_axis : int
        Voxel axes that become the slice index, the rows and the columns.
    flip_rows, flip_cols : bool
        Whether the voxel axis runs against the requested direction and is reversed.
    spacing_mm : tuple of two float
        Spacing between rows and between columns of a laid-out slice.
    """

    array_axes: tuple[str, str]
    slice_axis: int
    row_axis: int
    col_axis: int
    flip_rows: bool
    flip_cols: bool
    spacing_mm: tuple[float, float]

    @classmethod
    def from_affine(cls, affine: np.ndarray, array_axes: Sequence[str] = ("P", "L")) -> "SliceLayout":
        """Derive the layout from a NIfTI voxel-to-RAS affine and check it.

        Parameters
        ----------
        affine : numpy.ndarray
            4 x 4 voxel-to-RAS+ matrix.
        array_axes : sequence of two str
            Requested directions of increasing rows and columns, as in a model card.

        Raises
        ------
        DataError
            When no voxel axis lies within 45 degrees of a requested direction.
        """
        axes = tuple(a.upper() for a in array_axes)
        if len(axes) != 2 or any(a not in _DIRECTION for a in axes):
            raise DataError(f"array_axes must be two of L, R, A, P, S, I, not {array_axes!r}")
        matrix = (_RAS_TO_LPS @ np.asarray(affine, dtype=float))[:3, :3]
        spacing = np.linalg.norm(matrix, axis=0)
        cosines = matrix / spacing
        chosen = []
        flips = []
        for letter in axes:
            patient_axis, sign = _DIRECTION[letter]
            voxel_axis = int(np.argmax(np.abs(cosines[patient_axis])))
            alignment = cosines[patient_axis, voxel_axis]
            if abs(alignment) < _MIN_ALIGNMENT:
                raise DataError(f"no voxel axis runs within 45 degrees of direction {letter}")
            chosen.append(voxel_axis)
            flips.append(bool(np.sign(alignment) != sign))
        if chosen[0] == chosen[1]:
            raise DataError(f"directions {axes} fall on the same voxel axis {chosen[0]}")
        slice_axis = ({0, 1, 2} - set(chosen)).pop()
        layout = cls(axes, slice_axis, chosen[0], chosen[1], flips[0], flips[1],
                     (float(spacing[chosen[0]]), float(spacing[chosen[1]])))
        layout.check(affine)
        return layout

    def slice(self, volume: np.ndarray, index: int) -> np.ndarray:
        """Cut slice ``index`` (along :attr:`slice_axis`) laid out as :attr:`array_axes`."""
        plane = np.take(volume, index, axis=self.slice_axis)
        # np.take drops the slice axis; the two remaining axes keep their order.
        remaining = [a for a in range(3) if a != self.slice_axis]
        if remaining.index(self.row_axis) != 0:
            plane = plane.T
        if self.flip_rows:
            plane = plane[::-1, :]
        if self.flip_cols:
            plane = plane[:, ::-1]
        return np.ascontiguousarray(plane)

    def voxel(self, row: float, col: float, index: int, shape: Sequence[int]) -> np.ndarray:
        """Voxel coordinates ``(i, j, k)`` of pixel ``(row, col)`` of laid-out slice ``index``."""
        voxel = np.zeros(3)
        voxel[self.slice_axis] = index
        voxel[self.row_axis] = shape[self.row_axis] - 1 - row if self.flip_rows else row
        voxel[self.col_axis] = shape[self.col_axis] - 1 - col if self.flip_cols else col
        return voxel

    def directions(self, affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """LPS unit vectors along which rows and columns of a laid-out slice increase."""
        lps = _RAS_TO_LPS @ np.asarray(affine, dtype=float)

        def position(row: float, col: float) -> np.ndarray:
            return (lps @ np.append(self.voxel(row, col, 0, shape), 1.0))[:3]

        origin = position(0, 0)
        down, right = position(1, 0) - origin, position(0, 1) - origin
        return down / np.linalg.norm(down), right / np.linalg.norm(right)

    def check(self, affine: np.ndarray, shape: Sequence[int] = (2, 2, 2)) -> None:
        """Assert, by mapping pixels back through the affine, that the layout is as requested.

        Raises
        ------
        DataError
            When rows or columns of a laid-out slice do not run mainly along :attr:`array_axes`.
        """
        for letter, direction in zip(self.array_axes, self.directions(affine, shape)):
            patient_axis, sign = _DIRECTION[letter]
            if int(np.argmax(np.abs(direction))) != patient_axis or np.sign(direction[patient_axis]) != sign:
                raise DataError(f"laid-out slice runs along {np.round(direction, 3)}, not {letter}")


@dataclass
class Case:
    """The co-registered volumes of one subject.

    Attributes
    ----------
    name : str
        Case name (the file prefix).
    images : dict of str to numpy.ndarray
        Contrast name to float32 volume.
    labels : numpy.ndarray or None
        Integer label volume on the same grid.
    affine : numpy.ndarray
        Voxel-to-RAS affine of the reference image, used for every volume of the case.
    layout : SliceLayout
        How slices of this case are laid out.
    sources : dict of str to Path
        The file each volume was read from (contrasts and ``"labels"``).
    """

    name: str
    images: dict[str, np.ndarray]
    labels: np.ndarray | None
    affine: np.ndarray
    layout: SliceLayout
    sources: dict[str, Path] = field(default_factory=dict)

    @property
    def slices(self) -> int:
        return next(iter(self.images.values())).shape[self.layout.slice_axis]

    @property
    def contrasts(self) -> list[str]:
        """Contrasts available, including in-phase derived from water and fat."""
        names = [c for c in CONTRASTS if c in self.images]
        if "in_phase" not in names and {"water", "fat"} <= set(names):
            names.append("in_phase")
        return names

    def volume(self, contrast: str) -> np.ndarray:
        """The volume of one contrast (in-phase = water + fat when it has no file)."""
        if contrast in self.images:
            return self.images[contrast]
        if contrast == "in_phase" and {"water", "fat"} <= set(self.images):
            return self.images["water"] + self.images["fat"]
        raise DataError(f"case {self.name} has no {contrast} image")


def _load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib  # the only NIfTI reader; imported late so the module loads without it

    image = nib.load(str(path))
    return np.asanyarray(image.dataobj), np.asarray(image.affine, dtype=float)


def _same_grid(reference: np.ndarray, other: np.ndarray) -> bool:
    """Same orientation and spacing; translations may differ (they do not move voxels)."""
    a, b = reference[:3, :3], other[:3, :3]
    return bool(np.allclose(a, b, rtol=_GRID_TOLERANCE, atol=_GRID_TOLERANCE * np.abs(a).max()))


def load_case(name: str, images: Mapping[str, Path], labels: Path | None = None,
              array_axes: Sequence[str] = ("P", "L")) -> Case:
    """Load the volumes of one case onto one grid.

    The first image in :data:`CONTRASTS` order (water before fat) gives the affine of all
    volumes. The other headers must agree with it on shape, orientation and spacing; a different
    translation is accepted, because the MyoSegmenTUM water header has none while fat and labels
    have one, and only orientation and spacing decide how slices are laid out.

    Parameters
    ----------
    name : str
        Case name.
    images : mapping of str to Path
        Contrast name to NIfTI file.
    labels : Path, optional
        NIfTI file of the manual labels.
    array_axes : sequence of two str
        Layout of the slices (a card's ``array_axes``).

    Raises
    ------
    DataError
        When the volumes do not share a grid or a contrast is unknown.
    """
    unknown = set(images) - set(CONTRASTS)
    if unknown or not images:
        raise DataError(f"case {name}: contrasts must be among {CONTRASTS}, got {sorted(images)}")
    ordered = [c for c in CONTRASTS if c in images]
    volumes: dict[str, np.ndarray] = {}
    affine = None
    shape = None
    for contrast in ordered:
        array, this_affine = _load_nifti(Path(images[contrast]))
        if affine is None:
            affine, shape = this_affine, array.shape
        _check_grid(name, contrast, shape, affine, array.shape, this_affine)
        volumes[contrast] = np.asarray(array, dtype=np.float32)
    label_volume = None
    if labels is not None:
        array, label_affine = _load_nifti(Path(labels))
        _check_grid(name, "labels", shape, affine, array.shape, label_affine)
        if not np.array_equal(array, np.round(array)):
            raise DataError(f"case {name}: labels are not integers")
        label_volume = np.asarray(array, dtype=np.int16)
    layout = SliceLayout.from_affine(affine, array_axes)
    sources = {c: Path(p) for c, p in images.items()}
    if labels is not None:
        sources["labels"] = Path(labels)
    return Case(name, volumes, label_volume, affine, layout, sources)


def _check_grid(name: str, what: str, shape, affine, other_shape, other_affine) -> None:
    if tuple(other_shape) != tuple(shape) or len(shape) != 3:
        raise DataError(f"case {name}: {what} has shape {other_shape}, expected 3D {shape}")
    if not _same_grid(affine, other_affine):
        raise DataError(f"case {name}: {what} header has another orientation or spacing")
    if not np.allclose(affine[:3, 3], other_affine[:3, 3], atol=0.5):
        log.info("case %s: %s header translation differs; using the reference image's", name, what)


def find_cases(folder: str | Path, array_axes: Sequence[str] = ("P", "L"),
               require_labels: bool = True) -> list[Case]:
    """Load every case of a folder (``<case>_labels.nii.gz`` beside ``<case>_<contrast>.nii.gz``).

    Raises
    ------
    DataError
        When the folder holds no case.
    """
    folder = Path(folder)
    names = sorted({_case_name(p) for p in folder.glob("*_*.nii*") if _case_name(p)})
    cases = []
    for name in names:
        images = {c: p for c in CONTRASTS if (p := _find(folder, name, c)) is not None}
        labels = _find(folder, name, "labels")
        if not images or (require_labels and labels is None):
            continue
        cases.append(load_case(name, images, labels, array_axes))
    if not cases:
        raise DataError(f"{folder}: no case with images and labels (<case>_water.nii.gz, <case>_labels.nii.gz)")
    return cases


def _case_name(path: Path) -> str | None:
    stem = path.name.split(".nii")[0]
    for suffix in (*CONTRASTS, "labels"):
        if stem.endswith("_" + suffix):
            return stem[: -len(suffix) - 1]
    return None


def _find(folder: Path, name: str, suffix: str) -> Path | None:
    for extension in (".nii.gz", ".nii"):
        path = folder / f"{name}_{suffix}{extension}"
        if path.is_file():
            return path
    return None


def side_swap(labels: Mapping[int, LabelInfo]) -> dict[int, int]:
    """Label value of the same muscle on the other side, for every label value.

    Raises
    ------
    DataError
        When a muscle is labelled on one side only (a left-right flip would then mislabel it).
    """
    swap = {}
    for value, info in labels.items():
        partners = [v for v, other in labels.items()
                    if other.muscle == info.muscle and other.side != info.side]
        if len(partners) != 1:
            raise DataError(f"label {value} ({info.name}) has no single partner on the other side")
        swap[value] = partners[0]
    return swap


def label_centroids_lps(labels: np.ndarray, affine: np.ndarray) -> dict[int, np.ndarray]:
    """Centroid in LPS millimetres of every non-zero label value."""
    lps = _RAS_TO_LPS @ np.asarray(affine, dtype=float)
    centroids = {}
    for value in np.unique(labels):
        if value == 0:
            continue
        voxel = np.argwhere(labels == value).mean(axis=0)
        centroids[int(value)] = (lps @ np.append(voxel, 1.0))[:3]
    return centroids


def check_label_sides(labels: np.ndarray, affine: np.ndarray, infos: Mapping[int, LabelInfo]) -> None:
    """Check from the centroids that every label lies on the side its name says.

    LPS x increases towards the patient's left: each left label's centroid must lie at larger x
    than the midpoint of its muscle's pair of centroids.

    Raises
    ------
    DataError
        When a label is missing or lies on the wrong side.
    """
    centroids = label_centroids_lps(labels, affine)
    for value, partner in side_swap(infos).items():
        if value not in centroids or partner not in centroids:
            raise DataError(f"labels {value} and {partner} must both occur to check their sides")
        midline = (centroids[value][0] + centroids[partner][0]) / 2
        is_left = centroids[value][0] > midline
        if is_left != (infos[value].side == "left"):
            raise DataError(f"label {value} ({infos[value].name}) lies on the patient's "
                            f"{'left' if is_left else 'right'} (centroid x {centroids[value][0]:.1f} mm)")


def parse_slices(spec: str, count: int) -> list[int]:
    """Parse a slice list such as ``"12-15,4,8"`` (inclusive ranges) into sorted indices.

    Raises
    ------
    DataError
        When an index is outside ``0 .. count - 1``.
    """
    indices: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        first, _, last = part.partition("-")
        indices.update(range(int(first), int(last or first) + 1))
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise DataError(f"slices {sorted(bad)} are outside 0..{count - 1}")
    return sorted(indices)


def target_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, int]:
    """Shape of a 2D array resampled from ``spacing`` to ``target`` covering the same extent."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def resample_2d(array: np.ndarray, spacing: Sequence[float], target: Sequence[float],
                order: int, shape: Sequence[int] | None = None) -> np.ndarray:
    """Resample the last two axes from ``spacing`` to ``target`` mm, pixel centres aligned.

    The first pixel's outer edge stays where it was, so resampling there and back returns the
    original grid. Leading axes (e.g. classes) are resampled one by one.

    Parameters
    ----------
    array : numpy.ndarray
        ``[..., rows, columns]``.
    spacing, target : sequence of two float
        Present and wanted spacing, rows then columns.
    order : int
        Interpolation order: 1 (linear) for images and scores, 0 (nearest) for labels.
    shape : sequence of two int, optional
        Output shape; by default the same extent at the new spacing (:func:`target_shape`).
    """
    shape = tuple(shape) if shape is not None else target_shape(array.shape[-2:], spacing, target)
    if tuple(shape) == array.shape[-2:] and np.allclose(spacing, target):
        return array.copy()
    rows = (np.arange(shape[0]) + 0.5) * target[0] / spacing[0] - 0.5
    cols = (np.arange(shape[1]) + 0.5) * target[1] / spacing[1] - 0.5
    grid = np.stack(np.meshgrid(rows, cols, indexing="ij"))
    flat = array.reshape(-1, *array.shape[-2:])
    out = np.stack([ndimage.map_coordinates(plane, grid, order=order, mode="nearest") for plane in flat])
    return out.reshape(*array.shape[:-2], *shape)


def zscore_nonzero(image: np.ndarray) -> np.ndarray:
    """Normalise a slice by the mean and SD of its non-zero pixels; zero pixels stay zero.

    This is MONAI's ``NormalizeIntensity(nonzero=True)`` on one slice, the card's
    ``zscore_nonzero``: the masked-out background of Dixon images does not dilute the statistics.
    """
    image = np.asarray(image, dtype=np.float32)
    mask = image != 0
    if not mask.any():
        return np.zeros_like(image)
    values = image[mask]
    std = float(values.std())
    out = np.zeros_like(image)
    out[mask] = (values - values.mean()) / (std if std > 0 else 1.0)
    return out


def prepare_image(case: Case, contrast: str, index: int, spacing: Sequence[float]) -> np.ndarray:
    """Slice ``index`` of one contrast, laid out, resampled to ``spacing``, not yet normalised."""
    plane = case.layout.slice(case.volume(contrast), index)
    return resample_2d(plane.astype(np.float32), case.layout.spacing_mm, spacing, order=1).astype(np.float32)


def prepare_labels(case: Case, index: int, spacing: Sequence[float]) -> np.ndarray:
    """Labels of slice ``index``, laid out and resampled (nearest) to ``spacing``."""
    if case.labels is None:
        raise DataError(f"case {case.name} has no labels")
    plane = case.layout.slice(case.labels, index)
    return resample_2d(plane, case.layout.spacing_mm, spacing, order=0).astype(np.int16)


def labelled_slices(case: Case) -> list[int]:
    """Indices of the slices that carry at least one label."""
    if case.labels is None:
        return []
    other = tuple(a for a in range(3) if a != case.layout.slice_axis)
    return [int(i) for i in np.flatnonzero(case.labels.any(axis=other))]

