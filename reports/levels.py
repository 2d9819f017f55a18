"""Vertebral levels of slices.

Metrics are grouped by level when the level of a slice is known, through a
:data:`reports.metrics.LevelAssigner`: frame geometry in, level name or ``None`` out. The
pipeline's levels come from the bodies the level model found on the study's sagittal series
(:func:`inference.vertebrae.assign_levels`, as ``musclenode levels`` prints them); here, an
assignment of head-foot ranges, for tests and research sidecars.
"""

from __future__ import annotations

from typing import Callable, Mapping

from inference.geometry import FrameGeometry
from inference.vocabulary import Level, vertebra_range

__all__ = ["LEVEL_RANGES", "is_slice_level", "levels_by_height", "range_members"]

#: Ranges of vertebral bodies measured as groups of their own, beside each level, when a series
#: has slices at every body and disc of the range: the ranges the published references give their
#: values over (reference-v1: L1-L5, Crawford et al. AJNR 2016; L3-L5, Sollmann et al. 2020; see
#: reports/data/reference-v1-sources.csv). Named as those references name them: "L3-L5" is the
#: bodies L3 to L5 and the discs between, never a disc.
LEVEL_RANGES = ("L1-L5", "L3-L5")


def is_slice_level(name: str) -> bool:
    """Whether a group's level is a slice's level, one body or disc (``"L3"``, ``"L3-L4"``), not
    a range of bodies (``"L3-L5"``, :data:`LEVEL_RANGES`) nor the whole series."""
    try:
        Level.parse(name)
    except ValueError:
        return False
    return True


def range_members(levels: str) -> tuple[str, ...]:
    """The slice levels of a range of bodies, head to foot.

    >>> range_members("L3-L5")
    ('L3', 'L3-L4', 'L4', 'L4-L5', 'L5')

    Raises
    ------
    ValueError
        For text that is no range of vertebrae (:func:`inference.vocabulary.vertebra_range`), or
        a range of under three bodies: "L3-L4" names the disc between them as a slice's level.
    """
    bodies = vertebra_range(levels)
    if len(bodies) < 3:
        raise ValueError(f"levels {levels!r}: a range of levels spans at least three bodies; "
                         "two adjacent ones name the disc between them")
    members = []
    for upper in bodies[:-1]:
        members += [Level(upper).name, Level(upper, disc=True).name]
    return tuple(members + [Level(bodies[-1]).name])


def levels_by_height(ranges: Mapping[str, tuple[float, float]]) -> Callable[[FrameGeometry], str | None]:
    """Assign levels by the height of a frame's centre along the patient's head-foot axis.

    Parameters
    ----------
    ranges : mapping of str to (float, float)
        Level name to an inclusive range of LPS z (mm, +z towards the head), for example
        ``{"L3": (-40.0, -5.0), "L4": (-75.0, -40.0)}``. Ranges must not overlap.

    Returns
    -------
    callable
        Frame geometry to level name, ``None`` outside every range.
    """
    ordered = sorted((min(low, high), max(low, high), name) for name, (low, high) in ranges.items())
    for (low_a, high_a, a), (low_b, _, b) in zip(ordered, ordered[1:]):
        if low_b < high_a:
            raise ValueError(f"level ranges {a} and {b} overlap")

    def level_of(frame: FrameGeometry) -> str | None:
        height = float(frame.centre[2])
        for low, high, name in ordered:
            if low <= height <= high:
                return name
        return None

    return level_of
