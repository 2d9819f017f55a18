"""Coded concepts of the DICOM results: anatomy, measurements, methods, grades.

Every concept the SEG and the SR write is defined here, once, with the evidence for it in
``reports/CODES.md``. Concepts come, in order of preference, from a DICOM context group as
pydicom ships it (``pydicom.sr.codedict``), from SNOMED CT or UBERON where DICOM has none, and
from the private scheme :data:`SCHEME` (``99MUSCLENODE``) only where no public concept says what
musclenode measures. A private concept is declared in the SR's CodingSchemeIdentificationSequence
through :func:`coding_scheme`, so that a reader can tell whose codes they are.
"""

from __future__ import annotations

import re

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.card import MUSCLES, SIDES

from .uids import derive_uid

__all__ = [
    "ALGORITHM_FAMILY",
    "ANATOMICAL_STRUCTURE",
    "ASYMMETRY",
    "BOTH_SIDES",
    "COMMENT",
    "FAT_FRACTION",
    "FAT_GRADE",
    "FAT_INFILTRATION",
    "FUNCTIONAL_CSA",
    "LATERALITY",
    "LUMBAR_SPINE",
    "MEAN",
    "MUSCLE_CODES",
    "NOT_GRADED",
    "PERCENTILE",
    "POPULATION_MEAN",
    "POPULATION_SD",
    "PROCEDURE_REPORTED",
    "SCHEME",
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
    "fat_method",
    "grade_value",
    "level_sites",
    "muscle_code",
    "side_code",
    "yes_no",
]

#: Private coding scheme designator of musclenode (PS3.3 C.12.1.1.2.1: "99" then the owner).
SCHEME = "99MUSCLENODE"
SCHEME_VERSION = "1"
#: Fixed for ever: the scheme's identity must not change with the software version.
SCHEME_UID = derive_uid("musclenode", "coding scheme", SCHEME)

ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure  # 91723000, CID 7150
LUMBAR_SPINE = codes.SCT.LumbarSpine  # 122496007, CID 4031

#: Segmented property types. Erector spinae is in CID 6116/7151; the others are in no DICOM
#: context group (CIDs are extensible), see CODES.md for the evidence behind each.
MUSCLE_CODES: dict[str, Code] = {
    "multifidus": Code("5709001", "SCT", "Multifidus muscles"),
    "erector_spinae": codes.SCT.ErectorSpinaeMuscle,  # 44947003
    # No SNOMED CT concept ID for psoas major could be verified against a SNOMED release here;
    # UBERON is a DICOM coding scheme (PS3.16 Table 8-1) and its ID was verified.
    "psoas_major": Code("0001298", "UBERON", "psoas major muscle"),
    "quadratus_lumborum": Code("6001004", "SCT", "Quadratus lumborum muscle"),
}

LATERALITY: dict[str, Code] = {"left": codes.SCT.Left, "right": codes.SCT.Right}  # CID 244
#: The "both sides" groups of the SR (CID 244, where 51440002 has the meaning "Bilateral").
BOTH_SIDES = codes.SCT.Bilateral

# Measurements (TID 300 concept names).
VOLUME = codes.SCT.Volume  # 118565006, CID 7469
AREA = codes.SCT.Area  # 42798000, CID 7469
MEAN = codes.SCT.Mean  # 373098007, CID 7464 (derivation)
FAT_FRACTION = codes.DCM.FatFraction  # 129100, CID 7469
FAT_INFILTRATION = Code("FATINF", SCHEME, "Fat infiltration (share of area classified fat)")
FUNCTIONAL_CSA = Code("FCSA", SCHEME, "Functional cross-sectional area")
ASYMMETRY = Code("ASYM", SCHEME, "Left-right asymmetry of mean CSA")
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
ALGORITHM_FAMILY = codes.DCM.ArtificialIntelligence  # 123110, CID 7162

_FAT_METHODS: dict[str, Code] = {
    "dixon_ff": Code("DIXONFF", SCHEME, "Dixon fat signal fraction F/(F+W)"),
    "dixon_vendor_ff": Code("VENDORFF", SCHEME, "Scanner fat-fraction map"),
    "gmm2": Code("GMM2", SCHEME, "2-class Gaussian mixture of T1/T2 intensity"),
    "gmm3": Code("GMM3", SCHEME, "3-class Gaussian mixture of T1/T2 intensity"),
    "kmeans2": Code("KMEANS2", SCHEME, "2-class k-means of T1/T2 intensity"),
    "kmeans3": Code("KMEANS3", SCHEME, "3-class k-means of T1/T2 intensity"),
}

#: Qualitative evaluations. The citation is in the concept's meaning (CodeMeaning is LO, 64
#: characters) and in full in a TEXT item beside it.
FAT_GRADE = Code("KJAERGRADE", SCHEME, "Fat infiltration grade (Kjaer 2007)")
_GRADES = {
    0: Code("KJAER0", SCHEME, "Grade 0 (<20% fat)"),
    1: Code("KJAER1", SCHEME, "Grade 1 (20-50% fat)"),
    2: Code("KJAER2", SCHEME, "Grade 2 (>50% fat)"),
}
NOT_GRADED = Code("NOTGRADED", SCHEME, "Not graded")
SEVERE_MULTIFIDUS_FAT = Code("SEVEREMF", SCHEME, "Severe multifidus fat >=50% (Wesselink 2025)")

_VERTEBRAE = {
    1: codes.SCT.L1Vertebra,
    2: codes.SCT.L2Vertebra,
    3: codes.SCT.L3Vertebra,
    4: codes.SCT.L4Vertebra,
    5: codes.SCT.L5Vertebra,
}
_LEVELS = re.compile(r"^L([1-5])(?:-L([1-5]))?$")


def muscle_code(muscle: str) -> Code:
    """The segmented property type of a canonical muscle name."""
    try:
        return MUSCLE_CODES[muscle]
    except KeyError:
        raise ValueError(f"muscle {muscle!r} is not one of {', '.join(MUSCLES)}") from None


def side_code(side: str) -> Code:
    """Laterality of ``"left"``, ``"right"`` or ``"both"``."""
    if side == "both":
        return BOTH_SIDES
    try:
        return LATERALITY[side]
    except KeyError:
        raise ValueError(f"side {side!r} is not one of {', '.join(SIDES)} or both") from None


def fat_method(method: str) -> Code:
    """The measurement method of a fat method name of :mod:`reports.metrics`."""
    try:
        return _FAT_METHODS[method]
    except KeyError:
        raise ValueError(f"fat method {method!r} has no code; known: {', '.join(_FAT_METHODS)}") from None


def grade_value(value: int) -> Code:
    """The coded value of fat infiltration grade 0, 1 or 2."""
    try:
        return _GRADES[value]
    except KeyError:
        raise ValueError(f"fat infiltration grade must be 0, 1 or 2, not {value!r}") from None


def yes_no(flag: bool) -> Code:
    """SCT Yes / No (CID 230)."""
    return codes.SCT.Yes if flag else codes.SCT.No


def level_sites(levels: str) -> list[Code]:
    """The vertebrae of a level range such as ``"L3"`` or ``"L4-L5"``, cranial first."""
    match = _LEVELS.match(levels.strip())
    if not match:
        raise ValueError(f"levels {levels!r}: expected L1..L5 or a range such as L3-L5")
    first, last = int(match.group(1)), int(match.group(2) or match.group(1))
    if last < first:
        raise ValueError(f"levels {levels!r}: the range must run from cranial to caudal")
    return [_VERTEBRAE[n] for n in range(first, last + 1)]


def coding_scheme() -> CodingSchemeIdentificationItem:
    """The CodingSchemeIdentificationSequence item that declares :data:`SCHEME`."""
    return CodingSchemeIdentificationItem(
        designator=SCHEME,
        name="musclenode local concepts",
        version=SCHEME_VERSION,
        uid=SCHEME_UID,
        responsible_organization="musclenode project",
    )
