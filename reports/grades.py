"""Published fat infiltration grades and cut-offs, each returned with its citation.

- :func:`fat_infiltration_grade`: grade 0 (< 20 % of the cross-section fat), 1 (20-50 %),
  2 (> 50 %), as Storheim et al. 2017 state the grading of Kjaer et al. 2007 for the multifidus.
- :func:`severe_multifidus_fat`: multifidus intramuscular fat >= 50 % ("severe"), which was
  associated with worse 5-year recovery after decompression for lumbar spinal stenosis
  (Wesselink et al. 2025).
- :func:`fat_unreliable_reason`: psoas fat from T1/T2 thresholding is not graded or flagged at
  all, because no thresholding model measured it reliably (ICC <= 0.01; Wesselink et al. 2024).

Boundaries are those the papers print, compared on the unrounded value: exactly 20 % is grade 1,
exactly 50 % is grade 1 (grade 2 is "> 50 %"), and exactly 50 % is severe (">= 50 %"). The two
sources therefore disagree at exactly 50 %, and each function keeps its own source's rule. A value
shown rounded (19.96 % as "20.0 %") can sit on the other side of a boundary from its label; the
label is the authority.

Both cut-offs were defined on T2-weighted images (visual grading, or automated thresholding). A
Dixon fat fraction is a signal fraction, not the share of the area that is fat; the two agree
well for the multifidus (3-class Gaussian mixture vs Dixon ICC >= 0.77, Wesselink et al. 2024) but
are not the same quantity, so a grade from a Dixon value carries a note saying so.

A method that cannot tell fat above a limit from below it (two-point Dixon, 50 %:
``FatMethod.ambiguous_above_percent``) never gives the severe flag, whose cut-off is that very
limit, and its grade says that grade 2 (> 50 %) is out of its reach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from inference.vocabulary import FatMethod, Muscle, ReferenceMethod, muscle_group

from .reference import muscle_key

__all__ = [
    "CITATION_KJAER_STORHEIM",
    "CITATION_WESSELINK_2024",
    "CITATION_WESSELINK_2025",
    "Grade",
    "fat_infiltration_grade",
    "fat_unreliable_reason",
    "severe_multifidus_fat",
]

CITATION_KJAER_STORHEIM = ("Kjaer P, et al. BMC Med 2007;5:2 (doi:10.1186/1741-7015-5-2); cut-offs as stated by "
                           "Storheim K, et al. BMC Musculoskelet Disord 2017;18:145 (doi:10.1186/s12891-017-1505-5)")
CITATION_WESSELINK_2025 = "Wesselink EO, et al. Spine 2025 (doi:10.1097/BRS.0000000000005408)"
CITATION_WESSELINK_2024 = "Wesselink EO, et al. N Am Spine Soc J 2024;17:100313"

_BOUNDARIES = ("boundaries as published, on the unrounded value: below 20 % grade 0, 20 % to 50 % inclusive "
               "grade 1, above 50 % grade 2")
_DIXON = ("the cut-off was defined on T2-weighted images; this value is a Dixon fat fraction, a related but "
          "different quantity")


@dataclass(frozen=True)
class Grade:
    """A grade or flag with where it comes from.

    Attributes
    ----------
    value : int, bool or None
        The grade (0, 1, 2), the flag (True/False), or None when the value was not graded.
    label : str
        Short text for a report, e.g. "grade 1 (20-50% fat)" or "not graded".
    citation : str
        The source of the grade, or of the reason it was not given.
    note : str
        How the source defined it and how it was applied here, or why it was refused.
    """

    value: int | bool | None
    label: str
    citation: str
    note: str

    @property
    def graded(self) -> bool:
        return self.value is not None


def _method(fat_percent: float, method: str) -> ReferenceMethod:
    """The reference method of a method name; refuses unknown methods and impossible values."""
    known = ReferenceMethod.of(method)
    if known is None:
        raise ValueError(f"method {method!r} is not one of {', '.join(ReferenceMethod)} or a fat method")
    if not (math.isfinite(fat_percent) and 0.0 <= fat_percent <= 100.0):
        raise ValueError(f"fat percentage must be within 0-100, got {fat_percent}")
    return known


def fat_unreliable_reason(method: str, muscle: str) -> str | None:
    """Why a fat value of this method and muscle must not be graded, or None when it may be.

    Psoas major fat (alone or in a group) from T1/T2 thresholding is unreliable: none of the
    thresholding models tested agreed with Dixon for the psoas (ICC <= 0.01, Wesselink et al.
    2024, T2-weighted images). T1-weighted thresholding is treated the same way, since nothing
    shows it does better for the psoas.
    """
    if ReferenceMethod.of(method) is ReferenceMethod.T1T2_THRESHOLD and Muscle.PSOAS_MAJOR in muscle_group(muscle):
        return ("psoas fat from T1/T2 thresholding is unreliable (ICC <= 0.01 against Dixon for every "
                "thresholding model tested) and is not graded")
    return None


def _ambiguous_above(method: str) -> float | None:
    """The fat percentage above which a fat method's values are ambiguous (None: no limit, or a
    reference method's name)."""
    try:
        return FatMethod(method).ambiguous_above_percent
    except ValueError:
        return None


def _refusal(method: str, muscle: str, citation_if_muscle: str, what: str) -> Grade | None:
    reason = fat_unreliable_reason(method, muscle)
    if reason is not None:
        return Grade(None, "not graded", CITATION_WESSELINK_2024, reason)
    if muscle_group(muscle) != (Muscle.MULTIFIDUS,):
        return Grade(None, "not graded", citation_if_muscle,
                     f"{what} was defined for the multifidus only, not for {muscle_key(muscle)}")
    return None


def fat_infiltration_grade(fat_percent: float, *, method: str, muscle: str) -> Grade:
    """Fat infiltration grade 0, 1 or 2 of the multifidus (Kjaer et al. 2007; Storheim et al. 2017).

    Parameters
    ----------
    fat_percent : float
        Percentage of the muscle cross-section that is fat (0-100). Storheim et al. grade the
        total multifidus cross-section, left plus right side together.
    method : str
        ``dixon_ff`` or ``t1t2_threshold``, or a fat method such as ``gmm3`` (compared under
        its :class:`~inference.vocabulary.ReferenceMethod`).
    muscle : str
        Muscle key; only ``multifidus`` is graded.

    Returns
    -------
    Grade
        ``value`` 0 (< 20 %), 1 (20 % to 50 % inclusive) or 2 (> 50 %); None with the reason when
        the combination is not graded.
    """
    limit = _ambiguous_above(method)
    method = _method(fat_percent, method)
    refused = _refusal(method, muscle, CITATION_KJAER_STORHEIM, "the fat infiltration grade")
    if refused is not None:
        return refused
    if fat_percent < 20.0:
        value, label = 0, "grade 0 (<20% fat)"
    elif fat_percent <= 50.0:
        value, label = 1, "grade 1 (20-50% fat)"
    else:
        value, label = 2, "grade 2 (>50% fat)"
    note = ("share of the multifidus cross-section (left plus right in the source) containing fat, graded "
            "visually on T2-weighted images in the source; " + _BOUNDARIES)
    if method is ReferenceMethod.DIXON_FF:
        note += "; " + _DIXON
    if limit is not None:
        note += (f"; this method cannot tell fat above {limit:g} % from below, so grade 2 is out of its reach and "
                 f"a muscle of more than {limit:g} % fat would be graded as less")
    return Grade(value, label, CITATION_KJAER_STORHEIM, note)


def severe_multifidus_fat(fat_percent: float, *, method: str, muscle: str) -> Grade:
    """Whether multifidus intramuscular fat is "severe" (>= 50 %), after Wesselink et al. 2025.

    In 149 patients operated for lumbar spinal stenosis, severe multifidus fat (>= 50 %, each side
    measured separately on T2-weighted MRI by automated models) went with less successful 5-year
    recovery (37.5 % vs 53.7 %); the association was not seen for the erector spinae. It is a
    prognostic association in that population, not a diagnosis.

    Parameters
    ----------
    fat_percent : float
        Intramuscular fat of one multifidus (one side), 0-100.
    method : str
    muscle : str
        Only ``multifidus`` is flagged.

    Returns
    -------
    Grade
        ``value`` True (>= 50 %) or False (< 50 %); None with the reason when not flagged.
    """
    limit = _ambiguous_above(method)
    method = _method(fat_percent, method)
    refused = _refusal(method, muscle, CITATION_WESSELINK_2025, "the severe-fat flag")
    if refused is not None:
        return refused
    if limit is not None and limit <= 50.0:
        return Grade(None, "not flagged", CITATION_WESSELINK_2025,
                     f"the severe-fat flag (>= 50 %) cannot be decided by a method that cannot tell fat above "
                     f"{limit:g} % from below")
    severe = fat_percent >= 50.0
    label = "severe (>=50% fat)" if severe else "non-severe (<50% fat)"
    note = ("per muscle side, T2-weighted MRI with automated models in the source; 50 % exactly counts as "
            "severe; associated with worse 5-year recovery after decompression for lumbar spinal stenosis")
    if method is ReferenceMethod.DIXON_FF:
        note += "; " + _DIXON
    return Grade(severe, label, CITATION_WESSELINK_2025, note)
