"""Functional groups of enhanced multi-frame images: where a frame's attributes are found.

An enhanced image (enhanced MR, SEG, ...) keeps per-frame attributes such as the plane position,
orientation, pixel measures and rescale in functional group macros, each either in the frame's
own item of the Per-frame Functional Groups Sequence or, when it is the same for every frame,
in the one item of the Shared Functional Groups Sequence (PS3.3 C.7.6.16). This is the one
place that looks them up; the geometry reader and the node's header index both use it.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

__all__ = ["functional_group", "is_enhanced"]


def is_enhanced(ds: Any) -> bool:
    """Whether the instance places its frames through functional groups."""
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def functional_group(ds: Any, frame_index: int, sequence: str) -> Dataset | None:
    """The item of one functional group macro for one frame.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        An enhanced multi-frame instance (its header suffices).
    frame_index : int
        0-based frame index.
    sequence : str
        Keyword of the macro's sequence, e.g. ``"PlanePositionSequence"``.

    Returns
    -------
    pydicom.dataset.Dataset or None
        The first item of that sequence in the frame's own functional groups, else in the
        shared ones (a per-frame group overrides a shared one); None when neither has it or the
        sequence is empty.
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    items = ([per_frame[frame_index]] if per_frame and 0 <= frame_index < len(per_frame) else [])
    items += [shared[0]] if shared else []
    for item in items:
        found = item.get(sequence)
        if found:
            return found[0]
    return None
