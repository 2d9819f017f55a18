"""Vertebral levels from a sagittal series: find and name the lumbar bodies, then give any slice its level.

Two steps, both without torch:

1. :func:`find_bodies` runs the level model (a card of kind ``vertebrae``, see
   :mod:`inference.card`) on every frame of a sagittal series and returns a
   :class:`LevelReference`: each vertebral body found, named (T11 to L5), with its centroid and
   the centre points and normals of its superior and inferior end plates in DICOM LPS (mm), and
   the problems seen (gaps, bodies out of order, bodies that could not be named).
2. :func:`level_of` turns a reference into a :data:`reports.metrics.LevelAssigner`: frame geometry
   in, ``"L3"`` (the frame's plane crosses the L3 body on the spine's axis), ``"L3-L4"`` (it
   crosses the axis between those bodies: the disc) or ``None`` (outside the identified range,
   or the axis is outside the frame). Any plane works, oblique and angled slabs included: the
   level is where the plane cuts the spine's axis, the polyline through the bodies' centroids,
   on which each end plate (a plane through its centre) marks where a body ends
   (:func:`spine_axis`).

:func:`assign_levels` ties both to one axial series and first checks that the sagittal and axial
series share a FrameOfReferenceUID; without that their coordinates cannot be compared and no
level is given, with the reason.

Conventions: LPS mm (+x patient's left, +y posterior, +z head); normals are unit vectors; "along
the spine" runs head to foot in the bodies' order. The model grid of a frame lies in that frame's
plane, rows towards the feet and columns towards posterior, at the card's spacing (2 mm).

Naming: the model names each voxel T11..L5 directly; bodies are connected components of body
voxels, ordered along the spine, and named consecutively with the offset that agrees best with
the model's per-voxel names (:data:`NAMING`, chosen on held-out subjects; see the model card).
S1 is not named by the model (neither training set labels it): the L5-S1 disc is derived from
L5's inferior end plate and the median height of the other discs found.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Collection, Mapping, Sequence

import numpy as np
from scipy import ndimage

from .card import KIND_VERTEBRAE, CardError, ModelCard
from .end_plate_edge import EdgeSettings, edge_position, end_plate_profile
from .operator_rewrite import prelu_as_leaky_relu
from .geometry import FrameGeometry, SeriesImage
from .vocabulary import Level, Vertebra

__all__ = [
    "Body",
    "LevelReference",
    "SeriesLevels",
    "NAMING",
    "NO_LEVEL_REFERENCE",
    "SAGITTAL_COSINE",
    "Prediction",
    "predict",
    "assign_levels",
    "axis_position",
    "bodies_from_labels",
    "disc_key_frames",
    "end_plate",
    "end_plate_offsets",
    "find_bodies",
    "image_edges",
    "is_sagittal",
    "level_of",
    "model_grid",
    "move_end_plates",
    "name_candidates",
    "place_end_plates",
    "spine_axis",
    "plane_crossing",
    "upsample2",
]

#: How candidate bodies get their names (see :func:`name_candidates`).
NAMING = "consensus"
#: Smallest angle cosine between a sagittal slice's normal and the patient's left-right axis
#: (30 degrees).
SAGITTAL_COSINE = 0.866
#: Why a study has no level reference.
NO_LEVEL_REFERENCE = "no sagittal series in the study (slice normal along the patient's left-right axis)"
#: Candidate bodies smaller than this share of the median candidate are dropped (fragments).
MIN_BODY_SHARE = 0.2
#: Candidate bodies smaller than this are dropped whatever the others (ml).
MIN_BODY_ML = 1.0
#: Pieces of body voxels whose centroids lie closer than this are one body (mm): a body is
#: 25-35 mm high, so neighbouring bodies' centroids lie farther apart.
MERGE_MM = 15.0
#: ... if they also lie within this distance left-right (mm).
LATERAL_MM = 30.0
#: A candidate body taller than this many times the median one is two bodies joined (split).
TALL_RATIO = 1.5
#: A cut needs a waist: at most this share of the median count of voxels per millimetre.
WAIST_SHARE = 0.6
#: Disc height used for L5-S1 when no other disc was measured (mm).
DEFAULT_DISC_MM = 10.0
#: Half-width of the mid-sagittal band used to find a body's waist (mm, along the series normal).
MIDLINE_HALF_WIDTH_MM = 8.0
#: Half-width of the band around a body's centroid (left-right, mm) whose voxels give its end
#: plates: the sagittal slice(s) through the middle of the body, as a radiologist reads them. The
#: slice nearest the centroid is always in it. With the 8 mm band used before, the edge traced per
#: strip was the outermost of 3-4 slices (end plates are concave left-right too), and the bodies came
#: out about 1.5 mm too tall at the spine's axis on training subjects (see
#: :func:`inference.training.vertebrae_eval.boundary_errors`).
END_PLATE_HALF_WIDTH_MM = 2.5


@dataclass(frozen=True)
class Body:
    """One vertebral body found on the sagittal series.

    Attributes
    ----------
    vertebra : Vertebra
        Its name.
    centroid : numpy.ndarray
        ``(3,)`` LPS mm, mean of its voxels.
    superior, inferior : numpy.ndarray
        ``(3,)`` LPS mm: centre of the superior (head) and inferior (foot) end plate.
    superior_normal, inferior_normal : numpy.ndarray
        ``(3,)`` unit LPS vectors perpendicular to each end plate, pointing towards the head.
    volume_ml : float
        Volume of its voxels on the model grid (partial where the series does not cover it).
    agreement : float
        Share of its voxels to which the model gave the name it carries (0 to 1).
    """

    vertebra: Vertebra
    centroid: np.ndarray
    superior: np.ndarray
    inferior: np.ndarray
    superior_normal: np.ndarray
    inferior_normal: np.ndarray
    volume_ml: float
    agreement: float

    @property
    def name(self) -> str:
        return self.vertebra.value

    def as_dict(self) -> dict:
        """JSON-ready: points and normals as lists of 3 floats rounded to 0.1 mm / 0.001."""
        return {"vertebra": self.name,
                "centroid_lps_mm": _rounded(self.centroid, 1), "superior_lps_mm": _rounded(self.superior, 1),
                "inferior_lps_mm": _rounded(self.inferior, 1),
                "superior_normal": _rounded(self.superior_normal, 3),
                "inferior_normal": _rounded(self.inferior_normal, 3),
                "volume_ml": round(self.volume_ml, 1), "agreement": round(self.agreement, 3)}


def _rounded(vector: np.ndarray, digits: int) -> list[float]:
    return [round(float(v), digits) for v in vector]


@dataclass(frozen=True)
class LevelReference:
    """The bodies found on one sagittal series: what :func:`level_of` maps slices against.

    Attributes
    ----------
    series_instance_uid, frame_of_reference_uid, series_description : str
        The sagittal series the bodies come from.
    bodies : tuple of Body
        Head to foot, consecutive names where nothing is missing.
    problems : tuple of str
        What limits the reference (no bodies, gaps, names out of order, unnamed bodies).
    model : str
        ``NAME@VERSION`` of the level model.
    disc_mm : float
        Median height of the discs between the bodies found (the L5-S1 disc is given this height).
    """

    series_instance_uid: str
    frame_of_reference_uid: str
    series_description: str
    bodies: tuple[Body, ...]
    problems: tuple[str, ...] = ()
    model: str = ""
    disc_mm: float = DEFAULT_DISC_MM

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.bodies]

    def body(self, vertebra: Vertebra | str) -> Body | None:
        for body in self.bodies:
            if body.vertebra == vertebra:
                return body
        return None

    def as_dict(self) -> dict:
        return {"series_instance_uid": self.series_instance_uid,
                "frame_of_reference_uid": self.frame_of_reference_uid,
                "series_description": self.series_description, "model": self.model,
                "bodies": [b.as_dict() for b in self.bodies], "disc_mm": round(self.disc_mm, 1),
                "problems": list(self.problems)}


# ---------------------------------------------------------------------------------------------
# Geometry (pure)


def is_sagittal(frame: FrameGeometry, cosine: float = SAGITTAL_COSINE) -> bool:
    """Whether a frame's normal runs along the patient's left-right axis (within 30 degrees)."""
    return abs(float(frame.normal[0])) >= cosine


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def model_grid(frame: FrameGeometry, spacing_mm: float, minimum: Sequence[int] = (192, 192),
               multiple: int = 16, centre: np.ndarray | None = None) -> FrameGeometry:
    """The level model's input grid in a sagittal frame's plane.

    Rows run towards the feet (the patient's -z projected into the plane), columns towards
    posterior (+y, made perpendicular to the rows), at ``spacing_mm``; the grid covers the frame
    (at least ``minimum`` pixels, a multiple of ``multiple`` so the UNet's strides fit) and is
    centred on ``centre`` (LPS, default the frame's centre; it is moved into the frame's plane).

    Returns
    -------
    FrameGeometry
        Not a DICOM frame (no SOP Instance UID): pixel ``(r, c)`` of the model's input.
    """
    normal = frame.normal
    down = _unit(np.array([0.0, 0.0, -1.0]) - normal * (-normal[2]))
    back = np.array([0.0, 1.0, 0.0])
    back = _unit(back - normal * (back @ normal) - down * (back @ down))
    corners = frame.pixel_to_lps(np.array([0.0, 0.0, frame.rows - 1.0, frame.rows - 1.0]),
                                 np.array([0.0, frame.columns - 1.0, 0.0, frame.columns - 1.0]))
    size = []
    for axis, low in zip((down, back), minimum):
        extent = float(np.ptp(corners @ axis)) / spacing_mm + 1
        size.append(int(max(low, multiple * np.ceil(extent / multiple))))
    middle = frame.centre if centre is None else np.asarray(centre, dtype=np.float64)
    middle = middle - normal * ((middle - frame.centre) @ normal)
    origin = middle - (size[0] - 1) / 2 * spacing_mm * down - (size[1] - 1) / 2 * spacing_mm * back
    return FrameGeometry(position=tuple(origin), row_cosine=tuple(back), column_cosine=tuple(down),
                         pixel_spacing=(spacing_mm, spacing_mm), rows=size[0], columns=size[1])


def resample_to_grid(image: np.ndarray, frame: FrameGeometry, grid: FrameGeometry) -> np.ndarray:
    """A frame's pixels on another grid in (or near) its plane: bilinear, 0 outside the frame.

    Before sampling onto a coarser grid the image is smoothed with a Gaussian of sigma 0.4 grid
    pixels (in the frame's pixels), as the training samples were.

    Parameters
    ----------
    image : numpy.ndarray
        ``(frame.rows, frame.columns)``.
    frame, grid : FrameGeometry

    Returns
    -------
    numpy.ndarray
        float32 ``(grid.rows, grid.columns)``.
    """
    sigma = [max(0.0, 0.4 * grid.pixel_spacing[0] / s) if grid.pixel_spacing[0] > s else 0.0
             for s in frame.pixel_spacing]
    source = ndimage.gaussian_filter(np.asarray(image, dtype=np.float32), sigma) if max(sigma) > 0 else image
    rows, columns = np.meshgrid(np.arange(grid.rows), np.arange(grid.columns), indexing="ij")
    pixel = frame.lps_to_pixel(grid.pixel_to_lps(rows, columns))
    return ndimage.map_coordinates(np.asarray(source, dtype=np.float32), [pixel[..., 0], pixel[..., 1]],
                                   order=1, cval=0.0, mode="constant").astype(np.float32)


def upsample2(scores: np.ndarray) -> np.ndarray:
    """Bilinear interpolation onto the grid of half the spacing over the same extent.

    ``(channels, rows, columns)`` -> ``(channels, 2 rows - 1, 2 columns - 1)``: output pixel
    ``(i, j)`` lies at input pixel ``(i / 2, j / 2)``.
    """
    channels, rows, columns = scores.shape
    tall = np.empty((channels, 2 * rows - 1, columns), dtype=scores.dtype)
    tall[:, ::2] = scores
    tall[:, 1::2] = (scores[:, :-1] + scores[:, 1:]) / 2
    out = np.empty((channels, 2 * rows - 1, 2 * columns - 1), dtype=scores.dtype)
    out[:, :, ::2] = tall
    out[:, :, 1::2] = (tall[:, :, :-1] + tall[:, :, 1:]) / 2
    return out


def end_plate(points: np.ndarray, axis: np.ndarray, across: np.ndarray, superior: bool,
              bin_mm: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Centre and normal of one end plate of a body from its mid-sagittal voxels.

    The body's edge towards the head (``superior``) or the feet is traced per ``bin_mm`` strip
    along ``across`` (the anterior-posterior direction in the sagittal plane, perpendicular to
    ``axis``); a line fitted through the central 70 % of the strips gives the normal, and the
    edge in the middle third of the strips (end plates are concave) gives the centre.

    Parameters
    ----------
    points : numpy.ndarray
        ``(n, 3)`` LPS mm, the body's voxels near its mid-sagittal plane.
    axis : numpy.ndarray
        ``(3,)`` unit vector along the spine towards the head.
    across : numpy.ndarray
        ``(3,)`` unit vector perpendicular to ``axis`` in the sagittal plane.
    superior : bool

    Returns
    -------
    centre, normal : numpy.ndarray
        ``(3,)`` LPS mm and a unit vector towards the head.
    """
    points = np.asarray(points, dtype=np.float64)
    origin = points.mean(axis=0)
    t_axis = (points - origin) @ axis
    t_across = (points - origin) @ across
    strips = np.floor((t_across - t_across.min()) / bin_mm).astype(int)
    edges_w, edges_a = [], []
    for strip in np.unique(strips):
        inside = strips == strip
        edges_w.append(t_across[inside].mean())
        edges_a.append(t_axis[inside].max() if superior else t_axis[inside].min())
    edges_w, edges_a = np.array(edges_w), np.array(edges_a)
    keep = slice(int(0.15 * len(edges_w)), max(int(np.ceil(0.85 * len(edges_w))), int(0.15 * len(edges_w)) + 1))
    order = np.argsort(edges_w)
    w, a = edges_w[order][keep], edges_a[order][keep]
    if len(w) >= 3 and np.ptp(w) > 0:
        slope, _ = np.polyfit(w, a, 1)
        slope = float(np.clip(slope, -1.0, 1.0))  # end plates tilt less than 45 degrees to the axis
    else:
        slope = 0.0
    # The centre: end plates are concave, so the edge is taken in the middle third of the strips
    # (where a slice through the spine's axis meets it), not from the line through the rims.
    middle = float(np.median(w))
    centre_strips = np.abs(w - middle) <= max(np.ptp(w) / 6, bin_mm)
    height = float(np.median(a[centre_strips] - slope * (w[centre_strips] - middle)))
    centre = origin + middle * across + height * axis
    normal = _unit(axis - slope * across)
    return centre, normal


def plane_crossing(points: np.ndarray, centre: np.ndarray, normal: np.ndarray) -> list[tuple[int, float]]:
    """Where a plane cuts a polyline: ``(segment index, fraction along it)`` for each crossing.

    Parameters
    ----------
    points : numpy.ndarray
        ``(n, 3)`` LPS mm, the polyline's vertices.
    centre, normal : numpy.ndarray
        A point of the plane and its normal (``(3,)``).
    """
    distance = (np.asarray(points) - centre) @ normal
    found = []
    for i in range(len(distance) - 1):
        d0, d1 = distance[i], distance[i + 1]
        if d0 == d1:
            if d0 == 0:
                found.append((i, 0.0))
            continue
        if (d0 <= 0 <= d1) or (d1 <= 0 <= d0):
            found.append((i, float(d0 / (d0 - d1))))
    return found


#: How far the spine's axis runs beyond the highest and lowest body's centroid (mm), along the line
#: through the last two centroids (as :func:`inference.training.vertebrae_eval.true_level` does).
AXIS_EXTENSION_MM = 40.0


def _on_line(point: np.ndarray, normal: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[float, np.ndarray]:
    """Where the plane through ``point`` with ``normal`` cuts the segment start -> end: the fraction
    along it (clamped to 0..1: an end plate lies between its body's centroid and the next one) and
    the point."""
    d0, d1 = float((start - point) @ normal), float((end - point) @ normal)
    fraction = 0.5 if d0 == d1 else float(np.clip(d0 / (d0 - d1), 0.0, 1.0))
    return fraction, start + fraction * (end - start)


def spine_axis(reference: LevelReference) -> list[tuple[np.ndarray, np.ndarray]]:
    """Where each body's end plates cut the spine's axis: ``(superior point, inferior point)`` LPS mm,
    one pair per body, head to foot.

    The spine's axis is the line through the bodies' centroids (polyline, head to foot), extended
    :data:`AXIS_EXTENSION_MM` beyond the first and last body along the line through the last two
    centroids. Each end plate is the plane through its centre with its normal; its point on the axis
    is where that plane cuts the axis between the body's centroid and the neighbouring one. The
    centroids come from the whole body (all slices), so the axis does not depend on how the middle
    of an end plate was traced; the labels' truth (:func:`inference.training.vertebrae_eval.true_level`)
    uses the same axis through the labelled bodies' centroids. Where two neighbouring end plates
    cross on the axis (a disc of height <= 0), both take their middle. With one body, its end-plate
    centres are its points.
    """
    bodies = reference.bodies
    if len(bodies) < 2:
        return [(b.superior, b.inferior) for b in bodies]
    centroids = [np.asarray(b.centroid, dtype=np.float64) for b in bodies]

    def beyond(i: int, j: int) -> np.ndarray:  # the axis extended past centroid i, away from centroid j
        direction = centroids[i] - centroids[j]
        return centroids[i] + AXIS_EXTENSION_MM * direction / max(float(np.linalg.norm(direction)), 1e-6)

    points = []
    for i, body in enumerate(bodies):
        above = centroids[i - 1] if i > 0 else beyond(0, 1)
        below = centroids[i + 1] if i + 1 < len(bodies) else beyond(i, i - 1)
        points.append([_on_line(body.superior, body.superior_normal, centroids[i], above),
                       _on_line(body.inferior, body.inferior_normal, centroids[i], below)])
    for i in range(len(points) - 1):
        (f_low, low), (f_high, high) = points[i][1], points[i + 1][0]
        # Both on the segment centroid i -> centroid i + 1: fractions f_low and 1 - f_high from i.
        if f_low > 1.0 - f_high:
            middle = (low + high) / 2
            points[i][1], points[i + 1][0] = (f_low, middle), (f_high, middle)
    return [(sup[1], inf[1]) for sup, inf in points]


def _segments(reference: LevelReference) -> list[tuple[np.ndarray, np.ndarray, str | None]]:
    """The spine's axis as segments ``(start, end, level name or None)`` head to foot: each body from
    its superior to its inferior end plate's point on the axis (:func:`spine_axis`), each disc from
    one body's inferior point to the next one's superior point, and below L5 the L5-S1 disc, along
    the axis extended below L5, down to the plane ``reference.disc_mm`` below L5's inferior end
    plate (parallel to it)."""
    bodies = reference.bodies
    axis = spine_axis(reference)
    segments: list[tuple[np.ndarray, np.ndarray, str | None]] = []
    for i, body in enumerate(bodies):
        segments.append((axis[i][0], axis[i][1], body.name))
        if i + 1 < len(bodies):
            below = bodies[i + 1]
            adjacent = body.vertebra.below is below.vertebra
            segments.append((axis[i][1], axis[i + 1][0], Level(body.vertebra, disc=True).name if adjacent else None))
    if bodies and bodies[-1].vertebra is Vertebra.L5:
        last = bodies[-1]
        if len(bodies) >= 2:
            direction = _unit(np.asarray(last.centroid) - np.asarray(bodies[-2].centroid))
        else:
            direction = -last.inferior_normal
        start = axis[-1][1]
        # Along the axis to the plane disc_mm below L5's inferior end plate.
        along = float(direction @ -last.inferior_normal)
        length = reference.disc_mm / along if along > 0.3 else reference.disc_mm
        segments.append((start, start + length * direction, Level(Vertebra.L5, disc=True).name))
    return segments


def level_of(reference: LevelReference) -> Callable[[FrameGeometry], str | None]:
    """A level assigner (:data:`reports.metrics.LevelAssigner`) from a level reference.

    A frame gets the level where its plane cuts the spine's axis, the line through the bodies'
    centroids (:func:`spine_axis`): ``"L3"`` when that point lies in the L3 body (between the
    planes of its superior and inferior end plates: the slice crosses the body near the midline),
    ``"L3-L4"`` when it lies between L3's inferior and L4's superior end plate (the disc), the
    L5-S1 disc below L5 for ``reference.disc_mm`` (measured along L5's inferior normal). A frame is
    judged by its central plane: a 4 mm slice half on a disc and half on a body gets the level at
    its centre. ``None`` when the plane cuts the axis above the highest or below the
    lowest part identified, across a gap between non-adjacent bodies, or where the cut lies
    outside the frame's pixels. If the plane cuts the axis more than once, the cut nearest the
    frame's centre counts. The frame of reference is not checked here (:func:`assign_levels`).
    """
    locate = axis_position(reference)
    return lambda frame: locate(frame)[0]


def axis_position(reference: LevelReference) -> Callable[[FrameGeometry], tuple[str | None, float | None]]:
    """Like :func:`level_of`, with where the frame cuts its part of the spine's axis.

    Returns
    -------
    callable
        Frame geometry to ``(level name or None, distance in mm along the axis from the cut to the
        middle of that part or None)``; for a disc level, the distance to the middle of the disc,
        which picks a disc's key slice (:func:`disc_key_frames`).
    """
    segments = _segments(reference)
    if not segments:
        return lambda frame: (None, None)
    vertices = np.array([segments[0][0]] + [s[1] for s in segments])

    def locate(frame: FrameGeometry) -> tuple[str | None, float | None]:
        centre = frame.centre
        best: tuple[float, str | None, float] | None = None
        for index, fraction in plane_crossing(vertices, centre, frame.normal):
            start, end, name = segments[index]
            point = start + fraction * (end - start)
            row, column, _ = frame.lps_to_pixel(point)
            if not (-0.5 <= row <= frame.rows - 0.5 and -0.5 <= column <= frame.columns - 0.5):
                continue
            distance = float(np.linalg.norm(point - centre))
            if best is None or distance < best[0]:
                best = (distance, name, abs(fraction - 0.5) * float(np.linalg.norm(end - start)))
        return (None, None) if best is None or best[1] is None else (best[1], best[2])

    return locate


def disc_key_frames(levels: Sequence[str | None], offsets: Sequence[float | None],
                    excluded: Collection[int] = ()) -> dict[str, int]:
    """The key slice of each disc level: the frame nearest the middle of the disc.

    Parameters
    ----------
    levels, offsets : sequences, one item per frame
        The frame's level and its distance (mm) from the middle of that level along the spine's
        axis (:class:`SeriesLevels`).
    excluded : collection of int
        Frames that quality control set aside: never a key slice.

    Returns
    -------
    dict
        Disc level name (``"L4-L5"``) to frame index; ties go to the earlier frame.
    """
    chosen: dict[str, tuple[float, int]] = {}
    for index, (level, offset) in enumerate(zip(levels, offsets)):
        if not level or offset is None or index in excluded or not Level.parse(level).disc:
            continue
        if level not in chosen or (offset, index) < chosen[level]:
            chosen[level] = (offset, index)
    return {level: index for level, (_, index) in chosen.items()}


# ---------------------------------------------------------------------------------------------
# Bodies from a label volume (pure)


@dataclass(frozen=True)
class _Candidate:
    flat: np.ndarray  # flat indices of its voxels in the class volume
    points: np.ndarray  # (n, 3) LPS of its voxels
    votes: np.ndarray  # (classes,) voxel counts per model class (index 0 unused)
    volume_ml: float


def name_candidates(votes: Sequence[np.ndarray], naming: str = NAMING) -> tuple[list[int | None], list[str]]:
    """Vertebra index (:attr:`Vertebra.index`, T11 = 1 ... L5 = 7) of each candidate body.

    Parameters
    ----------
    votes : sequence of numpy.ndarray
        Per candidate, head to foot, voxel counts per model class (class k names vertebra index k,
        class 0 is background and unused).
    naming : str
        ``"direct"``: each candidate takes the class most of its voxels have (duplicates: the
        largest keeps it). ``"order"``: the lowest candidate is L5 and the others are named
        upwards. ``"consensus"``: consecutive names, with the offset whose names most voxels
        agree with.

    Returns
    -------
    names : list of int or None
        None for a candidate that cannot be named (outside T11-L5, or a duplicate).
    problems : list of str
    """
    n = len(votes)
    problems: list[str] = []
    if n == 0:
        return [], problems
    classes = len(votes[0])
    if naming == "direct":
        names: list[int | None] = [int(np.argmax(v[1:]) + 1) for v in votes]
        for k in set(names):
            holders = [i for i, name in enumerate(names) if name == k]
            if len(holders) > 1:
                keep = max(holders, key=lambda i: votes[i][k])
                for i in holders:
                    if i != keep:
                        names[i] = None
                problems.append(f"{len(holders)} bodies were named {list(Vertebra)[k].value}; the largest keeps the name")
        known = [k for k in names if k is not None]
        if known != sorted(known):
            problems.append("the names the model gave are not in head-to-foot order")
        return names, problems
    if naming == "order":
        offset = (classes - 1) - (n - 1)
    elif naming == "consensus":
        best = None
        for offset in range(1 - n, classes):
            score = sum(float(votes[i][offset + i]) for i in range(n) if 1 <= offset + i < classes)
            if best is None or score > best[0]:
                best = (score, offset)
        offset = best[1]
        direct = [int(np.argmax(v[1:]) + 1) for v in votes]
        # A body the order leaves outside T11-L5 is not named at all, and said so below.
        disagree = [i for i in range(n) if direct[i] != offset + i and 1 <= offset + i < classes]
        if disagree:
            # Which bodies, so that a reader can look at them on the sagittal series.
            which = ", ".join(f"{_vertebra_name(offset + i, classes)} (the model: {_vertebra_name(direct[i], classes)})"
                              for i in disagree)
            problems.append(f"{len(disagree)} of {n} bodies {'was' if len(disagree) == 1 else 'were'} named by "
                            f"their order: the model's own name for {'it' if len(disagree) == 1 else 'them'} "
                            f"differed: {which}")
    else:
        raise ValueError(f"naming must be direct, order or consensus, not {naming!r}")
    names = [offset + i if 1 <= offset + i < classes else None for i in range(n)]
    unnamed = names.count(None)
    if unnamed:
        problems.append(f"{unnamed} {'body' if unnamed == 1 else 'bodies'} outside T11-L5 "
                        f"{'was' if unnamed == 1 else 'were'} not named")
    return names, problems


def _vertebra_name(index: int, classes: int) -> str:
    """The name of vertebra index ``index`` (T11 = 1 ... L5 = 7), or "unnamed" outside T11-L5."""
    return list(Vertebra)[index].value if 1 <= index < min(classes, len(Vertebra)) else "unnamed"


def _height(points: np.ndarray, axis: np.ndarray) -> float:
    t = points @ axis
    return float(np.percentile(t, 98) - np.percentile(t, 2))


def _split_tall(candidates: list[_Candidate], classes: np.ndarray, normal: np.ndarray,
                voxel_ml: float) -> tuple[list[_Candidate], int]:
    """Split candidates more than :data:`TALL_RATIO` times as tall as the median candidate at
    their narrowest point along the spine (a disc the model bridged), up to twice each.

    Heights are measured along the spine's overall direction (the line through the highest and
    lowest candidates' centroids, in the sagittal plane); the cut is where the fewest voxels of
    the mid-sagittal band lie, in the middle half of the candidate, if there are fewer than
    :data:`WAIST_SHARE` times the median count there.
    """
    if len(candidates) < 3:
        return candidates, 0
    centroids = np.array([c.points.mean(axis=0) for c in candidates])
    ordered = centroids[np.argsort(-centroids[:, 2])]
    axis = ordered[0] - ordered[-1]
    axis = axis - normal * (axis @ normal)
    axis = _unit(axis) if np.linalg.norm(axis) > 0 else np.array([0.0, 0.0, 1.0])
    heights = [_height(c.points, axis) for c in candidates]
    typical = float(np.median(heights))
    out: list[_Candidate] = []
    split = 0
    queue = [(c, 0) for c in candidates]
    while queue:
        candidate, depth = queue.pop()
        centroid = candidate.points.mean(axis=0)
        if depth >= 2 or _height(candidate.points, axis) <= TALL_RATIO * typical:
            out.append(candidate)
            continue
        t = (candidate.points - centroid) @ axis
        band = np.abs((candidate.points - centroid) @ normal) <= MIDLINE_HALF_WIDTH_MM
        low, high = np.percentile(t, 2), np.percentile(t, 98)
        bins = np.arange(low, high + 1.0, 1.0)
        counts, _ = np.histogram(t[band], bins)
        counts = np.convolve(counts, np.ones(3) / 3, mode="same")
        middle = slice(len(counts) // 4, max(len(counts) // 4 + 1, 3 * len(counts) // 4))
        if counts[middle].size == 0 or counts[middle].min() >= WAIST_SHARE * np.median(counts):
            out.append(candidate)
            continue
        cut = bins[middle.start + int(np.argmin(counts[middle]))] + 0.5
        flat_classes = classes.reshape(-1)
        for part in (t > cut, t <= cut):
            flat = candidate.flat[part]
            votes = np.bincount(flat_classes[flat], minlength=len(candidate.votes)).astype(np.float64)
            votes[0] = 0
            queue.append((_Candidate(flat, candidate.points[part], votes, float(len(flat)) * voxel_ml), depth + 1))
        split += 1
    return out, split


def bodies_from_labels(classes: np.ndarray, positions: np.ndarray, voxel_ml: float, normal: np.ndarray,
                       naming: str = NAMING, named: np.ndarray | None = None) -> tuple[list[Body], list[str]]:
    """Named bodies from per-voxel model classes on a stack of sagittal grids.

    Parameters
    ----------
    classes : numpy.ndarray
        ``(slices, rows, columns)`` int, model class per voxel (0 background, k = vertebra index k).
    positions : numpy.ndarray
        ``(slices, rows, columns, 3)`` LPS mm of each voxel.
    voxel_ml : float
        Volume of one voxel (ml).
    normal : numpy.ndarray
        ``(3,)`` unit normal of the sagittal slices.
    naming : str
        See :func:`name_candidates`.
    named : numpy.ndarray, optional
        Same shape as ``classes``, filled here with the vertebra index of each voxel of a body
        kept (0 elsewhere): the named segmentation, for measuring Dice.

    Returns
    -------
    bodies : list of Body
        Head to foot.
    problems : list of str
    """
    problems: list[str] = []
    grid_index = np.arange(classes.size).reshape(classes.shape)
    flat_positions = positions.reshape(-1, 3)
    n_classes = int(len(Vertebra) - 1)  # classes 0..7 at most (T11..L5)
    n_classes = max(n_classes, int(classes.max()) + 1)
    structure = ndimage.generate_binary_structure(3, 1)
    # Pieces: connected components of each class. A body the model gave two names splits into
    # pieces whose centroids lie close together; neighbouring bodies lie a body height apart.
    pieces: list[tuple[np.ndarray, int]] = []
    for k in range(1, n_classes):
        components, count = ndimage.label(classes == k, structure)
        for index, box in enumerate(ndimage.find_objects(components), 1):
            if box is None:
                continue
            flat = grid_index[box][components[box] == index]
            if len(flat) * voxel_ml >= 0.25 * MIN_BODY_ML:
                pieces.append((flat, k))
    centres = np.array([flat_positions[flat].mean(axis=0) for flat, _ in pieces]).reshape(-1, 3)
    sizes = np.array([len(flat) * voxel_ml for flat, _ in pieces])
    big = [i for i in range(len(pieces)) if sizes[i] >= MIN_BODY_ML]
    group = {i: i for i in big}

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    # Large pieces closer than MERGE_MM are one body; each small piece joins the nearest large
    # piece if that lies within MERGE_MM, else it is dropped (a fragment).
    def near(i: int, j: int) -> bool:
        # Close in the sagittal plane (a body is 25-35 mm high, 30-40 mm deep) and within a body's
        # width left-right (its halves may come apart on slices where the model missed it).
        offset = centres[i] - centres[j]
        across = float(offset @ normal)
        return bool(np.linalg.norm(offset - across * normal) < MERGE_MM and abs(across) < LATERAL_MM)

    for a, i in enumerate(big):
        for j in big[a + 1:]:
            if near(i, j) and root(i) != root(j):
                group[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i in big:
        members.setdefault(root(i), []).append(i)
    for i in range(len(pieces)):
        if i in group or not big:
            continue
        nearest = min(big, key=lambda j: np.linalg.norm(centres[i] - centres[j]))
        if near(i, nearest):
            members[root(nearest)].append(i)
    candidates: list[_Candidate] = []
    for indices in members.values():
        flat = np.concatenate([pieces[i][0] for i in indices])
        votes = np.zeros(n_classes)
        for i in indices:
            votes[pieces[i][1]] += len(pieces[i][0])
        candidates.append(_Candidate(flat, flat_positions[flat], votes, float(len(flat)) * voxel_ml))
    if not candidates:
        return [], ["no vertebral body was found on the sagittal series"]
    median = float(np.median([c.volume_ml for c in candidates if c.volume_ml >= MIN_BODY_ML] or [0.0]))
    candidates = [c for c in candidates if c.volume_ml >= max(MIN_BODY_ML, MIN_BODY_SHARE * median)]
    if not candidates:
        return [], ["only fragments of vertebral bodies were found on the sagittal series"]
    candidates, split = _split_tall(candidates, classes, normal, voxel_ml)
    if split:
        joined = "a body much taller than the others was" if split == 1 else \
            f"{split} bodies much taller than the others were"
        problems.append(f"{joined} split at the narrowest point (two bodies joined across a disc)")
        candidates = [c for c in candidates if c.volume_ml >= max(MIN_BODY_ML, MIN_BODY_SHARE * median)]
    centroids = np.array([c.points.mean(axis=0) for c in candidates])
    # Order along the spine: head to foot (LPS z decreasing), which holds for any lumbar spine
    # imaged in a sagittal plane (lordosis bends the axis by far less than 90 degrees per body).
    order = np.argsort(-centroids[:, 2])
    candidates = [candidates[i] for i in order]
    centroids = centroids[order]
    names, naming_problems = name_candidates([c.votes for c in candidates], naming)
    problems += naming_problems
    kept = [(c, centroid, name) for c, centroid, name in zip(candidates, centroids, names) if name is not None]
    if not kept:
        return [], problems + ["no vertebral body could be named"]
    vertebrae = list(Vertebra)
    bodies: list[Body] = []
    kept_centroids = np.array([k[1] for k in kept])
    for i, (candidate, centroid, name) in enumerate(kept):
        above = kept_centroids[i - 1] if i > 0 else None
        below = kept_centroids[i + 1] if i + 1 < len(kept) else None
        if above is not None and below is not None:
            axis = above - below
        elif above is not None:
            axis = above - centroid
        elif below is not None:
            axis = centroid - below
        else:
            axis = np.array([0.0, 0.0, 1.0])
        axis = axis - normal * (axis @ normal)
        axis = _unit(axis if np.linalg.norm(axis) > 0 else np.array([0.0, 0.0, 1.0]))
        across = _unit(np.cross(axis, normal))
        lateral = np.abs((candidate.points - centroid) @ normal)
        mid = candidate.points[lateral <= max(END_PLATE_HALF_WIDTH_MM, float(lateral.min()) + 0.5)]
        if len(mid) < 10:
            mid = candidate.points
        superior, superior_normal = end_plate(mid, axis, across, superior=True)
        inferior, inferior_normal = end_plate(mid, axis, across, superior=False)
        agreement = float(candidate.votes[name] / max(candidate.votes.sum(), 1.0))
        if named is not None:
            named.reshape(-1)[candidate.flat] = name
        bodies.append(Body(vertebrae[name], centroid, superior, inferior, superior_normal, inferior_normal,
                           candidate.volume_ml, agreement))
    for upper, lower in zip(bodies, bodies[1:]):
        if upper.vertebra.index >= lower.vertebra.index:
            problems.append(f"{upper.name} is not above {lower.name}: bodies out of order")
        elif upper.vertebra.below is not lower.vertebra:
            missing = vertebrae[upper.vertebra.index + 1:lower.vertebra.index]
            problems.append(f"gap between {upper.name} and {lower.name}: "
                            f"{', '.join(v.value for v in missing)} not found; no level between them")
    return bodies, problems


def _disc_height(bodies: Sequence[Body]) -> float:
    heights = [float((upper.inferior - lower.superior) @ upper.inferior_normal)
               for upper, lower in zip(bodies, bodies[1:]) if upper.vertebra.below is lower.vertebra]
    heights = [h for h in heights if 2.0 <= h <= 20.0]
    return float(np.median(heights)) if heights else DEFAULT_DISC_MM


# ---------------------------------------------------------------------------------------------
# The model


class _Session:
    """An ONNX Runtime session of a level model, cached per card file."""

    _cache: dict[tuple[str, str], object] = {}

    @classmethod
    def get(cls, card: ModelCard, threads: int | None = None):
        import onnxruntime as ort

        key = (str(card.onnx_path), card.sha256)
        if key not in cls._cache:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads or 2
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            model = card.onnx_path.read_bytes()
            import hashlib

            if hashlib.sha256(model).hexdigest() != card.sha256:
                raise CardError(f"model {card.name}: {card.onnx_path.name} does not match its card's sha256")
            # The same floats, faster on the CPU (inference.operator_rewrite).
            cls._cache[key] = ort.InferenceSession(prelu_as_leaky_relu(model).model, sess_options=options,
                                                   providers=["CPUExecutionProvider"])
        return cls._cache[key]


def _normalise(image: np.ndarray, normalisation: Mapping[str, object]) -> np.ndarray:
    from .runtime import normalise

    return normalise(image[None], normalisation)[0]


def find_bodies(series: SeriesImage, card: ModelCard, naming: str | None = None, threads: int | None = None,
                batch: int = 4) -> LevelReference:
    """Find and name the vertebral bodies on a sagittal series.

    Parameters
    ----------
    series : SeriesImage
        A sagittal series (slice normals within 30 degrees of the patient's left-right axis);
        its largest stack is used.
    card : ModelCard
        A level model (kind ``vertebrae``).
    naming : str, optional
        See :func:`name_candidates`; default the card's ``postprocess.naming``, else :data:`NAMING`.
    threads : int, optional
        ONNX Runtime threads (default 2).
    batch : int
        Frames per model call.

    Returns
    -------
    LevelReference
        With no bodies and the reason in ``problems`` when the series is not sagittal or nothing
        was found.
    """
    prediction = predict(series, card, threads, batch)
    if prediction.problem:
        return LevelReference(**prediction.info, bodies=(), problems=(prediction.problem,))
    naming = naming or card.postprocess.get("naming", NAMING)
    bodies, problems = bodies_from_labels(prediction.classes, prediction.positions, prediction.voxel_ml,
                                          prediction.normal, naming)
    edge = card.postprocess.get("end_plate_edge")
    settings = EdgeSettings(edge) if edge else None
    bodies = [place_end_plates(b, end_plate_offsets(card, b.name),
                               image_edges(b, series, prediction.normal, settings) if settings else (None, None),
                               settings) for b in bodies]
    return LevelReference(**prediction.info, bodies=tuple(bodies), problems=tuple(problems),
                          disc_mm=_disc_height(bodies))


def end_plate_offsets(card: ModelCard, vertebra: str) -> tuple[float, float]:
    """``(superior, inferior)`` end-plate offsets (mm, positive into the body) of one vertebra from
    the card's ``postprocess``: ``end_plate_offset_mm_by_vertebra[vertebra]`` where the card has
    it, else ``end_plate_offset_mm``, else none (see :func:`move_end_plates`)."""
    by_vertebra = card.postprocess.get("end_plate_offset_mm_by_vertebra") or {}
    offsets = by_vertebra.get(vertebra) or card.postprocess.get("end_plate_offset_mm") or (0.0, 0.0)
    return float(offsets[0]), float(offsets[1])


def move_end_plates(body: Body, superior_mm: float, inferior_mm: float) -> Body:
    """The body with its end-plate centres moved along their normals: the superior one by
    ``-superior_mm`` and the inferior one by ``+inferior_mm`` (positive values move both into the
    body). The level model's card gives the offsets measured on training subjects
    (``postprocess.end_plate_offset_mm`` and ``end_plate_offset_mm_by_vertebra``, see
    :func:`end_plate_offsets`): how far its bodies end beyond the labelled ones where a slice
    crosses the spine's axis (:func:`inference.training.vertebrae_eval.calibrate`)."""
    return replace(body, superior=body.superior - superior_mm * body.superior_normal,
                   inferior=body.inferior + inferior_mm * body.inferior_normal)


def image_edges(body: Body, series: SeriesImage, normal: np.ndarray, settings: EdgeSettings
                ) -> tuple[float | None, float | None]:
    """Where the image itself shows the body's end plates (:mod:`inference.end_plate_edge`).

    Parameters
    ----------
    body : Body
        As the model found it (end plates before any offset).
    series : SeriesImage
        The sagittal series; the frame of its largest stack nearest the body's centroid is used.
    normal : numpy.ndarray
        ``(3,)`` unit normal of the sagittal frames.
    settings : EdgeSettings

    Returns
    -------
    superior, inferior : float or None
        mm outwards from each end-plate centre along its normal where the intensity rises most
        steeply into the disc (before the card's offset), or None where the image cannot say.
    """
    stack = max(series.stacks, key=len)
    nearest = min(stack, key=lambda i: abs(float((body.centroid - np.asarray(series.geometry[i].centre))
                                                 @ np.asarray(series.geometry[i].normal))))
    frame, image = series.geometry[nearest], series.frames[nearest]
    edges = []
    for superior, centre, plate_normal in ((True, body.superior, body.superior_normal),
                                           (False, body.inferior, body.inferior_normal)):
        across = _unit(np.cross(plate_normal, normal))
        profile = end_plate_profile(image, frame, centre, plate_normal, across, superior)
        edges.append(edge_position(profile, settings)[0])
    return edges[0], edges[1]


def place_end_plates(body: Body, model_offsets: tuple[float, float], edges: tuple[float | None, float | None],
                     settings: EdgeSettings | None) -> Body:
    """The end plates used: the model's, moved by its offsets, averaged with the image's edges.

    Parameters
    ----------
    body : Body
        As the model found it.
    model_offsets : tuple of float
        ``(superior, inferior)`` mm into the body (:func:`end_plate_offsets`, :func:`move_end_plates`).
    edges : tuple of (float or None)
        From :func:`image_edges`, mm outwards from the model's end plates.
    settings : EdgeSettings or None
        The card's ``postprocess.end_plate_edge``; None: the model's end plates alone.

    Returns
    -------
    Body
        Each end-plate centre moved along its normal to ``(1 - w) * model + w * (edge - offset)``
        with the card's weight ``w``, where the image gives an edge within ``max_move_mm`` of the
        model's end plate; elsewhere the model's end plate with its offset.
    """
    moved = move_end_plates(body, *model_offsets)
    if settings is None:
        return moved
    placed = {}
    for side, edge, offset, outwards in (("superior", edges[0], settings.offset_mm[0], 1.0),
                                         ("inferior", edges[1], settings.offset_mm[1], -1.0)):
        if edge is None or abs(edge - offset) > settings.max_move_mm:
            continue
        plate_normal = getattr(body, f"{side}_normal")
        from_image = getattr(body, side) + outwards * (edge - offset) * plate_normal
        current = getattr(moved, side)
        placed[side] = current + settings.weight * float((from_image - current) @ plate_normal) * plate_normal
    return replace(moved, **placed)


@dataclass(frozen=True)
class Prediction:
    """The level model's classes on a sagittal stack (see :func:`predict`).

    Attributes
    ----------
    classes : numpy.ndarray
        ``(slices, rows, columns)`` vertebra index per voxel (0 background, T11 = 1 ... L5 = 7)
        on the model grids refined to half their spacing (class scores interpolated bilinearly).
    positions : numpy.ndarray
        ``(slices, rows, columns, 3)`` LPS mm.
    normal : numpy.ndarray
        ``(3,)`` the slices' unit normal.
    voxel_ml : float
    info : dict
        Identity of the series and the model, as :class:`LevelReference` takes it.
    problem : str or None
        Why nothing was predicted (not sagittal).
    """

    classes: np.ndarray
    positions: np.ndarray
    normal: np.ndarray
    voxel_ml: float
    info: dict
    problem: str | None = None


def predict(series: SeriesImage, card: ModelCard, threads: int | None = None, batch: int = 4) -> Prediction:
    """Run the level model on the largest stack of a sagittal series (see :func:`find_bodies`)."""
    if card.kind != KIND_VERTEBRAE:
        raise CardError(f"model {card.name} segments {card.kind}, not vertebrae")
    stack = max(series.stacks, key=len)
    frames = [series.geometry[i] for i in stack]
    info = dict(series_instance_uid=series.series_instance_uid,
                frame_of_reference_uid=series.frame_of_reference_uid,
                series_description=series.series_description, model=f"{card.name}@{card.version}")
    if not is_sagittal(frames[0]):
        empty = np.zeros((0, 0, 0), dtype=np.int64)
        return Prediction(empty, np.zeros((0, 0, 0, 3)), frames[0].normal, 0.0, info,
                          "the reference series is not sagittal")
    spacing = float(card.spacing_mm[0])
    centre = np.mean([f.centre for f in frames], axis=0)
    grids = [model_grid(f, spacing, card.window, centre=centre) for f in frames]
    shape = max(g.shape for g in grids)
    grids = [model_grid(f, spacing, shape, centre=centre) for f in frames]
    images = np.stack([_normalise(resample_to_grid(series.frames[i], f, g), card.normalisation)
                       for i, f, g in zip(stack, frames, grids)])
    session = _Session.get(card, threads)
    name = session.get_inputs()[0].name
    # Class scores are interpolated (bilinear) onto a grid of half the spacing before the argmax:
    # end plates then fall between the model's 2 mm pixels rather than on them.
    fine = (2 * shape[0] - 1, 2 * shape[1] - 1)
    classes = np.empty((len(images),) + fine, dtype=np.int64)
    for first in range(0, len(images), batch):
        logits = session.run(None, {name: images[first:first + batch, None]})[0]
        for j, scores in enumerate(logits):
            classes[first + j] = upsample2(scores).argmax(axis=0)
    # Model class k -> vertebra index (T11 = 1 ... L5 = 7) through the card's labels.
    lookup = np.zeros(card.classes, dtype=np.int64)
    for k, value in enumerate(card.output_labels, 1):
        if value in card.labels:
            lookup[k] = card.labels[value].vertebra.index
    classes = lookup[classes]
    rows, columns = np.meshgrid(np.arange(fine[0]) / 2.0, np.arange(fine[1]) / 2.0, indexing="ij")
    positions = np.stack([g.pixel_to_lps(rows, columns) for g in grids])
    normal = frames[0].normal
    gaps = np.diff(sorted(float(f.centre @ normal) for f in frames))
    step = float(np.median(gaps)) if len(gaps) else float(frames[0].slice_thickness or spacing)
    voxel_ml = (spacing / 2) * (spacing / 2) * step / 1000.0
    return Prediction(classes, positions, normal, voxel_ml, info)


# ---------------------------------------------------------------------------------------------
# Levels of a series


@dataclass(frozen=True)
class SeriesLevels:
    """The level of every frame of one (axial) series, or why there are none.

    Attributes
    ----------
    series_instance_uid : str
    levels : tuple of (str or None)
        One per frame of the series, in frame order.
    reason : str or None
        Why no frame has a level (other frame of reference, no bodies), else None.
    reference : LevelReference or None
    offsets_mm : tuple of (float or None)
        One per frame: distance (mm) along the spine's axis from where the frame cuts it to the
        middle of the frame's level (None without a level); picks each disc's key slice
        (:meth:`key_frames`).
    """

    series_instance_uid: str
    levels: tuple[str | None, ...]
    reason: str | None = None
    reference: LevelReference | None = field(default=None, repr=False)
    offsets_mm: tuple[float | None, ...] = ()

    @property
    def problems(self) -> tuple[str, ...]:
        """What the level reference reported about the bodies behind these levels (bodies named by
        their order against the model's own names, bodies split, gaps): () when no frame has a
        level (then :attr:`reason` says why) or nothing was seen."""
        if self.reference is None or self.reason is not None:
            return ()
        return tuple(self.reference.problems)

    def key_frames(self, excluded: Collection[int] = ()) -> dict[str, int]:
        """Each disc level's key slice, the frame nearest the middle of the disc that quality
        control kept (:func:`disc_key_frames`): disc level name to frame index."""
        offsets = self.offsets_mm or tuple(None for _ in self.levels)
        return disc_key_frames(self.levels, offsets, excluded)

    def as_dict(self) -> dict:
        """A JSON-compatible summary (job record, study record): the reference series, the
        frames per level in head-to-foot order of first appearance, the reason for none, and the
        reference's :attr:`problems`."""
        counts: dict[str, int] = {}
        for level in self.levels:
            key = level or "none"
            counts[key] = counts.get(key, 0) + 1
        return {"reference": None if self.reference is None else self.reference.series_instance_uid,
                "reason": self.reason, "frames": counts, "problems": list(self.problems)}


def assign_levels(reference: LevelReference | None, series: SeriesImage, reason: str | None = None) -> SeriesLevels:
    """The level of every frame of ``series`` from a sagittal reference.

    No frame gets a level (and ``reason`` says why) when there is no reference, when it found no
    body, or when the two series do not share a FrameOfReferenceUID: positions of different
    frames of reference cannot be compared (the patient may have moved between them).
    """
    none = tuple(None for _ in series.geometry)
    if reference is None:
        return SeriesLevels(series.series_instance_uid, none, reason or "no sagittal reference series")
    if not series.frame_of_reference_uid or series.frame_of_reference_uid != reference.frame_of_reference_uid:
        return SeriesLevels(series.series_instance_uid, none,
                            f"the sagittal series {reference.series_instance_uid} is in frame of reference "
                            f"{reference.frame_of_reference_uid or '(none)'} and this series in "
                            f"{series.frame_of_reference_uid or '(none)'}: positions cannot be compared",
                            reference)
    if not reference.bodies:
        return SeriesLevels(series.series_instance_uid, none,
                            "; ".join(reference.problems) or "no vertebral body found", reference)
    locate = axis_position(reference)
    found = [locate(g) for g in series.geometry]
    return SeriesLevels(series.series_instance_uid, tuple(level for level, _ in found), None, reference,
                        tuple(offset for _, offset in found))
