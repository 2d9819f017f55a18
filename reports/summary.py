"""The summary as DICOM: one Secondary Capture image per page, which every PACS viewer shows.

The SEG and the TID 1500 SR carry the results for software; many viewers show neither well
(OHIF shows no TID 1500 group without image coordinates). These pages are what reaches every
viewer: key slices with muscle outlines, the measurement table with the reference bands, and the
charts (drawn by :mod:`reports.render`).

Encoding decisions
------------------
- **One single-frame Secondary Capture Image per page** (SOP class 1.2.840.10008.5.1.4.1.1.7):
  the oldest colour image object, shown by every viewer and PACS; the multi-frame true-colour SC
  is not shown page by page by some viewers, and the pages are few.
- RGB, 8 bits, PhotometricInterpretation RGB, PlanarConfiguration 0 (pixel-interleaved),
  Explicit VR Little Endian, uncompressed, so that no viewer needs a decoder.
- ConversionType ``WSD`` (workstation), Modality ``OT``: the pages are drawn, not converted from a
  modality's images.
- BurnedInAnnotation ``YES``: the pages carry the study date, age and sex as text. They carry no
  name, ID or birth date (see :mod:`reports.render`), but a de-identification tool should still
  review them, which ``YES`` asks for.
- Patient, study and clinical-trial attributes are copied from a source instance, so that the
  pages file into the same patient and study; the type 2 ones are written empty when the source
  lacks them. SpecificCharacterSet is copied too, since the copied names are encoded in it.
- UIDs come from :class:`reports.uids.ResultIdentity` (``uid("summary", "series")``,
  ``uid("summary", "instance", "<page>")``), so that a re-run replaces the pages in the PACS.
- The first page references the key slices it shows (SourceImageSequence, purpose "source image
  for image processing operation"); the other pages reference every segmented instance.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, UID

from inference.geometry import LabelMap

from .assessment import Assessment
from .patient import PatientContext
from .render import RESEARCH_USE, Page, key_frames, render_pages
from .seg import result_series_number
from .uids import ResultIdentity

__all__ = [
    "MANUFACTURER",
    "SECONDARY_CAPTURE_IMAGE_STORAGE",
    "SERIES_DESCRIPTION",
    "SERIES_NUMBER_OFFSET",
    "build_summary",
    "encode_pages",
    "render_pages",
    "write_pdf",
]

SECONDARY_CAPTURE_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
MANUFACTURER = "musclenode"
SERIES_DESCRIPTION = "Paraspinal muscle summary (research use)"
#: SeriesNumber offset after the source's number times 100 (the SEG is 91, the SR 92).
SERIES_NUMBER_OFFSET = 93
_LO = 64

# Copied from the source when present. Patient, Clinical Trial Subject, General Study, Patient
# Study and Clinical Trial Study modules (PS3.3 C.7.1.1, C.7.1.3, C.7.2.1, C.7.2.2, C.7.2.3).
_COPIED = (
    "SpecificCharacterSet",
    # Patient
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence", "PatientComments",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "PatientSpeciesDescription", "PatientSpeciesCodeSequence", "PatientBreedDescription",
    "PatientBreedCodeSequence", "BreedRegistrationSequence", "ResponsiblePerson", "ResponsiblePersonRole",
    "ResponsibleOrganization", "QualityControlSubject", "StrainDescription", "StrainNomenclature",
    "GeneticModificationsSequence",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "ClinicalTrialProtocolEthicsCommitteeName", "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    # General Study
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence", "StudyID", "AccessionNumber", "IssuerOfAccessionNumberSequence",
    "StudyDescription", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "RequestingService",
    "ProcedureCodeSequence", "ReasonForPerformedProcedureCodeSequence",
    # Patient Study
    "AdmittingDiagnosesDescription", "PatientAge", "PatientSize", "PatientWeight", "Occupation",
    "AdditionalPatientHistory", "AdmissionID", "IssuerOfAdmissionIDSequence",
    # Clinical Trial Study
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription",
    # General Series: the body part decides whether Laterality is needed; it is the source's.
    "BodyPartExamined",
)
#: Type 2 attributes of the Patient and General Study modules: present, empty when unknown.
_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
           "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _dicom_text(text: str, limit: int | None = None) -> str:
    """Text for a DICOM string in the default repertoire (the copied charset may lack the dash)."""
    text = text.replace("\u2014", "-").encode("ascii", "replace").decode("ascii")
    # An LO holds 64 characters: a long model name must not make the instance invalid.
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def _source_from_series(label_map: LabelMap) -> Dataset:
    """Patient and study attributes from the series' own record, when no source header is given."""
    series = label_map.series
    patient, study = series.patient, series.study
    ds = Dataset()
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.StudyID = study.study_id
    ds.ReferringPhysicianName = study.referring_physician_name
    if study.study_description:
        ds.StudyDescription = study.study_description
    return ds


def _copy_patient_and_study(source: Dataset, ds: Dataset) -> None:
    if not str(source.get("StudyInstanceUID", "")).strip():
        raise ValueError("the source dataset has no StudyInstanceUID: the summary could not be filed in its study")
    for keyword in _COPIED:
        if keyword in source:
            ds[keyword] = source[keyword]
    for keyword in _TYPE_2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    if "BodyPartExamined" not in ds:
        # Without it, a validator cannot tell whether Laterality is needed; the node measures lumbar spines.
        ds.BodyPartExamined = "LSPINE"


def _references(label_map: LabelMap, frames: Sequence[int]) -> DicomSequence:
    series = label_map.series
    purpose = Dataset()
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
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
    source_dataset: Dataset,
    *,
    model_name: str,
    model_version: str,
    software_version: str,
    created: datetime | None = None,
    series_number: int | None = None,
) -> list[Dataset]:
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
        Defaults to the source series number times 100 plus :data:`SERIES_NUMBER_OFFSET`.

    Returns
    -------
    list of pydicom.dataset.Dataset
        One per page, InstanceNumber 1, 2, ..., with file meta, ready to save or send.
    """
    if not pages:
        raise ValueError("no pages to encode")
    created = created or datetime.now(timezone.utc)
    if source_dataset is None:
        source_dataset = _source_from_series(label_map)
    if series_number is None:
        series_number = result_series_number(label_map.series.series_number, SERIES_NUMBER_OFFSET)
    date, time = created.strftime("%Y%m%d"), created.strftime("%H%M%S")
    series_uid = identity.uid("summary", "series")
    every_frame = range(len(label_map.series))
    shown = key_frames(label_map, 4)
    datasets = []
    for number, page in enumerate(pages, start=1):
        pixels = np.asarray(page.pixels)
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"page {number} must be uint8 RGB (rows, columns, 3), not {pixels.dtype} {pixels.shape}")
        ds = Dataset()
        _copy_patient_and_study(source_dataset, ds)
        instance_uid = identity.uid("summary", "instance", str(number))
        # SOP Common
        ds.SOPClassUID = SECONDARY_CAPTURE_IMAGE_STORAGE
        ds.SOPInstanceUID = instance_uid
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        # General Series
        ds.Modality = "OT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = SERIES_DESCRIPTION
        ds.SeriesDate, ds.SeriesTime = date, time
        # General Equipment and SC Equipment
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = MANUFACTURER
        ds.SoftwareVersions = [_dicom_text(software_version, _LO), _dicom_text(f"{model_name} {model_version}", _LO)]
        ds.ConversionType = "WSD"
        ds.SecondaryCaptureDeviceManufacturer = MANUFACTURER
        ds.SecondaryCaptureDeviceManufacturerModelName = MANUFACTURER
        ds.SecondaryCaptureDeviceSoftwareVersions = _dicom_text(software_version, _LO)
        # General Image and SC Image
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.InstanceNumber = number
        ds.PatientOrientation = ""  # a page, not a view of the patient
        ds.ContentDate, ds.ContentTime = date, time
        ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = date, time
        ds.ImageComments = _dicom_text(page.title)
        ds.DerivationDescription = _dicom_text(
            f"Summary of the automatic segmentation by {model_name} {model_version} of series "
            f"{label_map.series.series_instance_uid}, drawn by musclenode {software_version}. {RESEARCH_USE}.")
        ds.SourceImageSequence = _references(label_map, shown if number == 1 else every_frame)
        ds.BurnedInAnnotation = "YES"
        ds.RecognizableVisualFeatures = "NO"
        ds.LossyImageCompression = "00"
        # Image Pixel
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = instance_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
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
) -> list[Dataset]:
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
        Defaults to the source series number times 100 plus :data:`SERIES_NUMBER_OFFSET`.

    Returns
    -------
    list of pydicom.dataset.Dataset
        One Secondary Capture Image per page: key slices, measurements (one or more pages),
        charts.
    """
    pages = render_pages(label_map, assessments, patient, model_name=card_name, model_version=card_version,
                         software_version=software_version)
    return encode_pages(pages, label_map, identity, source_dataset, model_name=card_name, model_version=card_version,
                        software_version=software_version, created=created, series_number=series_number)


def write_pdf(pages: Sequence[Page | np.ndarray], path: str | Path, *, title: str = SERIES_DESCRIPTION) -> Path:
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
