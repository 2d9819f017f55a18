"""The summary as DICOM: one Secondary Capture image per page, which every PACS viewer shows.

The SEG and the TID 1500 SR carry the results for software; many viewers show neither well
(OHIF shows no TID 1500 group without image coordinates). These pages are what reaches every
viewer: key slices with muscle outlines, the measurement table with the reference bands, and the
charts (drawn by :mod:`reports.render`).

Encoding decisions
------------------
- **One single-frame Secondary Capture Image per page** (SOP class 1.2.840.10008.5.1.4.1.1.7),
  built by highdicom's :class:`highdicom.sc.SCImage`: the oldest colour image object, shown by
  every viewer and PACS; the multi-frame true-colour SC is not shown page by page by some
  viewers, and the pages are few.
- RGB, 8 bits, PhotometricInterpretation RGB, PlanarConfiguration 0 (pixel-interleaved),
  Explicit VR Little Endian, uncompressed, so that no viewer needs a decoder.
- ConversionType ``WSD`` (workstation), Modality ``OT``: the pages are drawn, not converted from a
  modality's images.
- BurnedInAnnotation ``YES``: the pages carry the study date, age and sex as text. They carry no
  name, ID or birth date (see :mod:`reports.render`), but a de-identification tool should still
  review them, which ``YES`` asks for.
- Patient, study and clinical-trial attributes are copied from a source instance (highdicom's
  copy of the Patient and Study modules), so that the pages file into the same patient and
  study, with the patient's values as the node read them (:func:`inference.patient.result_header`);
  the type 2 ones are written empty when the source lacks them. SpecificCharacterSet is copied
  too, since the copied names are encoded in it. The scanner that acquired the source is named
  as contributing equipment.
- PatientOrientation is empty: a page is not a view of the patient (type 2C in the General
  Image module; highdicom asks for an orientation, which is then cleared).
- UIDs come from :class:`reports.uids.ResultIdentity` (``uid("summary", "series")``,
  ``uid("summary", "instance", "<page>")``), so that a re-run replaces the pages in the PACS.
- The first page references the key slices it shows (:attr:`reports.render.Page.frames`, so the
  disc levels' key slices or an excluded image where the page shows them; SourceImageSequence,
  purpose "source image for image processing operation"); the other pages reference every
  segmented instance.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from inference.geometry import LabelMap
from inference.patient import PatientContext, result_header
from inference.segmentation_quality import SegmentationQuality

from .assessment import Assessment
from .equipment import MANUFACTURER, Equipment, ResultSeries
from .render import RESEARCH_USE, Page, key_frames, render_pages
from .uids import ResultIdentity

__all__ = ["build_summary", "encode_pages", "render_pages", "write_pdf"]

#: The purpose of each reference to a source image (CID 7202).
_SOURCE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")


def _dicom_text(text: str) -> str:
    """Text for a DICOM string in the default repertoire (the copied charset may lack the dash)."""
    return text.replace("\u2014", "-").encode("ascii", "replace").decode("ascii")


def _source_from_series(label_map: LabelMap) -> Dataset:
    """Patient and study attributes from the series' own record, when no source header is given."""
    series = label_map.series
    patient, study = series.patient, series.study
    ds = Dataset()
    # The first source instance, standing in for its header: its class says which modules to copy.
    ds.SOPClassUID = series.sop_class_uid
    ds.SOPInstanceUID = series.geometry[0].sop_instance_uid
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex.value if patient.sex is not None else ""
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.StudyID = study.study_id
    ds.ReferringPhysicianName = study.referring_physician_name
    if study.study_description:
        ds.StudyDescription = study.study_description
    return ds


def _references(label_map: LabelMap, frames: Sequence[int]) -> DicomSequence:
    series = label_map.series
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = _SOURCE_PURPOSE
    by_instance: dict[str, list[int]] = {}
    for index in frames:
        geometry = series.geometry[index]
        by_instance.setdefault(geometry.sop_instance_uid, []).append(geometry.frame_number)
    items = []
    for uid, numbers in by_instance.items():
        item = Dataset()
        item.ReferencedSOPClassUID = series.sop_class_uid
        item.ReferencedSOPInstanceUID = uid
        multi_frame = sum(1 for g in series.geometry if g.sop_instance_uid == uid) > 1
        if multi_frame:
            item.ReferencedFrameNumber = sorted(numbers)
        item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
        items.append(item)
    return DicomSequence(items)


def encode_pages(
    pages: Sequence[Page],
    label_map: LabelMap,
    identity: ResultIdentity,
    source_dataset: Dataset | None,
    *,
    model_name: str,
    model_version: str,
    software_version: str,
    created: datetime | None = None,
    series_number: int | None = None,
    device_serial_number: str = MANUFACTURER,
) -> list[SCImage]:
    """Encode rendered pages as Secondary Capture Image instances of one new series.

    Parameters
    ----------
    pages : sequence of Page
        From :func:`reports.render.render_pages`.
    label_map : LabelMap
        The segmentation the pages show (its series is referenced).
    identity : ResultIdentity
        Makes the series and instance UIDs.
    source_dataset : pydicom.dataset.Dataset or None
        Any instance of the source series (the header is enough): patient, study and clinical
        trial attributes are copied from it. None takes the few the series itself recorded.
    model_name, model_version, software_version : str
        Written to SoftwareVersions and the derivation description.
    created : datetime, optional
        Content and creation date and time; defaults to now (UTC). Pass a fixed value for
        byte-identical re-runs.
    series_number : int, optional
        Defaults to :meth:`ResultSeries.number` of the source series.
    device_serial_number : str
        The installation, as in the SEG and the SR.
    quality : SegmentationQuality, optional
        The segmentation's verdict (see :func:`reports.render.render_pages`).

    Returns
    -------
    list of highdicom.sc.SCImage
        One per page, InstanceNumber 1, 2, ..., with file meta, ready to save or send.

    Raises
    ------
    ValueError
        When there is no page, a page is not uint8 RGB, or the source has no StudyInstanceUID.
    """
    if not pages:
        raise ValueError("no pages to encode")
    source = result_header(source_dataset) if source_dataset is not None else _source_from_series(label_map)
    if not str(source.get("StudyInstanceUID", "")).strip():
        raise ValueError("the source dataset has no StudyInstanceUID: the summary could not be filed in its study")
    created = created or datetime.now(timezone.utc)
    date, time = created.strftime("%Y%m%d"), created.strftime("%H%M%S")
    series = label_map.series
    equipment = Equipment(software_version, f"{model_name} {model_version}", device_serial_number)
    every_frame = range(len(series))
    shown = key_frames(label_map, 4)
    datasets = []
    for number, page in enumerate(pages, start=1):
        pixels = np.asarray(page.pixels)
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"page {number} must be uint8 RGB (rows, columns, 3), not {pixels.dtype} {pixels.shape}")
        identification = ResultSeries.SUMMARY.identification(identity, series.series_number, page=number)
        if series_number is not None:
            identification["series_number"] = series_number
        ds = SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=np.ascontiguousarray(pixels),
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            patient_orientation=("L", "P"),  # cleared below: a page is not a view of the patient
            **identification,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_date=date,
            series_time=time,
            content_date=date,
            content_time=time,
            **equipment.general_equipment(),
        )
        ds.copy_patient_and_study_information(source)
        # General Series: the body part decides whether Laterality is needed; it is the source's.
        ds.BodyPartExamined = source.get("BodyPartExamined") or "LSPINE"
        ds.PatientOrientation = ""
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        # SC Equipment and SC Image: drawn on a workstation, at the time of the results.
        ds.ConversionType = "WSD"
        ds.SecondaryCaptureDeviceManufacturer = MANUFACTURER
        ds.SecondaryCaptureDeviceManufacturerModelName = MANUFACTURER
        ds.SecondaryCaptureDeviceSoftwareVersions = equipment.software_versions[0]
        ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = date, time
        ds.ImageComments = _dicom_text(page.title)
        ds.DerivationDescription = _dicom_text(
            f"Summary of the automatic segmentation by {equipment.model} of series "
            f"{series.series_instance_uid}, drawn by {equipment.source}. {RESEARCH_USE}.")
        if page.frames:
            ds.SourceImageSequence = _references(label_map, page.frames)
        else:
            ds.SourceImageSequence = _references(label_map, shown if number == 1 else every_frame)
        ds.BurnedInAnnotation = "YES"
        ds.RecognizableVisualFeatures = "NO"
        ds.LossyImageCompression = "00"
        datasets.append(ds)
    return datasets


def build_summary(
    label_map: LabelMap,
    assessments: Sequence[Assessment],
    patient: PatientContext,
    identity: ResultIdentity,
    card_name: str,
    card_version: str,
    software_version: str,
    source_dataset: Dataset | None,
    *,
    created: datetime | None = None,
    series_number: int | None = None,
    device_serial_number: str = MANUFACTURER,
    quality: SegmentationQuality | None = None,
) -> list[SCImage]:
    """Render the summary pages and encode them as a Secondary Capture series.

    Parameters
    ----------
    label_map : LabelMap
        The segmentation, on the series it was made from.
    assessments : sequence of Assessment
        From :func:`reports.assessment.assess`.
    patient : PatientContext
        Age, sex and BMI shown in the page header.
    identity : ResultIdentity
        The UIDs of this set of results.
    card_name, card_version : str
        The segmentation model.
    software_version : str
        musclenode's version.
    source_dataset : pydicom.dataset.Dataset or None
        An instance of the source series; its patient and study attributes are copied (None: the
        few the series recorded).
    created : datetime, optional
        Creation date and time written to the instances (default now, UTC).
    series_number : int, optional
        Defaults to :meth:`ResultSeries.number` of the source series.
    device_serial_number : str
        The installation, as in the SEG and the SR.

    Returns
    -------
    list of highdicom.sc.SCImage
        One Secondary Capture Image per page: key slices, measurements (one or more pages),
        charts.
    """
    pages = render_pages(label_map, assessments, patient, model_name=card_name, model_version=card_version,
                         software_version=software_version, quality=quality)
    return encode_pages(pages, label_map, identity, source_dataset, model_name=card_name, model_version=card_version,
                        software_version=software_version, created=created, series_number=series_number,
                        device_serial_number=device_serial_number)


def write_pdf(pages: Sequence[Page | np.ndarray], path: str | Path, *,
              title: str = ResultSeries.SUMMARY.description()) -> Path:
    """Write the pages as one PDF, a page per image, for people outside the PACS.

    Parameters
    ----------
    pages : sequence of Page or numpy.ndarray
        Rendered pages (uint8 RGB).
    path : path-like
        Where to write; the folder must exist.
    title : str
        PDF document title.

    Returns
    -------
    Path
    """
    from PIL import Image

    images = []
    for page in pages:
        pixels = page.pixels if isinstance(page, Page) else np.asarray(page)
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"a page must be uint8 RGB (rows, columns, 3), not {pixels.dtype} {pixels.shape}")
        images.append(Image.fromarray(pixels, "RGB"))
    if not images:
        raise ValueError("no pages to write")
    path = Path(path)
    # 120 dpi prints a 1280-pixel-wide page about 27 cm wide: landscape A4 with margins.
    images[0].save(path, format="PDF", save_all=True, append_images=images[1:], resolution=120.0,
                   title=title, producer="musclenode")
    return path
