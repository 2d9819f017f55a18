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

__all__ = ["levels_by_height"]


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
