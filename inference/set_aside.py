"""Images set aside, and why: one record from reading a series through to its results.

Series come as scanners and archives write them: a slice repeated at the same place, a slice
without its position, a localizer inside an axial series, an instance whose pixel data cannot be
decoded. The node processes the rest and says what it left out. Every such image becomes one
:class:`SetAside` (which instance, which frame, what kind of problem, and the detail in words),
carried on the :class:`~inference.geometry.SeriesImage` it was left out of, then on the
:class:`~inference.geometry.LabelMap` of the acquisition, and from there into the SR, the summary
page, the job record and ``musclenode status``. Later checks that exclude frames (quality
control) add their own kinds here and use the same record.

Nothing here reads files; these are plain values.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Iterable

__all__ = ["MIN_FRAMES", "SetAside", "SetAsideKind", "describe_counts", "too_few_frames"]

#: The fewest frames a series (after setting images aside) must keep to be processed. Two are
#: the least a volume is measured from (PS3.3 slice spacing needs neighbours); the third keeps
#: a single stray slice from being reported as a series result. With fewer, the job fails with
#: the set-aside reasons as its reason.
MIN_FRAMES = 3


class SetAsideKind(StrEnum):
    """Why an image was left out; the value is what the job record and the SR say."""

    UNREADABLE = "unreadable"
    UNDECODABLE = "undecodable pixel data"
    NOT_GREYSCALE = "not a greyscale image"
    NO_GEOMETRY = "no position, orientation or pixel spacing"
    INVALID_GEOMETRY = "invalid position, orientation or pixel spacing"
    OFF_PLANE = "off-plane"
    REPEATED = "repeated at the same position"
    UNPAIRED = "no partner in the other Dixon series"
    BLANK = "blank"
    NOISE = "noise only"

    @property
    def words(self) -> str:
        """A sentence fragment for people: what this kind means."""
        return _WORDS[self]


_WORDS = {
    SetAsideKind.UNREADABLE: "the file could not be read as DICOM",
    SetAsideKind.UNDECODABLE: "its pixel data could not be decoded",
    SetAsideKind.NOT_GREYSCALE: "it is not a greyscale image",
    SetAsideKind.NO_GEOMETRY: "it lacks the position, orientation or pixel spacing that place it in the patient",
    SetAsideKind.INVALID_GEOMETRY: "its position, orientation or pixel spacing are not valid",
    SetAsideKind.OFF_PLANE: "it is not in the series' axial plane (a localizer or another plane)",
    SetAsideKind.REPEATED: "a later acquisition at the same position is used instead",
    SetAsideKind.UNPAIRED: "the other Dixon series has no image at this position",
    SetAsideKind.BLANK: "it holds no body to measure (a blank image)",
    SetAsideKind.NOISE: "it holds noise only, no anatomy",
}


@dataclass(frozen=True)
class SetAside:
    """One image (an instance, or one frame of it) left out of processing.

    Attributes
    ----------
    series_instance_uid : str
        The series it belongs to.
    sop_instance_uid : str
        The instance ("" when the file could not be read far enough to know it).
    frame_number : int or None
        1-based frame number within the instance (1 for single-frame instances); None when the
        whole instance is set aside (all its frames).
    kind : SetAsideKind
    detail : str
        What exactly was found, in words a person understands (no patient data).
    instance_number : int or None
        InstanceNumber, so that a person can find the image in a viewer.
    multi_frame : bool
        Whether the instance has several frames (then the frame is named when shown).
    """

    series_instance_uid: str
    sop_instance_uid: str
    frame_number: int | None
    kind: SetAsideKind
    detail: str
    instance_number: int | None = None
    multi_frame: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", SetAsideKind(self.kind))

    @property
    def where(self) -> str:
        """``"instance 12"`` or ``"instance 2, frame 3"`` (the UID where there is no number)."""
        instance = (f"instance {self.instance_number}" if self.instance_number is not None
                    else f"instance {self.sop_instance_uid or '(unknown)'}")
        if self.multi_frame and self.frame_number is not None:
            return f"{instance}, frame {self.frame_number}"
        return instance

    def describe(self) -> str:
        """One line: where, what kind, and the detail."""
        return f"{self.where}: {self.kind} ({self.detail})"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-compatible record (job results, ``musclenode status --json``)."""
        return {"series_uid": self.series_instance_uid, "sop_instance_uid": self.sop_instance_uid,
                "frame": self.frame_number, "instance_number": self.instance_number,
                "multi_frame": self.multi_frame, "kind": str(self.kind), "detail": self.detail}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "SetAside":
        """The inverse of :meth:`as_dict`."""
        return cls(record["series_uid"], record["sop_instance_uid"], record.get("frame"),
                   SetAsideKind(record["kind"]), record["detail"], record.get("instance_number"),
                   bool(record.get("multi_frame", False)))


def describe_counts(items: Iterable[SetAside]) -> str:
    """``"3 images set aside: 2 repeated at the same position, 1 off-plane"`` ("" for none)."""
    items = list(items)
    if not items:
        return ""
    counts = Counter(item.kind for item in items)
    parts = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{len(items)} image{'s' if len(items) != 1 else ''} set aside: {parts}"


def too_few_frames(kept: int, items: Iterable[SetAside], what: str = "the series") -> str | None:
    """The reason a series cannot be processed with ``kept`` frames left, or None when enough are.

    The reason names the rule (:data:`MIN_FRAMES`) and every kind of image that was set aside.
    """
    if kept >= MIN_FRAMES:
        return None
    items = list(items)
    reasons = "; ".join(sorted({f"{item.kind}: {item.kind.words}" for item in items}))
    return (f"{what} keeps {kept} usable image{'s' if kept != 1 else ''} after setting aside {len(items)}, "
            f"and at least {MIN_FRAMES} are needed" + (f" ({reasons})" if reasons else ""))
