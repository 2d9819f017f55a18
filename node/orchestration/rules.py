"""Selection rules: which assembled series the node processes, and why or why not.

In the spirit of MONAI Deploy's series selection rules, but fixed to what lumbar muscle analysis
needs. Each series of a study is judged on its headers alone (pure functions, no I/O):

1. modality and SOP class (an MR image);
2. lumbar region: BodyPartExamined, then study, series and protocol descriptions;
3. axial, judged per slice: a slice is axial when its normal is within ``max_oblique_degrees``
   of the patient's long axis, so that angled slabs in one series still count. Slices that are
   not axial (a localizer inside the series) or lack position, orientation or spacing are set
   aside by the pipeline (:mod:`inference.set_aside`) when they are the minority and at least
   :data:`inference.set_aside.MIN_FRAMES` axial slices remain; the decision says how many;
4. no fat suppression (there is no fat signal left to measure): ScanOptions FS, SFS or WE, an
   inversion recovery with a STIR's short inversion time, or a description, protocol or sequence
   name that says so (``rules.fat_suppressed_patterns``). Headers can hide it; the pipeline
   checks the pixels too (:mod:`inference.input_quality`);
5. the contrast: a Dixon component (water, fat, in-phase, opposed-phase, fat fraction) from
   ImageType values and vendor descriptions, otherwise T1 or T2 from the enhanced contrast
   attribute, TR and TE, or the description.

Dixon components of one acquisition (same study and frame of reference, and most slice positions
in common: a component may lack a slice the others have, which the pipeline then sets aside) are
then grouped, and a group is measured by the best fat method its components allow:

- water and fat (F/(F+W)), or a vendor fat-fraction map: the whole group is selected;
- otherwise in-phase and opposed-phase: two-point Dixon, the fat signal fraction
  (IP - OP) / (2 IP), valid below 50 % fat (:attr:`inference.vocabulary.FatMethod.TWO_POINT_DIXON_FF`),
  selected only when the study has no water/fat group (one measurement per study, the better);
- otherwise a component alone, processed as the contrast it is, again only when the study has no
  water/fat group: in-phase (preferred: it carries fat) as a T1-weighted series with fat by
  clustering, else water or fat for areas and volumes without fat. An opposed-phase image alone
  is skipped: water and fat cancel in it, so it holds no fat measure, and models are not
  trained on it.

Every series gets exactly one :class:`Decision` with a reason a person can read.

One series of the study is also chosen as its **level reference** (:func:`level_reference`): the
sagittal series (slice normal within 30° of the patient's left-right axis) that gives the axial
slices their vertebral levels (:mod:`inference.vertebrae`) - T2-weighted first, then T1, then any
other (a STIR), most images among equals. Its decision has the role
:data:`LEVEL_REFERENCE` and says why; every job of the study carries it (so that a reference
that arrives late, or changes, makes the results again).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

import numpy as np

from inference.geometry import axial_tilt_degrees, orientation_normal, plane_name
from inference.set_aside import MIN_FRAMES
from inference.vertebrae import NO_LEVEL_REFERENCE, SAGITTAL_COSINE
from inference.vocabulary import Contrast

from ..config import Rules

__all__ = ["LEVEL_REFERENCE", "NO_LEVEL_REFERENCE", "Decision", "SeriesHeaders", "decide_study", "dixon_role",
           "echo_phase", "level_reference", "orientation_name"]

MR_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
}

# ImageType values for Dixon components as the main vendors write them: Siemens (WATER, FAT,
# IN_PHASE, OPP_PHASE, with DIXON), Philips mDixon (W, F, IP, OP, FF), GE IDEAL/FLEX (WATER, FAT,
# IN PHASE, OUT PHASE), and fat-fraction maps (FF, FAT_FRACTION, PDFF).
_DIXON_IMAGE_TYPES = {
    Contrast.WATER: {"W", "WATER"},
    Contrast.FAT: {"F", "FAT"},
    Contrast.IN_PHASE: {"IP", "IN_PHASE", "IN PHASE", "INPHASE"},
    Contrast.OPPOSED_PHASE: {"OP", "OPP_PHASE", "OUT_PHASE", "OUT PHASE", "OPPOSED_PHASE", "OUTPHASE"},
    Contrast.FAT_FRACTION: {"FF", "FAT_FRACTION", "FATFRACTION", "PDFF"},
}
# Series descriptions that name a Dixon component, as scanners write them when ImageType does not.
_DIXON_DESCRIPTIONS = {
    Contrast.FAT_FRACTION: re.compile(r"(fat[ _-]?frac|\bpdff\b|\bff\b|_ff$)", re.I),
    Contrast.OPPOSED_PHASE: re.compile(r"(opp|out[ _-]?phase|_op$|\bop\b)", re.I),
    Contrast.IN_PHASE: re.compile(r"(in[ _-]?phase|_in$|_ip$|\bip\b)", re.I),
    Contrast.WATER: re.compile(r"(water|_w$|\bw\b)", re.I),
    Contrast.FAT: re.compile(r"(\bfat\b|_f$|\bf\b)", re.I),
}
_DIXON_HINT = re.compile(r"dixon|ideal|flex|mdixon|\bvibe\b.*_(w|f|in|opp)$", re.I)
# Dual-echo chemical-shift protocols whose series names both phases (Siemens "t1_fl2d_opp-in",
# "in-opp", GE and Philips "dual echo", "IP/OP"): the echo time says which one a series holds.
_DUAL_ECHO_HINT = re.compile(r"(?<![a-z])(opp[ _-]?in|in[ _-]?opp|ip[ _/-]?op|in[ _/-]?out)(?![a-z])|dual[ _-]?echo|"
                             r"chem[a-z]*[ _-]?shift", re.I)
#: Fat-water chemical shift (ppm) and proton gyromagnetic ratio (MHz/T): see :func:`echo_phase`.
_FAT_SHIFT_PPM = 3.4
_LARMOR_MHZ_PER_T = 42.577
#: An echo this close (in cycles of the fat-water beat) to in-phase or opposed-phase is named so.
_PHASE_TOLERANCE = 0.15


@dataclass(frozen=True)
class SeriesHeaders:
    """What the rules know of one assembled series: the header summaries of its instances."""

    series_uid: str
    study_uid: str
    version: int
    headers: tuple[dict[str, Any], ...]

    def first(self, key: str, default: Any = "") -> Any:
        for header in self.headers:
            value = header.get(key)
            if value not in (None, "", []):
                return value
        return default

    @property
    def frames(self) -> list[dict[str, Any]]:
        return [frame for header in self.headers for frame in header.get("frames", [])]


@dataclass(frozen=True)
class Decision:
    """The verdict on one series.

    Attributes
    ----------
    selected : bool
        Whether the series will be processed.
    kind : str or None
        ``"dixon"``, ``"t1"`` or ``"t2"`` for a selected series, or ``"water"`` or ``"fat"`` for
        a Dixon component processed alone (see :class:`reports.pipeline.WorkItem`).
    role : str or None
        Its part in the group: a Dixon component (``"water"``, ``"fat"``, ``"in_phase"``,
        ``"opposed_phase"``, ``"fat_fraction"``) or the weighting of a single series.
    grouping : str or None
        Series with the same grouping are processed together.
    reason : str
        Why, in words a radiographer or an IT person understands.
    """

    series_uid: str
    version: int
    selected: bool
    reason: str
    kind: str | None = None
    role: str | None = None
    grouping: str | None = None

    def as_row(self) -> dict[str, Any]:
        return {
            "series_uid": self.series_uid, "version": self.version, "selected": self.selected,
            "kind": self.kind, "role": self.role, "grouping": self.grouping, "reason": self.reason,
        }


def orientation_name(orientation: Sequence[float]) -> str:
    """``"axial"``, ``"coronal"`` or ``"sagittal"``: the plane a slice is closest to."""
    return plane_name(orientation)


def _descriptions(series: SeriesHeaders) -> list[str]:
    return [series.first(k) for k in ("SeriesDescription", "ProtocolName", "StudyDescription") if series.first(k)]


def _search(patterns: Iterable[str], texts: Iterable[str]) -> tuple[str, str] | None:
    for text in texts:
        # Scanners join words with underscores ("t2_stir_tra"); patterns use word boundaries.
        words = text.replace("_", " ")
        for pattern in patterns:
            if re.search(pattern, words, re.I):
                return pattern, text
    return None


def _check_modality(series: SeriesHeaders, rules: Rules) -> str | None:
    modality = series.first("Modality").upper()
    if modality not in rules.modalities:
        return f"modality {modality or '(none)'} is not one of {', '.join(rules.modalities)}"
    sop_class = series.first("SOPClassUID")
    if sop_class not in MR_IMAGE_SOP_CLASSES:
        return f"SOP class {sop_class} is not an MR image"
    return None


def _check_lumbar(series: SeriesHeaders, rules: Rules) -> tuple[str | None, str]:
    """Return (reason to skip, or None; what made it lumbar)."""
    own = [series.first(k) for k in ("SeriesDescription", "ProtocolName") if series.first(k)]
    excluded = _search(rules.exclude_patterns, own)
    if excluded:
        return f"description {excluded[1]!r} matches the exclusion pattern {excluded[0]!r}", ""
    body_part = series.first("BodyPartExamined").upper()
    if body_part in rules.lumbar_body_parts:
        return None, f"BodyPartExamined {body_part}"
    if body_part not in rules.ambiguous_body_parts:
        return f"not lumbar: BodyPartExamined {body_part} is not a lumbar body part", ""
    texts = _descriptions(series)
    excluded = _search(rules.exclude_patterns, texts)
    if excluded:
        return f"not lumbar: description {excluded[1]!r} matches the exclusion pattern {excluded[0]!r}", ""
    lumbar = _search(rules.lumbar_patterns, texts)
    if lumbar:
        return None, f"description {lumbar[1]!r}"
    shown = f"BodyPartExamined {body_part}" if body_part else "no BodyPartExamined"
    return f"not lumbar: {shown} and no description matches a lumbar pattern", ""


def _placed(frame: dict[str, Any]) -> bool:
    return all(frame.get(k) for k in ("orientation", "position", "spacing")) and \
        axial_tilt_degrees(frame["orientation"]) is not None


def _axial_frames(series: SeriesHeaders, rules: Rules) -> list[dict[str, Any]]:
    """The frames the pipeline keeps: placed in the patient and axial."""
    return [f for f in series.frames if _placed(f) and axial_tilt_degrees(f["orientation"]) <= rules.max_oblique_degrees]


def _check_axial(series: SeriesHeaders, rules: Rules) -> tuple[str | None, str]:
    frames = series.frames
    if not frames:
        return "no image frames", ""
    placed = [f for f in frames if _placed(f)]
    unplaced = len(frames) - len(placed)
    tilts = [axial_tilt_degrees(f["orientation"]) for f in placed]
    axial = [t for t in tilts if t <= rules.max_oblique_degrees]
    off = [f for f, t in zip(placed, tilts) if t > rules.max_oblique_degrees]
    if len(off) * 2 >= len(placed) and off:
        planes = sorted({orientation_name(f["orientation"]) for f in off})
        return (
            f"not axial: {len(off)} of {len(placed)} slices are tilted more than {rules.max_oblique_degrees:g}°"
            f" from the axial plane (closest to {', '.join(planes)})"
        ), ""
    if len(axial) < MIN_FRAMES:
        return (f"too few usable axial slices: {len(axial)} of {len(frames)} (at least {MIN_FRAMES} needed;"
                f" {unplaced} without position, orientation or pixel spacing, {len(off)} off-plane)"), ""
    orientations = {tuple(round(v, 3) for v in f["orientation"]) for f in placed
                    if axial_tilt_degrees(f["orientation"]) <= rules.max_oblique_degrees}
    detail = f"axial, tilt up to {max(axial):.1f}°"
    if len(orientations) > 1:
        detail += f" in {len(orientations)} orientations (angled slabs)"
    aside = []
    if off:
        planes = sorted({orientation_name(f["orientation"]) for f in off})
        aside.append(f"{len(off)} off-plane ({', '.join(planes)})")
    if unplaced:
        aside.append(f"{unplaced} without position, orientation or pixel spacing")
    if aside:
        detail += f"; {' and '.join(aside)} of {len(frames)} slices will be set aside"
    return None, detail


#: ScanOptions (0018,0022) values that suppress fat: FS (fat saturation, PS3.3 C.8.3.1.1.4's
#: defined term, written by Siemens, Philips and GE), SFS (spectral fat saturation, Siemens), and
#: WE (water excitation, Siemens), which excites water alone.
FAT_SUPPRESSING_SCAN_OPTIONS = frozenset({"FS", "FAT SAT", "FATSAT", "SFS", "WE"})

#: An inversion-recovery series (ScanningSequence IR) with an inversion time at most this (ms) is
#: a STIR: fat's null point is at TI = ln 2 x T1 of fat, about 150 ms at 1.5 T and 170-230 ms at
#: 3 T as scanners set it; T1-FLAIR and other inversion-recovery T1 use 700 ms or more.
STIR_MAX_INVERSION_TIME_MS = 300.0


def _check_fat_suppression(series: SeriesHeaders, rules: Rules) -> str | None:
    options = set(series.first("ScanOptions", [])) & FAT_SUPPRESSING_SCAN_OPTIONS
    if options:
        return f"fat-suppressed (ScanOptions {', '.join(sorted(options))}): no fat signal left to measure"
    inversion = series.first("InversionTime", None)
    if "IR" in series.first("ScanningSequence", []) and inversion is not None \
            and 0 < float(inversion) <= STIR_MAX_INVERSION_TIME_MS:
        return (f"fat-suppressed (inversion recovery with TI {float(inversion):g} ms, a STIR): no fat signal left "
                "to measure")
    found = _search(rules.fat_suppressed_patterns, [series.first("SeriesDescription"), series.first("ProtocolName"),
                                                    series.first("SequenceName")])
    if found:
        return f"fat-suppressed (description {found[1]!r}): no fat signal left to measure"
    return None


def _check_single_echo(series: SeriesHeaders) -> str | None:
    """A dual-echo chemical-shift series that holds both echoes cannot be one component."""
    echoes = sorted({h.get("EchoTime") for h in series.headers if h.get("EchoTime")})
    description = series.first("SeriesDescription")
    if len(echoes) > 1 and description and _DUAL_ECHO_HINT.search(description):
        return (f"a dual-echo series holding {len(echoes)} echo times ({', '.join(f'{t:g}' for t in echoes)} ms) "
                "in one series: in-phase and opposed-phase must come as separate series to be paired")
    return None


def echo_phase(echo_time_ms: float, field_strength_t: float) -> Contrast | None:
    """In-phase or opposed-phase from the echo time: where water and fat precess back in step
    or half a cycle apart.

    The fat-water frequency difference is 3.4 ppm (the main methylene peak; Hamilton G, et al.
    NMR Biomed 2011;24:784) of the proton Larmor frequency, 42.577 MHz/T: one cycle takes
    4.6 ms at 1.5 T and 2.3 ms at 3 T, so 2.3 ms is opposed-phase and 4.6 ms in-phase at 1.5 T.
    An echo within :data:`_PHASE_TOLERANCE` of a cycle of either is named; otherwise None.
    """
    if not (echo_time_ms and echo_time_ms > 0 and field_strength_t and field_strength_t > 0):
        return None
    cycle_ms = 1000.0 / (_FAT_SHIFT_PPM * _LARMOR_MHZ_PER_T * field_strength_t)
    phase = (echo_time_ms / cycle_ms) % 1.0
    if min(phase, 1.0 - phase) <= _PHASE_TOLERANCE:
        return Contrast.IN_PHASE
    if abs(phase - 0.5) <= _PHASE_TOLERANCE:
        return Contrast.OPPOSED_PHASE
    return None


def dixon_role(image_type: Sequence[str], description: str, echo_time_ms: float | None = None,
               field_strength_t: float | None = None) -> tuple[Contrast | None, str]:
    """The Dixon component named by ImageType values or, failing that, by the description.

    A dual-echo chemical-shift series whose description names both phases ("t1_fl2d_opp-in_tra",
    "dual echo") but neither ImageType nor the description says which echo it holds is named by
    its echo time at its field strength (:func:`echo_phase`), when both are known.

    Returns
    -------
    tuple
        The role (or ``None``) and the evidence for it.
    """
    values = {v.upper() for v in image_type[2:]} if len(image_type) > 2 else set()
    for role, names in _DIXON_IMAGE_TYPES.items():
        found = values & names
        if found:
            return role, "ImageType " + "\\".join(image_type)
    if description and _DUAL_ECHO_HINT.search(description):
        role = echo_phase(echo_time_ms or 0.0, field_strength_t or 0.0)
        if role is not None:
            return role, f"description {description!r}, TE {echo_time_ms:g} ms at {field_strength_t:g} T"
        return None, ""
    if description and (_DIXON_HINT.search(description) or "DIXON" in values):
        for role, pattern in _DIXON_DESCRIPTIONS.items():
            if pattern.search(description):
                return role, f"description {description!r}"
    return None, ""


def _weighting(series: SeriesHeaders) -> tuple[Contrast | None, str]:
    """T1 or T2 from the enhanced contrast attribute, TR and TE, or the description."""
    contrast = str(series.first("AcquisitionContrast")).upper()
    if contrast in ("T1", "T2"):
        return Contrast(contrast.lower()), f"AcquisitionContrast {contrast}"
    tr, te = series.first("RepetitionTime", None), series.first("EchoTime", None)
    if tr is not None and te is not None:
        if te <= 30 and tr <= 1200:
            return Contrast.T1, f"TR {tr:g} ms, TE {te:g} ms"
        if te >= 60 and tr >= 1500:
            return Contrast.T2, f"TR {tr:g} ms, TE {te:g} ms"
    description = " ".join(_descriptions(series)[:2])
    match = re.search(r"\bt([12])(?![0-9])", description, re.I)
    if match:
        return Contrast(f"t{match.group(1)}"), f"description {description!r}"
    shown = f"TR {tr:g} ms, TE {te:g} ms" if tr is not None and te is not None else "no TR/TE"
    return None, shown


#: The role of a study's level reference in its decision and in the series of its jobs.
LEVEL_REFERENCE = "level_reference"
#: Preference among sagittal series: T2 shows the discs and end plates best, then T1.
_REFERENCE_PREFERENCE = {Contrast.T2: 0, Contrast.T1: 1}


def _slice_normal(series: SeriesHeaders) -> np.ndarray | None:
    """The unit normal (LPS) of the series' first frame with a usable orientation, or None."""
    for frame in series.frames:
        normal = orientation_normal(frame["orientation"]) if frame.get("orientation") else None
        if normal is not None:
            return normal
    return None


def level_reference(series_list: Sequence[SeriesHeaders]) -> tuple[SeriesHeaders | None, Contrast | None, str]:
    """The study's level reference among its series.

    Returns
    -------
    (SeriesHeaders or None, Contrast or None, str)
        The sagittal series, its weighting (T1, T2 or None for another contrast) and the evidence
        of the weighting; or ``(None, None, NO_LEVEL_REFERENCE)``.
    """
    candidates = []
    for series in series_list:
        normal = _slice_normal(series)
        if normal is None or abs(float(normal[0])) < SAGITTAL_COSINE:
            continue
        weighting, evidence = _weighting(series)
        candidates.append((_REFERENCE_PREFERENCE.get(weighting, 2), -len(series.headers),
                           str(series.first("SeriesDescription")), series.series_uid, series, weighting, evidence))
    if not candidates:
        return None, None, NO_LEVEL_REFERENCE
    best = min(candidates, key=lambda c: c[:4])
    return best[4], best[5], best[6]


def _reference_decision(series_list: Sequence[SeriesHeaders], rules: Rules,
                        decisions: dict[str, Decision]) -> None:
    """Mark the study's level reference (:func:`level_reference`) among its lumbar MR series that
    are not measured themselves."""
    images = [s for s in series_list if _check_modality(s, rules) is None and _check_lumbar(s, rules)[0] is None
              and not decisions[s.series_uid].selected]
    chosen, weighting, evidence = level_reference(images)
    if chosen is None:
        return
    what = f"{weighting.upper()}-weighted ({evidence})" if weighting is not None else f"weighting unknown ({evidence})"
    decisions[chosen.series_uid] = replace(
        decisions[chosen.series_uid], selected=False, role=LEVEL_REFERENCE, kind=None, grouping=None,
        reason=f"level reference: the sagittal series, {what}, that gives the axial series of this study their "
               f"vertebral levels; not measured itself ({decisions[chosen.series_uid].reason})")


#: Share of the smaller set of slice positions two Dixon components must have in common to be
#: one acquisition: a component may lack a few slices (set aside or never sent); two separate
#: acquisitions (two stations, another slab) share few or none.
_SHARED_POSITIONS = 0.8


def _positions(series: SeriesHeaders, rules: Rules) -> frozenset[tuple[float, ...]]:
    """Slice positions and orientations of the axial frames, rounded to 0.01 mm and 0.01."""
    return frozenset(tuple(round(v, 2) for v in f["position"] + f["orientation"]) for f in _axial_frames(series, rules))


def _same_acquisition(a: frozenset, b: frozenset) -> bool:
    return bool(a) and bool(b) and len(a & b) >= _SHARED_POSITIONS * min(len(a), len(b))


def decide_study(series_list: Sequence[SeriesHeaders], rules: Rules, *, still_arriving: int = 0) -> list[Decision]:
    """Judge every series of one study.

    Parameters
    ----------
    series_list : sequence of SeriesHeaders
        The assembled series of the study.
    rules : Rules
        The configured rules.
    still_arriving : int
        Series of the study known to the node but not yet assembled. While there are any, the
        fallbacks (a two-point pair, a component alone) wait, unselected: a water/fat partner
        may be among them, and the study is judged again when each becomes ready.

    Returns
    -------
    list of Decision
        One per series, in the order given.
    """
    decisions: dict[str, Decision] = {}
    # Dixon acquisitions: (study, frame of reference, slice positions of the first component) and
    # their components by role.
    dixon: list[tuple[tuple[str, str, frozenset], dict[str, tuple[SeriesHeaders, str]]]] = []
    for series in series_list:
        skip = _check_modality(series, rules)
        lumbar_evidence = axial_evidence = ""
        if skip is None:
            skip, lumbar_evidence = _check_lumbar(series, rules)
        if skip is None:
            skip, axial_evidence = _check_axial(series, rules)
        role = evidence = None
        if skip is None:
            skip = _check_single_echo(series)
        if skip is None:
            role, evidence = dixon_role(series.first("ImageType", []), series.first("SeriesDescription"),
                                        series.first("EchoTime", None), series.first("MagneticFieldStrength", None))
            if role is None:
                skip = _check_fat_suppression(series, rules)
        if skip is not None:
            decisions[series.series_uid] = Decision(series.series_uid, series.version, False, skip)
            continue
        basis = f"lumbar ({lumbar_evidence}), {axial_evidence}"
        if role is not None:
            where = (series.study_uid, series.first("FrameOfReferenceUID"), _positions(series, rules))
            components = next((found for key, found in dixon if key[:2] == where[:2]
                               and _same_acquisition(key[2], where[2])), None)
            if components is None:
                components = {}
                dixon.append((where, components))
            if role in components:
                decisions[series.series_uid] = Decision(
                    series.series_uid, series.version, False,
                    f"a second Dixon {role} series of the same acquisition; "
                    f"series {components[role][0].series_uid} is used",
                )
                continue
            components[role] = (series, f"Dixon {role} ({evidence}); {basis}")
            continue
        weighting, evidence = _weighting(series)
        if weighting is None:
            decisions[series.series_uid] = Decision(
                series.series_uid, series.version, False,
                f"neither a Dixon component nor T1- or T2-weighted ({evidence})",
            )
        else:
            decisions[series.series_uid] = Decision(
                series.series_uid, series.version, True, f"{weighting.upper()}-weighted ({evidence}); {basis}",
                kind=weighting, role=weighting, grouping=f"{weighting}:{series.series_uid}",
            )

    groups = [_dixon_plan(components) for _, components in dixon]
    preferred = next((plan for plan in groups if plan.method == _WATER_FAT), None)
    for plan in groups:
        if plan.method != _WATER_FAT and preferred is None and still_arriving:
            decisions.update((series.series_uid, Decision(
                series.series_uid, series.version, False,
                f"Dixon {role} without a water and fat pair or a fat-fraction map so far (have: {plan.names}): "
                f"waits for the {still_arriving} series of this study still arriving")) for role, (series, _)
                in plan.components.items())
            continue
        decisions.update((d.series_uid, d) for d in _decide_dixon_group(plan, preferred))
    _reference_decision(series_list, rules, decisions)
    return [decisions[s.series_uid] for s in series_list]


_WATER_FAT = "water/fat"
_TWO_POINT = "two-point"
_ALONE = "alone"
#: A component alone, in the order one is chosen to be processed, with its kind.
_ALONE_KINDS = ((Contrast.IN_PHASE, Contrast.T1), (Contrast.WATER, Contrast.WATER), (Contrast.FAT, Contrast.FAT))


@dataclass(frozen=True)
class _DixonPlan:
    """One acquisition's Dixon components and how they can be measured."""

    components: dict[str, tuple[SeriesHeaders, str]]
    method: str

    @property
    def anchor(self) -> SeriesHeaders:
        for role in (Contrast.WATER, Contrast.FAT_FRACTION, Contrast.IN_PHASE):
            if role in self.components:
                return self.components[role][0]
        return next(iter(self.components.values()))[0]

    @property
    def names(self) -> str:
        return ", ".join(sorted(self.components))


def _dixon_plan(components: dict[str, tuple[SeriesHeaders, str]]) -> _DixonPlan:
    if (Contrast.WATER in components and Contrast.FAT in components) or Contrast.FAT_FRACTION in components:
        return _DixonPlan(components, _WATER_FAT)
    if Contrast.IN_PHASE in components and Contrast.OPPOSED_PHASE in components:
        return _DixonPlan(components, _TWO_POINT)
    return _DixonPlan(components, _ALONE)


def _decide_dixon_group(plan: _DixonPlan, preferred: _DixonPlan | None) -> list[Decision]:
    """The decisions on one acquisition's Dixon components (``preferred``: the study's first
    water/fat group, which other groups give way to)."""
    grouping = f"dixon:{plan.anchor.series_uid}"
    items = plan.components.items()
    if plan.method == _WATER_FAT:
        how = "; fat from water and fat" if Contrast.WATER in plan.components and Contrast.FAT in plan.components \
            else "; fat from the scanner's fat-fraction map"
        if Contrast.IN_PHASE in plan.components and Contrast.OPPOSED_PHASE in plan.components:
            how += ", preferred to the two-point in-phase/opposed-phase fat fraction"
        return [Decision(series.series_uid, series.version, True, f"{reason}; paired with {plan.names}{how}",
                         kind="dixon", role=role, grouping=grouping) for role, (series, reason) in items]
    missing = f"without a water and fat pair or a fat-fraction map of the same acquisition (have: {plan.names})"
    if preferred is not None:
        instead = (f"the study's water/fat Dixon (series {preferred.anchor.series_uid}) is measured instead, "
                   "the better fat method")
        what = "an in-phase/opposed-phase pair" if plan.method == _TWO_POINT else missing
        return [Decision(series.series_uid, series.version, False, f"Dixon {role} {what}: {instead}")
                for role, (series, _) in items]
    if plan.method == _TWO_POINT:
        return [Decision(
            series.series_uid, series.version, True,
            f"{reason}; paired with {plan.names}: two-point Dixon ({missing}), segmented on in-phase, fat signal "
            "fraction (IP - OP) / (2 IP), valid below 50 % fat", kind="dixon", role=role, grouping=grouping)
            for role, (series, reason) in items]
    chosen = next(((role, kind) for role, kind in _ALONE_KINDS if role in plan.components), None)
    decisions = []
    for role, (series, reason) in items:
        if chosen is None:
            decisions.append(Decision(
                series.series_uid, series.version, False,
                f"Dixon {role} {missing}: water and fat cancel in an opposed-phase image, which holds no fat measure "
                "on its own and is not a model input"))
        elif role != chosen[0]:
            other = plan.components[chosen[0]][0].series_uid
            decisions.append(Decision(series.series_uid, series.version, False,
                                      f"Dixon {role} {missing}: the {chosen[0]} series {other} of the same "
                                      "acquisition is processed instead"))
        else:
            kind = chosen[1]
            as_what = ("processed as T1-weighted (an in-phase gradient echo is T1-weighted), fat infiltration by "
                       "clustering" if kind == Contrast.T1 else
                       f"processed as a {role} image: areas and volumes, no fat (a {role} image alone holds no "
                       "fat fraction)")
            decisions.append(Decision(series.series_uid, series.version, True, f"{reason}; {missing}: {as_what}",
                                      kind=kind.value, role=kind.value, grouping=f"{kind.value}:{series.series_uid}"))
    return decisions
