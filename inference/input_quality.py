"""Input quality control: what cannot be measured, found from the pixels before inference.

Headers say a great deal (:mod:`node.orchestration.rules` skips fat-suppressed series by their
ScanOptions, sequence names and descriptions), but headers lie: a STIR or water-only series
exported with a neutral description reaches the pipeline looking like a T2. These checks read the
images themselves, on the already-read series (:class:`inference.geometry.SeriesImage`), and are
pure functions of pixel arrays and pixel spacing:

- per slice: a slice with no body in it (blank, or a uniform image) or with no structure at all
  (noise only) is set aside (:attr:`SetAsideKind.BLANK`, :attr:`SetAsideKind.NOISE`);
- per series: in-plane pixel spacing coarser than :data:`MAX_PIXEL_SPACING_MM` is refused; an
  image whose subcutaneous fat is no brighter than the inside of the body is refused as fat
  suppressed (:func:`fat_suppression_problem`).

Thresholds were calibrated on the real MyoSegmenTUM volume the tests use (``TUM01``, water and fat
of a 3 T six-echo Dixon, 400 x 400 x 29, 1.02 x 1.02 mm pixels); the numbers are given with each
constant. One subject is little: the margins between the classes are wide, and the constants sit
in the middle of them, but they are not validated on a population.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from inference.geometry import SeriesImage
from inference.set_aside import SetAsideKind

__all__ = [
    "BAND_DEPTH_MM", "INTERIOR_DEPTH_MM", "MAX_PIXEL_SPACING_MM", "MIN_BAND_RATIO", "MIN_BODY_FRACTION",
    "MIN_NEIGHBOUR_CORRELATION", "SKIN_FRACTION",
    "SliceQuality", "body_mask", "body_masks", "fat_suppression_problem", "measure_series", "measure_slice",
    "resolution_problem", "set_aside_unusable", "slice_problem",
]

#: The coarsest in-plane pixel spacing (mm, either direction) that is measured. A judgement, not a
#: measurement: the smallest muscle measured (multifidus at the upper lumbar levels) is a few
#: square centimetres in cross-section, and beyond 2 mm the ring of boundary pixels, each partly
#: muscle, becomes a large share of its area. Lumbar axial T1/T2 and Dixon series are typically
#: reconstructed at 0.5-1.5 mm (TUM01: 1.02 mm), so the limit refuses localizers and scouts.
MAX_PIXEL_SPACING_MM = 2.0

#: The least fraction of a slice the body (:func:`body_mask`) must cover for the slice to count as holding anatomy. On TUM01 the body covers
#: 0.27-0.36 of every slice in every contrast (water, fat, in-phase, opposed-phase); a blank slice
#: covers 0, a slice with only a stray bright spot a few pixels.
MIN_BODY_FRACTION = 0.02

#: The least correlation between horizontally and vertically neighbouring pixels (the mean of the
#: two, over the whole slice) for a slice to have structure. Anatomy with background is smooth on
#: the pixel scale: on TUM01 the correlation is 0.985-0.998 in every slice of every contrast. White
#: Gaussian or Rician noise gives 0.00, and complex noise zero-filled to twice the matrix (as
#: scanners interpolate) 0.38.
MIN_NEIGHBOUR_CORRELATION = 0.8

#: The skin line: where the signal reaches this fraction of the median signal of the body
#: (measured from the background level). Lower values put the line in the blurred rim outside the
#: skin (on TUM01, the air/tissue threshold alone put it 5-8 mm outside).
SKIN_FRACTION = 0.15

#: The band of subcutaneous fat: body pixels between these depths (mm) from the skin line of the
#: body mask. Lumbar subcutaneous fat is 5-40 mm thick in adults; the first 4 mm are the skin and
#: the blurred edge (on TUM01 the in-phase signal there is a quarter of the fat's). A patient with
#: less than about 10 mm of subcutaneous fat brings muscle into the band, which lowers the ratio.
BAND_DEPTH_MM = (4.0, 16.0)

#: The interior: body pixels deeper than this (mm), i.e. muscle, organs and the spine.
INTERIOR_DEPTH_MM = 25.0

#: The least ratio of the band's median to the interior's median (the median over slices that
#: have a body) for an image to hold a fat signal. Measured on TUM01, median [min-max] over its 29
#: slices: in-phase (water + fat) 2.03 [1.61-2.28], opposed-phase 2.48 [1.97-2.76] and fat 5.9
#: [2.4-8.7], against water alone 0.25 [0.21-0.71]. Fat-suppressed images (STIR, SPIR, SPAIR)
#: leave subcutaneous fat darker than the inside, as the water image does; an image with fat
#: signal makes it brighter. 1.0 ("subcutaneous fat no brighter than the inside of the body") is
#: near the geometric middle of the closest slices of the two groups (0.71 and 1.61).
MIN_BAND_RATIO = 1.0


@dataclass(frozen=True)
class SliceQuality:
    """What the checks measured on one slice.

    Attributes
    ----------
    body_fraction : float
        Fraction of the slice covered by the body mask (0-1).
    neighbour_correlation : float
        Mean correlation of horizontally and vertically adjacent pixels (-1 to 1; 0 for a
        uniform slice).
    band_ratio : float or None
        Median of the subcutaneous band over median of the interior; None when the body is too
        small to have both (or the interior median is not positive).
    body_cut : bool
        The body runs off the slice on two opposite sides (left and right, or top and bottom):
        a field of view narrower than the body, where the slice's edges stand in for skin.
    """

    body_fraction: float
    neighbour_correlation: float
    band_ratio: float | None
    body_cut: bool = False


def _otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of a 1-D array of finite values (256 bins)."""
    histogram, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(histogram).astype(np.float64)
    total = weight[-1]
    mass = np.cumsum(histogram * centres)
    below = weight[:-1]
    above = total - below
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_below = mass[:-1] / below
        mean_above = (mass[-1] - mass[:-1]) / above
        between = below * above * (mean_below - mean_above) ** 2
    between = np.nan_to_num(between, nan=-1.0)
    return float(edges[1:][int(np.argmax(between))])


def _body_threshold(smoothed: np.ndarray) -> float:
    """Between background and the darkest tissue: Otsu on the logarithm of the signal.

    Otsu on the signal itself splits bright from dark tissue (fat from muscle) rather than body
    from air; on the logarithm, the background noise (orders of magnitude below any tissue) is
    its own class.
    """
    low = float(smoothed.min())
    air = low + float(np.expm1(_otsu_threshold(np.log1p(smoothed.reshape(-1) - low))))
    tissue = smoothed[smoothed > air]
    if tissue.size == 0:
        return air
    # The blurred rim around the body (ringing, partial volume) is above the air but far below
    # any tissue: a fraction of the typical tissue signal puts the skin line where the body is.
    return max(air, low + SKIN_FRACTION * (float(np.median(tissue)) - low))


def body_mask(pixels: np.ndarray) -> np.ndarray:
    """The body on one slice: the largest component above the skin line, holes filled.

    The threshold is the higher of Otsu's on the log signal (air against tissue) and
    :data:`SKIN_FRACTION` of the body's median signal; the image is smoothed over 3 x 3 pixels
    first and the component closed (2 iterations) before its holes are filled.

    Parameters
    ----------
    pixels : numpy.ndarray
        ``(rows, columns)`` greyscale values (any unit; rescale applied).

    Returns
    -------
    numpy.ndarray
        bool, same shape; all False for a uniform slice.
    """
    values = np.asarray(pixels, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0 or float(finite.max()) <= float(finite.min()):
        return np.zeros(values.shape, dtype=bool)
    # A light smoothing (3 x 3) keeps the fat-free dark gaps of a water image inside the body.
    smoothed = ndi.uniform_filter(np.nan_to_num(values, nan=float(finite.min())), size=3)
    above = smoothed > _body_threshold(smoothed)
    labels, count = ndi.label(above)
    if count == 0:
        return np.zeros(values.shape, dtype=bool)
    sizes = np.bincount(labels.reshape(-1))[1:]
    largest = labels == (int(np.argmax(sizes)) + 1)
    # Closed and filled on the component's bounding box with a background margin wider than the
    # closing reaches (_CLOSING + 1 pixels): outside it every pixel stays background, so the
    # result is the same as on the whole slice, on a third to a half of the pixels.
    rows, columns = np.nonzero(largest.any(axis=1))[0], np.nonzero(largest.any(axis=0))[0]
    margin = _CLOSING + 1
    box = (slice(max(0, int(rows[0]) - margin), int(rows[-1]) + margin + 1),
           slice(max(0, int(columns[0]) - margin), int(columns[-1]) + margin + 1))
    body = np.zeros(values.shape, dtype=bool)
    body[box] = _fill_holes(ndi.binary_closing(largest[box], iterations=_CLOSING))
    return body


#: Iterations of the body mask's closing (3 x 3 cross): gaps up to about 4 pixels are bridged.
_CLOSING = 2


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask)``, the same pixels, found faster.

    A hole is a 4-connected background component that does not touch the edge of the array;
    labelling the background once finds them all, where ``binary_fill_holes`` dilates from the
    edge until nothing changes (one pass over the array per pixel of the longest path).

    Parameters
    ----------
    mask : numpy.ndarray
        bool ``(rows, columns)``.

    Returns
    -------
    numpy.ndarray
        bool, same shape: ``mask`` with its holes set.
    """
    background, _ = ndi.label(~mask)  # 4-connected, as binary_fill_holes' default structure
    outside = np.zeros(int(background.max()) + 1, dtype=bool)
    for edge in (background[0], background[-1], background[:, 0], background[:, -1]):
        outside[edge] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[background]


def _neighbour_correlation(values: np.ndarray) -> float:
    def corr(a: np.ndarray, b: np.ndarray) -> float:
        a = a - a.mean()
        b = b - b.mean()
        denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
        return float((a * b).sum()) / denominator if denominator > 0 else 0.0

    return (corr(values[:, :-1], values[:, 1:]) + corr(values[:-1, :], values[1:, :])) / 2


def _depth_mm(body: np.ndarray, pixel_spacing: Sequence[float]) -> np.ndarray:
    """Depth below the skin line: each body pixel's distance (mm) to the nearest pixel outside the
    body, the slice's edge counting as outside; 0 outside the body.

    Parameters
    ----------
    body : numpy.ndarray
        bool ``(rows, columns)``, not all False.
    pixel_spacing : sequence of 2 float
        ``(between rows, between columns)`` in mm.

    Returns
    -------
    numpy.ndarray
        float64, same shape.
    """
    # The distance transform runs on the body's bounding box with a ring of one background
    # pixel: the nearest outside pixel of a body pixel is never beyond that ring (moving it onto
    # the ring brings it no further in either direction), so the depths are those of the whole
    # slice, on the box's pixels only.
    rows, columns = np.nonzero(body.any(axis=1))[0], np.nonzero(body.any(axis=0))[0]
    box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(columns[0]), int(columns[-1]) + 1))
    depth = np.zeros(body.shape, dtype=np.float64)
    depth[box] = ndi.distance_transform_edt(np.pad(body[box], 1),
                                            sampling=tuple(float(s) for s in pixel_spacing))[1:-1, 1:-1]
    return depth


def measure_slice(pixels: np.ndarray, pixel_spacing: Sequence[float], body: np.ndarray | None = None,
                  band_ratio: bool = True) -> SliceQuality:
    """Body fraction, neighbour correlation and subcutaneous band ratio of one slice.

    Parameters
    ----------
    pixels : numpy.ndarray
        ``(rows, columns)`` greyscale values.
    pixel_spacing : sequence of 2 float
        ``(between rows, between columns)`` in mm, as PixelSpacing.
    body : numpy.ndarray, optional
        ``body_mask(pixels)`` when already found (bool, same shape): not found again.
    band_ratio : bool
        False: the band ratio is not measured (None), for an image whose fat signal is not
        checked (:func:`fat_suppression_problem`); its distance transform is most of a slice's
        measuring once the body is found.
    """
    values = np.nan_to_num(np.asarray(pixels, dtype=np.float64))
    # The slice is measured with NaN as 0: the mask of the pixels as they are is that same mask
    # only when every pixel is finite (always, for pixels read from integer Pixel Data).
    if body is None or not np.isfinite(pixels).all():
        body = body_mask(values)
    fraction = float(body.mean()) if body.size else 0.0
    correlation = _neighbour_correlation(values) if min(values.shape) > 1 else 0.0
    return SliceQuality(fraction, correlation, _band_ratio(values, body, pixel_spacing) if band_ratio else None,
                        _runs_off(body))


def _runs_off(body: np.ndarray) -> bool:
    """:attr:`SliceQuality.body_cut` of a body mask: it reaches two opposite edges of the slice.

    :func:`body_mask` closes the body as if the slice were surrounded by air, which takes up to
    :data:`_CLOSING` pixels off a body cut by the slice's edge: reaching within
    ``_CLOSING + 1`` pixels of an edge counts as reaching it.
    """
    reach = _CLOSING + 1
    if min(body.shape) <= 2 * reach:
        return False
    return bool((body[:, :reach].any() and body[:, -reach:].any()) or (body[:reach].any() and body[-reach:].any()))


def _band_ratio(values: np.ndarray, body: np.ndarray, pixel_spacing: Sequence[float]) -> float | None:
    """:attr:`SliceQuality.band_ratio` of one slice: ``values`` (float64) and ``body`` (bool) are
    ``(rows, columns)``, ``pixel_spacing`` in mm."""
    if not body.any():
        return None
    depth = _depth_mm(body, pixel_spacing)
    band = values[body & (depth >= BAND_DEPTH_MM[0]) & (depth <= BAND_DEPTH_MM[1])]
    interior = values[body & (depth > INTERIOR_DEPTH_MM)]
    if band.size < 50 or interior.size < 50:
        return None
    inside = float(np.median(interior))
    return float(np.median(band)) / inside if inside > 0 else None


def slice_problem(quality: SliceQuality) -> tuple[SetAsideKind, str] | None:
    """Why a slice cannot be measured, or None: the kind (blank or noise) and the detail in words."""
    if quality.neighbour_correlation < MIN_NEIGHBOUR_CORRELATION:
        if quality.neighbour_correlation == 0.0 and quality.body_fraction == 0.0:
            return SetAsideKind.BLANK, "a uniform image"
        return SetAsideKind.NOISE, (f"neighbouring pixels correlate {quality.neighbour_correlation:.2f}, below the "
                         f"{MIN_NEIGHBOUR_CORRELATION:g} of anatomy")
    if quality.body_fraction < MIN_BODY_FRACTION:
        return SetAsideKind.BLANK, (f"the body covers {100 * quality.body_fraction:.1f} % of the image, below "
                         f"{100 * MIN_BODY_FRACTION:g} %")
    return None


def resolution_problem(pixel_spacings: Sequence[Sequence[float]]) -> str | None:
    """The reason a series' in-plane resolution is too coarse, or None.

    Parameters
    ----------
    pixel_spacings : sequence of (float, float)
        PixelSpacing (mm) of every frame.
    """
    coarsest = max((max(float(s) for s in spacing) for spacing in pixel_spacings), default=0.0)
    if coarsest > MAX_PIXEL_SPACING_MM:
        return (f"in-plane pixel spacing {coarsest:g} mm is coarser than the {MAX_PIXEL_SPACING_MM:g} mm "
                "at which muscle boundaries can be measured")
    return None


def fat_suppression_problem(qualities: Sequence[SliceQuality]) -> str | None:
    """The reason a series looks fat suppressed from its pixels, or None.

    The median over slices of :attr:`SliceQuality.band_ratio` (slices without one are left out)
    must reach :data:`MIN_BAND_RATIO`. Nothing is decided when no slice has a ratio (the slice
    checks refuse such a series).

    Slices whose body runs off the image on two opposite sides (:attr:`SliceQuality.body_cut`)
    have no subcutaneous band at their cut edges, only muscle and organs the ratio was not made
    for: they are left out, and when they are most of the slices the fat signal cannot be
    checked, which refuses the series too, saying so.
    """
    measured = [q for q in qualities if q.band_ratio is not None]
    if not measured:
        return None
    ratios = [q.band_ratio for q in measured if not q.body_cut]
    if 2 * len(ratios) < len(measured):
        return (f"the fat signal cannot be checked: the body runs off the image on two opposite sides in "
                f"{len(measured) - len(ratios)} of {len(measured)} slices (a field of view narrower than the body), so "
                "the subcutaneous fat that tells an image with fat signal from a fat-suppressed one cannot be "
                "measured; a series whose field of view holds the whole body, or a Dixon series, can be measured")
    ratio = float(np.median(ratios))
    if ratio < MIN_BAND_RATIO:
        return (f"the image looks fat suppressed: subcutaneous fat is {ratio:.2f} times as bright as the inside of "
                f"the body (median of {len(ratios)} slices), where an image with fat signal has it brighter "
                f"(ratio at least {MIN_BAND_RATIO:g}); there is no fat signal to measure")
    return None


def body_masks(series: SeriesImage) -> list[np.ndarray]:
    """:func:`body_mask` of every frame of a series, in frame order: found once for the input
    checks (:func:`set_aside_unusable`) and the segmentation's
    (:func:`inference.segmentation_quality.check_segmentation`), which both need it."""
    return [body_mask(pixels) for pixels in series.frames]


def measure_series(series: SeriesImage, bodies: Sequence[np.ndarray] | None = None,
                   band_ratio: bool = True) -> list[SliceQuality]:
    """:func:`measure_slice` of every frame of a series, in frame order; ``bodies`` are the frames'
    :func:`body_masks` when already found, ``band_ratio`` as for :func:`measure_slice`."""
    bodies = bodies if bodies is not None else [None] * len(series.frames)
    return [measure_slice(pixels, geometry.pixel_spacing, body, band_ratio)
            for pixels, geometry, body in zip(series.frames, series.geometry, bodies)]


def set_aside_unusable(series: SeriesImage, bodies: Sequence[np.ndarray] | None = None,
                       band_ratio: bool = True) -> tuple[SeriesImage, list[SliceQuality]]:
    """Set aside the blank and noise-only frames of a series (:func:`slice_problem`).

    ``bodies`` are the frames' :func:`body_masks` when already found; ``band_ratio`` False leaves
    the band ratio unmeasured (:func:`measure_slice`), where the fat signal is not checked.

    Returns
    -------
    SeriesImage
        The series less those frames (``series`` itself when every frame holds anatomy), each
        set aside with its kind and detail.
    list of SliceQuality
        What :func:`measure_slice` measured on each frame kept, in the series' order, so that
        the series-level checks need not measure them again.

    Raises
    ------
    inference.geometry.GeometryError
        When every frame is blank or noise.
    """
    drop = {}
    kept: list[SliceQuality] = []
    for index, quality in enumerate(measure_series(series, bodies, band_ratio)):
        problem = slice_problem(quality)
        if problem is None:
            kept.append(quality)
        else:
            drop[index] = series.set_aside_record(index, problem[0], problem[1])
    return series.without(drop), kept
