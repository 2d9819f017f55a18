"""The pipeline: one selected group of series in, SEG, SR, key-slice outlines, summary and rows out.

The node's workers (``node.orchestration.worker``) and the offline ``musclenode process``
command (``node.orchestration.offline``) both call :func:`run`, so a
study gives the same numbers whichever way it came in. The steps read as the data flow of
README ("Architecture"): series -> segment -> measure -> assess -> SEG + SR + summary.
"""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from inference.card import KIND_VERTEBRAE, CardError, ModelCard
from inference.geometry import (MAX_OBLIQUE_DEGREES, GeometryError, LabelMap, SeriesImage, pair_components,
                                read_series, set_aside_off_plane)
from inference.input_quality import (SliceQuality, body_masks, fat_suppression_problem, measure_series,
                                     resolution_problem, set_aside_unusable)
from inference.patient import PatientContext, from_dataset
from inference.registry import DEFAULT_LEVEL_MODEL, load_model
from inference.runtime import Segmenter
from inference.segmentation_quality import SegmentationQuality, Verdict, check_segmentation
from inference.set_aside import SetAside, too_few_frames
from inference.vertebrae import NO_LEVEL_REFERENCE, LevelReference, SeriesLevels, assign_levels, find_bodies
from inference.vocabulary import DIXON_COMPONENTS, Contrast, FatMethod, Laterality
from reports.assessment import Assessment, assess
from reports.levels import LEVEL_RANGES
from reports.metrics import ALL_LEVELS, FatSource, MuscleMetrics, measure
from reports.reference import SiteReference
from reports.uids import ResultIdentity

__all__ = ["COHORT_COLUMNS", "FAT_SIGNAL_KINDS", "SLICE_COLUMNS", "PipelineError", "PipelineSettings", "Results", "WorkItem",
           "check_inputs", "cohort_rows", "find_level_reference", "run", "series_levels", "slice_rows"]

log = logging.getLogger(__name__)


class PipelineError(Exception):
    """A work item that cannot be processed; ``transient`` says whether trying again may help."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class WorkItem:
    """What to process: series by role as file lists.

    ``kind`` is ``"dixon"`` (the roles are Dixon components of one acquisition: water and fat, a
    fat-fraction map, or in-phase and opposed-phase), ``"t1"`` or ``"t2"`` (one weighted series,
    fat by clustering; an in-phase image without its partners comes as ``"t1"``), or
    ``"water"`` or ``"fat"`` (one Dixon component without its partners: areas and volumes, no
    fat, since neither image alone holds a fat fraction). A single series' role is its kind.

    ``level_reference`` are the files of the study's sagittal series that gives the slices their
    vertebral levels (:mod:`inference.vertebrae`); without one, ``level_reason`` says why (it
    is stated wherever levels would appear). ``level_bodies`` is what the level model found on
    that series when the caller already knows it (one study, several work items: see
    :func:`find_level_reference`); otherwise it is found from ``level_reference``.
    """

    kind: str
    series_files: Mapping[str, Sequence[Path]]
    patient: PatientContext | None = None
    level_reference: Sequence[Path] = ()
    level_reason: str | None = None
    level_bodies: LevelReference | None = None


@dataclass(frozen=True)
class PipelineSettings:
    """How fat is measured and what it is compared with; which slices count as axial.

    ``max_oblique_degrees`` is the node's ``rules.max_oblique_degrees``: a frame whose normal
    is further than this from the head-foot axis is set aside (a localizer inside the series).
    ``level_model`` is the vertebral level model as the node's model folders resolve it; None
    means the bundled one.
    """

    erode_fat: bool = True
    cluster_method: FatMethod = FatMethod.GMM3
    assume_levels: str | None = "L1-L5"
    site_reference: SiteReference | None = None
    max_oblique_degrees: float = MAX_OBLIQUE_DEGREES
    level_model: ModelCard | None = None


@dataclass
class Results:
    """Everything one work item produced.

    ``segmentations`` holds one SEG per orientation group of the series (one for a single
    stack; one per slab for angled slabs, see :func:`reports.seg.build_segmentations`).
    ``quality`` is the segmentation's verdict (:mod:`inference.segmentation_quality`): when it is
    "not measured", ``metrics`` and ``assessments`` are empty and the SR and summary say why.
    ``levels`` is the vertebral level of each frame of the label map's series, or the reason
    there are none. ``outlines`` is the key-slice outlines as a document of their own, in the form
    viewers turn into their tools (:mod:`reports.outline_report`); None when no disc level has a
    key slice.
    """

    label_map: LabelMap
    metrics: list[MuscleMetrics]
    assessments: list[Assessment]
    patient: PatientContext
    segmentations: list[Dataset]
    report: Dataset
    summary: list[Dataset]
    seconds: dict[str, float] = field(default_factory=dict)
    quality: SegmentationQuality | None = None
    levels: SeriesLevels | None = None
    outlines: Dataset | None = None

    @property
    def segmentation(self) -> Dataset:
        """The first SEG (the only one for a series of one orientation)."""
        return self.segmentations[0]

    @property
    def set_aside(self) -> tuple[SetAside, ...]:
        """Images of the input series that were not processed, each with its reason."""
        return self.label_map.set_aside

    @property
    def datasets(self) -> list[tuple[str, Dataset]]:
        """Every result object with its kind, the SEGs first (the SR references them), the key-slice
        outlines (kind ``outlines``, where there are any) after the SR."""
        return ([("seg", seg) for seg in self.segmentations] + [("sr", self.report)]
                + ([("outlines", self.outlines)] if self.outlines is not None else [])
                + [("summary", d) for d in self.summary])


#: Kinds of work item that are one Dixon component alone: segmented, measured without fat.
LONE_COMPONENT_KINDS = (Contrast.WATER, Contrast.FAT)


def _fat_source(kind: str, images: Mapping[str, SeriesImage], settings: PipelineSettings) -> FatSource | None:
    """Where a work item's fat comes from, in order of preference: water and fat, the scanner's
    fat-fraction map, the two-point in-phase/opposed-phase pair; clustering for a weighted
    series; nothing for a lone water or fat image."""
    if kind == "dixon":
        if Contrast.WATER in images and Contrast.FAT in images:
            return FatSource(water=images[Contrast.WATER], fat=images[Contrast.FAT], erode=settings.erode_fat)
        if Contrast.FAT_FRACTION in images:
            return FatSource(fraction=images[Contrast.FAT_FRACTION], erode=settings.erode_fat)
        if Contrast.IN_PHASE in images and Contrast.OPPOSED_PHASE in images:
            return FatSource(in_phase=images[Contrast.IN_PHASE], opposed_phase=images[Contrast.OPPOSED_PHASE],
                             erode=settings.erode_fat)
        raise PipelineError("a Dixon group needs water and fat, a fat-fraction map, or in-phase and opposed-phase")
    if kind in LONE_COMPONENT_KINDS:
        return None
    return FatSource(cluster=settings.cluster_method)


@functools.lru_cache(maxsize=1)
def _level_card() -> ModelCard:
    """The bundled level model (checked against its checksum once per process)."""
    return load_model(DEFAULT_LEVEL_MODEL, kind=KIND_VERTEBRAE)


def find_level_reference(files: Sequence[Path], settings: PipelineSettings = PipelineSettings()
                         ) -> tuple[LevelReference | None, str | None]:
    """The vertebral bodies the level model finds on a study's sagittal series.

    Returns
    -------
    (LevelReference or None, str or None)
        The bodies (possibly none, with the problems), or None and why the series cannot be used
        (unreadable, or the level model cannot be loaded).
    """
    try:
        card = settings.level_model or _level_card()
        return find_bodies(read_series(files), card, threads=1), None
    except (OSError, ValueError, CardError) as exc:
        return None, f"the sagittal reference series cannot be used: {exc}"


def series_levels(item: WorkItem, series: SeriesImage, settings: PipelineSettings = PipelineSettings(),
                  found: tuple[LevelReference | None, str | None] | None = None) -> SeriesLevels:
    """The vertebral level of every frame of ``series`` from the work item's sagittal reference.

    ``found`` is :func:`find_level_reference`'s answer for the item's reference when already
    known. No frame has a level, with the reason, when the item has no reference, the reference
    cannot be read or the level model finds no body on it, or the two series do not share a frame
    of reference (:func:`inference.vertebrae.assign_levels`).
    """
    if item.level_bodies is not None:
        return assign_levels(item.level_bodies, series)
    if not item.level_reference:
        return assign_levels(None, series, item.level_reason or NO_LEVEL_REFERENCE)
    reference, problem = found if found is not None else find_level_reference(item.level_reference, settings)
    return assign_levels(reference, series, problem)


def read_inputs(item: WorkItem, settings: PipelineSettings = PipelineSettings()) -> dict[str, SeriesImage]:
    """Read a work item's series, with what cannot be used set aside (:func:`read_and_measure`)."""
    return read_and_measure(item, settings)[0]


#: A frame of a source series: (SOP Instance UID, frame number).
FrameKey = tuple[str, int]


def _frame_keys(series: SeriesImage) -> list[FrameKey]:
    return [(g.sop_instance_uid, g.frame_number) for g in series.geometry]


def read_and_measure(item: WorkItem, settings: PipelineSettings = PipelineSettings(),
                     ) -> tuple[dict[str, SeriesImage], dict[str, list[SliceQuality]], dict[FrameKey, np.ndarray]]:
    """Read a work item's series, with what cannot be used set aside, what
    :func:`inference.input_quality.measure_slice` measured on the frames each series kept (not for
    a fat-fraction map, and not for Dixon components, whose pairing may drop more frames; the band
    ratio only of the image :func:`check_inputs` checks for fat signal), and
    the body mask (:func:`inference.input_quality.body_mask`) of every frame measured, by frame,
    for the segmentation's quality control.

    Every series loses the images :func:`inference.geometry.read_series` cannot use, its
    off-plane frames (:func:`inference.geometry.set_aside_off_plane`) and its blank and
    noise-only frames (:func:`inference.input_quality.set_aside_unusable`; not of a fat-fraction
    map, whose air is noise by design); Dixon components then
    keep the positions they all have (:func:`inference.geometry.pair_components`), so a frame
    blank in one component is set aside in the others as unpaired.

    Raises
    ------
    PipelineError
        When a series cannot be read at all, has no axial frame, every frame is blank or noise, or
        fewer than :data:`inference.set_aside.MIN_FRAMES` frames remain.
    """
    images: dict[str, SeriesImage] = {}
    qualities: dict[str, list[SliceQuality]] = {}
    bodies: dict[FrameKey, np.ndarray] = {}
    for role, files in item.series_files.items():
        try:
            series = read_series(files)
        except (OSError, ValueError) as exc:
            raise PipelineError(f"cannot read the {role} series: {exc}") from exc
        try:
            series = set_aside_off_plane(series, settings.max_oblique_degrees)
        except GeometryError as exc:
            raise PipelineError(f"the {role} series has no axial image: {exc}") from exc
        if role == Contrast.FAT_FRACTION:
            # A fat-fraction map's air is a random fraction (noise by design); the components
            # it comes with, which the model segments (the bundled card takes water, fat or
            # in-phase), are checked instead.
            images[role] = series
            continue
        masks = body_masks(series)
        bodies.update(zip(_frame_keys(series), masks))
        try:
            images[role], qualities[role] = set_aside_unusable(
                series, masks, band_ratio=item.kind in FAT_SIGNAL_KINDS and role == item.kind)
        except GeometryError as exc:
            raise PipelineError(f"the {role} series holds no anatomy to measure: {exc}") from exc
    if item.kind == "dixon" and len(images) > 1:
        try:
            images = pair_components(images)
        except GeometryError as exc:
            raise PipelineError(f"the Dixon series cannot be paired: {exc}") from exc
        qualities = {}  # frames of the components' own measurements may have gone unpaired
    for role, series in images.items():
        reason = too_few_frames(len(series), series.set_aside, f"the {role} series")
        if reason is not None:
            raise PipelineError(reason)
    return images, qualities, bodies


#: Kinds of work item whose segmented image must carry fat signal: a weighted series measured by
#: clustering, and a lone fat image. Not a Dixon group, whose water image is fat-free by design
#: and whose fat comes from the other components, nor a lone water image, measured without fat.
FAT_SIGNAL_KINDS = ("t1", "t2", Contrast.FAT)


def check_inputs(item: WorkItem, images: Mapping[str, SeriesImage],
                 qualities: Mapping[str, Sequence[SliceQuality]] | None = None) -> None:
    """Refuse, before inference, series that cannot be measured (:mod:`inference.input_quality`).

    ``qualities`` are the measurements :func:`read_and_measure` already made of a series' frames;
    a series without them is measured here.

    Every series must have in-plane pixels no coarser than
    :data:`inference.input_quality.MAX_PIXEL_SPACING_MM`; the image of a kind in
    :data:`FAT_SIGNAL_KINDS` must not look fat suppressed from its pixels (subcutaneous fat no
    brighter than the inside of the body), whatever its headers say.

    Raises
    ------
    PipelineError
        With the reason, never transient.
    """
    for role, series in images.items():
        reason = resolution_problem([g.pixel_spacing for g in series.geometry])
        if reason is not None:
            raise PipelineError(f"the {role} series cannot be measured: {reason}")
    if item.kind in FAT_SIGNAL_KINDS and item.kind in images:
        measured = (qualities or {}).get(item.kind)
        reason = fat_suppression_problem(measured if measured is not None else measure_series(images[item.kind]))
        if reason is not None:
            raise PipelineError(f"the {item.kind} series cannot be measured: {reason}")


def run(item: WorkItem, segmenter: Segmenter, settings: PipelineSettings = PipelineSettings(), *,
        software_version: str) -> Results:
    """Process one work item.

    ``software_version`` is the node's version: it enters the result UIDs and the objects'
    SoftwareVersions, so that results of another release replace, never duplicate, these.
    Images that cannot be used are set aside (:func:`read_inputs`) and reported with the results.

    Raises
    ------
    PipelineError
        When the series cannot be read or segmented, or is refused by :func:`check_inputs`
        before inference; never transient for bad input.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="level-reference") as pool:
        # The level model looks at the sagittal series while the axial series is read and
        # segmented: ONNX Runtime and scipy release the GIL, so on a second core its time is not
        # added to the job's (bench/level_job.py). Its answer is the same either way.
        found = (pool.submit(find_level_reference, item.level_reference, settings)
                 if item.level_bodies is None and item.level_reference else None)
        return _run(item, segmenter, settings, software_version, found)


def _run(item: WorkItem, segmenter: Segmenter, settings: PipelineSettings, software_version: str,
         found: Future | None) -> Results:
    """:func:`run`, with the level reference being found in ``found`` (None: found here if any)."""
    from reports.outline_report import build_outline_report
    from reports.seg import build_segmentations, source_datasets_of
    from reports.sr import build_report
    from reports.summary import build_summary

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    images, qualities, bodies = read_and_measure(item, settings)
    check_inputs(item, images, qualities)
    set_aside = tuple(dict.fromkeys(entry for series in images.values() for entry in series.set_aside))
    if set_aside:
        log.info("%d image(s) set aside: %s", len(set_aside), "; ".join(sorted({str(e.kind) for e in set_aside})))
    seconds["read"] = time.perf_counter() - started

    started = time.perf_counter()
    try:
        if item.kind == "dixon":
            label_map = segmenter.segment_components({r: images[r] for r in DIXON_COMPONENTS if r in images})
        elif item.kind in LONE_COMPONENT_KINDS:  # the card must accept the component (choose_contrast)
            label_map = segmenter.segment_components({item.kind: images[item.kind]})
        else:
            label_map = segmenter.segment(images[item.kind])
    except ValueError as exc:
        raise PipelineError(f"cannot segment: {exc}") from exc
    label_map = replace(label_map, set_aside=set_aside)
    seconds["inference"] = time.perf_counter() - started
    if not label_map.values_present():
        raise PipelineError(f"the model found no paraspinal muscle in the {len(label_map.series)} images of the "
                            "series: there is nothing to measure")

    started = time.perf_counter()
    quality = check_segmentation(label_map, bodies=[bodies.get(key) for key in _frame_keys(label_map.series)])
    if quality.verdict is not Verdict.PASS:
        log.warning("segmentation quality %s: %s", quality.verdict, quality.reason)
    seconds["quality"] = time.perf_counter() - started

    started = time.perf_counter()
    source = next(iter(label_map.series.source_paths.values()), None)
    source_dataset = dcmread(source, stop_before_pixels=True) if source else None
    patient = item.patient or (from_dataset(source_dataset) if source_dataset is not None else from_dataset(Dataset()))
    levels = series_levels(item, label_map.series, settings, found.result() if found is not None else None)
    if levels.reason:
        log.info("no vertebral levels: %s", levels.reason)
    by_frame = {(g.sop_instance_uid, g.frame_number): level
                for g, level in zip(label_map.series.geometry, levels.levels) if level}
    level_of = (lambda frame: by_frame.get((frame.sop_instance_uid, frame.frame_number))) if by_frame else None
    if quality.measured:
        metrics = measure(label_map, _fat_source(item.kind, images, settings), level_of=level_of,
                          exclude=quality.excluded_frames, key_frames=levels.key_frames(quality.excluded_frames),
                          level_ranges=LEVEL_RANGES)
        assessments = assess(metrics, patient, assume_levels=settings.assume_levels, site=settings.site_reference,
                             levels_reason=levels.reason, levels_problems=levels.problems)
    else:  # no number leaves the node: the SR and summary say "not measured" and why
        metrics, assessments = [], []
    seconds["measure"] = time.perf_counter() - started

    started = time.perf_counter()
    card = segmenter.card
    identity = ResultIdentity([s.series_instance_uid for s in images.values()], f"{card.name} {card.version}", software_version)
    try:
        segmentations = build_segmentations(label_map, card.name, card.version, identity, software_version)
    except ValueError as exc:  # highdicom's and our checks of what a SEG can reference
        raise PipelineError(f"cannot make a DICOM SEG on these images: {exc}") from exc
    sources = source_datasets_of(label_map)  # read once: evidence of both reports
    report = build_report(label_map, segmentations, assessments, identity, card.name, card.version,
                          software_version, patient=patient, source_datasets=sources, quality=quality)
    outlines = build_outline_report(label_map, assessments, identity, card.name, card.version, software_version,
                                    patient=patient, source_datasets=sources, quality=quality)
    summary = build_summary(label_map, assessments, patient, identity, card.name, card.version, software_version,
                            source_dataset, quality=quality)
    seconds["results"] = time.perf_counter() - started
    return Results(label_map, metrics, assessments, patient, segmentations, report, summary, seconds, quality, levels,
                   outlines)


#: The columns of :func:`cohort_rows`, in order: a cohort table without rows still has them.
COHORT_COLUMNS = (
    "study", "series", "model", "age", "sex", "bmi", "muscle", "side", "level", "slices", "mean_csa_mm2",
    "volume_cm3", "fat_method", "fat_percent", "fat_median_percent", "functional_csa_mm2", "asymmetry_percent",
    "fat_z", "fat_percentile", "reference", "no_reference_reason", "grade", "range_min_mm", "range_max_mm",
    "quality", "excluded_images", "key_slice_sop_instance_uid", "key_slice_csa_mm2", "key_slice_fat_percent",
)


#: The columns of :func:`slice_rows` (``slices.csv`` of ``musclenode process``), in order.
SLICE_COLUMNS = ("study", "series", "sop_instance_uid", "frame", "position_mm", "level", "muscle", "side",
                 "csa_mm2", "fat_percent")


def slice_rows(results: Results, study: str) -> list[dict[str, Any]]:
    """Rows of the per-slice table: one per measured slice x muscle x side.

    ``position_mm`` is the slice centre's height along the patient's head-foot axis (LPS z, mm,
    +z towards the head); ``level`` the slice's vertebral level (``L3``, ``L3-L4``) or empty;
    ``fat_percent`` the slice's fat (fat fraction or fat infiltration, as the series' method;
    empty for clustering, which is measured per muscle, not per slice). Excluded slices are not
    in it.
    """
    series = results.label_map.series
    rows = []
    for m in results.metrics:
        if m.level != ALL_LEVELS or m.side is Laterality.BOTH:
            continue
        for area in m.slices:
            rows.append({
                "study": study, "series": series.series_instance_uid, "sop_instance_uid": area.sop_instance_uid,
                "frame": area.frame_number, "position_mm": round(float(series.geometry[area.frame_index].centre[2]), 2),
                "level": area.level, "muscle": m.muscle, "side": m.side, "csa_mm2": round(area.area_mm2, 2),
                "fat_percent": None if area.fat_percent is None else round(area.fat_percent, 2),
            })
    return sorted(rows, key=lambda r: (-r["position_mm"], r["muscle"], r["side"]))


def cohort_rows(results: Results, study: str) -> list[dict[str, Any]]:
    """Rows of a cohort CSV: one per study x muscle x side (x level when levels are known).

    ``age`` is in completed years, as the field reports ages (and as the reference's age bands
    count them); ``sex`` and ``bmi`` are the values the comparisons used, empty when missing.
    ``quality`` is the segmentation's verdict ("pass" or "limited"; a series "not measured" has
    no rows, and the study record lists it with its reason) and ``excluded_images`` how many of
    the series' images it excluded from the numbers. For a disc level (``L4-L5``), the
    ``key_slice_*`` columns give the muscle on the image nearest the middle of the disc: its SOP
    Instance UID, cross-sectional area (mm²) and fat (%); empty for other rows.
    """
    rows = []
    patient = results.patient
    quality = results.quality
    verdict = None if quality is None else str(quality.verdict)
    excluded = None if quality is None else len(quality.excluded)
    for assessment in results.assessments:
        m = assessment.metrics
        fat = m.fat
        row = {
            "study": study,
            "series": results.label_map.series.series_instance_uid,
            "model": f"{results.label_map.model_name} {results.label_map.model_version}",
            "age": patient.age_completed_years, "sex": patient.sex,
            "bmi": None if patient.bmi is None else round(patient.bmi, 2),
            "muscle": m.muscle, "side": m.side, "level": m.level, "slices": m.n_slices,
            "mean_csa_mm2": round(m.mean_csa_mm2, 2),
            "volume_cm3": None if m.volume_cm3 is None else round(m.volume_cm3, 3),
            "fat_method": None if fat is None else fat.method,
            "fat_percent": None if fat is None or fat.mean_percent is None else round(fat.mean_percent, 2),
            "fat_median_percent": None if fat is None or fat.median_percent is None else round(fat.median_percent, 2),
            "functional_csa_mm2": None if m.functional_csa_mm2 is None else round(m.functional_csa_mm2, 2),
            "asymmetry_percent": None if m.asymmetry_percent is None else round(m.asymmetry_percent, 2),
            "fat_z": None, "fat_percentile": None, "reference": None, "no_reference_reason": None,
            "grade": None if assessment.grade is None else assessment.grade.value,
            "range_min_mm": round(m.range_mm[0], 1), "range_max_mm": round(m.range_mm[1], 1),
            "quality": verdict, "excluded_images": excluded,
            "key_slice_sop_instance_uid": None if m.key_slice is None else m.key_slice.sop_instance_uid,
            "key_slice_csa_mm2": None if m.key_slice is None else round(m.key_slice.area_mm2, 2),
            "key_slice_fat_percent": (None if m.key_slice is None or m.key_slice.fat_percent is None
                                      else round(m.key_slice.fat_percent, 2)),
        }
        comparison = assessment.fat
        if comparison is not None:
            row["fat_z"] = None if comparison.z is None else round(comparison.z, 3)
            row["fat_percentile"] = None if comparison.percentile is None else round(comparison.percentile, 1)
            # The reference's version or the site reference's title first: every z-score names its reference.
            row["reference"] = (f"{comparison.stratum.version}: {comparison.stratum.description}"
                                if comparison.stratum else None)
            row["no_reference_reason"] = comparison.reason
        rows.append(row)
    return rows
