"""The canonical vocabulary: muscles, sides, input contrasts, fat methods, vertebral levels, sex.

Every concept that more than one module names is defined here, once, as an enum that carries its
display names, colours and codes. This module is the lowest layer of the house: ``inference``,
``reports`` and ``node`` all import it, and it imports nothing of theirs. Adding a muscle, a fat
method or a level means adding one member here (and its evidence in ``reports/CODES.md``).

The enums are :class:`enum.StrEnum`, so a member equals its value (``Muscle.MULTIFIDUS ==
"multifidus"``): the strings written in model cards, reference tables, CSV files and the node's
database stay exactly what they were, and ``Muscle("multifidus")`` parses them.

Codes are pydicom :class:`~pydicom.sr.coding.Code` objects. Sources, in order of preference: a
DICOM context group as pydicom ships it (``pydicom.sr.codedict``, PS3.16), SNOMED CT or UBERON
where DICOM has none, and the private scheme ``99MUSCLENODE`` (:data:`PRIVATE_SCHEME`) only where
no public concept says what musclenode measures. The evidence for each is in ``reports/CODES.md``.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Iterable

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "PRIVATE_SCHEME",
    "Contrast",
    "DIXON_COMPONENTS",
    "FatMethod",
    "FatQuantity",
    "Laterality",
    "Level",
    "Muscle",
    "ReferenceMethod",
    "Sex",
    "Side",
    "Vertebra",
    "muscle_group",
    "vertebra_range",
]

#: Private coding scheme designator of musclenode (PS3.3 C.12.1.1.2.1: "99" then the owner).
PRIVATE_SCHEME = "99MUSCLENODE"


# ---------------------------------------------------------------------------------------------
# Anatomy


class Side(StrEnum):
    """Laterality, read from patient coordinates (DICOM LPS), never from image columns."""

    LEFT = "left"
    RIGHT = "right"

    @property
    def code(self) -> Code:
        """SCT laterality (CID 244): Left 7771000, Right 24028007."""
        return codes.SCT.Left if self is Side.LEFT else codes.SCT.Right

    @property
    def letter(self) -> str:
        return "L" if self is Side.LEFT else "R"

    @property
    def lps_sign(self) -> int:
        """Sign of the LPS x coordinate on this side of the midline (+x is the patient's left)."""
        return 1 if self is Side.LEFT else -1

    @property
    def other(self) -> "Side":
        """The opposite side."""
        return Side.RIGHT if self is Side.LEFT else Side.LEFT


class Laterality(StrEnum):
    """The sides a measurement covers: one :class:`Side`, or both together.

    Metrics are reported per side and for both sides together (the left/right asymmetry belongs
    to the latter); a label map's labels always have one :class:`Side`.
    """

    LEFT = Side.LEFT.value
    RIGHT = Side.RIGHT.value
    BOTH = "both"

    @property
    def sides(self) -> tuple[Side, ...]:
        """The sides covered, left first."""
        return tuple(Side) if self is Laterality.BOTH else (Side(self.value),)

    @property
    def code(self) -> Code:
        """SCT laterality (CID 244): Left, Right, or Bilateral 51440002 for both."""
        return codes.SCT.Bilateral if self is Laterality.BOTH else Side(self.value).code

    @property
    def letter(self) -> str:
        """``"L"``, ``"R"`` or ``"L+R"``."""
        return "+".join(side.letter for side in self.sides)


class Muscle(StrEnum):
    """The lumbar paraspinal muscles musclenode segments and measures.

    Member order is the canonical order (tables, charts, combined keys such as
    ``"multifidus+erector_spinae"``).
    """

    MULTIFIDUS = "multifidus"
    ERECTOR_SPINAE = "erector_spinae"
    PSOAS_MAJOR = "psoas_major"
    QUADRATUS_LUMBORUM = "quadratus_lumborum"

    @property
    def display(self) -> str:
        """Name for people, e.g. ``"Erector spinae"``."""
        return _MUSCLE_DISPLAY[self][0]

    @property
    def short(self) -> str:
        """Name where space is tight (table rows, chart labels)."""
        return _MUSCLE_DISPLAY[self][1]

    @property
    def code(self) -> Code:
        """Segmented property type (SEG) and finding site (SR); see ``reports/CODES.md``."""
        return _MUSCLE_CODES[self]

    def colour(self, side: Side | str) -> tuple[int, int, int]:
        """Display colour (sRGB) of this muscle on one side: one hue per muscle, right deep,
        left light. The SEG's recommended display colour and the summary's outlines both use it,
        so an overlay in a viewer and an outline on the summary page look alike."""
        return _MUSCLE_COLOURS[(self, Side(side))]

    @property
    def index(self) -> int:
        """Position in the canonical order."""
        return list(Muscle).index(self)

    @property
    def words(self) -> str:
        """The name in lower-case words, e.g. ``"erector spinae"`` (segment labels, sentences)."""
        return self.display.lower()


def muscle_group(muscles: "str | Iterable[str]") -> tuple[Muscle, ...]:
    """The muscles of a group key such as ``"multifidus+erector_spinae"``, in canonical order.

    Parameters
    ----------
    muscles : str or iterable of str
        One muscle, a group key joined by ``"+"``, or the members.

    Raises
    ------
    ValueError
        When a member is not a :class:`Muscle`, a muscle is named twice, or none is named.
    """
    names = [n.strip() for n in (muscles.split("+") if isinstance(muscles, str) else muscles)]
    unknown = [n for n in names if n not in _MUSCLE_VALUES]
    if unknown or not names:
        raise ValueError(f"muscle {'+'.join(names)!r}: each member must be one of "
                         f"{', '.join(m.value for m in Muscle)}")
    if len(set(names)) != len(names):
        raise ValueError(f"muscle {'+'.join(names)!r} names a muscle twice")
    return tuple(sorted((Muscle(n) for n in names), key=lambda m: m.index))


_MUSCLE_VALUES = frozenset(m.value for m in Muscle)
_MUSCLE_DISPLAY = {
    Muscle.MULTIFIDUS: ("Multifidus", "Multifidus"),
    Muscle.ERECTOR_SPINAE: ("Erector spinae", "Erector spinae"),
    Muscle.PSOAS_MAJOR: ("Psoas major", "Psoas major"),
    Muscle.QUADRATUS_LUMBORUM: ("Quadratus lumborum", "Quadratus lumb."),
}

#: Erector spinae is in CID 6116/7151; the others are in no DICOM context group (CIDs are
#: extensible). Psoas major: no SNOMED CT concept ID could be verified against a SNOMED release
#: offline; UBERON is a DICOM coding scheme (PS3.16 Table 8-1) and its ID was verified.
_MUSCLE_CODES = {
    Muscle.MULTIFIDUS: Code("5709001", "SCT", "Multifidus muscles"),
    Muscle.ERECTOR_SPINAE: codes.SCT.ErectorSpinaeMuscle,  # 44947003
    Muscle.PSOAS_MAJOR: Code("0001298", "UBERON", "psoas major muscle"),
    Muscle.QUADRATUS_LUMBORUM: Code("6001004", "SCT", "Quadratus lumborum muscle"),
}

_MUSCLE_COLOURS = {
    (Muscle.MULTIFIDUS, Side.RIGHT): (230, 80, 80),
    (Muscle.MULTIFIDUS, Side.LEFT): (255, 150, 150),
    (Muscle.ERECTOR_SPINAE, Side.RIGHT): (60, 120, 220),
    (Muscle.ERECTOR_SPINAE, Side.LEFT): (130, 180, 255),
    (Muscle.PSOAS_MAJOR, Side.RIGHT): (60, 170, 90),
    (Muscle.PSOAS_MAJOR, Side.LEFT): (140, 220, 150),
    (Muscle.QUADRATUS_LUMBORUM, Side.RIGHT): (220, 170, 40),
    (Muscle.QUADRATUS_LUMBORUM, Side.LEFT): (250, 215, 120),
}


# ---------------------------------------------------------------------------------------------
# Vertebral levels


class Vertebra(StrEnum):
    """Vertebrae a lumbar level can name, head to foot (member order is anatomical order)."""

    T10 = "T10"
    T11 = "T11"
    T12 = "T12"
    L1 = "L1"
    L2 = "L2"
    L3 = "L3"
    L4 = "L4"
    L5 = "L5"
    S1 = "S1"

    @property
    def index(self) -> int:
        """Position head to foot (T10 = 0)."""
        return list(Vertebra).index(self)

    @property
    def below(self) -> "Vertebra | None":
        """The next vertebra towards the feet, or None after the last."""
        members = list(Vertebra)
        return members[self.index + 1] if self.index + 1 < len(members) else None

    @property
    def code(self) -> Code:
        """SCT vertebra (CID 7304 as pydicom ships it).

        Raises
        ------
        ValueError
            For a vertebra whose concept has not been verified (see ``reports/CODES.md``).
        """
        code = _VERTEBRA_CODES.get(self)
        if code is None:
            raise ValueError(f"no verified code for vertebra {self.value} yet (reports/CODES.md)")
        return code


_VERTEBRA_CODES: dict[Vertebra, Code | None] = {
    Vertebra.T10: codes.SCT.T10Vertebra,  # 7610001
    Vertebra.T11: codes.SCT.T11Vertebra,  # 12989004
    Vertebra.T12: codes.SCT.T12Vertebra,  # 23215003
    Vertebra.L1: codes.SCT.L1Vertebra,  # 66794005
    Vertebra.L2: codes.SCT.L2Vertebra,  # 14293000
    Vertebra.L3: codes.SCT.L3Vertebra,  # 36470004
    Vertebra.L4: codes.SCT.L4Vertebra,  # 11994002
    Vertebra.L5: codes.SCT.L5Vertebra,  # 49668003
    # pydicom's codedict has no S1 vertebra; to be verified before it is written anywhere.
    Vertebra.S1: None,
}

#: Intervertebral discs, keyed by the vertebra above (CID 7304 as pydicom ships it).
_DISC_CODES: dict[Vertebra, Code] = {
    Vertebra.T10: codes.SCT.T10T11Disc,  # 34959001
    Vertebra.T11: codes.SCT.T11T12Disc,  # 1537001
    Vertebra.T12: codes.SCT.T12L1Disc,  # 76206002
    Vertebra.L1: codes.SCT.L1L2Disc,  # 80064006
    Vertebra.L2: codes.SCT.L2L3Disc,  # 67459009
    Vertebra.L3: codes.SCT.L3L4Disc,  # 62551000
    Vertebra.L4: codes.SCT.L4L5Disc,  # 84020006
    Vertebra.L5: codes.SCT.L5S1Disc,  # 715056000
}

_LEVEL_TEXT = re.compile(r"^\s*([TLS]\d{1,2})\s*(?:[-/]\s*([TLS]\d{1,2}))?\s*$", re.IGNORECASE)


class Level:
    """A vertebral level: a vertebral body (``"L3"``) or the disc between two adjacent bodies
    (``"L3-L4"``).

    Parameters
    ----------
    upper : Vertebra
        The body, or the vertebra above the disc.
    disc : bool
        True for the disc below ``upper``.

    Raises
    ------
    ValueError
        For a disc below the last vertebra of :class:`Vertebra`.
    """

    __slots__ = ("upper", "disc")

    def __init__(self, upper: Vertebra | str, disc: bool = False) -> None:
        upper = Vertebra(upper)
        if disc and upper.below is None:
            raise ValueError(f"there is no disc below {upper.value} in the vocabulary")
        self.upper = upper
        self.disc = disc

    @classmethod
    def parse(cls, text: str) -> "Level":
        """``"L3"``, ``"L3-L4"`` (also ``"L3/L4"``, any case) to a level.

        Raises
        ------
        ValueError
            When the text names no vertebra, or two that are not adjacent.
        """
        match = _LEVEL_TEXT.match(str(text))
        if not match:
            raise ValueError(f"level {text!r}: expected a vertebra such as L3 or a disc such as L3-L4")
        upper = Vertebra(match.group(1).upper())
        if match.group(2) is None:
            return cls(upper)
        lower = Vertebra(match.group(2).upper())
        if upper.below is not lower:
            raise ValueError(f"level {text!r}: a disc lies between two adjacent vertebrae")
        return cls(upper, disc=True)

    @property
    def lower(self) -> Vertebra | None:
        """The vertebra below a disc (None for a body)."""
        return self.upper.below if self.disc else None

    @property
    def name(self) -> str:
        """``"L3"`` or ``"L3-L4"``."""
        return f"{self.upper.value}-{self.lower.value}" if self.disc else self.upper.value

    @property
    def order(self) -> float:
        """Head-to-foot order: a body at its index, a disc half-way to the next."""
        return self.upper.index + (0.5 if self.disc else 0.0)

    @property
    def code(self) -> Code:
        """SCT code of the vertebra or the intervertebral disc (CID 7304)."""
        return _DISC_CODES[self.upper] if self.disc else self.upper.code

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Level({self.name!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            try:
                other = Level.parse(other)
            except ValueError:
                return False
        return isinstance(other, Level) and (self.upper, self.disc) == (other.upper, other.disc)

    def __hash__(self) -> int:
        return hash((self.upper, self.disc))

    def __lt__(self, other: "Level") -> bool:
        return self.order < other.order


_RANGE_TEXT = re.compile(r"^([TLS]\d{1,2})(?:-([TLS]\d{1,2}))?$")


def vertebra_range(text: str) -> tuple[Vertebra, ...]:
    """The vertebral bodies of an inclusive range, head first: ``"L3-L5"`` -> L3, L4, L5.

    This is how the published reference cohorts state the levels they measured over (and how
    the SR names the finding sites of a group): a range of bodies, so ``"L4-L5"`` here means
    the bodies L4 and L5. A slice's level, which may be the disc between two bodies, is a
    :class:`Level`. An en or em dash, spaces and lower case are accepted.

    Raises
    ------
    ValueError
        When the text names no vertebra of :class:`Vertebra`, or runs from foot to head.
    """
    cleaned = str(text).strip().replace("\u2013", "-").replace("\u2014", "-").replace(" ", "").upper()
    match = _RANGE_TEXT.match(cleaned)
    members = {v.value for v in Vertebra}
    if not match or any(g is not None and g not in members for g in match.groups()):
        raise ValueError(f"levels {text!r}: expected a vertebra such as L3 or a range such as L3-L5 "
                         f"({list(Vertebra)[0].value} to {list(Vertebra)[-1].value})")
    first = Vertebra(match.group(1))
    last = Vertebra(match.group(2) or match.group(1))
    if last.index < first.index:
        raise ValueError(f"levels {text!r}: the range must run from head to foot")
    return tuple(list(Vertebra)[first.index:last.index + 1])


# ---------------------------------------------------------------------------------------------
# The person


class Sex(StrEnum):
    """PatientSex as DICOM defines it (PS3.3 C.7.1.1: M, F, O), with the coded Subject Sex."""

    MALE = "M"
    FEMALE = "F"
    OTHER = "O"

    @property
    def display(self) -> str:
        """``"male"``, ``"female"`` or ``"other"``."""
        return self.name.lower()

    @property
    def code(self) -> Code:
        """Subject Sex value (CID 7455): DCM M, F, or 121102 Other sex."""
        return {Sex.MALE: codes.DCM.Male, Sex.FEMALE: codes.DCM.Female, Sex.OTHER: codes.DCM.OtherSex}[self]


# ---------------------------------------------------------------------------------------------
# Images and methods


class Contrast(StrEnum):
    """What an input image shows: a Dixon component or a weighted series."""

    WATER = "water"
    FAT = "fat"
    IN_PHASE = "in_phase"
    OPPOSED_PHASE = "opposed_phase"
    FAT_FRACTION = "fat_fraction"
    T1 = "t1"
    T2 = "t2"

    @property
    def is_dixon(self) -> bool:
        return self in DIXON_COMPONENTS


#: The components of a chemical-shift (Dixon) acquisition, in the order a pipeline prefers them.
DIXON_COMPONENTS = (Contrast.WATER, Contrast.FAT, Contrast.IN_PHASE, Contrast.OPPOSED_PHASE,
                    Contrast.FAT_FRACTION)


class ReferenceMethod(StrEnum):
    """How the values of a reference group were measured: only like is compared with like.

    ``dixon_ff``: fat fraction from chemical-shift (Dixon) images, F/(F+W) or PDFF, and the
    two-point fat signal fraction (IP - OP) / (2 IP) below 50 % (:attr:`FatMethod.TWO_POINT_DIXON_FF`:
    in that range it equals F/(F+W) of the same magnitude images, and the published Dixon rows
    of Crawford et al. 2016 were themselves measured with two-point Dixon).
    ``t1t2_threshold``: fat share of the cross-section from thresholding or clustering a T1- or
    T2-weighted image. Mixing them is wrong (Masi et al., BMC Med Imaging 2023; Wesselink et al.,
    N Am Spine Soc J 2024;17:100313).
    """

    DIXON_FF = "dixon_ff"
    T1T2_THRESHOLD = "t1t2_threshold"

    @property
    def quantity(self) -> "FatQuantity":
        """The quantity a fat method of this kind measures."""
        return FatQuantity.FAT_FRACTION if self is ReferenceMethod.DIXON_FF else FatQuantity.FAT_INFILTRATION

    @classmethod
    def of(cls, method: str) -> "ReferenceMethod | None":
        """The reference method of a :class:`FatMethod` or of a reference method's own name;
        None for a name that is neither."""
        if method in _REFERENCE_VALUES:
            return cls(method)
        if method in _FAT_METHOD_VALUES:
            return FatMethod(method).reference
        return None


class FatQuantity(StrEnum):
    """What a fat number is: a Dixon fat fraction, or the share of a cross-section classified fat.

    Different quantities (Masi et al. 2023): never compared with each other's references.
    """

    FAT_FRACTION = "fat_fraction"
    FAT_INFILTRATION = "fat_infiltration"

    @property
    def words(self) -> str:
        """``"fat fraction"`` or ``"fat infiltration"``."""
        return self.value.replace("_", " ")


_REFERENCE_VALUES = frozenset(m.value for m in ReferenceMethod)


class FatMethod(StrEnum):
    """How the node measures fat inside a muscle.

    Each member carries: its value (the name written in CSV files and settings), the reference
    method it is compared under, for a clustering method the algorithm and its number of classes
    (``("gmm", 3)``: scikit-learn's GaussianMixture; ``("kmeans", 2)``: KMeans), its code
    (private scheme: no public concept names these methods), a sentence for people, and
    ``ambiguous_above_percent``: the fat percentage above which the method cannot tell a value
    from its mirror image (None: no such limit).

    ``TWO_POINT_DIXON_FF`` is the fat signal fraction of two-point Dixon, (IP - OP) / (2 IP) from
    magnitude in-phase and opposed-phase images, for protocols (common at 1.5 T) that give no
    water and fat images. With magnitude images IP = W + F and OP = |W - F|, so the formula
    gives F/(F+W) when fat is below water and W/(F+W) when it is above: a voxel of 70 % fat reads
    30 %. It cannot tell fat above 50 % from below (Dixon WT, Radiology 1984;153:189; Ma J, J Magn
    Reson Imaging 2008;28:543); healthy and moderately infiltrated paraspinal muscle lies
    below (Crawford et al. 2016: 15-32 % at L1-L5 and L5), so the method assumes it. It is not
    PDFF (no T2* or T1 correction, no multi-peak fat model): a signal fraction, coded apart from
    water/fat Dixon and from a scanner's map.
    """

    DIXON_FF = ("dixon_ff", ReferenceMethod.DIXON_FF, None,
                "DIXONFF", "Dixon fat signal fraction F/(F+W)",
                "Dixon fat fraction F/(F+W)")
    DIXON_VENDOR_FF = ("dixon_vendor_ff", ReferenceMethod.DIXON_FF, None,
                       "VENDORFF", "Scanner fat-fraction map",
                       "the scanner's fat-fraction map")
    TWO_POINT_DIXON_FF = ("dixon_2pt_ff", ReferenceMethod.DIXON_FF, None,
                          "DIXON2PT", "Two-point Dixon fat signal fraction (IP-OP)/(2 IP)",
                          "two-point Dixon fat signal fraction (IP - OP) / (2 IP) from in-phase and "
                          "opposed-phase images; it cannot tell fat above 50 % from below (a voxel of 70 % "
                          "fat reads 30 %), and muscle is assumed to lie below",
                          50.0)
    GMM2 = ("gmm2", ReferenceMethod.T1T2_THRESHOLD, ("gmm", 2),
            "GMM2", "2-class Gaussian mixture of T1/T2 intensity",
            "fat infiltration: share of voxels in the bright class of a 2-class Gaussian mixture of the image")
    GMM3 = ("gmm3", ReferenceMethod.T1T2_THRESHOLD, ("gmm", 3),
            "GMM3", "3-class Gaussian mixture of T1/T2 intensity",
            "fat infiltration: share of voxels in the brightest class of a 3-class Gaussian mixture of the image")
    KMEANS2 = ("kmeans2", ReferenceMethod.T1T2_THRESHOLD, ("kmeans", 2),
               "KMEANS2", "2-class k-means of T1/T2 intensity",
               "fat infiltration: share of voxels in the bright of 2 k-means clusters of the image")
    KMEANS3 = ("kmeans3", ReferenceMethod.T1T2_THRESHOLD, ("kmeans", 3),
               "KMEANS3", "3-class k-means of T1/T2 intensity",
               "fat infiltration: share of voxels in the brightest of 3 k-means clusters of the image")

    def __new__(cls, value: str, reference: ReferenceMethod, cluster: tuple[str, int] | None, code_value: str,
                code_meaning: str, description: str, ambiguous_above_percent: float | None = None) -> "FatMethod":
        member = str.__new__(cls, value)
        member._value_ = value
        member.reference = reference
        member.cluster = cluster
        member.clustering = cluster is not None
        member.code = Code(code_value, PRIVATE_SCHEME, code_meaning)
        member.description = description
        member.ambiguous_above_percent = ambiguous_above_percent
        return member

    @property
    def quantity(self) -> FatQuantity:
        """Fat fraction (Dixon) or fat infiltration (clustering)."""
        return self.reference.quantity

    @classmethod
    def clustering_methods(cls) -> tuple["FatMethod", ...]:
        """The methods that cluster a T1/T2 image (the setting ``metrics.cluster_method``)."""
        return tuple(m for m in cls if m.clustering)


_FAT_METHOD_VALUES = frozenset(m.value for m in FatMethod)
