"""The key-slice outlines as an SR document of their own, in the form viewers turn into tools.

The main report (:mod:`reports.sr`) has each muscle's outline at each disc level's key slice as
a TID 1410 planar ROI. OHIF 3.13.2 cannot use those (tests/test_viewer.py): it stops on the
main report's groups without coordinates, and its measurement panel lists only measurements it
"hydrates" into its cornerstone tools, which needs

- a TID 1501 group whose tracking identifier names a cornerstone tool
  (:data:`CORNERSTONE_FREEHAND`), and
- the outline under the group's first NUM as INFERRED FROM SCOORD (TID 300's row, as dcmjs
  writes measurements), not as the group's own region (TID 1410).

This module writes that document: a Comprehensive 3D SR (TID 1500) whose imaging measurements
are only those groups, one per disc level x muscle x side, each with

- tracking identifier :data:`CORNERSTONE_FREEHAND`, and a tracking UID derived from the result
  identity, the muscle, side, disc and key slice;
- finding type the muscle; finding sites the muscle with its laterality and the disc (as the
  main report codes them, :func:`reports.sr.finding_sites`);
- the area NUM (cross-sectional area, mm2), with the closed outline (:func:`reports.sr.outline`)
  INFERRED FROM it as a SCOORD POLYLINE on the source image (and frame), then the fat NUM of
  that slice where fat is measured per slice (Dixon): the main report's values
  (:attr:`reports.metrics.MuscleMetrics.key_slice`, the cohort's ``key_slice_*`` columns).

The document-level notes state the research use and name the main report's TID 1410 group that
each outline repeats, since the tracking identifier no longer says it in words. It is a series
of its own (:attr:`reports.equipment.ResultSeries.OUTLINES`) with the source images of the
outlines as evidence. Nothing is written for a series without key slices (no disc level, or not
measured).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pydicom
from highdicom.sr import (
    Comprehensive3DSR,
    ContainerContentItem,
    CoordinatesForMeasurement,
    GraphicTypeValues,
    MeasurementsAndQualitativeEvaluations,
    RelationshipTypeValues,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset

from inference.geometry import LabelMap
from inference.patient import PatientContext
from inference.segmentation_quality import SegmentationQuality

from . import codes as mn
from .assessment import Assessment
from .equipment import MANUFACTURER, ResultSeries
from .sr import (document_notes, finding_sites, is_multiframe, key_slice_label, key_slice_outline, measurement_document,
                 research_note, slice_measurements)
from .uids import ResultIdentity

__all__ = ["CORNERSTONE_FREEHAND", "build_outline_report"]

#: Tracking identifier of every group: the name under which cornerstone (OHIF's image library)
#: writes, and hydrates, a freehand planar ROI. OHIF lists in its measurement panel only groups
#: that name one of its tools (or a 4-5 point rectangle); TID 1501's tracking identifier is free
#: text, so other viewers just show it, and the muscle, side and disc are the finding sites.
CORNERSTONE_FREEHAND = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"


def _group(assessment: Assessment, label_map: LabelMap, multiframe: bool,
           identity: ResultIdentity) -> MeasurementsAndQualitativeEvaluations | None:
    found = key_slice_outline(assessment, label_map, label_map.series.sop_class_uid, multiframe)
    if found is None:
        return None
    points, source = found
    metrics = assessment.metrics
    area = metrics.key_slice
    coordinates = CoordinatesForMeasurement(graphic_type=GraphicTypeValues.POLYLINE, graphic_data=points,
                                            source_image=source)
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=identity.uid("outlines", "group", metrics.muscle, metrics.side, metrics.level,
                             area.sop_instance_uid, str(area.frame_number)),
            identifier=CORNERSTONE_FREEHAND),
        finding_type=metrics.muscle.code,
        finding_sites=finding_sites(metrics.muscle, metrics.side, metrics.level),
        measurements=slice_measurements(area, metrics, coordinates),
    )


def _notes(card_name: str, card_version: str, labels: Sequence[str], main_report_uid: str) -> ContainerContentItem:
    what = TextContentItem(
        name=mn.COMMENT, relationship_type=RelationshipTypeValues.CONTAINS,
        value=(f"Outlines at the key slice of each disc level (the image nearest the middle of the disc), "
               f"in the order of their groups: {'; '.join(labels)}. The same values, with every other "
               f"measurement, are in the measurement report {main_report_uid}. Each group's tracking "
               f"identifier is the viewer tool name {CORNERSTONE_FREEHAND}, under which viewers built on "
               "cornerstone (OHIF) list it; the muscle, side and disc are its finding sites."))
    return document_notes([research_note(card_name, card_version), what])


def build_outline_report(
    label_map: LabelMap,
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
) -> Comprehensive3DSR | None:
    """The key-slice outlines of one label map's assessments as their own TID 1500 document.

    Parameters are those of :func:`reports.sr.build_report` (no SEG: the outlines reference the
    source images). ``source_datasets``: headers of the source instances, from which those the
    outlines lie on are taken as evidence; read from ``label_map.series.source_paths`` when not
    given.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR or None
        None when no assessment has a key slice with muscle on it, or ``quality`` says the series
        was not measured.
    """
    if quality is not None and not quality.measured:
        return None
    series = label_map.series
    multiframe = is_multiframe(series)
    groups, labels, referenced = [], [], []
    for assessment in assessments:
        group = _group(assessment, label_map, multiframe, identity)
        if group is not None:
            groups.append(group)
            labels.append(key_slice_label(assessment))
            referenced.append(assessment.metrics.key_slice.sop_instance_uid)
    if not groups:
        return None
    referenced = list(dict.fromkeys(referenced))
    if source_datasets is not None:
        by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
        evidence = [by_uid[uid] for uid in referenced]
    else:
        evidence = [pydicom.dcmread(Path(series.source_paths[uid]), stop_before_pixels=True) for uid in referenced]
    main_report = ResultSeries.SR.identification(identity, series.series_number)["sop_instance_uid"]
    return measurement_document(groups, _notes(card_name, card_version, labels, main_report), evidence,
                                ResultSeries.OUTLINES, identity, series.series_number, card_name, card_version,
                                software_version, device_serial_number, patient)
