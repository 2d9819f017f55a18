"""TID 1500 Measurement Report: the muscles' numbers in a Comprehensive 3D SR.

Structure of the report (PS3.16 TID 1500), built with highdicom's templates:

- observer context: the device, musclenode running the named model; subject context (TID 1007):
  the age and sex the reference comparisons used;
- procedure reported: MR (CID 100, see ``reports/CODES.md``);
- one TID 1411 volumetric group per muscle and side, referencing its SEG segment with the SEG's
  own tracking identifier and UID: volume, mean CSA, fat (Dixon fat fraction, or fat infiltration
  from T1/T2 clustering: different concepts, never mixed), functional CSA, and the grades. A
  series of several orientations has one SEG per orientation group (:mod:`reports.seg`), and a
  muscle's segment then lies in several SEGs, which one TID 1411 row cannot reference: the group
  is then a TID 1501 group with the segments' tracking identifier and UID (the same in every
  SEG), and its slices' TID 1410 groups reference each SEG frame they measure;
- one TID 1501 group per muscle for both sides together (the left/right asymmetry lives there),
  and one per muscle, side and vertebral level when levels are known;
- one TID 1410 planar group per muscle, side and slice, referencing the SEG frame of that slice:
  the cross-sectional area (and the slice's fat fraction for Dixon);
- at the key slice of each disc level (the frame nearest the middle of the disc,
  :attr:`reports.metrics.MuscleMetrics.key_slice`), one TID 1410 planar group per muscle and side
  whose region is the muscle's outline on that image, a closed SCOORD POLYLINE in the image's
  pixel coordinates referencing the source image (and frame): the slice's area and fat as above,
  with the muscle, side and disc as finding sites: image-anchored measurements, for viewers that
  show only those. OHIF 3.13.2 lists neither these nor anything of this report (see
  tests/test_viewer.py): the same outlines go out in the form it lists as a document of their own,
  :mod:`reports.outline_report`;
- z-score and percentile against the reference standard as measurements of their own, each
  INFERRED FROM a copy of the measured value and from a TEXT that cites the reference group and
  gives the equation with the group's mean and SD;
- the grades as coded qualitative evaluations of their group (the citation's short form is in
  the concept's meaning);
- document-level qualitative evaluations (TEXT): the research-use statement, the patient values
  the comparisons used (age, sex, height, weight, BMI, and what was missing and why), per group
  the full citations of its grades and why a comparison was not made, and the images set aside
  (:mod:`inference.set_aside`): a count by kind, then one TEXT per image, concept
  ``(SETASIDE, 99MUSCLENODE, "Image set aside")``, naming its series, instance, frame, kind and
  reason, so that software finds them by the concept and a person reads them.

UIDs come from :class:`reports.uids.ResultIdentity`; the device observer UID from
:func:`reports.uids.derive_uid`, because it names the device, not the study.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from highdicom.sr import (
    CoordinatesForMeasurement,
    GraphicTypeValues,
    ImageRegion,
    CodeContentItem,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    ReferencedSegment,
    ReferencedSegmentationFrame,
    RelationshipTypeValues,
    SourceImageForRegion,
    SourceImageForSegmentation,
    SourceSeriesForSegmentation,
    TextContentItem,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.geometry import LabelMap
from inference.patient import PatientContext, result_header
from inference.segmentation_quality import SegmentationQuality
from inference.set_aside import SetAside, describe_counts
from inference.vocabulary import FatQuantity, Laterality, Level, Muscle

from . import codes as mn
from .assessment import Assessment
from .equipment import MANUFACTURER, Equipment, ResultSeries, fit_lo
from .grades import fat_unreliable_reason
from .metrics import ALL_LEVELS, MuscleMetrics, SliceArea
from .reference import Comparison
from .seg import SegmentRef, segment_frames, segments, source_datasets_of
from .uids import ResultIdentity, derive_uid

__all__ = ["RESEARCH_STATEMENT", "build_report", "device_observation_context", "document_notes", "finding_sites", "is_multiframe",
           "key_slice_label", "key_slice_outline", "measurement_document", "outline", "research_note",
           "slice_measurements"]

RESEARCH_STATEMENT = (
    "For research use only. Not for diagnostic use: automated measurements by musclenode, not "
    "verified by a person.")
#: TID 1500 row "Qualitative Evaluations" (document level).
_QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
_FAT_CONCEPT = {FatQuantity.FAT_FRACTION: mn.FAT_FRACTION, FatQuantity.FAT_INFILTRATION: mn.FAT_INFILTRATION}
_EQUIVALENT_MEANING = Code("121050", "DCM", "Equivalent Meaning of Concept Name")
_MEANINGS = {("DCM", "121232"): "Source series for segmentation", ("DCM", "121233"): "Source image for segmentation"}
_TABLE_CITATION = Code("121422", "DCM", "Table of Values Citation")  # CID 228
_SUBJECT_CLASS = Code("121024", "DCM", "Subject Class")  # TID 1006 row 1


def _text(name: Code, value: str) -> TextContentItem:
    return TextContentItem(name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS)


def _relative(comparison: Comparison | None, measured: Code, value: float, unit: Code,
              what: str) -> list[Measurement]:
    """Z-score and percentile of a value (``what``, in words) in its reference group.

    Each is a NUM of its own, INFERRED FROM a copy of the measured value and from a TEXT that
    cites the reference group and gives the equation (TID 1419 rows 13 and 16, TID 300 rows 9
    and 12). TID 311 statistical properties would say the same on the measurement itself, but
    PixelMed's validator reads their NUM items as malformed INFERRED FROM rows.
    """
    if comparison is None or comparison.z is None or comparison.stratum is None:
        return []
    stratum = comparison.stratum
    source = (f"{stratum.description}, {stratum.kind} reference {stratum.version}"
              + (f", n {stratum.n}" if stratum.n else "") + f": {stratum.citation}")
    notes = [*comparison.notes, stratum.note] if stratum.note else list(comparison.notes)
    z_equation = stratum.equation or f"z against {stratum.version}"
    if stratum.kind == "site":
        percentile_text = f"{z_equation}; percentile: {comparison.percentile_basis}"
    else:
        z_equation += f" ({unit.value})"
        percentile_text = f"{z_equation}; percentile = 100 x normal CDF(z), {comparison.percentile_basis}"
    found = []
    for name, number, number_unit, equation in (
            (mn.Z_SCORE, comparison.z, mn.UNIT_NONE, z_equation),
            (mn.PERCENTILE, comparison.percentile, mn.UNIT_PERCENT, percentile_text)):
        derived = Measurement(name=name, value=number, unit=number_unit)
        # In the order of TID 1419's rows (13, 16, 18), which validators check.
        derived[0].ContentSequence = [
            NumContentItem(name=measured, value=value, unit=unit,
                           relationship_type=RelationshipTypeValues.INFERRED_FROM),
            TextContentItem(name=_TABLE_CITATION, value="; ".join([source, equation, *notes]),
                            relationship_type=RelationshipTypeValues.INFERRED_FROM),
            TextContentItem(name=_EQUIVALENT_MEANING, value=f"{name.meaning} of {what}",
                            relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD),
        ]
        found.append(derived)
    return found


def _measurements(assessment: Assessment) -> list[Measurement]:
    metrics = assessment.metrics
    found = []
    if metrics.volume_cm3 is not None:
        found.append(Measurement(name=mn.VOLUME, value=metrics.volume_cm3, unit=mn.UNIT_CM3))
    found.append(Measurement(name=mn.AREA, value=metrics.mean_csa_mm2, unit=mn.UNIT_MM2, derivation=mn.MEAN))
    found.extend(_relative(assessment.csa, mn.AREA, metrics.mean_csa_mm2, mn.UNIT_MM2, "mean cross-sectional area"))
    fat = metrics.fat
    if fat is not None and fat.mean_percent is not None:
        concept = _FAT_CONCEPT[fat.quantity]
        found.append(Measurement(name=concept, value=fat.mean_percent, unit=mn.UNIT_PERCENT, derivation=mn.MEAN,
                                 method=fat.method.code))
        found.extend(_relative(assessment.fat, concept, fat.mean_percent, mn.UNIT_PERCENT, fat.quantity.words))
    if metrics.functional_csa_mm2 is not None and fat is not None:
        found.append(Measurement(name=mn.FUNCTIONAL_CSA, value=metrics.functional_csa_mm2, unit=mn.UNIT_MM2,
                                 derivation=mn.MEAN, method=fat.method.code))
    if metrics.asymmetry_percent is not None:
        found.append(Measurement(name=mn.ASYMMETRY, value=metrics.asymmetry_percent, unit=mn.UNIT_PERCENT))
    return found


def _grade_shown(assessment: Assessment) -> bool:
    """A grade is reported when given, or when refused because the fat value is unreliable.

    Refusals because a grade is defined for the multifidus only would add a "not graded" to
    every other muscle and tell a reader nothing.
    """
    grade, fat = assessment.grade, assessment.metrics.fat
    if grade is None:
        return False
    unreliable = fat is not None and fat_unreliable_reason(fat.method, assessment.metrics.muscle) is not None
    return grade.graded or unreliable


def _evaluations(assessment: Assessment) -> tuple[list[QualitativeEvaluation], list[str]]:
    """Coded grades for the group, and for the document the citations and notes a reader needs."""
    coded: list[QualitativeEvaluation] = []
    notes: list[str] = []
    if _grade_shown(assessment):
        grade = assessment.grade
        value = mn.grade_value(int(grade.value)) if grade.graded else mn.NOT_GRADED
        coded.append(QualitativeEvaluation(name=mn.FAT_GRADE, value=value))
        notes.append(f"fat infiltration grade: {grade.label}. Source: {grade.citation}. {grade.note}")
    severe = assessment.severe
    if severe is not None and severe.graded:
        coded.append(QualitativeEvaluation(name=mn.SEVERE_MULTIFIDUS_FAT, value=mn.yes_no(bool(severe.value))))
        notes.append(f"multifidus fat: {severe.label}. Source: {severe.citation}. {severe.note}")
    if assessment.levels_note:
        notes.append(assessment.levels_note)
    fat = assessment.metrics.fat
    if fat is not None and fat.note:
        notes.append(fat.note)
    for what, comparison in (("fat", assessment.fat), ("mean CSA", assessment.csa)):
        if comparison is not None and comparison.reason:
            notes.append(f"no reference comparison of {what}: {comparison.reason}")
    return coded, notes


def _standard_meanings(group):
    """PS3.16's code meanings where highdicom capitalises them (validators compare meanings)."""
    for item in group[0].ContentSequence:
        name = item.ConceptNameCodeSequence[0]
        if (name.CodingSchemeDesignator, name.CodeValue) in _MEANINGS:
            name.CodeMeaning = _MEANINGS[(name.CodingSchemeDesignator, name.CodeValue)]
    return group


@functools.lru_cache(maxsize=None)
def _coded(code: Code) -> CodedConcept:
    """One highdicom CodedConcept per code, shared by every content item that names it.

    highdicom builds a new dataset for each Code it is given, and the SR's constructor
    deep-copies the whole tree; the per-slice groups name the same few codes thousands of times.
    A shared concept is never modified (it is written the same wherever it appears), so the
    document's bytes stay the same; the report is about 6 % cheaper to build.
    """
    return CodedConcept.from_code(code)


def finding_sites(muscle: Muscle, side: Laterality, levels: str | None = None) -> list[FindingSite]:
    """The muscle with its side, and the level: a slice level (a vertebral body such as ``L3``, or
    the intervertebral disc ``L3-L4``, CID 7304) by its own code, a range of bodies (``L1-L5``, as
    published references state theirs) by each body's code."""
    sites = [FindingSite(anatomic_location=_coded(muscle.code), laterality=_coded(side.code))]
    if levels:
        try:
            codes_ = [Level.parse(levels).code]
        except (ValueError, KeyError):  # not a single body or disc: a range of bodies
            codes_ = mn.level_sites(levels)
        sites.extend(FindingSite(anatomic_location=_coded(code)) for code in codes_)
    return sites


def _label(assessment: Assessment) -> str:
    metrics = assessment.metrics
    name = metrics.muscle.words
    label = f"{name}, both sides" if metrics.side is Laterality.BOTH else f"{metrics.side} {name}"
    return label if metrics.level == ALL_LEVELS else f"{label}, {metrics.level}"


def _volumetric(assessment: Assessment, segment: SegmentRef, seg: Dataset,
                series_uid: str) -> VolumetricROIMeasurementsAndQualitativeEvaluations:
    metrics = assessment.metrics
    coded, _ = _evaluations(assessment)
    group = VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=segment.tracking_uid, identifier=segment.tracking_id),
        referenced_segment=ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=segment.number,
            source_series=SourceSeriesForSegmentation(series_uid)),
        finding_type=_coded(metrics.muscle.code),
        finding_sites=finding_sites(metrics.muscle, metrics.side),
        measurements=_measurements(assessment),
        qualitative_evaluations=coded or None,
    )
    return _standard_meanings(group)


def _image_free(assessment: Assessment, identity: ResultIdentity,
                segment: SegmentRef | None = None) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501: a group that no single segment outlines (both sides, a level range, or a segment
    that lies in several SEGs, whose tracking identifier and UID it then carries)."""
    metrics = assessment.metrics
    level = None if metrics.level == ALL_LEVELS else metrics.level
    coded, _ = _evaluations(assessment)
    tracking = (TrackingIdentifier(uid=segment.tracking_uid, identifier=segment.tracking_id) if segment is not None
                else TrackingIdentifier(uid=identity.uid("sr", "group", metrics.muscle, metrics.side, metrics.level),
                                        identifier=_label(assessment)))
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=_coded(metrics.muscle.code),
        finding_sites=finding_sites(metrics.muscle, metrics.side, level),
        measurements=_measurements(assessment),
        qualitative_evaluations=coded or None,
    )


def slice_measurements(area: SliceArea, metrics: MuscleMetrics,
                       coordinates: CoordinatesForMeasurement | None = None) -> list[Measurement]:
    """A slice's cross-sectional area, and its fat by the group's method when measured per slice.

    ``coordinates`` (TID 1501 groups only: TID 300's INFERRED FROM SCOORD row) is the outline the
    area was measured in, placed under the area's NUM."""
    measurements = [Measurement(name=_coded(mn.AREA), value=area.area_mm2, unit=_coded(mn.UNIT_MM2),
                                referenced_coordinates=None if coordinates is None else [coordinates])]
    fat = metrics.fat
    if area.fat_percent is not None and fat is not None:
        measurements.append(Measurement(name=_coded(_FAT_CONCEPT[fat.quantity]), value=area.fat_percent,
                                        unit=_coded(mn.UNIT_PERCENT), derivation=_coded(mn.MEAN),
                                        method=_coded(fat.method.code)))
    return measurements


def _planar(area: SliceArea, assessment: Assessment, segment: SegmentRef, seg: Dataset, seg_frame: int,
            source_class: str, multiframe: bool,
            identity: ResultIdentity) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    metrics = assessment.metrics
    source = SourceImageForSegmentation(
        referenced_sop_class_uid=source_class, referenced_sop_instance_uid=area.sop_instance_uid,
        referenced_frame_numbers=[area.frame_number] if multiframe else None)
    group = PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=identity.uid("sr", "slice", metrics.muscle, metrics.side, area.sop_instance_uid,
                             str(area.frame_number)),
            identifier=f"{segment.tracking_id}, slice {area.frame_index + 1}"),
        referenced_segment=ReferencedSegmentationFrame(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, frame_number=seg_frame,
            segment_number=segment.number, source_image=source),
        finding_type=_coded(metrics.muscle.code),
        finding_sites=finding_sites(metrics.muscle, metrics.side),
        measurements=slice_measurements(area, metrics),
    )
    # PS3.3 C.18.3: Referenced Segment Number is only for a SEG referenced without frames; with a
    # frame number the frame already names the segment, and dciodvfy rejects both together.
    for item in group[0].ContentSequence:
        if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeValue == "121214":
            for reference in item.ReferencedSOPSequence:
                if "ReferencedFrameNumber" in reference:
                    del reference.ReferencedSegmentNumber
    return _standard_meanings(group)


def outline(mask: np.ndarray) -> np.ndarray | None:
    """The largest outline of a binary mask as a closed polyline in DICOM image coordinates.

    The outline is the 0.5 iso-line of the mask (contourpy, as matplotlib draws the summary
    pages' outlines): it runs half-way between the pixel centres inside and outside. Coordinates
    are (column, row) pairs as SCOORD wants them (PS3.3 C.18.6.1.1): the top left corner of the
    top left pixel is (0, 0), so the centre of pixel (row r, column c) is (c + 0.5, r + 0.5).
    Of several outlines (several pieces of the muscle, holes) the one enclosing the largest area
    is kept. The first point is repeated at the end (closed).

    Returns
    -------
    numpy.ndarray or None
        ``(n, 2)`` float32, or None for an empty mask.
    """
    import contourpy

    if not mask.any():
        return None
    # A background border, so that a muscle touching the image edge still gets a closed outline.
    padded = np.pad(mask.astype(np.float64), 1)
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(0.5)

    def enclosed(line: np.ndarray) -> float:
        x, y = line[:, 0], line[:, 1]
        return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2

    best = max(lines, key=enclosed)
    if not np.array_equal(best[0], best[-1]):
        best = np.vstack([best, best[:1]])
    # Padded index (x, y) of a pixel centre is (c + 1, r + 1); DICOM puts that centre at (c + .5, r + .5).
    return (best - 0.5).astype(np.float32)


def key_slice_outline(assessment: Assessment, label_map: LabelMap, source_class: str,
                      multiframe: bool) -> tuple[np.ndarray, SourceImageForRegion] | None:
    """A muscle's outline at its disc level's key slice (:func:`outline`) and the source image
    (and frame) it lies on; None where the group has no key slice (not a disc level, both sides
    together) or the muscle has no pixel there."""
    metrics = assessment.metrics
    area = metrics.key_slice
    if area is None or metrics.side is Laterality.BOTH or not metrics.label_values:
        return None
    points = outline(np.isin(label_map.labels[area.frame_index], metrics.label_values))
    if points is None:
        return None
    return points, SourceImageForRegion(
        referenced_sop_class_uid=source_class, referenced_sop_instance_uid=area.sop_instance_uid,
        referenced_frame_numbers=[area.frame_number] if multiframe else None)


def _key_slice_outline(assessment: Assessment, label_map: LabelMap, source_class: str, multiframe: bool,
                       identity: ResultIdentity) -> PlanarROIMeasurementsAndQualitativeEvaluations | None:
    """TID 1410 at a disc level's key slice: the muscle's outline there (a closed SCOORD POLYLINE
    on the source image) with that slice's area and fat, the muscle, side and disc as sites."""
    found = key_slice_outline(assessment, label_map, source_class, multiframe)
    if found is None:
        return None
    points, source = found
    metrics = assessment.metrics
    area = metrics.key_slice
    region = ImageRegion(graphic_type=GraphicTypeValues.POLYLINE, graphic_data=points, source_image=source)
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=identity.uid("sr", "key slice", metrics.muscle, metrics.side, metrics.level, area.sop_instance_uid,
                             str(area.frame_number)),
            identifier=key_slice_label(assessment)),
        referenced_region=region,
        finding_type=_coded(metrics.muscle.code),
        finding_sites=finding_sites(metrics.muscle, metrics.side, metrics.level),
        measurements=slice_measurements(area, metrics),
    )


def key_slice_label(assessment: Assessment) -> str:
    """The key-slice outline's name in words, e.g. "left multifidus, L4-L5, key slice"."""
    return f"{_label(assessment)}, key slice"


def _subject_context(patient: PatientContext | None) -> list:
    """TID 1006/1007 Subject Context, Patient: the age and sex the comparisons used.

    Only the values the node used are written (TID 1007's rows are optional): Subject Age in
    years as a NUM (CID 7456 unit ``a``), Subject Sex coded (CID 7455). The patient module of
    the SR carries the header's identity; height, weight and BMI, which TID 1007 has no row
    for, are in the document's statement of the patient values.
    """
    if patient is None or (patient.age_years is None and patient.sex is None):
        return []
    context = RelationshipTypeValues.HAS_OBS_CONTEXT
    items: list = [CodeContentItem(name=_SUBJECT_CLASS, value=codes.DCM.Patient, relationship_type=context)]
    if patient.sex is not None:
        items.append(CodeContentItem(name=codes.DCM.SubjectSex, value=patient.sex.code, relationship_type=context))
    if patient.age_years is not None:
        items.append(NumContentItem(name=codes.DCM.SubjectAge, value=round(patient.age_years, 2),
                                    unit=codes.UCUM.Year, relationship_type=context))
    return items


def _set_aside_notes(items: Sequence[SetAside]) -> list[TextContentItem]:
    """The images set aside: their count by kind (a comment), then one TEXT per image."""
    if not items:
        return []
    notes = [_text(mn.COMMENT, describe_counts(items) + ". They are in no segmentation and no measurement.")]
    for item in items:
        frame = f", frame {item.frame_number}" if item.multi_frame and item.frame_number is not None else ""
        number = f" (instance number {item.instance_number})" if item.instance_number is not None else ""
        notes.append(_text(mn.SET_ASIDE, f"series {item.series_instance_uid}, instance "
                                         f"{item.sop_instance_uid or '(unreadable file)'}{number}{frame}: "
                                         f"{item.kind}; {item.detail}"))
    return notes


def _quality_items(quality: SegmentationQuality | None) -> list:
    """The verdict (CODE), its reason and one TEXT per excluded image with its problems."""
    if quality is None:
        return []
    context = RelationshipTypeValues.CONTAINS
    items: list = [CodeContentItem(name=mn.SEGMENTATION_QUALITY, value=mn.verdict_value(quality.verdict),
                                   relationship_type=context)]
    if quality.reason:
        items.append(_text(mn.COMMENT, f"Segmentation quality control: {quality.verdict}. {quality.reason}."))
    for check in quality.excluded:
        items.append(_text(mn.EXCLUDED_IMAGE, f"instance {check.sop_instance_uid} ({check.where}): "
                                              + "; ".join(check.problems)))
    return items


def _not_measured_group(quality: SegmentationQuality, identity: ResultIdentity) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 without measurements: the lumbar paraspinal muscles, tried and not measured."""
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=identity.uid("sr", "group", "not measured"),
                                               identifier="Lumbar paraspinal muscles: not measured"),
        finding_type=mn.ANATOMICAL_STRUCTURE,
        finding_sites=[FindingSite(anatomic_location=mn.LUMBAR_SPINE)],
        qualitative_evaluations=[QualitativeEvaluation(name=mn.SEGMENTATION_QUALITY,
                                                       value=mn.verdict_value(quality.verdict))],
    )


def research_note(card_name: str, card_version: str) -> TextContentItem:
    """The research-use statement with the segmentation model, as every report states it."""
    return _text(mn.COMMENT, f"{RESEARCH_STATEMENT} Segmentation model: {card_name} {card_version}.")


def is_multiframe(series) -> bool:
    """Whether frames of the series share instances (enhanced multi-frame): references then name the frame."""
    return len({g.sop_instance_uid for g in series.geometry}) < len(series.geometry)


def device_observation_context(card_name: str, card_version: str, software_version: str,
                               device_serial_number: str = MANUFACTURER,
                               patient: PatientContext | None = None) -> ObservationContext:
    """TID 1001: musclenode running the named model as the device observer (its UID names the
    device, not the study), and the subject context the comparisons used (:func:`_subject_context`)."""
    equipment = Equipment(software_version, f"{card_name} {card_version}", device_serial_number)
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=derive_uid("musclenode", "device observer", card_name, card_version, software_version,
                           device_serial_number),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=fit_lo(equipment.model),
            serial_number=fit_lo(device_serial_number),
        ),
    )
    context = ObservationContext(observer_device_context=observer)
    context.extend(_subject_context(patient))
    return context


def _document_notes(assessments: Sequence[Assessment], patient: PatientContext | None, card_name: str,
                    card_version: str, set_aside: Sequence[SetAside] = (),
                    quality: SegmentationQuality | None = None) -> ContainerContentItem:
    """TID 1500 row 12: the research-use statement, the patient values, the fat method in words,
    each group's sources, and the images set aside.

    The grade citations and notes are TEXT here rather than beside the coded grade in its group,
    because the document-level container is where every validator accepts free text.
    """
    items = [research_note(card_name, card_version)]
    items.extend(_quality_items(quality))
    if patient is not None:
        known = []
        if patient.age_years is not None:
            known.append(f"age {patient.age_years:.1f} years ({patient.age_source})")
        if patient.sex is not None:
            known.append(f"sex {patient.sex}")
        if patient.height_m is not None:
            known.append(f"height {patient.height_m:.2f} m")
        if patient.weight_kg is not None:
            known.append(f"weight {patient.weight_kg:g} kg")
        if patient.bmi is not None:
            known.append(f"BMI {patient.bmi:.1f} kg/m2")
        text = "Patient values used for the reference comparison: " + (", ".join(known) or "none")
        if patient.missing:
            text += f"; missing: {patient.explanation()}"
        if patient.notes:
            text += "; " + "; ".join(patient.notes)
        items.append(_text(mn.COMMENT, text))
    # Each fat method once, in words, with its limits (two-point Dixon: nothing above 50 %): the
    # measurements name it only by its code.
    methods = sorted({a.metrics.fat.method for a in assessments if a.metrics.fat is not None})
    for method in methods:
        items.append(_text(mn.COMMENT, f"Fat ({method.code.value}, {method.code.scheme_designator}): "
                                       f"{method.description}."))
    for assessment in assessments:
        _, notes = _evaluations(assessment)
        if notes:
            items.append(_text(mn.COMMENT, f"{_label(assessment)}: " + " | ".join(notes)))
    items.extend(_set_aside_notes(set_aside))
    return document_notes(items)


def document_notes(items: Sequence) -> ContainerContentItem:
    """TID 1500 row 12, the document's Qualitative Evaluations container, holding ``items``."""
    container = ContainerContentItem(name=_QUALITATIVE_EVALUATIONS,
                                     relationship_type=RelationshipTypeValues.CONTAINS)
    container.ContentSequence = list(items)
    return container


def build_report(
    label_map: LabelMap,
    segmentation: Dataset | Sequence[Dataset],
    assessments: Sequence[Assessment],
    identity: ResultIdentity,
    card_name: str,
    card_version: str,
    software_version: str,
    patient: PatientContext | None = None,
    *,
    source_datasets: Sequence[Dataset] | None = None,
    device_serial_number: str = MANUFACTURER,
    quality: SegmentationQuality | None = None,
) -> Comprehensive3DSR:
    """The TID 1500 Measurement Report of one label map's assessments.

    Parameters
    ----------
    label_map : LabelMap
        The labels the SEG was made from (its series is the source of both).
    segmentation : Dataset or sequence of Dataset
        The SEG from :func:`reports.seg.build_segmentation`, or the SEGs of every orientation
        group from :func:`reports.seg.build_segmentations` (or read back from their files).
    assessments : sequence of Assessment
        From :func:`reports.assessment.assess`: per muscle, side (left, right, both) and level.
    identity : ResultIdentity
        Source of the SR's UIDs and of the tracking UIDs of groups that have no SEG segment.
    card_name, card_version : str
        The model card's name and version.
    software_version : str
        musclenode's version.
    patient : PatientContext, optional
        The patient values the comparisons used; stated in the report when given.
    source_datasets : sequence of Dataset, optional
        Headers of the source instances; read from ``label_map.series.source_paths`` when not
        given.
    device_serial_number : str
        The installation, as in the SEG.
    quality : SegmentationQuality, optional
        The segmentation's verdict: coded in the document's qualitative evaluations with one
        TEXT per excluded image; when it is "not measured" (and ``assessments`` is empty) the
        report's only group is the lumbar paraspinal muscles with that verdict, and no number.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR

    Raises
    ------
    ValueError
        When an assessment of one side has no segment in the SEG, a slice has no SEG frame, or
        there is nothing to report (no assessment and no "not measured" verdict).
    """
    not_measured = quality is not None and not quality.measured
    if not assessments and not not_measured:
        raise ValueError("no assessments: there is nothing to report")
    if assessments and not_measured:
        raise ValueError("a series that was not measured has no assessments to report")
    segmentations = [segmentation] if isinstance(segmentation, Dataset) else list(segmentation)
    if not segmentations:
        raise ValueError("no SEG: the report measures segments")
    series = label_map.series
    sources = list(source_datasets) if source_datasets is not None else source_datasets_of(label_map)
    # (muscle, side) -> segment, and (muscle, side, source instance, source frame) -> (SEG, frame).
    by_key: dict[tuple[str, str], SegmentRef] = {}
    frames: dict[tuple[str, str, str, int], tuple[Dataset, int, SegmentRef]] = {}
    for seg in segmentations:
        found = segments(seg)
        by_number = {ref.number: (key, ref) for key, ref in found.items()}
        for key, ref in found.items():
            by_key.setdefault(key, ref)
        for (number, uid, frame), seg_frame in segment_frames(seg).items():
            if number in by_number:
                key, ref = by_number[number]
                frames[(*key, uid, frame)] = (seg, seg_frame, ref)
    multiframe = is_multiframe(series)

    groups: list = [_not_measured_group(quality, identity)] if not_measured else []
    planar: list = []
    outlines: list = []
    for assessment in assessments:
        metrics = assessment.metrics
        if metrics.level != ALL_LEVELS or metrics.side is Laterality.BOTH:
            groups.append(_image_free(assessment, identity))
            roi = _key_slice_outline(assessment, label_map, series.sop_class_uid, multiframe, identity)
            if roi is not None:
                outlines.append(roi)
            continue
        segment = by_key.get((metrics.muscle, metrics.side))
        if segment is None:
            raise ValueError(f"the SEG has no segment for the {metrics.side} {metrics.muscle}")
        if len(segmentations) == 1:
            groups.append(_volumetric(assessment, segment, segmentations[0], series.series_instance_uid))
        else:
            groups.append(_image_free(assessment, identity, segment))
        for area in metrics.slices:
            key = (metrics.muscle, metrics.side, area.sop_instance_uid, area.frame_number)
            if key not in frames:
                raise ValueError(f"no SEG has a frame of the {metrics.side} {metrics.muscle} on source frame "
                                 f"{area.frame_number} of instance {area.sop_instance_uid}")
            seg, seg_frame, ref = frames[key]
            planar.append(_planar(area, assessment, ref, seg, seg_frame, series.sop_class_uid, multiframe,
                                  identity))

    notes = _document_notes(assessments, patient, card_name, card_version, label_map.set_aside, quality)
    return measurement_document(groups + planar + outlines, notes, [*sources, *segmentations], ResultSeries.SR,
                                identity, series.series_number, card_name, card_version, software_version,
                                device_serial_number, patient)


def measurement_document(groups: Sequence, notes: ContainerContentItem, evidence: Sequence[Dataset],
                         result_series: ResultSeries, identity: ResultIdentity, source_series_number: int | None,
                         card_name: str, card_version: str, software_version: str,
                         device_serial_number: str = MANUFACTURER,
                         patient: PatientContext | None = None) -> Comprehensive3DSR:
    """A complete, final Comprehensive 3D SR holding a TID 1500 Measurement Report.

    The report has the device observation context (:func:`device_observation_context`), the
    procedure reported, ``groups`` as its imaging measurements and ``notes`` (the document's
    Qualitative Evaluations, :func:`document_notes`); the document is ``result_series``'
    (:meth:`reports.equipment.ResultSeries.identification`) and repeats the patient's attributes of
    its first evidence as the node read them (:func:`inference.patient.result_header`).
    """
    evidence = [result_header(evidence[0]), *evidence[1:]]
    report = MeasurementReport(
        observation_context=device_observation_context(card_name, card_version, software_version,
                                                       device_serial_number, patient),
        procedure_reported=mn.PROCEDURE_REPORTED,
        imaging_measurements=list(groups),
    )
    report[0].ContentSequence.append(notes)
    equipment = Equipment(software_version, f"{card_name} {card_version}", device_serial_number)
    return Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        **result_series.identification(identity, source_series_number),
        **equipment.general_equipment(),
        is_complete=True,
        is_final=True,
        coding_schemes=[mn.coding_scheme()],
    )
