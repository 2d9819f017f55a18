"""Each muscle's metrics set against the reference standard and the published grades.

This is where a number becomes something a clinician can read: the fat fraction with its z-score,
percentile and the reference group it was compared with; the fat infiltration grade and the
multifidus "severe" flag with their citations; and, for every comparison that could not be made,
the reason.

Levels: the published references are per vertebral level range. When the slices' levels are not
known (no level model yet), the measurement over the whole series is compared with the lumbar
reference of ``assume_levels`` (by default L1-L5), and the comparison says so in a note. A
reader can then judge, for example, that a series reaching into L5/S1 reads fattier than L1-L5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from inference.patient import PatientContext
from inference.vocabulary import FatMethod, Level

from .grades import Grade, fat_infiltration_grade, severe_multifidus_fat
from .levels import is_slice_level
from .metrics import ALL_LEVELS, MuscleMetrics
from .reference import Comparison, ReferenceTable, SiteReference, compare

__all__ = ["Assessment", "assess"]


@dataclass(frozen=True)
class Assessment:
    """One muscle, side and level group with its comparisons and grades."""

    metrics: MuscleMetrics
    fat: Comparison | None
    csa: Comparison | None
    grade: Grade | None
    severe: Grade | None
    levels: str | None
    levels_note: str | None
    #: What the level reference reported about its bodies (see :func:`assess`), on every group.
    levels_problems: tuple[str, ...] = ()


def _levels(metrics: MuscleMetrics, assume_levels: str | None, levels_known: Sequence[str],
            levels_reason: str | None = None, levels_problems: Sequence[str] = ()) -> tuple[str | None, str | None]:
    if metrics.level != ALL_LEVELS:
        return metrics.level, None
    if assume_levels is None:
        return None, None
    if levels_known:
        # Per-level rows are used for the level groups where the reference has that level; this
        # group is the fallback over the whole series, and says so.
        # What the level reference saw that may make a level wrong travels with the levels.
        warns = f"; the level reference reports: {'; '.join(levels_problems)}" if levels_problems else ""
        return assume_levels, (f"levels identified ({levels_known[0]} to {levels_known[-1]}){warns}: each level "
                               f"is compared where the reference has that level; all slices together are "
                               f"compared with the {assume_levels} reference")
    why = f" ({levels_reason})" if levels_reason else ""
    return assume_levels, (
        f"vertebral levels of the slices were not identified{why}; the whole series is compared with the "
        f"{assume_levels} reference"
    )


def assess(
    metrics: Sequence[MuscleMetrics],
    patient: PatientContext,
    *,
    assume_levels: str | None = "L1-L5",
    table: ReferenceTable | None = None,
    site: SiteReference | None = None,
    levels_reason: str | None = None,
    levels_problems: Sequence[str] = (),
) -> list[Assessment]:
    """Compare every muscle group's fat and area with the reference, and grade its fat.

    Parameters
    ----------
    metrics : sequence of MuscleMetrics
        From :func:`reports.metrics.measure`.
    patient : PatientContext
        Age, sex, BMI (with what is missing and why).
    assume_levels : str or None
        Level range taken for the group ``"all"`` when levels are unknown; None to compare only
        groups of known level.
    table, site : optional
        The published table (default: the shipped version) and a site reference (preferred when
        it has a model for the measurement).
    levels_reason : str, optional
        Why the slices have no levels (no sagittal series, another frame of reference), stated
        in the note of the whole-series comparison.
    levels_problems : sequence of str
        What the level reference reported about its bodies (named by their order, split, gaps:
        :attr:`inference.vertebrae.SeriesLevels.problems`), stated in that note when levels are
        known.
    """
    assessments = []
    # The slices' own levels (a body or a disc), not the ranges measured over several of them.
    levels_known = sorted({item.level for item in metrics if is_slice_level(item.level)},
                          key=lambda level: Level.parse(level).order)
    for item in metrics:
        levels, note = _levels(item, assume_levels, levels_known, levels_reason, levels_problems)
        fat_comparison = grade = severe = None
        if item.fat is not None and item.fat.mean_percent is not None:
            fat_comparison = compare(
                item.fat.mean_percent, method=item.fat.method, muscle=item.muscle,
                measurement="fat_fraction_percent", levels=levels, patient=patient, table=table, site=site,
            )
            grade = fat_infiltration_grade(item.fat.mean_percent, method=item.fat.method, muscle=item.muscle)
            severe = severe_multifidus_fat(item.fat.mean_percent, method=item.fat.method, muscle=item.muscle)
        csa_method = item.fat.method if item.fat is not None else FatMethod.DIXON_FF
        csa_comparison = compare(
            item.mean_csa_mm2, method=csa_method, muscle=item.muscle, measurement="csa_mm2",
            levels=levels, patient=patient, table=table, site=site,
        )
        assessments.append(Assessment(item, fat_comparison, csa_comparison, grade, severe, levels, note,
                                      tuple(levels_problems) if levels_known else ()))
    return assessments
