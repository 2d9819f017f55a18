"""DICOM Segmentation of the paraspinal muscles, pixel for pixel on the source images.

The SEG is BINARY and uncompressed, with one segment per muscle and side that the label map
contains and one frame per source frame and segment, empty frames included, so that a viewer
finds a frame for every source image it shows. It references every source instance
(ReferencedSeriesSequence, and per frame DerivationImageSequence / SourceImageSequence), shares
the source's Frame of Reference, and repeats its patient and study so that a PACS files it into
the same study. UIDs come from :class:`reports.uids.ResultIdentity`, so that processing the same
series again replaces the SEG instead of adding one.

A series whose frames lie in several orientations (angled slabs, each planned along its disc)
gets one SEG per orientation group (:func:`build_segmentations`). highdicom builds a SEG with one
plane orientation for all its frames, shared by its source images ("Source images must have a
shared orientation"); the standard would allow a per-frame Plane Orientation, but highdicom
does not write one, and viewers (OHIF, cornerstone) load a SEG as one labelmap in one
orientation. So each group becomes a SEG of its own: its own series (viewers show one SEG per
series), with UIDs derived per part (:meth:`reports.equipment.ResultSeries.identification`), the
same segments with the same numbers and tracking UIDs in every part (so that a segment names one
muscle and side in all of them), and together one frame per source frame and segment. Frames
that were set aside (:mod:`inference.set_aside`) are not in the label map and so in no SEG.

Laterality is a SegmentedPropertyTypeModifierCodeSequence inside the item of
SegmentedPropertyTypeCodeSequence (PS3.3 C.8.20.2), where dciodvfy expects it; highdicom's
SegmentDescription has no parameter for it, so it is added to the item here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from inference.geometry import LabelMap
from inference.patient import result_header
from inference.vocabulary import Muscle, Side

from .codes import ALGORITHM_FAMILY, ANATOMICAL_STRUCTURE, LUMBAR_SPINE
from .equipment import MANUFACTURER, Equipment, ResultSeries, fit_lo
from .uids import ResultIdentity

__all__ = [
    "SegmentRef",
    "build_segmentation",
    "build_segmentations",
    "orientation_groups",
    "segment_frames",
    "segment_numbers",
    "segments",
    "source_datasets_of",
]


@dataclass(frozen=True)
class SegmentRef:
    """One segment of a SEG, as the SR refers to it."""

    number: int
    muscle: Muscle
    side: Side
    label: str
    tracking_id: str
    tracking_uid: str


def source_datasets_of(label_map: LabelMap) -> list[Dataset]:
    """Headers of the label map's source instances, in source order, read from their files.

    Raises
    ------
    ValueError
        When the series was built from datasets in memory (no files to read).
    """
    series = label_map.series
    uids = list(dict.fromkeys(g.sop_instance_uid for g in series.geometry))
    missing = [uid for uid in uids if uid not in series.source_paths]
    if missing:
        raise ValueError(
            f"{len(missing)} source instance(s) of series {series.series_instance_uid} have no file in "
            "series.source_paths: pass source_datasets")
    return [pydicom.dcmread(Path(series.source_paths[uid]), stop_before_pixels=True) for uid in uids]


def _ordered_sources(label_map: LabelMap,
                     datasets: Sequence[Dataset]) -> tuple[list[Dataset], list[hd.PlanePositionSequence] | None]:
    """The datasets in the order highdicom maps them onto frames, checked against the label map.

    Returns the datasets and, where the label map holds only some frames of one multi-frame
    instance (the others set aside), the plane position of each frame, from which highdicom
    finds the source frames.
    """
    geometry = label_map.series.geometry
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    uids = list(dict.fromkeys(g.sop_instance_uid for g in geometry))
    missing = [uid for uid in uids if uid not in by_uid]
    if missing:
        raise ValueError(f"source_datasets lack {len(missing)} instance(s) of the label map's series")
    if len(uids) == len(geometry):
        return [by_uid[uid] for uid in uids], None
    if len(uids) == 1:
        source = by_uid[uids[0]]
        numbers = [g.frame_number for g in geometry]
        if numbers == list(range(1, int(source.get("NumberOfFrames", 1)) + 1)):
            return [source], None
        positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, list(g.position)) for g in geometry]
        return [source], positions
    # highdicom maps SEG frames onto either single-frame instances or the frames of exactly one
    # multi-frame instance; a series of several multi-frame instances fits neither.
    raise ValueError(
        f"the label map's {len(geometry)} frames come from {len(uids)} instances, not from one "
        "frame per instance or frames of one multi-frame instance: a SEG cannot reference them")


def orientation_groups(label_map: LabelMap, source_datasets: Sequence[Dataset] | None = None) -> list[list[int]]:
    """Frame indices of each SEG the label map needs: one group per orientation and pixel grid.

    The groups are the series' stacks (:attr:`inference.geometry.SeriesImage.stacks`: the same
    orientation within 1e-3, matrix and spacing), in the source order of their first frame. With
    ``source_datasets`` of single-frame instances, a stack is split further where the written
    ImageOrientationPatient values differ at all, since highdicom compares them exactly.

    Raises
    ------
    ValueError
        When ``source_datasets`` lack an instance of the label map's series.
    """
    series = label_map.series
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets or ()}
    missing = {g.sop_instance_uid for g in series.geometry} - set(by_uid) if source_datasets is not None else set()
    if missing:
        raise ValueError(f"source_datasets lack {len(missing)} instance(s) of the label map's series")
    groups: list[list[int]] = []
    for stack in series.stacks:
        split: dict[tuple, list[int]] = {}
        for index in sorted(stack):
            ds = by_uid.get(series.geometry[index].sop_instance_uid)
            written = ds.get("ImageOrientationPatient") if ds is not None else None
            split.setdefault(tuple(str(v) for v in written) if written else (), []).append(index)
        groups.extend(split.values())
    return sorted(groups, key=lambda group: group[0])


def _segment_order(label_map: LabelMap) -> list[int]:
    present = label_map.values_present()
    return sorted(present, key=lambda v: (label_map.meaning[v].muscle.index,
                                          tuple(Side).index(label_map.meaning[v].side)))


def _description(number: int, muscle: Muscle, side: Side, label: str, identity: ResultIdentity,
                 algorithm: hd.AlgorithmIdentificationSequence) -> hd.seg.SegmentDescription:
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=ANATOMICAL_STRUCTURE,
        segmented_property_type=muscle.code,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=identity.uid("seg", "segment", muscle, side),
        tracking_id=label,
        anatomic_regions=[LUMBAR_SPINE],
        display_color=hd.color.CIELabColor(*_lab(muscle.colour(side))),
    )
    modifier = hd.sr.CodedConcept.from_code(side.code)
    description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
    return description


def _lab(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """CIE L*a*b* (D65) of an sRGB colour, as DICOM's RecommendedDisplayCIELabValue needs."""
    linear = [((c / 255 + 0.055) / 1.055) ** 2.4 if c / 255 > 0.04045 else c / 255 / 12.92 for c in rgb]
    matrix = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = matrix @ np.asarray(linear) / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return float(116 * f[1] - 16), float(500 * (f[0] - f[1])), float(200 * (f[1] - f[2]))


def build_segmentations(
    label_map: LabelMap,
    card_name: str,
    card_version: str,
    identity: ResultIdentity,
    software_version: str,
    source_datasets: Sequence[Dataset] | None = None,
    *,
    device_serial_number: str = MANUFACTURER,
) -> list[hd.seg.Segmentation]:
    """BINARY DICOM SEGs of a label map: one per orientation group, one frame per source frame and segment.

    Parameters
    ----------
    label_map : LabelMap
        Labels on the source grid; every label value present becomes a segment (in every SEG,
        with the same number).
    card_name, card_version : str
        The model card's name and version (algorithm identification, series description).
    identity : ResultIdentity
        Source of the series, instance and segment tracking UIDs.
    software_version : str
        musclenode's version (SoftwareVersions, algorithm source).
    source_datasets : sequence of Dataset, optional
        The source instances (headers suffice). Read from ``label_map.series.source_paths``
        when not given.
    device_serial_number : str
        DeviceSerialNumber: the installation (for example the node's AE title).

    Returns
    -------
    list of highdicom.seg.Segmentation
        One per :func:`orientation_groups` group, in that order: a single SEG with the plain
        result UIDs for a series of one orientation; otherwise part k of n with UIDs of its own.

    Raises
    ------
    ValueError
        When the label map has no label, or its frames cannot be mapped onto source instances.
    """
    values = _segment_order(label_map)
    if not values:
        raise ValueError("the label map contains no muscle: there is nothing to segment")
    datasets = list(source_datasets) if source_datasets is not None else source_datasets_of(label_map)
    groups = orientation_groups(label_map, datasets)
    if len(groups) == 1:
        return [_segmentation(label_map, values, datasets, card_name, card_version, identity, software_version,
                              device_serial_number, None)]
    parts = []
    for number, group in enumerate(groups, start=1):
        part = LabelMap(label_map.series.select(group), tuple(label_map.labels[i] for i in group),
                        label_map.meaning, label_map.model_name, label_map.model_version)
        parts.append(_segmentation(part, values, datasets, card_name, card_version, identity, software_version,
                                   device_serial_number, (number, len(groups))))
    return parts


def build_segmentation(
    label_map: LabelMap,
    card_name: str,
    card_version: str,
    identity: ResultIdentity,
    software_version: str,
    source_datasets: Sequence[Dataset] | None = None,
    *,
    device_serial_number: str = MANUFACTURER,
) -> hd.seg.Segmentation:
    """The one BINARY DICOM SEG of a label map whose frames share one orientation.

    Parameters are those of :func:`build_segmentations`.

    Raises
    ------
    ValueError
        When the label map has no label, its frames cannot be mapped onto source instances, or
        they lie in several orientations (use :func:`build_segmentations`).
    """
    datasets = list(source_datasets) if source_datasets is not None else source_datasets_of(label_map)
    groups = orientation_groups(label_map, datasets)
    if len(groups) > 1:
        raise ValueError(f"the label map's frames lie in {len(groups)} orientations; one SEG holds one "
                         "orientation: build one per orientation group with build_segmentations")
    return build_segmentations(label_map, card_name, card_version, identity, software_version, datasets,
                               device_serial_number=device_serial_number)[0]


def _segmentation(label_map: LabelMap, values: Sequence[int], source_datasets: Sequence[Dataset], card_name: str,
                  card_version: str, identity: ResultIdentity, software_version: str, device_serial_number: str,
                  part: tuple[int, int] | None) -> hd.seg.Segmentation:
    """One SEG of a label map whose frames share one orientation; segments numbered in ``values`` order."""
    datasets, plane_positions = _ordered_sources(label_map, source_datasets)
    # The SEG repeats the patient's attributes of the first source: as the node read them.
    datasets = [result_header(datasets[0]), *datasets[1:]]
    equipment = Equipment(software_version, f"{card_name} {card_version}", device_serial_number)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=fit_lo(card_name), family=ALGORITHM_FAMILY, version=fit_lo(card_version), source=equipment.source)
    lookup = np.zeros(256, dtype=np.uint16)
    descriptions = []
    for number, value in enumerate(values, start=1):
        info = label_map.meaning[value]
        lookup[value] = number
        descriptions.append(_description(number, info.muscle, info.side, info.name, identity, algorithm))
    # Values the label map does not describe cannot occur (LabelMap checks), so the lookup maps
    # every pixel onto a segment number or background.
    pixels = lookup[np.stack(label_map.labels)]
    series = label_map.series
    description = ("Paraspinal muscle segmentation, research use only" if part is None
                   else f"Paraspinal muscles, research use only; orientation {part[0]} of {part[1]}")
    return hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        **ResultSeries.SEG.identification(identity, series.series_number, model=equipment.model, part=part),
        **equipment.general_equipment(),
        omit_empty_frames=False,
        plane_positions=plane_positions,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_label="MUSCLES",
        content_description=fit_lo(description),
    )


def _same_code(item: Dataset, member: Muscle | Side) -> bool:
    return (item.CodeValue, item.CodingSchemeDesignator) == (member.code.value, member.code.scheme_designator)


def _muscle_of(item: Dataset) -> Muscle | None:
    return next((muscle for muscle in Muscle if _same_code(item, muscle)), None)


def _side_of(item: Dataset) -> Side | None:
    modifiers = item.get("SegmentedPropertyTypeModifierCodeSequence", [])
    return next((side for modifier in modifiers for side in Side if _same_code(modifier, side)), None)


def segments(seg: Dataset) -> dict[tuple[str, str], SegmentRef]:
    """The segments of a musclenode SEG by ``(muscle, side)``, read from the SEG itself.

    Segments whose property type or laterality is not one of musclenode's are left out.
    """
    found: dict[tuple[str, str], SegmentRef] = {}
    for item in seg.SegmentSequence:
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        muscle, side = _muscle_of(kind), _side_of(kind)
        if muscle is None or side is None:
            continue
        found[(muscle, side)] = SegmentRef(
            number=int(item.SegmentNumber), muscle=muscle, side=side, label=str(item.SegmentLabel),
            tracking_id=str(item.get("TrackingID", "")), tracking_uid=str(item.get("TrackingUID", "")))
    return found


def segment_numbers(seg: Dataset, label_map: LabelMap) -> dict[int, int]:
    """``{label value: segment number}`` for every label value of ``label_map`` the SEG holds."""
    by_key = segments(seg)
    return {value: by_key[(info.muscle, info.side)].number
            for value, info in label_map.meaning.items() if (info.muscle, info.side) in by_key}


def segment_frames(seg: Dataset) -> dict[tuple[int, str, int], int]:
    """``{(segment number, source SOP Instance UID, source frame number): SEG frame number}``.

    Source frame numbers are 1 for single-frame sources, as in :class:`FrameGeometry`.
    """
    frames: dict[tuple[int, str, int], int] = {}
    for number, item in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for derivation in item.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                source_frames = source.get("ReferencedFrameNumber") or [1]
                if not isinstance(source_frames, (list, pydicom.multival.MultiValue)):
                    source_frames = [source_frames]
                for frame in source_frames:
                    frames[(segment, str(source.ReferencedSOPInstanceUID), int(frame))] = number
    return frames
