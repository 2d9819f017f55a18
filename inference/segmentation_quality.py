"""Quality control of a segmentation, slice by slice, before any number leaves the node.

Input quality control (:mod:`inference.input_quality`) refuses what cannot be measured before
inference. This module judges what the model made of what it was given: each frame of a
:class:`~inference.geometry.LabelMap` passes or is excluded with its reasons, and the series gets
a verdict (:class:`Verdict`): **pass**, **limited** (some frames excluded; the others are
measured) or **not measured** (too many frames failed: no muscle numbers at all).

The checks on each frame, all in patient coordinates (DICOM LPS: +x the patient's left, +y
posterior, +z head):

1. **Presence**: multifidus and erector spinae (the muscles every lumbar level has) on both sides,
   each at least :data:`MIN_MUSCLE_AREA_MM2`.
2. **Inside the body**: at least :data:`MIN_INSIDE_BODY` of each outline lies within the body
   (:func:`inference.input_quality.body_mask` of the frame's own image).
3. **Behind the spine's front**: multifidus and erector spinae lie in the posterior part of the
   body (their centroids' depth within the body's front-to-back extent at least
   :data:`MIN_POSTERIOR_DEPTH`), and behind the psoas where the model outlines one. An
   upside-down image, or anatomy that is not a lumbar axial slice, fails here.
4. **Medial to lateral**: on each side the multifidus centroid is nearer the midline than the
   erector spinae's (the midline: halfway between the two multifidus centroids).
5. **Size against the body**: each muscle's area is within :data:`AREA_SHARE_BOUNDS` of the body's
   cross-section, all muscles together at most :data:`MAX_TOTAL_AREA_SHARE`.
6. **Continuity**: each paraspinal outline's area is within a factor :data:`MAX_AREA_CHANGE` of the
   median of its neighbours in the stack (up to two on each side), and its centroid within
   :data:`MAX_CENTROID_SHIFT_MM` of theirs.
7. **Confidence**: the model's mean normalised softmax entropy inside each outline
   (:attr:`~inference.geometry.LabelMap.uncertainty`) is at most :data:`MAX_UNCERTAINTY`.
8. **Left and right**: no label left on the wrong side by the runtime's laterality check
   (a ``"kept"`` :class:`~inference.geometry.LateralityFinding`).

A series is **not measured** when fewer than :data:`MIN_PASSING_SHARE` of its frames pass or
fewer than :data:`inference.set_aside.MIN_FRAMES` pass. Excluded frames enter no metric
(:func:`reports.metrics.measure` with ``exclude``).

Calibration: the bounds were set on the real MyoSegmenTUM volume (TUM01, 3 T Dixon, L2-L5, 29
slices) segmented by the bundled model in every contrast it takes, and on failures built from it
(upside-down, head-like and noise images; see ``tests/test_segmentation_quality.py``); each
constant gives what was measured. One subject is little: the bounds are wide, set to catch a
segmentation that is wrong in kind, not to grade a good one. A very lean or very obese patient
moves the area shares; the bounds leave a factor of about three either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Mapping, Sequence

import numpy as np

from inference.geometry import LabelMap
from inference.input_quality import body_mask
from inference.set_aside import MIN_FRAMES
from inference.vocabulary import Muscle, Side

__all__ = [
    "AREA_SHARE_BOUNDS", "MAX_AREA_CHANGE", "MAX_CENTROID_SHIFT_MM", "MAX_TOTAL_AREA_SHARE", "MAX_UNCERTAINTY",
    "MIN_INSIDE_BODY", "MIN_MUSCLE_AREA_MM2", "MIN_PASSING_SHARE", "MIN_POSTERIOR_DEPTH", "PARASPINAL",
    "SegmentationQuality", "SliceCheck", "Verdict", "check_segmentation", "slice_features",
]

#: The muscles every lumbar axial slice shows on both sides (psoas major begins at T12-L1 and
#: quadratus lumborum at L1-L4, so neither is required).
PARASPINAL = (Muscle.MULTIFIDUS, Muscle.ERECTOR_SPINAE)

#: The smallest area (mm2) of a required muscle on one side. The smallest on TUM01 (multifidus at
#: L2, bundled model, Dixon) is 239 mm2; published lumbar multifidus CSA is 200-1000 mm2 at L1-L5.
#: A few dozen pixels are a fragment, not the muscle.
MIN_MUSCLE_AREA_MM2 = 60.0

#: The least share of an outline's pixels inside the body outline. TUM01: 1.00 for every outline.
MIN_INSIDE_BODY = 0.9

#: The least depth of a paraspinal centroid in the body, from its front (0) to its back (1).
#: TUM01 (thick posterior subcutaneous fat, which lowers it): erector spinae 0.55-0.78,
#: multifidus 0.63-0.72. Mirrored front to back, the real muscles sit at 0.2-0.45.
MIN_POSTERIOR_DEPTH = 0.4

#: Bounds on one muscle's area (one side) as a share of the body's cross-section. TUM01 (body
#: 45-57 thousand mm2): multifidus 0.005-0.018, erector spinae 0.018-0.045.
AREA_SHARE_BOUNDS = {Muscle.MULTIFIDUS: (0.001, 0.06), Muscle.ERECTOR_SPINAE: (0.003, 0.10),
                     Muscle.PSOAS_MAJOR: (0.0, 0.10), Muscle.QUADRATUS_LUMBORUM: (0.0, 0.05)}

#: The most that all outlines together may cover of the body. TUM01: 0.07-0.10.
MAX_TOTAL_AREA_SHARE = 0.35

#: The largest factor between an outline's area and the median of its neighbours'. Between 4 mm
#: slices of TUM01 the largest is 1.4.
MAX_AREA_CHANGE = 2.5

#: The largest distance (mm) between an outline's centroid and the median of its neighbours'.
#: TUM01, 4 mm slices: at most 5 mm.
MAX_CENTROID_SHIFT_MM = 20.0

#: The most doubt the model may have inside an outline (mean normalised entropy, 0-1). TUM01 with
#: the bundled model (Dixon): 0.02-0.07; on the same images upside down, the fragments the model
#: outlines reach 0.3-0.8.
MAX_UNCERTAINTY = 0.3

#: The least share of a series' frames that must pass for its measurements to be given.
MIN_PASSING_SHARE = 0.5

#: Neighbours on each side that continuity is judged against.
_NEIGHBOURS = 2


class Verdict(StrEnum):
    """A series' quality verdict, as the SR, the summary, the job record and the cohort CSV say it."""

    PASS = "pass"
    LIMITED = "limited"
    NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class SliceCheck:
    """One frame of a label map: where it is and what, if anything, is wrong with its outlines.

    ``problems`` are sentences without patient data; a frame passes when there are none.
    """

    frame_index: int
    sop_instance_uid: str
    frame_number: int | None
    instance_number: int | None
    multi_frame: bool
    problems: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def where(self) -> str:
        """``"image 12"`` (its InstanceNumber) or ``"image 2, frame 3"``, as a viewer finds it."""
        instance = (f"image {self.instance_number}" if self.instance_number is not None
                    else f"instance {self.sop_instance_uid}")
        return f"{instance}, frame {self.frame_number}" if self.multi_frame and self.frame_number else instance

    def as_dict(self) -> dict[str, Any]:
        return {"frame_index": self.frame_index, "sop_instance_uid": self.sop_instance_uid,
                "frame": self.frame_number, "instance_number": self.instance_number, "where": self.where,
                "problems": list(self.problems)}


@dataclass(frozen=True)
class SegmentationQuality:
    """The verdict on one label map, with every frame's check.

    ``reason`` is one sentence: why the series is not measured, or which frames were excluded.
    """

    verdict: Verdict
    checks: tuple[SliceCheck, ...]
    reason: str = ""
    version: str = field(default="1")

    @property
    def excluded(self) -> tuple[SliceCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    @property
    def excluded_frames(self) -> frozenset[int]:
        return frozenset(c.frame_index for c in self.excluded)

    @property
    def measured(self) -> bool:
        return self.verdict is not Verdict.NOT_MEASURED

    def as_dict(self) -> dict[str, Any]:
        """A JSON-compatible record (job results, ``musclenode status``, the study record)."""
        return {"verdict": str(self.verdict), "reason": self.reason, "frames": len(self.checks),
                "excluded": [c.as_dict() for c in self.excluded]}


@dataclass(frozen=True)
class _Outline:
    muscle: Muscle
    side: Side
    area_mm2: float
    centroid: np.ndarray  # LPS, mm
    inside_body: float
    depth: float  # 0 front of the body, 1 back


def slice_features(labels: np.ndarray, image: np.ndarray, frame, meaning: Mapping[int, Any],
                   body: np.ndarray | None = None) -> tuple[float, dict[int, _Outline]]:
    """The body's area (mm2) and each outline's area, centroid, share inside the body and depth.

    Parameters
    ----------
    labels : numpy.ndarray
        uint8 ``(rows, columns)`` label values on ``frame``.
    image : numpy.ndarray
        The frame's own pixels, ``(rows, columns)``.
    frame : inference.geometry.FrameGeometry
    meaning : mapping of int to LabelInfo
    body : numpy.ndarray, optional
        ``body_mask(image)`` when already found (bool, ``(rows, columns)``).
    """
    body = body_mask(image) if body is None else body
    pixel_area = float(frame.pixel_spacing[0] * frame.pixel_spacing[1])
    body_area = float(body.sum()) * pixel_area
    if body.any():
        rows, columns = np.nonzero(body)
        # Sampled: the body's front-to-back extent needs no more than a few thousand points.
        step = max(1, rows.size // 4000)
        y = frame.pixel_to_lps(rows[::step], columns[::step])[:, 1]
        front, back = float(y.min()), float(y.max())
    else:
        front = back = 0.0
    outlines: dict[int, _Outline] = {}
    for value in np.unique(labels):
        value = int(value)
        if value == 0 or value not in meaning:
            continue
        mask = labels == value
        rows, columns = np.nonzero(mask)
        centroid = frame.pixel_to_lps(rows.mean(), columns.mean()).reshape(-1)[:3]
        inside = float(body[mask].mean()) if body.any() else 0.0
        depth = (float(centroid[1]) - front) / (back - front) if back > front else 0.0
        info = meaning[value]
        outlines[value] = _Outline(Muscle(info.muscle), Side(info.side), float(mask.sum()) * pixel_area,
                                   np.asarray(centroid, dtype=float), inside, depth)
    return body_area, outlines


def _name(outline: _Outline) -> str:
    return f"{outline.side} {outline.muscle.display.lower()}"


def _own_problems(body_area: float, outlines: Mapping[int, _Outline], uncertainty: Mapping[int, float],
                  required: Sequence[tuple[Muscle, Side]]) -> list[str]:
    """Checks 1-5 and 7 of one frame (module notes)."""
    problems: list[str] = []
    by_key = {(o.muscle, o.side): (value, o) for value, o in outlines.items()}
    missing = [f"{side} {muscle.display.lower()}" for muscle, side in required
               if (muscle, side) not in by_key or by_key[(muscle, side)][1].area_mm2 < MIN_MUSCLE_AREA_MM2]
    if missing:
        problems.append(f"no outline of at least {MIN_MUSCLE_AREA_MM2:g} mm2 of the " + ", ".join(missing))
    if body_area <= 0:
        problems.append("no body outline found in the image")
        return problems
    for value, outline in sorted(outlines.items()):
        if outline.inside_body < MIN_INSIDE_BODY:
            problems.append(f"{_name(outline)}: {100 * (1 - outline.inside_body):.0f} % of its outline lies outside "
                            "the body")
        low, high = AREA_SHARE_BOUNDS.get(outline.muscle, (0.0, 1.0))
        share = outline.area_mm2 / body_area
        if outline.area_mm2 >= MIN_MUSCLE_AREA_MM2 and not low <= share <= high:
            problems.append(f"{_name(outline)}: {100 * share:.1f} % of the body's cross-section, outside "
                            f"{100 * low:g}-{100 * high:g} %")
        if outline.muscle in PARASPINAL and outline.depth < MIN_POSTERIOR_DEPTH:
            problems.append(f"{_name(outline)} is not in the back of the body (depth {outline.depth:.2f} from front "
                            f"to back, at least {MIN_POSTERIOR_DEPTH} expected): upside down or not lumbar anatomy")
        doubt = uncertainty.get(value)
        if outline.muscle in PARASPINAL and doubt is not None and doubt > MAX_UNCERTAINTY:
            problems.append(f"{_name(outline)}: the model is unsure of this outline (mean entropy {doubt:.2f}, "
                            f"at most {MAX_UNCERTAINTY} accepted)")
    total = sum(o.area_mm2 for o in outlines.values()) / body_area
    if total > MAX_TOTAL_AREA_SHARE:
        problems.append(f"the outlines cover {100 * total:.0f} % of the body's cross-section (at most "
                        f"{100 * MAX_TOTAL_AREA_SHARE:g} % expected)")
    multifidus = {side: by_key[(Muscle.MULTIFIDUS, side)][1] for side in Side if (Muscle.MULTIFIDUS, side) in by_key}
    if len(multifidus) == 2:
        midline = 0.5 * (multifidus[Side.LEFT].centroid[0] + multifidus[Side.RIGHT].centroid[0])
        for side, inner in multifidus.items():
            outer = by_key.get((Muscle.ERECTOR_SPINAE, side))
            if outer is not None and abs(inner.centroid[0] - midline) >= abs(outer[1].centroid[0] - midline):
                problems.append(f"the {side} multifidus is not medial to the {side} erector spinae")
    for side in Side:
        psoas = by_key.get((Muscle.PSOAS_MAJOR, side))
        back = by_key.get((Muscle.MULTIFIDUS, side))
        if psoas is not None and back is not None and psoas[1].centroid[1] >= back[1].centroid[1]:
            problems.append(f"the {side} psoas major is not in front of the {side} multifidus")
    return problems


def _continuity_problems(index: int, stack: Sequence[int], outlines: Sequence[Mapping[int, _Outline]]) -> list[str]:
    """Check 6 of one frame against up to :data:`_NEIGHBOURS` frames on each side in ``stack``
    (the frames of its stack that passed the other checks, in order)."""
    position = stack.index(index)
    neighbours = [stack[k] for k in range(max(0, position - _NEIGHBOURS), min(len(stack), position + _NEIGHBOURS + 1))
                  if k != position]
    problems = []
    for value, outline in sorted(outlines[index].items()):
        if outline.muscle not in PARASPINAL:
            continue
        around = [outlines[n][value] for n in neighbours if value in outlines[n]]
        if len(around) < 2:  # an end of the stack with one neighbour says too little
            continue
        typical = float(np.median([o.area_mm2 for o in around]))
        ratio = max(outline.area_mm2, 1e-6) / max(typical, 1e-6)
        if ratio > MAX_AREA_CHANGE or ratio < 1 / MAX_AREA_CHANGE:
            problems.append(f"{_name(outline)}: area {outline.area_mm2:.0f} mm2 against {typical:.0f} mm2 on the "
                            "neighbouring slices")
        centre = np.median(np.stack([o.centroid[:2] for o in around]), axis=0)
        shift = float(np.linalg.norm(outline.centroid[:2] - centre))
        if shift > MAX_CENTROID_SHIFT_MM:
            problems.append(f"{_name(outline)}: {shift:.0f} mm from where the neighbouring slices have it")
    return problems


def check_segmentation(label_map: LabelMap, images: Sequence[np.ndarray] | None = None,
                       bodies: Sequence[np.ndarray | None] | None = None) -> SegmentationQuality:
    """Judge every frame of a label map and give the series its verdict (module notes).

    Parameters
    ----------
    label_map : LabelMap
        The model's labels on the series it segmented, with its laterality findings and (from the
        runtime) its per-frame uncertainty.
    images : sequence of numpy.ndarray, optional
        The pixels the body outline is found on, one ``(rows, columns)`` array per frame (default:
        the label map's series; give the in-phase or fat image of a Dixon group, whose body
        outline is sharper than the water image's).
    bodies : sequence of numpy.ndarray or None, optional
        :func:`inference.input_quality.body_mask` of each image where already found (the input
        checks found it on the series' own frames), None where not.

    Returns
    -------
    SegmentationQuality
    """
    series = label_map.series
    images = list(images) if images is not None else list(series.frames)
    if len(images) != len(series):
        raise ValueError(f"{len(images)} images for a label map of {len(series)} frames")
    required = [(muscle, side) for muscle in PARASPINAL for side in Side
                if any(i.muscle == muscle and i.side == side for i in label_map.meaning.values())]
    bodies = list(bodies) if bodies is not None else [None] * len(images)
    if len(bodies) != len(images):
        raise ValueError(f"{len(bodies)} body masks for {len(images)} images")
    features = [slice_features(labels, image, geometry, label_map.meaning, body)
                for labels, image, geometry, body in zip(label_map.labels, images, series.geometry, bodies)]
    outlines = [f[1] for f in features]
    uncertainty = label_map.uncertainty or tuple({} for _ in series.geometry)
    kept_sides = {f.frame_index for f in label_map.findings if f.action != "swapped"}
    stack_of = {index: stack for stack in series.stacks for index in stack}
    multi_frame = len({g.sop_instance_uid for g in series.geometry}) < len(series.geometry)
    own = [_own_problems(features[index][0], outlines[index], uncertainty[index], required)
           + (["a label lies on the wrong side of the midline (left/right check)"] if index in kept_sides else [])
           for index in range(len(series))]
    checks = []
    for index, geometry in enumerate(series.geometry):
        problems = own[index]
        if not problems:  # continuity only between slices that are fine on their own
            problems = _continuity_problems(index, [i for i in stack_of[index] if not own[i]], outlines)
        checks.append(SliceCheck(index, geometry.sop_instance_uid, geometry.frame_number,
                                 series.instance_numbers.get(geometry.sop_instance_uid), multi_frame,
                                 tuple(problems)))
    passed = sum(c.passed for c in checks)
    excluded = [c for c in checks if not c.passed]
    if passed < max(MIN_FRAMES, MIN_PASSING_SHARE * len(checks)):
        return SegmentationQuality(Verdict.NOT_MEASURED, tuple(checks),
                                   f"{len(excluded)} of {len(checks)} images failed the segmentation quality "
                                   f"control ({_common_problems(excluded)}): too few remain to measure")
    if excluded:
        return SegmentationQuality(Verdict.LIMITED, tuple(checks),
                                   f"{len(excluded)} of {len(checks)} images excluded from the measurements "
                                   f"({', '.join(c.where for c in excluded[:8])}"
                                   f"{' and more' if len(excluded) > 8 else ''}): {_common_problems(excluded)}")
    return SegmentationQuality(Verdict.PASS, tuple(checks))


def _common_problems(checks: Sequence[SliceCheck], count: int = 3) -> str:
    """The most frequent problems, shortened to their kind (the text before a colon or number)."""
    tally: dict[str, int] = {}
    for check in checks:
        for problem in dict.fromkeys(_kind(p) for p in check.problems):
            tally[problem] = tally.get(problem, 0) + 1
    ranked = sorted(tally.items(), key=lambda kv: (-kv[1], kv[0]))[:count]
    return "; ".join(f"{text} ({n})" for text, n in ranked)


def _kind(problem: str) -> str:
    """A problem without its numbers: ``"left multifidus: area ..."`` -> ``"area changes between slices"``."""
    if "neighbouring slices" in problem:
        return "discontinuous with the neighbouring slices"
    if "outside the body" in problem:
        return "outline outside the body"
    if "cross-section" in problem:
        return "implausible size for the body"
    if "back of the body" in problem:
        return "not in the back of the body (upside down or not lumbar anatomy)"
    if "unsure" in problem:
        return "low model confidence"
    if "medial" in problem or "in front of" in problem:
        return "muscles in the wrong arrangement"
    if problem.startswith("no outline"):
        return "a paraspinal muscle missing"
    if problem.startswith("no body"):
        return "no body in the image"
    return problem
