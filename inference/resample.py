"""In-plane resampling between a frame's pixel grid and a model's canonical array.

A model card fixes how the 2D array it was trained on lies in the patient: the patient direction
in which rows and columns grow (``array_axes``) and the spacing. :func:`canonical_grid` builds
that grid in the plane of one source frame, whatever the frame's orientation (oblique, rotated
in-plane, mirrored); :func:`resample` moves values between any two coplanar grids with bilinear
interpolation. Both grids are :class:`~inference.geometry.FrameGeometry`, so the way there and
the way back are the same function.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from .geometry import FrameGeometry, GeometryError

__all__ = ["DIRECTIONS", "canonical_grid", "resample", "plane_mapping"]

#: Unit LPS vector of each patient direction letter.
DIRECTIONS = {
    "L": (1.0, 0.0, 0.0), "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0), "A": (0.0, -1.0, 0.0),
    "S": (0.0, 0.0, 1.0), "I": (0.0, 0.0, -1.0),
}
#: A slice more oblique than this to the model's plane is refused rather than resampled into a
#: layout the model never saw (an axial model given a sagittal slice).
MAX_TILT_DEG = 45.0
_COPLANAR_MM = 1e-3


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation taking unit vector ``a`` onto unit vector ``b`` (not antiparallel)."""
    v = np.cross(a, b)
    c = float(a @ b)
    skew = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + skew + skew @ skew / (1.0 + c)


def canonical_grid(frame: FrameGeometry, array_axes: Sequence[str],
                   spacing_mm: Sequence[float]) -> FrameGeometry:
    """The model's input grid in the plane of one frame.

    The card's two directions span a plane (axial for ``["P", "L"]``). The smallest rotation
    that turns that plane into the frame's plane carries them into the frame: for a slab tilted
    about the left-right axis, "L" stays exactly patient-left and "P" tilts with the slab. The
    grid covers the whole frame (pixel edges included) and is centred on it.

    Parameters
    ----------
    frame : FrameGeometry
        The source frame.
    array_axes : sequence of two str
        Patient direction in which the model array's rows, then columns, grow.
    spacing_mm : sequence of two float
        The model's spacing between rows, then between columns.

    Returns
    -------
    FrameGeometry
        Rows grow along the (rotated) first direction, columns along the second; the result
        has no SOP Instance UID.

    Raises
    ------
    GeometryError
        When the frame's plane is more than :data:`MAX_TILT_DEG` from the model's plane.
    """
    d_row = np.asarray(DIRECTIONS[array_axes[0].upper()])
    d_col = np.asarray(DIRECTIONS[array_axes[1].upper()])
    model_normal = np.cross(d_row, d_col)
    normal = frame.normal
    cosine = float(model_normal @ normal)
    if abs(cosine) < math.cos(math.radians(MAX_TILT_DEG)):
        tilt = math.degrees(math.acos(min(1.0, abs(cosine))))
        raise GeometryError(
            f"the slice plane is {tilt:.0f} degrees from the model's plane "
            f"({array_axes[0]}/{array_axes[1]}); at most {MAX_TILT_DEG:.0f} is accepted")
    # A plane has no preferred side: rotate onto whichever normal is closer.
    rotation = _rotation_between(model_normal, normal if cosine > 0 else -normal)
    axis_row, axis_col = rotation @ d_row, rotation @ d_col
    spacing = (float(spacing_mm[0]), float(spacing_mm[1]))

    corners = frame.pixel_to_lps(np.array([-0.5, -0.5, frame.rows - 0.5, frame.rows - 0.5]),
                                 np.array([-0.5, frame.columns - 0.5, -0.5, frame.columns - 0.5]))
    centre = frame.centre
    along_row = (corners - centre) @ axis_row
    along_col = (corners - centre) @ axis_col
    # 1e-6 absorbs rounding so that a frame already on the model's grid keeps its size.
    rows = max(1, math.ceil((along_row.max() - along_row.min()) / spacing[0] - 1e-6))
    columns = max(1, math.ceil((along_col.max() - along_col.min()) / spacing[1] - 1e-6))
    origin = centre - (rows - 1) / 2 * spacing[0] * axis_row - (columns - 1) / 2 * spacing[1] * axis_col
    return FrameGeometry(position=tuple(origin), row_cosine=tuple(axis_col),
                         column_cosine=tuple(axis_row), pixel_spacing=spacing,
                         rows=rows, columns=columns)


def plane_mapping(source: FrameGeometry, target: FrameGeometry) -> tuple[np.ndarray, np.ndarray]:
    """The affine map from target pixel coordinates to source pixel coordinates.

    Returns
    -------
    matrix : numpy.ndarray
        2 x 2.
    offset : numpy.ndarray
        2; ``source_rc = matrix @ target_rc + offset`` with ``rc = (row, column)``.

    Raises
    ------
    GeometryError
        When the two grids do not lie in one plane.
    """
    probe = target.pixel_to_lps(np.array([0.0, 1.0, 0.0, target.rows - 1.0]),
                                np.array([0.0, 0.0, 1.0, target.columns - 1.0]))
    in_source = source.lps_to_pixel(probe)
    if np.max(np.abs(in_source[:, 2])) > _COPLANAR_MM:
        raise GeometryError("the grids are not in one plane")
    offset = in_source[0, :2]
    matrix = np.stack([in_source[1, :2] - offset, in_source[2, :2] - offset], axis=1)
    return matrix, offset


def resample(values: np.ndarray, source: FrameGeometry, target: FrameGeometry,
             fill: float | Sequence[float] = 0.0) -> np.ndarray:
    """Bilinear resampling of values on one grid onto another grid in the same plane.

    Parameters
    ----------
    values : numpy.ndarray
        ``(rows, columns)`` or ``(channels, rows, columns)`` on ``source``.
    source, target : FrameGeometry
        Coplanar grids.
    fill : float or sequence of float
        Value (per channel) for target pixels outside the source frame. Within half a pixel
        of the source's outer pixel centres the edge value is used: that strip belongs to the
        frame's field of view.

    Returns
    -------
    numpy.ndarray
        float32, ``values``' leading shape plus ``target.shape``.
    """
    values = np.asarray(values)
    if values.shape[-2:] != source.shape:
        raise GeometryError(f"values {values.shape} do not match the source grid {source.shape}")
    flat = values.reshape((-1,) + source.shape)
    matrix, offset = plane_mapping(source, target)
    rows, columns = np.meshgrid(np.arange(target.rows, dtype=np.float64),
                                np.arange(target.columns, dtype=np.float64), indexing="ij")
    source_rows = matrix[0, 0] * rows + matrix[0, 1] * columns + offset[0]
    source_columns = matrix[1, 0] * rows + matrix[1, 1] * columns + offset[1]
    inside = ((source_rows >= -0.5) & (source_rows <= source.rows - 0.5)
              & (source_columns >= -0.5) & (source_columns <= source.columns - 0.5))
    fills = np.broadcast_to(np.asarray(fill, dtype=np.float64), (flat.shape[0],))
    out = np.empty((flat.shape[0],) + target.shape, dtype=np.float32)
    for channel in range(flat.shape[0]):
        # affine_transform computes the same coordinates on the fly: several times faster than
        # map_coordinates on a precomputed grid.
        sampled = ndimage.affine_transform(flat[channel].astype(np.float32, copy=False), matrix, offset,
                                           output_shape=target.shape, order=1, mode="nearest")
        out[channel] = np.where(inside, sampled, fills[channel])
    return out.reshape(values.shape[:-2] + target.shape)
