"""Coded concepts of the DICOM results: anatomy, measurements, methods, grades.

The concepts of the vocabulary (muscles, sides, fat methods, vertebrae, sex) carry their own
codes in :mod:`inference.vocabulary`; every other concept the SEG and the SR write is defined
here, once, with the evidence for it in ``reports/CODES.md``. Concepts come, in order of
preference, from a DICOM context group as pydicom ships it (``pydicom.sr.codedict``), from
SNOMED CT or UBERON where DICOM has none, and from the private scheme ``99MUSCLENODE``
(:data:`inference.vocabulary.PRIVATE_SCHEME`) only where no public concept says what musclenode
measures. A private concept is declared in the SR's CodingSchemeIdentificationSequence through
:func:`coding_scheme`, so that a reader can tell whose codes they are.
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.vocabulary import PRIVATE_SCHEME, vertebra_range

from .uids import derive_uid

__all__ = [
    "ALGORITHM_FAMILY",
    "ANATOMICAL_STRUCTURE",
    "ASYMMETRY",
    "COMMENT",
    "FAT_FRACTION",
    "FAT_GRADE",
    "FAT_INFILTRATION",
    "FUNCTIONAL_CSA",
    "LUMBAR_SPINE",
    "MEAN",
    "NOT_GRADED",
    "PERCENTILE",
    "POPULATION_MEAN",
    "POPULATION_SD",
    "PROCEDURE_REPORTED",
    "SCHEME_UID",
    "SCHEME_VERSION",
    "SEVERE_MULTIFIDUS_FAT",
    "AREA",
    "UNIT_CM3",
    "UNIT_MM2",
    "UNIT_NONE",
    "UNIT_PERCENT",
    "VOLUME",
    "Z_SCORE",
    "coding_scheme",
    "grade_value",
    "level_sites",
    "yes_no",
]

SCHEME_VERSION = "1"
#: Fixed for ever: the scheme's identity must not change with the software version.
SCHEME_UID = derive_uid("musclenode", "coding scheme", PRIVATE_SCHEME)

ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure  # 91723000, CID 7150
LUMBAR_SPINE = codes.SCT.LumbarSpine  # 122496007, CID 4031

# Measurements (TID 300 concept names).
VOLUME = codes.SCT.Volume  # 118565006, CID 7469
AREA = codes.SCT.Area  # 42798000, CID 7469
MEAN = codes.SCT.Mean  # 373098007, CID 7464 (derivation)
FAT_FRACTION = codes.DCM.FatFraction  # 129100, CID 7469
FAT_INFILTRATION = Code("FATINF", PRIVATE_SCHEME, "Fat infiltration (share of area classified fat)")
FUNCTIONAL_CSA = Code("FCSA", PRIVATE_SCHEME, "Functional cross-sectional area")
ASYMMETRY = Code("ASYM", PRIVATE_SCHEME, "Left-right asymmetry of mean CSA")
# Position in the reference population (TID 311, CID 226 and 227).
Z_SCORE = codes.DCM.ZScoreOfMeasurement  # 121416
PERCENTILE = codes.DCM.PercentileRankingOfMeasurement  # 121415
POPULATION_MEAN = codes.SCT.MeanValueOfPopulation  # 373098007
POPULATION_SD = codes.DCM.StandardDeviationOfPopulation  # 121414

UNIT_CM3 = codes.UCUM.CubicCentimeter
UNIT_MM2 = codes.UCUM.SquareMillimeter
UNIT_PERCENT = codes.UCUM.Percent
#: A z-score is a count of standard deviations: dimensionless ("1", CID 7181).
UNIT_NONE = codes.UCUM.NoUnits

#: TID 1500 procedure reported. CID 100 (as pydicom 3.0 ships it) has no MR of the lumbar
#: spine; this is its generic MR entry, and the anatomy is in the finding sites.
PROCEDURE_REPORTED = codes.LN.MRIUnspecifiedBodyRegion  # 25056-3
#: Concept name of the report's free-text statements (research use, sources, notes).
COMMENT = codes.DCM.Comment  # 121106
#: A TEXT naming one image that was not processed and why (inference.set_aside): no DICOM concept
#: says "image excluded from this analysis", so the private scheme does.
SET_ASIDE = Code("SETASIDE", PRIVATE_SCHEME, "Image set aside")
ALGORITHM_FAMILY = codes.DCM.ArtificialIntelligence  # 123110, CID 7162

#: The segmentation's quality verdict (inference.segmentation_quality.Verdict) as a coded
#: qualitative evaluation, and a TEXT naming each image it excluded from the measurements: no
#: DICOM concept says "segmentation quality control", so the private scheme does.
SEGMENTATION_QUALITY = Code("SEGQC", PRIVATE_SCHEME, "Segmentation quality control")
EXCLUDED_IMAGE = Code("SEGQCEXCL", PRIVATE_SCHEME, "Image excluded by segmentation quality control")
_VERDICTS = {
    "pass": Code("SEGQCPASS", PRIVATE_SCHEME, "Passed: every image measured"),
    "limited": Code("SEGQCLIMITED", PRIVATE_SCHEME, "Limited: images excluded from the measurements"),
    "not measured": Code("SEGQCNOTMEASURED", PRIVATE_SCHEME, "Not measured: segmentation failed quality control"),
}

#: Qualitative evaluations. The citation is in the concept's meaning (CodeMeaning is LO, 64
#: characters) and in full in a TEXT item beside it.
FAT_GRADE = Code("KJAERGRADE", PRIVATE_SCHEME, "Fat infiltration grade (Kjaer 2007)")
_GRADES = {
    0: Code("KJAER0", PRIVATE_SCHEME, "Grade 0 (<20% fat)"),
    1: Code("KJAER1", PRIVATE_SCHEME, "Grade 1 (20-50% fat)"),
    2: Code("KJAER2", PRIVATE_SCHEME, "Grade 2 (>50% fat)"),
}
NOT_GRADED = Code("NOTGRADED", PRIVATE_SCHEME, "Not graded")
SEVERE_MULTIFIDUS_FAT = Code("SEVEREMF", PRIVATE_SCHEME, "Severe multifidus fat >=50% (Wesselink 2025)")


def grade_value(value: int) -> Code:
    """The coded value of fat infiltration grade 0, 1 or 2."""
    try:
        return _GRADES[value]
    except KeyError:
        raise ValueError(f"fat infiltration grade must be 0, 1 or 2, not {value!r}") from None


def verdict_value(verdict: str) -> Code:
    """The coded value of a segmentation quality verdict ("pass", "limited", "not measured")."""
    try:
        return _VERDICTS[str(verdict)]
    except KeyError:
        raise ValueError(f"no code for the quality verdict {verdict!r}") from None


def yes_no(flag: bool) -> Code:
    """SCT Yes / No (CID 230)."""
    return codes.SCT.Yes if flag else codes.SCT.No


def level_sites(levels: str) -> list[Code]:
    """The vertebrae of a level range such as ``"L3"`` or ``"L3-L5"``, head first.

    Raises
    ------
    ValueError
        For text that is no range of :class:`inference.vocabulary.Vertebra`, or a vertebra whose
        code has not been verified.
    """
    return [vertebra.code for vertebra in vertebra_range(levels)]


def coding_scheme() -> CodingSchemeIdentificationItem:
    """The CodingSchemeIdentificationSequence item that declares the private scheme."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="musclenode local concepts",
        version=SCHEME_VERSION,
        uid=SCHEME_UID,
        responsible_organization="musclenode project",
    )
