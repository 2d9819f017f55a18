"""Where a vertebral body ends on the sagittal image itself: the steepest rise into the disc.

The level model draws each body on a 2 mm grid; where a body's end plate lies along the spine's
axis it scatters by about 1 mm (standard deviation against the labels on training subjects, see
the level model's card). The image has 0.4-1.2 mm pixels, and on the T2-weighted and water
images the model is used with, the intervertebral disc is brighter than the bone marrow next to
it (the nucleus holds water); the cortical end plate between them is dark. Along a line through
the end plate's centre, perpendicular to it, the intensity therefore rises steeply where the
body ends and the disc begins. This module finds that rise; :func:`inference.vertebrae.find_bodies`
averages it with the model's end plate (the card's ``postprocess.end_plate_edge``). Each of the
two has its own systematic offset from the labelled end plate, measured on training subjects and
subtracted (:func:`inference.training.vertebrae_eval.calibrate`); the average then scatters less
than either (on training subjects 4201 of 4464 axial slices at their level, against 4169 with the
model's end plates and 4189 with the image's alone).

Coordinates: LPS mm; positions along a profile are mm from the model's end-plate centre,
positive outwards (away from the body, into the disc).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from scipy import ndimage

from .geometry import FrameGeometry

__all__ = ["PROFILE_MM", "EdgeSettings", "edge_position", "end_plate_profile"]

#: Positions along the profile (mm, outwards from the model's end-plate centre), every 0.25 mm.
PROFILE_MM = np.arange(-8.0, 8.0 + 1e-9, 0.25)
#: Offsets of the parallel lines averaged into one profile (mm along the end plate, in the
#: sagittal plane): the central 6 mm of a body 30-40 mm deep, where the end plate is flat enough
#: (it is concave towards the rims) and the line stays inside the body and the disc.
LINES_MM = np.arange(-3.0, 3.0 + 1e-9, 1.0)
#: Smoothing of the profile before its gradient is taken (Gaussian sigma, mm): half a pixel of a
#: 1 mm image, so noise does not make the steepest point.
SMOOTHING_MM = 0.5
#: Where the profile shows the body (inside: -8 to -4 mm) and the disc (outside: 1 to 7 mm) and
#: where the edge is looked for (within 4 mm of the model's end plate).
BODY_MM = (-8.0, -4.0)
DISC_MM = (1.0, 7.0)
SEARCH_MM = 4.0


class EdgeSettings:
    """The card's ``postprocess.end_plate_edge``, read once.

    Attributes
    ----------
    offset_mm : tuple of float
        ``(superior, inferior)``: how far (mm, outwards) the steepest rise lies beyond the labelled
        end plate, the median over training subjects (subtracted from every edge found).
    weight : float
        Share of the edge in the end plate used (0: the model's alone, 1: the edge's alone).
    min_disc_to_body : float
        The edge is used only where the disc is at least this much brighter than the body (the
        ratio of the brightest disc intensity to the median body intensity); a darker disc (T1,
        a degenerated disc, an inverted contrast) has no rise to find.
    max_move_mm : float
        The edge is used only within this distance of the model's end plate (after its offset):
        farther away it is another edge (the far side of a thin disc, a Schmorl node).
    """

    def __init__(self, raw: dict) -> None:
        offset = raw.get("offset_mm") or (0.0, 0.0)
        self.offset_mm = (float(offset[0]), float(offset[1]))
        self.weight = float(raw.get("weight", 0.5))
        self.min_disc_to_body = float(raw.get("min_disc_to_body", 1.05))
        self.max_move_mm = float(raw.get("max_move_mm", 3.0))


def end_plate_profile(image: np.ndarray, frame: FrameGeometry, centre: np.ndarray, normal: np.ndarray,
                      across: np.ndarray, superior: bool) -> np.ndarray:
    """Image intensity across one end plate, outwards, averaged over parallel lines.

    Parameters
    ----------
    image : numpy.ndarray
        ``(rows, columns)`` float pixels of the sagittal frame nearest the body's middle.
    frame : FrameGeometry
        That frame's geometry.
    centre : numpy.ndarray
        ``(3,)`` LPS mm, the model's end-plate centre (projected onto the frame's plane here).
    normal : numpy.ndarray
        ``(3,)`` unit LPS vector perpendicular to the end plate, towards the head.
    across : numpy.ndarray
        ``(3,)`` unit LPS vector along the end plate in the sagittal plane (anterior-posterior).
    superior : bool
        The body's superior end plate (outwards = towards the head) or its inferior one.

    Returns
    -------
    numpy.ndarray
        ``(len(PROFILE_MM),)`` mean intensity at each position of :data:`PROFILE_MM` (NaN where
        every line leaves the image).
    """
    centre = np.asarray(centre, float)
    frame_normal = np.asarray(frame.normal, float)
    centre = centre - float((centre - np.asarray(frame.centre)) @ frame_normal) * frame_normal
    outwards = np.asarray(normal, float) * (1.0 if superior else -1.0)
    points = (centre[None, None] + LINES_MM[:, None, None] * np.asarray(across, float)
              + PROFILE_MM[None, :, None] * outwards)
    pixels = frame.lps_to_pixel(points.reshape(-1, 3))
    values = ndimage.map_coordinates(np.asarray(image, np.float64), [pixels[:, 0], pixels[:, 1]], order=1,
                                     cval=np.nan).reshape(len(LINES_MM), len(PROFILE_MM))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # every line outside the image: NaN is the answer
        return np.nanmean(values, axis=0)


def edge_position(profile: Sequence[float], settings: EdgeSettings) -> tuple[float | None, float]:
    """Where the profile rises most steeply from the body into the disc.

    Parameters
    ----------
    profile : sequence of float
        ``(len(PROFILE_MM),)`` from :func:`end_plate_profile`.
    settings : EdgeSettings
        Only its ``min_disc_to_body`` is used here.

    Returns
    -------
    position : float or None
        mm outwards from the model's end plate (within :data:`SEARCH_MM`), before the card's
        offset; None where the image cannot say: under 80 % of the profile inside the image, a
        body that is not brighter than zero, or a disc not ``min_disc_to_body`` times as bright
        as the body.
    disc_to_body : float
        Brightest disc intensity over the median body intensity (NaN where not measured).
    """
    values = np.asarray(profile, dtype=np.float64)
    inside = np.isfinite(values)
    if inside.sum() < 0.8 * len(values):
        return None, float("nan")
    values = np.interp(PROFILE_MM, PROFILE_MM[inside], values[inside])
    step = float(PROFILE_MM[1] - PROFILE_MM[0])
    smooth = ndimage.gaussian_filter1d(values, SMOOTHING_MM / step)
    body = float(np.median(smooth[(PROFILE_MM >= BODY_MM[0]) & (PROFILE_MM <= BODY_MM[1])]))
    disc = float(np.max(smooth[(PROFILE_MM >= DISC_MM[0]) & (PROFILE_MM <= DISC_MM[1])]))
    if body <= 0:
        return None, float("nan")
    ratio = disc / body
    if ratio < settings.min_disc_to_body:
        return None, ratio
    window = np.abs(PROFILE_MM) <= SEARCH_MM
    rise = np.gradient(smooth)
    return float(PROFILE_MM[window][int(np.argmax(rise[window]))]), ratio
