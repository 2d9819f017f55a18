"""Slice-wise segmentation with ONNX Runtime, as a model card prescribes.

One 2D frame at a time, in its own plane:

1. resample the frame in-plane onto the card's canonical grid (``array_axes``, ``spacing_mm``),
   bilinear, the grid built from the frame's patient geometry;
2. normalise as the card says; crop to the foreground if it says so; pad to the window;
3. sliding windows with the card's overlap, run in batches, blended with a Gaussian (or
   constant) weight map;
4. class scores to probabilities, back onto the frame's own pixel grid (bilinear), argmax;
5. class index to the card's label value; largest connected component per label if asked;
6. left/right checked against patient coordinates (see :func:`check_laterality`).

Volume scope
------------
Models run by MONAI over a 3D volume (MuscleMap's ``mm_segment``: Orientation, Spacing,
NormalizeIntensity, CropForeground, then SliceInferer) see slices that were prepared together.
A card whose ``normalisation`` says ``"scope": "volume"`` gets the same, per stack of parallel
frames (at most ``"max_slices"`` consecutive frames at a time, as MuscleMap processes a long
volume in chunks):

* each frame's canonical grid starts at the frame's first pixel centre along the card's axes and
  has ``round(extent / spacing) + 1`` points, as MONAI's ``Spacing`` places it (slice scope
  centres the grid on the frame instead);
* the normalisation statistics are taken over all frames of the chunk;
* the foreground box (``crop_foreground``) is taken over the chunk in 3D, frames more than
  :data:`CROP_MARGIN` frames from any foreground are background;
* windows are blended with MONAI's importance map (a floor of :data:`MONAI_WEIGHT_FLOOR`), and
  the class scores themselves (zero outside the crop, as MONAI's inverse crop pads them) are
  resampled onto the frame before the argmax, as MONAI's ``Invertd`` does.

``crop_foreground`` is MONAI's ``CropForeground(margin=20, allow_smaller=True)`` as MuscleMap
uses it: the bounding box of pixels that are positive after normalisation, widened by
:data:`CROP_MARGIN` canonical pixels and clipped to the grid.

CPU time (:class:`Tuning`)
--------------------------
How the runtime spends CPU, never what the model is asked: every window the model sees is the
same normalised image, so the labels stay what the card's recipe gives, up to where the windows
fall (measured by ``bench/study_cpu.py``: Dice against the untuned runtime and against manual
labels on the real study).

* **Body crop** (slice scope, for cards that do not crop themselves): the sliding windows cover
  only the body's bounding box (:func:`body_box`), not the air around it. A lumbar axial field of
  view is square and the body about half as deep as it is wide, so about 10 windows of 160 x 160
  at overlap 0.5 replace 25 on a 400 mm field. Outside the box the probability of background
  is 1, as for the blank slices the runtime already skips. The probabilities go back onto the
  frame only over the box's footprint (:meth:`~inference.geometry.FrameGeometry.crop`), with the
  rest of the frame background.
* **No spinning**: ONNX Runtime's intra-op threads by default spin while waiting for work, which
  burns a core's time for nothing when the machine has other work (other workers, the node):
  measured here with 2 threads on a busy 2-core machine, 20.7 against 11.9 CPU ms per window,
  and slower in wall time as well (57.7 against 36.5 ms).
* **PRelu as LeakyRelu** (:mod:`inference.operator_rewrite`): MONAI's UNet activates every block
  with a one-slope PRelu, which ONNX Runtime's CPU kernel computes element by element with
  broadcasting; LeakyRelu with the same slope is the same function on the same float32 numbers,
  in a vectorised kernel. The class scores stay identical bit for bit; the bundled Dixon model
  went from 7.9 to 5.6 ms per 160 x 160 window on one thread (PRelu had been 30 % of the time).
* **One window per call on the CPU**: with the faster activations, one window a call was 4.6 ms
  against 5.2 with four (the activations of one window stay in cache); a window's scores do not
  depend on the others in its batch (checked equal). CUDA keeps four.
* **Only where a muscle can win** (:meth:`Segmenter._box_to_frame`): the probabilities go back
  onto the frame only over the bounding box of the canonical pixels whose background
  probability is under 0.51, and the argmax and connected components run inside that region;
  elsewhere the argmax is background whatever the interpolation (a bilinear mix of pixels all
  at least 0.51 background). The labels and the uncertainty are those of resampling everything
  (on the real study: every label equal, uncertainty within 3e-16).
* Measured and left as they were: the graph optimisation level (``ORT_ENABLE_ALL``, set
  explicitly, is ONNX Runtime's default; ``BASIC`` and ``EXTENDED`` were 10-40 % slower), the
  transposed convolutions as sub-pixel convolutions (a 2 x 2 convolution into four phases and
  DepthToSpace: not exact, and 8 % slower), flushing denormals to zero (no faster), dynamic int8
  quantisation (no faster: ONNX Runtime's ConvInteger is no quicker than its float convolution
  here), and static int8 quantisation (QDQ; ``bench/study_cpu.py --quantised``): it kept Dice
  against the manual labels within 0.004, but only when calibrated on the very study it was
  tested on, and was 11 % faster per window than the float model with LeakyRelu. A quantised
  model needs calibration data from its own training set, so it belongs to the model's recipe,
  not to the runtime, which must work for any model a card brings.

No torch here: the runtime needs only numpy, scipy, onnxruntime and onnx (to rewrite the graph).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnxruntime as ort
from scipy import ndimage

from .card import CardError, LabelInfo, ModelCard
from .geometry import FrameGeometry, LabelMap, LateralityFinding, SeriesImage, pair_frames
from .operator_rewrite import prelu_as_leaky_relu
from .resample import canonical_grid, resample
from .vocabulary import Side

__all__ = [
    "CPU",
    "mask_uncertainty",
    "CUDA",
    "InputError",
    "Segmenter",
    "available_cores",
    "choose_providers",
    "choose_contrast",
    "select_inputs",
    "normalise",
    "foreground_box",
    "body_box",
    "Tuning",
    "UNTUNED",
    "volume_grid",
    "window_starts",
    "gaussian_weights",
    "sliding_window",
    "keep_largest_components",
    "check_laterality",
]

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
#: A label centroid closer than this to the midline is on neither side (mm).
MIDLINE_MARGIN_MM = 2.0
#: Margin (canonical pixels, and frames in volume scope) around the foreground box: MuscleMap's
#: ``CropForegroundd(margin=20)``.
CROP_MARGIN = 20
#: Smallest blending weight of MONAI's Gaussian importance map (``compute_importance_map``).
MONAI_WEIGHT_FLOOR = 1e-3
#: A pixel belongs to the body when it is brighter than this fraction of its slice's 99th
#: percentile in any channel (:func:`body_box`): well above the noise of air in magnitude images,
#: well below subcutaneous fat in fat images and muscle in water images.
BODY_THRESHOLD = 0.05
#: Margin (canonical pixels, at 1 mm: mm) around the body box, so that the windows at the body's
#: edge still see some air, as they do without the crop.
BODY_MARGIN = 16


@dataclass(frozen=True)
class Tuning:
    """How the runtime spends CPU time (see the module notes); never what the model computes.

    Attributes
    ----------
    body_crop : bool
        Slide the windows over the body's bounding box only (:func:`body_box`).
    spinning : bool
        Let ONNX Runtime's idle intra-op threads spin (its default) instead of sleeping.
    leaky_relu : bool
        Run single-slope ``PRelu`` nodes as ``LeakyRelu``, which computes the same floats
        (:func:`inference.operator_rewrite.prelu_as_leaky_relu`).
    cpu_windows_per_call : int
        Windows per model call on the CPU provider when the model's batch dimension is dynamic
        and the caller does not set ``batch_size``; each window's scores do not depend on the
        others in its batch.
    """

    body_crop: bool = True
    spinning: bool = False
    leaky_relu: bool = True
    cpu_windows_per_call: int = 1


#: The runtime as it was before the tuning: windows over the whole grid, spinning threads, the
#: model's ``PRelu`` as exported, 4 windows a call. For benchmarks and for checking that the
#: tuning leaves the labels as they were.
UNTUNED = Tuning(body_crop=False, spinning=True, leaky_relu=False, cpu_windows_per_call=4)


class InputError(ValueError):
    """The images given cannot be what the model expects."""


# ---------------------------------------------------------------------------------------------
# Execution providers and sessions
# ---------------------------------------------------------------------------------------------


def choose_providers(available: Sequence[str], preference: str | Sequence[str] | None = None) -> list[str]:
    """Execution providers to ask ONNX Runtime for, best first.

    Parameters
    ----------
    available : sequence of str
        What ``onnxruntime.get_available_providers()`` says.
    preference : None, "auto", "cpu", "cuda" or sequence of str
        ``None``/``"auto"``: CUDA when available, then CPU. ``"cpu"``: CPU only. ``"cuda"``: CUDA
        then CPU, and an error when CUDA is not available (a GPU was required). A sequence:
        those provider names in that order, skipping the ones not available.

    Returns
    -------
    list of str
        Always ending with the CPU provider, which every ONNX Runtime build has.

    Raises
    ------
    ValueError
        When ``"cuda"`` is asked for but not available, or the preference is not understood.
    """
    available = list(available)
    if preference is None or preference == "auto":
        wanted = [CUDA]
    elif preference == "cpu":
        wanted = []
    elif preference == "cuda":
        if CUDA not in available:
            raise ValueError("CUDA execution was required but this onnxruntime offers only "
                             + ", ".join(available) + " (install onnxruntime-gpu and a CUDA runtime)")
        wanted = [CUDA]
    elif isinstance(preference, str):
        raise ValueError(f"provider preference {preference!r} is not auto, cpu, cuda or a list of providers")
    else:
        wanted = list(preference)
    chosen = [p for p in wanted if p in available and p != CPU]
    return list(dict.fromkeys(chosen)) + [CPU]


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and container cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _open_session(card: ModelCard, providers: list[str], threads: int, verify: bool,
                  tuning: Tuning = Tuning()) -> ort.InferenceSession:
    if card.path is None:
        raise CardError(f"model card {card.name} was not loaded from a file: no model to open")
    model = card.onnx_path.read_bytes()
    # One read both checks and loads, so the bytes that run are the bytes that were checked.
    if verify:
        if hashlib.sha256(model).hexdigest() != card.sha256:
            raise CardError(f"model {card.name}: {card.onnx_path.name} does not match its card's sha256")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if tuning.spinning else "0")
    options.log_severity_level = 3  # errors only: provider fallbacks are reported by Segmenter
    if tuning.leaky_relu:
        model = prelu_as_leaky_relu(model).model
    return ort.InferenceSession(model, sess_options=options, providers=providers)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def choose_contrast(card: ModelCard, available: Iterable[str]) -> str:
    """The first contrast in the card's order that is among the available components.

    Parameters
    ----------
    card : ModelCard
    available : iterable of str
        Roles of one acquisition's components, e.g. ``{"water", "fat", "in_phase"}``.

    Raises
    ------
    InputError
        When none is accepted.
    """
    available = set(available)
    for contrast in card.contrasts:
        if contrast in available:
            return contrast
    raise InputError(f"model {card.name} accepts {', '.join(card.contrasts)};"
                     f" the acquisition has {', '.join(sorted(available)) or 'nothing'}")


def select_inputs(card: ModelCard, components: Mapping[str, SeriesImage]) -> list[SeriesImage]:
    """The series to feed, one per input channel, from one acquisition's components.

    A one-channel card takes the first of its contrasts that is present (:func:`choose_contrast`);
    a card with several channels takes its contrasts in order, one per channel, and all must be
    present.
    """
    if card.channels == 1:
        return [components[choose_contrast(card, components)]]
    if len(card.contrasts) != card.channels:
        raise CardError(f"model {card.name}: {card.channels} channels but {len(card.contrasts)} contrasts")
    missing = [c for c in card.contrasts if c not in components]
    if missing:
        raise InputError(f"model {card.name} needs {', '.join(card.contrasts)}; missing {', '.join(missing)}")
    return [components[c] for c in card.contrasts]


# ---------------------------------------------------------------------------------------------
# Numbers: normalisation, windows, blending
# ---------------------------------------------------------------------------------------------


def normalise(image: np.ndarray, normalisation: Mapping[str, object]) -> np.ndarray:
    """Intensity normalisation of a ``(channels, rows, columns)`` slice, per channel.

    A ``(channels, slices, rows, columns)`` volume is normalised per channel over all its slices.

    ``zscore_nonzero`` leaves zero pixels at zero (they are outside the field of view or the
    body) and standardises the rest, as MONAI's NormalizeIntensity(nonzero=True) does;
    ``zscore`` uses every pixel; ``percentile`` maps the ``low`` and ``high`` percentiles to 0
    and 1 and clips. A flat channel is only shifted, never divided by zero.
    """
    method = normalisation.get("method")
    out = np.empty(image.shape, dtype=np.float32)
    for c, channel in enumerate(image.astype(np.float64)):
        if method == "zscore_nonzero":
            mask = channel != 0
            if not mask.any():
                out[c] = channel
                continue
            values = channel[mask]
            std = values.std() or 1.0
            out[c] = np.where(mask, (channel - values.mean()) / std, 0.0)
        elif method == "zscore":
            out[c] = (channel - channel.mean()) / (channel.std() or 1.0)
        elif method == "percentile":
            low, high = np.percentile(channel, [float(normalisation.get("low", 0.5)),
                                                float(normalisation.get("high", 99.5))])
            out[c] = np.clip((channel - low) / (high - low), 0, 1) if high > low else 0.0
        else:
            raise CardError(f"unknown normalisation {method!r}")
    return out


def foreground_box(image: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Bounding box of pixels positive in any channel, widened by ``margin``, clipped to the image.

    This is MONAI's ``CropForeground(select_fn=is_positive, margin=margin, allow_smaller=True)``
    (``allow_smaller=True`` was MONAI's default before 1.5, when MuscleMap pinned 1.3): after a
    z-score normalisation the box is that of the pixels brighter than the mean.

    Parameters
    ----------
    image : numpy.ndarray
        ``(channels, *spatial)``: a slice ``(channels, rows, columns)`` or a volume
        ``(channels, slices, rows, columns)``.
    margin : int
        Pixels added on every side along every spatial axis.

    Returns
    -------
    tuple of slice or None
        One slice per spatial axis; None when no pixel is positive.
    """
    mask = np.any(image > 0, axis=0)
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, int(hits[0]) - margin), min(mask.shape[axis], int(hits[-1]) + 1 + margin)))
    return tuple(box)


def _eroded_3x3(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_erosion(mask, np.ones((3, 3)))`` (outside the image is background),
    as two passes of three shifted rows and columns."""
    rows = np.zeros_like(mask)
    rows[1:-1] = mask[:-2] & mask[1:-1] & mask[2:]
    out = np.zeros_like(mask)
    out[:, 1:-1] = rows[:, :-2] & rows[:, 1:-1] & rows[:, 2:]
    return out


def body_box(image: np.ndarray, window: Sequence[int], margin: int = BODY_MARGIN,
             threshold: float = BODY_THRESHOLD) -> tuple[slice, slice] | None:
    """The part of a slice the sliding windows must cover: the body's bounding box.

    Body pixels are those brighter than ``threshold`` times their channel's 99th percentile in
    any channel, after a 3 x 3 binary opening that drops isolated noise pixels. Everything bright
    counts (arms beside the trunk, a coil marker): the box can only be too large, which costs
    windows, never labels.

    Parameters
    ----------
    image : numpy.ndarray
        ``(channels, rows, columns)`` on the model's canonical grid, before normalisation
        (magnitude images: air near zero).
    window : sequence of two int
        The model's window; the box is widened to at least this size where the image allows,
        so that no window is padded with zeros that the uncropped image would not have.
    margin : int
        Pixels added around the body on every side.
    threshold : float
        Fraction of the 99th percentile (:data:`BODY_THRESHOLD`).

    Returns
    -------
    tuple of two slice or None
        Rows and columns of the box, clipped to the image; None when nothing is bright.
    """
    mask = np.zeros(image.shape[1:], dtype=bool)
    for channel in np.asarray(image, dtype=np.float32):
        level = float(np.percentile(channel, 99.0))
        if level > 0:
            mask |= channel > threshold * level
    # Only the opening's bounding box is needed, and dilating by 3 x 3 widens a bounding box by
    # one pixel on every side (within the image): so the erosion, and one pixel more.
    mask = _eroded_3x3(mask)
    if not mask.any():
        return None
    box = []
    for axis, want in zip((0, 1), window):
        hits = np.flatnonzero(mask.any(axis=1 - axis))
        size = mask.shape[axis]
        low, high = max(0, int(hits[0]) - 1 - margin), min(size, int(hits[-1]) + 2 + margin)
        short = int(want) - (high - low)
        if short > 0:  # grow to a window, centred, within the image
            low = max(0, low - short // 2)
            high = min(size, low + int(want))
            low = max(0, high - int(want))
        box.append(slice(low, high))
    return box[0], box[1]


def volume_grid(frame: FrameGeometry, array_axes: Sequence[str], spacing_mm: Sequence[float]) -> FrameGeometry:
    """The model's input grid in one frame's plane, placed as MONAI's ``Spacing`` places it.

    The axes are those of :func:`~inference.resample.canonical_grid`. MONAI resamples a volume
    onto a grid that starts at the first voxel centre (after ``Orientation``, the corner that
    comes first along both axes) and has ``round(extent / spacing) + 1`` points along each
    axis, where the extent is the distance between the outer voxel centres
    (``compute_shape_offset`` with ``scale_extent=False``). For a frame whose axes are those of
    the card this is exactly MONAI's grid; for a frame rotated in-plane it is the grid over
    the bounding box of the frame's outer pixel centres.
    """
    grid = canonical_grid(frame, array_axes, spacing_mm)
    axis_row, axis_col = np.asarray(grid.column_cosine), np.asarray(grid.row_cosine)
    centres = frame.pixel_to_lps(np.array([0.0, 0.0, frame.rows - 1.0, frame.rows - 1.0]),
                                 np.array([0.0, frame.columns - 1.0, 0.0, frame.columns - 1.0]))
    along_row, along_col = centres @ axis_row, centres @ axis_col
    spacing = (float(spacing_mm[0]), float(spacing_mm[1]))
    rows = max(1, int(np.round(np.ptp(along_row) / spacing[0] + 1.0)))
    columns = max(1, int(np.round(np.ptp(along_col) / spacing[1] + 1.0)))
    centre = frame.centre
    origin = (centre + (along_row.min() - centre @ axis_row) * axis_row
              + (along_col.min() - centre @ axis_col) * axis_col)
    return FrameGeometry(position=tuple(origin), row_cosine=tuple(axis_col), column_cosine=tuple(axis_row),
                         pixel_spacing=spacing, rows=rows, columns=columns)


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets of sliding windows along one axis of length ``size`` (``size >= window``).

    Windows advance by ``window * (1 - overlap)`` (at least one pixel); the last one is pulled
    back to end exactly at the border, so every pixel is covered and no window sticks out.
    """
    if size < window:
        raise ValueError(f"axis of {size} is shorter than the window {window}: pad first")
    if size == window:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    count = -(-(size - window) // step) + 1
    return sorted({min(i * step, size - window) for i in range(count)})


def gaussian_weights(window: Sequence[int], sigma_scale: float, floor: float = 1e-6) -> np.ndarray:
    """Blending weights for a window: a Gaussian centred on it, sigma = ``sigma_scale`` x size.

    Predictions near a window's border see less context; weighting by distance from the centre
    lets the neighbouring window, which sees that spot centrally, dominate. Scaled to a peak of
    1 and floored at ``floor`` so that every covered pixel keeps a non-zero total weight
    (MONAI's importance map is floored at :data:`MONAI_WEIGHT_FLOOR`).
    """
    axes = []
    for size in window:
        sigma = max(float(sigma_scale) * size, 1e-6)
        x = np.arange(size, dtype=np.float64) - (size - 1) / 2
        axes.append(np.exp(-0.5 * (x / sigma) ** 2))
    weights = np.outer(axes[0], axes[1])
    return np.maximum(weights / weights.max(), floor).astype(np.float32)


def sliding_window(image: np.ndarray, predict: Callable[[np.ndarray], np.ndarray],
                   window: Sequence[int], overlap: float, weights: np.ndarray,
                   batch_size: int) -> np.ndarray:
    """Blend window predictions over a ``(channels, rows, columns)`` image at least a window big.

    Parameters
    ----------
    image : numpy.ndarray
        Input, each spatial size at least the window's.
    predict : callable
        ``(batch, channels, window_rows, window_columns)`` to ``(batch, classes, wr, wc)``.
    window : sequence of two int
    overlap : float
    weights : numpy.ndarray
        ``window``-shaped blending weights.
    batch_size : int
        Windows per call of ``predict`` (a short last batch is padded to this size when the
        model's batch dimension is fixed, see :class:`Segmenter`).

    Returns
    -------
    numpy.ndarray
        float32 ``(classes, rows, columns)``: the weighted mean of all windows covering a pixel.
    """
    wr, wc = int(window[0]), int(window[1])
    corners = [(r, c) for r in window_starts(image.shape[1], wr, overlap)
               for c in window_starts(image.shape[2], wc, overlap)]
    total: np.ndarray | None = None
    norm = np.zeros(image.shape[1:], dtype=np.float32)
    for first in range(0, len(corners), batch_size):
        chunk = corners[first:first + batch_size]
        batch = np.stack([image[:, r:r + wr, c:c + wc] for r, c in chunk]).astype(np.float32)
        scores = np.asarray(predict(batch), dtype=np.float32)
        if scores.ndim != 4 or scores.shape[0] < len(chunk) or scores.shape[2:] != (wr, wc):
            raise InputError(f"the model returned {scores.shape} for windows {batch.shape}")
        if total is None:
            total = np.zeros((scores.shape[1],) + image.shape[1:], dtype=np.float32)
            weighted = np.empty(scores.shape[1:], dtype=np.float32)
        for (r, c), window_scores in zip(chunk, scores):
            np.multiply(weights, window_scores, out=weighted)  # one buffer for every window
            total[:, r:r + wr, c:c + wc] += weighted
            norm[r:r + wr, c:c + wc] += weights
    assert total is not None
    return total / norm


def _pad_to(image: np.ndarray, window: Sequence[int]) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Zero-pad ``(channels, rows, columns)`` symmetrically to at least ``window``."""
    pads = []
    for size, want in zip(image.shape[1:], window):
        extra = max(0, int(want) - size)
        pads.append((extra // 2, extra - extra // 2))
    padded = np.pad(image, [(0, 0)] + pads)
    inner = tuple(slice(before, before + size) for (before, _), size in zip(pads, image.shape[1:]))
    return padded, inner  # type: ignore[return-value]


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=0, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=0, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Per label value, keep only its largest 8-connected component (ties: the first found)."""
    out = labels.copy()
    for value in np.unique(labels):
        if value == 0:
            continue
        components, count = ndimage.label(labels == value, structure=_EIGHT_CONNECTED)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())[1:]
        out[(components != 0) & (components != int(np.argmax(sizes)) + 1)] = 0
    return out


def check_laterality(labels: np.ndarray, frame: FrameGeometry, meaning: Mapping[int, LabelInfo],
                     frame_index: int = 0) -> tuple[np.ndarray, list[LateralityFinding]]:
    """Check every left/right label against patient coordinates on one frame.

    The midline is the mean patient x (LPS: +x is the patient's left) of all labelled pixels.
    A left label's centroid must lie more than :data:`MIDLINE_MARGIN_MM` to the patient's left
    of it, a right label's to the right; within the margin it counts as neither.

    Policy: when BOTH sides of a muscle are on the wrong side, the input was mirrored (or the
    model's card has its axes the wrong way round): the pair's values are exchanged and a
    ``"swapped"`` finding says so. When only one side is wrong (the other correct, absent or on
    the midline), nothing reliable can be said about which pixels belong to which side, so the
    labels stay as they are and a ``"kept"`` finding asks for review.

    Parameters
    ----------
    labels : numpy.ndarray
        uint8 ``(rows, columns)`` on ``frame``.
    frame : FrameGeometry
    meaning : mapping of int to LabelInfo
    frame_index : int
        Written into the findings.

    Returns
    -------
    labels : numpy.ndarray
        The labels, with swapped pairs exchanged (a new array when anything changed).
    findings : list of LateralityFinding
    """
    labelled = labels != 0
    if not labelled.any():
        return labels, []
    rows, columns = np.nonzero(labelled)
    x = frame.pixel_to_lps(rows, columns)[:, 0]
    midline = float(x.mean())
    values = labels[rows, columns]
    # Signed distance of each label's centroid from the midline towards the side it should be on.
    towards_own_side = {
        int(v): (float(x[values == v].mean()) - midline) * meaning[int(v)].side.lps_sign
        for v in np.unique(values) if int(v) in meaning}
    wrong = {v: d < -MIDLINE_MARGIN_MM for v, d in towards_own_side.items()}
    pairs: dict[str, dict[str, int]] = {}
    for value, info in meaning.items():
        pairs.setdefault(info.muscle, {})[info.side] = value
    findings = []
    out = labels
    for muscle, sides in sorted(pairs.items()):
        left, right = sides.get(Side.LEFT, -1), sides.get(Side.RIGHT, -1)
        wrong_left, wrong_right = wrong.get(left, False), wrong.get(right, False)
        if wrong_left and wrong_right:
            out = labels.copy() if out is labels else out
            out[labels == left] = right
            out[labels == right] = left
            findings.append(LateralityFinding(
                frame_index, muscle, "swapped",
                f"left and right centroids {-towards_own_side[left]:.1f} mm and {-towards_own_side[right]:.1f} mm "
                "across the midline from their sides: both on the wrong side, exchanged"))
        elif wrong_left or wrong_right:
            side, value = (Side.LEFT, left) if wrong_left else (Side.RIGHT, right)
            findings.append(LateralityFinding(
                frame_index, muscle, "kept",
                f"{side} centroid {-towards_own_side[value]:.1f} mm across the midline from its side "
                "while its partner is not: left as segmented"))
    return out, findings


# ---------------------------------------------------------------------------------------------
# The segmenter
# ---------------------------------------------------------------------------------------------


def _scope(card: ModelCard) -> tuple[str, int]:
    """``(scope, max_slices)`` from the card's normalisation (see the module notes)."""
    scope = card.normalisation.get("scope", "slice")
    if scope not in ("slice", "volume"):
        raise CardError(f"model {card.name}: normalisation.scope must be slice or volume, not {scope!r}")
    max_slices = card.normalisation.get("max_slices", 0) or 0
    if not isinstance(max_slices, int) or max_slices < 0:
        raise CardError(f"model {card.name}: normalisation.max_slices must be a positive integer")
    return scope, max_slices


#: Background pixels kept around a box before resampling it (see :meth:`Segmenter._box_to_frame`).
_RING = 2
#: A canonical pixel whose background probability is at least this cannot give a frame pixel
#: interpolated from it a muscle label (:meth:`Segmenter._box_to_frame`); the 0.01 above one half
#: is far beyond float32 rounding of the mix (about 1e-7) and of the softmax's sum (1e-6).
_CERTAIN_BACKGROUND = 0.51


@dataclass(frozen=True)
class _SliceResult:
    labels: np.ndarray
    findings: list[LateralityFinding]
    uncertainty: dict[int, float] = field(default_factory=dict)


def mask_uncertainty(probabilities: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Mean normalised entropy of the class probabilities inside each label's mask.

    The entropy of a pixel's class distribution divided by its maximum, log(classes): 0 where
    the model gave one class all the probability, 1 where it spread it evenly. Its mean inside a
    mask is the model's own doubt about that outline (used by
    :mod:`inference.segmentation_quality`; mean softmax entropy as in Mehrtash et al., IEEE TMI
    2020;39:3868-78).

    Parameters
    ----------
    probabilities : numpy.ndarray
        ``(classes, rows, columns)``, summing to 1 over the classes.
    labels : numpy.ndarray
        ``(rows, columns)`` label values on the same grid.

    Returns
    -------
    dict of int to float
        Label value (not 0) -> mean normalised entropy in [0, 1].
    """
    labelled = labels != 0
    if not labelled.any() or probabilities.shape[0] < 2:
        return {}
    inside = probabilities[:, labelled].astype(np.float64)
    entropy = -(inside * np.log(np.clip(inside, 1e-12, 1.0))).sum(axis=0) / np.log(probabilities.shape[0])
    values = labels[labelled]
    return {int(v): float(entropy[values == v].mean()) for v in np.unique(values)}


class Segmenter:
    """Runs one model card's ONNX model over series, slice by slice.

    Parameters
    ----------
    card : ModelCard
        Loaded from a file (its ONNX file lies beside it); the file is checked against the
        card's sha256 before the session opens.
    providers : None, "auto", "cpu", "cuda" or sequence of str
        See :func:`choose_providers`.
    threads : int, optional
        ONNX Runtime intra-op threads (default: every core this process may use).
    batch_size : int, optional
        Windows per model call when the model's batch dimension is dynamic (default: 4 on
        CUDA, the tuning's ``cpu_windows_per_call`` on the CPU).
    tuning : Tuning
        How CPU time is spent (default: body crop, no spinning); :data:`UNTUNED` is the runtime
        before the tuning.

    Raises
    ------
    CardError
        When the model does not match its card (checksum, channels, classes, window) or a label
        value does not fit in the uint8 label map.
    ValueError
        When ``providers`` is ``"cuda"`` and the session could not use the CUDA provider.
    """

    def __init__(self, card: ModelCard, providers: str | Sequence[str] | None = None,
                 threads: int | None = None, batch_size: int | None = None, tuning: Tuning = Tuning()) -> None:
        self.card = card
        self.tuning = tuning
        self.meaning = {v: card.labels[v] for v in card.output_labels if v in card.labels}
        # Class k -> label value; classes whose value the card does not describe become background.
        self._lookup = np.array([0] + [v if v in self.meaning else 0 for v in card.output_labels], dtype=np.uint8)
        self.threads = int(threads) if threads else available_cores()
        requested = choose_providers(ort.get_available_providers(), providers)
        self.session = _open_session(card, requested, self.threads, verify=True, tuning=tuning)
        if self.providers[0] != requested[0]:
            if providers == "cuda":
                # onnxruntime-gpu lists CUDA whenever it is installed; whether the session got it
                # shows only here (no driver, no GPU, a missing CUDA library).
                raise ValueError(f"model {card.name}: CUDA execution was required, but ONNX Runtime could not use"
                                 f" it and fell back to {self.providers[0]} (no GPU or driver, or a CUDA library"
                                 " missing: see ONNX Runtime's log)")
            log.warning("model %s: asked for %s, ONNX Runtime uses %s", card.name, requested[0], self.providers[0])
        model_input = self.session.get_inputs()[0]
        self._input_name = model_input.name
        self._output_name = self.session.get_outputs()[0].name
        shape = list(model_input.shape)
        if len(shape) != 4:
            raise CardError(f"model {card.name}: input has rank {len(shape)}, the card contract is 4")
        static = [d if isinstance(d, int) else None for d in shape]
        if static[1] is not None and static[1] != card.channels:
            raise CardError(f"model {card.name}: {static[1]} input channels, the card says {card.channels}")
        if any(static[axis] not in (None, size) for axis, size in zip((2, 3), card.window)):
            raise CardError(f"model {card.name}: fixed input size {shape[2:]} is not the window {card.window}")
        classes = self.session.get_outputs()[0].shape
        if len(classes) == 4 and isinstance(classes[1], int) and classes[1] != card.classes:
            raise CardError(f"model {card.name}: {classes[1]} output classes, the card says {card.classes}")
        # A model exported with a fixed batch size gets exactly that many windows per call.
        self._fixed_batch = static[0]
        if batch_size is None:
            batch_size = 4 if self.device == "cuda" else tuning.cpu_windows_per_call
        self.batch_size = static[0] or max(1, int(batch_size))
        self._scope, self._max_slices = _scope(card)
        floor = MONAI_WEIGHT_FLOOR if self._scope == "volume" else 1e-6
        self._weights = (gaussian_weights(card.window, card.sigma_scale, floor) if card.blend == "gaussian"
                         else np.ones(tuple(card.window), dtype=np.float32))

    @property
    def providers(self) -> list[str]:
        """Execution providers the session actually uses, best first."""
        return list(self.session.get_providers())

    @property
    def device(self) -> str:
        """``"cuda"`` when the session runs on the CUDA provider, else ``"cpu"``."""
        return "cuda" if self.providers[0] == CUDA else "cpu"

    def _predict(self, batch: np.ndarray) -> np.ndarray:
        count = batch.shape[0]
        if self._fixed_batch and count < self._fixed_batch:
            batch = np.concatenate([batch, np.zeros((self._fixed_batch - count,) + batch.shape[1:], batch.dtype)])
        scores = self.session.run([self._output_name], {self._input_name: batch})[0]
        if scores.shape[1] != self.card.classes:
            raise CardError(
                f"model {self.card.name}: {scores.shape[1]} output classes, the card says {self.card.classes}")
        return scores[:count]

    def _as_channels(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image, dtype=np.float32)
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3 or image.shape[0] != self.card.channels:
            raise InputError(
                f"model {self.card.name} takes {self.card.channels} channel(s), got an array {image.shape}")
        return image

    def _windows(self, normalised: np.ndarray, box: tuple[slice, slice]) -> np.ndarray:
        """Class scores ``(classes, rows, columns)`` over ``box`` of a normalised canonical image."""
        card = self.card
        padded, inner = _pad_to(normalised[(slice(None),) + box], card.window)
        scores = sliding_window(padded, self._predict, card.window, card.overlap, self._weights, self.batch_size)
        return scores[(slice(None),) + inner]

    def _finish(self, on_frame: np.ndarray, frame: FrameGeometry, frame_index: int,
                probabilities: bool = True, region: tuple[slice, slice] | None = None) -> _SliceResult:
        """Class scores (``probabilities`` False) or probabilities on the frame's grid to checked
        label values, with each label's :func:`mask_uncertainty`. Outside ``region`` (default:
        nowhere) every pixel is known to be background (:meth:`_box_to_frame`), so the argmax
        and the connected components are taken inside it only."""
        region = region or (slice(0, frame.rows), slice(0, frame.columns))
        labels = np.zeros(frame.shape, dtype=np.uint8)
        labels[region] = self._lookup[np.argmax(on_frame[(slice(None),) + region], axis=0)]
        if self.card.largest_component:
            # Components cannot reach past the region: everything beyond it is background.
            labels[region] = keep_largest_components(labels[region])
        labels, findings = check_laterality(labels, frame, self.meaning, frame_index)
        return _SliceResult(labels, findings,
                            mask_uncertainty(on_frame if probabilities else _softmax(on_frame), labels))

    def _segment(self, image: np.ndarray, frame: FrameGeometry, frame_index: int) -> _SliceResult:
        card = self.card
        image = self._as_channels(image)
        if image.shape[1:] != frame.shape:
            raise InputError(f"image {image.shape[1:]} does not match its frame {frame.shape}")
        if self._scope == "volume":
            return self._segment_volume([image], [frame], [frame_index])[0]
        if not image.any():  # nothing to see: spare the model a blank slice
            return _SliceResult(np.zeros(frame.shape, np.uint8), [])
        grid = canonical_grid(frame, card.array_axes, card.spacing_mm)
        canonical = resample(image, frame, grid)
        normalised = normalise(canonical, card.normalisation)
        if card.crop_foreground:
            box = foreground_box(normalised, CROP_MARGIN)
        elif self.tuning.body_crop:
            box = body_box(canonical, card.window)
        else:
            box = None
        box = box or (slice(0, grid.rows), slice(0, grid.columns))
        # Probabilities, so that what the model never saw (outside the crop) can be certain
        # background and interpolation mixes comparable numbers.
        background = [1.0] + [0.0] * (card.classes - 1)
        region = None  # the whole frame
        if not self.tuning.body_crop:
            probabilities = np.zeros((card.classes,) + grid.shape, dtype=np.float32)
            probabilities[0] = 1.0
            probabilities[(slice(None),) + box] = _softmax(self._windows(normalised, box))
            on_frame = resample(probabilities, grid, frame, fill=background)
        else:
            on_frame, region = self._box_to_frame(_softmax(self._windows(normalised, box)), grid, box, frame,
                                                  background)
        return self._finish(on_frame, frame, frame_index, region=region)

    @staticmethod
    def _box_to_frame(probabilities: np.ndarray, grid: FrameGeometry, box: tuple[slice, slice],
                      frame: FrameGeometry, background: Sequence[float]
                      ) -> tuple[np.ndarray, tuple[slice, slice]]:
        """Probabilities over ``box`` of the canonical grid, resampled onto the whole frame, and
        the frame region outside which every pixel is background.

        The same labels and the same probabilities at every labelled pixel as resampling the
        whole grid with background outside the box, for a fraction of the work:

        * only the part of the box where a muscle can win is resampled: the bounding box of
          the pixels whose background probability is under :data:`_CERTAIN_BACKGROUND`. A
          frame pixel's probabilities are a bilinear mix (weights >= 0, summing to 1) of at
          most four canonical pixels'; when all four give background at least 0.51, the frame
          pixel does too and its argmax is background. Frame pixels outside that part get the
          background vector itself, which only the argmax reads there (the uncertainty is
          taken inside labels only, :func:`mask_uncertainty`);
        * that part is taken with a ring of :data:`_RING` pixels (what bilinear interpolation
          and the half-pixel edge rule reach into), filled with the box's probabilities and
          background beyond the box, and only the frame pixels over the ring's footprint are
          resampled.
        """
        possible = probabilities[0] < _CERTAIN_BACKGROUND
        on_frame = np.empty((probabilities.shape[0],) + frame.shape, dtype=np.float32)
        on_frame[:] = np.asarray(background, dtype=np.float32)[:, None, None]
        if not possible.any():
            return on_frame, (slice(0, 0), slice(0, 0))
        rows, columns = np.flatnonzero(possible.any(axis=1)), np.flatnonzero(possible.any(axis=0))
        focus = (slice(box[0].start + int(rows[0]), box[0].start + int(rows[-1]) + 1),
                 slice(box[1].start + int(columns[0]), box[1].start + int(columns[-1]) + 1))
        ring = (slice(max(0, focus[0].start - _RING), min(grid.rows, focus[0].stop + _RING)),
                slice(max(0, focus[1].start - _RING), min(grid.columns, focus[1].stop + _RING)))
        padded = np.empty((probabilities.shape[0], ring[0].stop - ring[0].start, ring[1].stop - ring[1].start),
                          dtype=np.float32)
        padded[:] = np.asarray(background, dtype=np.float32)[:, None, None]
        # The ring may reach past the box (background there) but holds the box's own values inside it.
        inner = [slice(max(r.start, b.start), min(r.stop, b.stop)) for r, b in zip(ring, box)]
        padded[:, inner[0].start - ring[0].start:inner[0].stop - ring[0].start,
               inner[1].start - ring[1].start:inner[1].stop - ring[1].start] = probabilities[
            :, inner[0].start - box[0].start:inner[0].stop - box[0].start,
            inner[1].start - box[1].start:inner[1].stop - box[1].start]
        source = grid.crop(*ring)
        corners = source.pixel_to_lps(np.array([-0.5, -0.5, source.rows - 0.5, source.rows - 0.5]),
                                      np.array([-0.5, source.columns - 0.5, -0.5, source.columns - 0.5]))
        rc = frame.lps_to_pixel(corners)[:, :2]
        low = np.maximum(np.floor(rc.min(axis=0)).astype(int) - 1, 0)
        high = np.minimum(np.ceil(rc.max(axis=0)).astype(int) + 2, frame.shape)
        region = (slice(int(low[0]), int(max(low[0], high[0]))), slice(int(low[1]), int(max(low[1], high[1]))))
        if np.all(high > low):
            on_frame[(slice(None),) + region] = resample(padded, source, frame.crop(*region), fill=background)
        return on_frame, region

    def _segment_volume(self, images: Sequence[np.ndarray], frames: Sequence[FrameGeometry],
                        frame_indices: Sequence[int]) -> list[_SliceResult]:
        """Segment parallel frames of one stack together, as MONAI does a volume (see the module notes).

        ``images`` are ``(channels, rows, columns)``, in stack order; the frames must share
        their pixel grid (one stack of :attr:`SeriesImage.stacks`).
        """
        card = self.card
        grids = [volume_grid(frame, card.array_axes, card.spacing_mm) for frame in frames]
        if len({grid.shape for grid in grids}) != 1:
            raise InputError("frames of different sizes cannot be segmented as one volume")
        # (channels, slices, rows, columns)
        canonical = np.stack([resample(image, frame, grid) for image, frame, grid in zip(images, frames, grids)], axis=1)
        normalised = normalise(canonical, card.normalisation)
        full = (slice(0, len(frames)), slice(0, grids[0].rows), slice(0, grids[0].columns))
        box = (foreground_box(normalised, CROP_MARGIN) if card.crop_foreground else full) if canonical.any() else None
        results = []
        for k, (frame, grid, frame_index) in enumerate(zip(frames, grids, frame_indices)):
            if box is None or not box[0].start <= k < box[0].stop:  # MONAI crops such slices away
                results.append(_SliceResult(np.zeros(frame.shape, np.uint8), []))
                continue
            # Scores, zero outside the crop, resampled as they are: what MONAI's Invertd does.
            scores = np.zeros((card.classes,) + grid.shape, dtype=np.float32)
            scores[(slice(None),) + box[1:]] = self._windows(normalised[:, k], box[1:])
            results.append(self._finish(resample(scores, grid, frame), frame, frame_index, probabilities=False))
        return results

    def segment_slice(self, image: np.ndarray, frame: FrameGeometry) -> np.ndarray:
        """Segment one frame.

        Parameters
        ----------
        image : numpy.ndarray
            ``(rows, columns)``, or ``(channels, rows, columns)`` for a multi-channel card.
        frame : FrameGeometry
            Where the frame lies in the patient.

        Returns
        -------
        numpy.ndarray
            uint8 label values on the frame's own grid (laterality findings are logged).
        """
        result = self._segment(image, frame, 0)
        for finding in result.findings:
            log.warning("laterality: %s %s: %s", finding.muscle, finding.action, finding.detail)
        return result.labels

    def segment(self, series: SeriesImage | Sequence[SeriesImage]) -> LabelMap:
        """Segment every frame of a series.

        Parameters
        ----------
        series : SeriesImage or sequence of SeriesImage
            One series, or one per input channel in the card's contrast order (see
            :func:`select_inputs`); further channels are matched to the first by position.

        Returns
        -------
        LabelMap
            On the first series' frames, with the laterality findings.
        """
        channels = [series] if isinstance(series, SeriesImage) else list(series)
        if len(channels) != self.card.channels:
            raise InputError(f"model {self.card.name} takes {self.card.channels} series, got {len(channels)}")
        reference = channels[0]
        partners = [pair_frames(reference, other) for other in channels[1:]]

        def image(index: int) -> np.ndarray:
            return self._as_channels(np.stack([reference.frames[index]] + [
                other.frames[pairs[index]] for other, pairs in zip(channels[1:], partners)]))

        results: dict[int, _SliceResult] = {}
        if self._scope == "volume":  # each stack in chunks of consecutive frames, ascending along its normal
            for stack in reference.stacks:
                size = self._max_slices or len(stack)
                for first in range(0, len(stack), size):
                    chunk = stack[first:first + size]
                    results.update(zip(chunk, self._segment_volume(
                        [image(i) for i in chunk], [reference.geometry[i] for i in chunk], chunk)))
        else:
            for index, frame in enumerate(reference.geometry):
                results[index] = self._segment(image(index), frame, index)
        labels, findings, uncertainty = [], [], []
        for index in range(len(reference)):
            labels.append(results[index].labels)
            findings.extend(results[index].findings)
            uncertainty.append(results[index].uncertainty)
        if findings:
            swapped = sum(f.action == "swapped" for f in findings)
            # No UIDs: logs stay free of anything that links to a patient.
            log.warning("model %s: left/right swapped on %d and questioned on %d frame/muscle pairs of %d frames",
                        self.card.name, swapped, len(findings) - swapped, len(reference))
        set_aside = tuple(dict.fromkeys(item for channel in channels for item in channel.set_aside))
        return LabelMap(series=reference, labels=tuple(labels), meaning=dict(self.meaning),
                        model_name=self.card.name, model_version=self.card.version, findings=tuple(findings),
                        set_aside=set_aside, uncertainty=tuple(uncertainty))

    def segment_components(self, components: Mapping[str, SeriesImage]) -> LabelMap:
        """Segment one acquisition given as role -> series (``"water"``, ``"fat"``, ...)."""
        return self.segment(select_inputs(self.card, components))
