"""What every result object says about where it came from and where it files.

The SEG, the SR and the summary pages name their maker the same way (General Equipment module:
Manufacturer, ManufacturerModelName, SoftwareVersions, DeviceSerialNumber) and take series
numbers from one scheme, so they are defined here once.

Series numbers: a result's SeriesNumber is its source series' number times 100 plus the
result's offset (:class:`ResultSeries`), so that results of different source series of a study
never share a number and a reader sees which series they came from (series 7 gives 791, 792,
793, and 794 for the key-slice outlines when the series has them).

A source series whose frames lie in several orientations (angled slabs) gets one SEG per
orientation group (:func:`reports.seg.build_segmentations`): each is a series of its own, as
viewers show one SEG per series, with the same SeriesNumber and a description that says which
part it is ("Paraspinal muscles 1/2 (model)").
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from .uids import ResultIdentity

__all__ = ["MANUFACTURER", "Equipment", "ResultSeries", "fit_lo"]

#: Manufacturer and model name of every result object.
MANUFACTURER = "musclenode"
# LO values are at most 64 characters; a long model name must not make a result invalid.
_LO = 64


def fit_lo(text: str) -> str:
    """``text`` cut to the 64 characters of a DICOM LO value, ending in "..." when cut.

    The ellipsis is ASCII: the results declare no SpecificCharacterSet of their own, so the
    default repertoire applies.
    """
    return text if len(text) <= _LO else text[: _LO - 3] + "..."


class ResultSeries(Enum):
    """The result series of one source series: SeriesNumber offset and SeriesDescription."""

    SEG = (91, "Paraspinal muscles{part} ({model})")
    SR = (92, "Paraspinal muscle measurements (research use)")
    SUMMARY = (93, "Paraspinal muscle summary (research use)")
    #: The key-slice outlines in the form viewers turn into their own tools (:mod:`reports.outline_report`).
    OUTLINES = (94, "Paraspinal muscle key-slice outlines (research use)")

    def __init__(self, offset: int, description: str) -> None:
        self.offset = offset
        self._description = description

    def number(self, source_series_number: int | None) -> int:
        """SeriesNumber: the source's number times 100 plus :attr:`offset` (0 for an unknown source).

        IS holds at most 12 characters; a vendor's huge series number wraps rather than overflows.
        """
        base = source_series_number if source_series_number and source_series_number > 0 else 0
        return (base % 10_000_000) * 100 + self.offset

    def description(self, model: str = "", part: tuple[int, int] | None = None) -> str:
        """SeriesDescription, naming the model and the part (``1/2``) where the series' description does."""
        shown = f" {part[0]}/{part[1]}" if part is not None and part[1] > 1 else ""
        return fit_lo(self._description.format(model=model, part=shown))

    def identification(self, identity: ResultIdentity, source_series_number: int | None, *, model: str = "",
                       page: int | None = None, part: tuple[int, int] | None = None) -> dict[str, Any]:
        """Keyword arguments of highdicom's SOP class constructors that identify one instance.

        Series and instance UIDs come from ``identity`` (``uid("seg", "series")``,
        ``uid("seg", "instance")``; a page of the summary is ``uid("summary", "instance", "2")``),
        the series number from :meth:`number`, the description from :meth:`description`.
        ``part=(k, n)`` with ``n > 1`` identifies the k-th of n series of this kind made from one
        source (a SEG per orientation group): ``uid("seg", "series", "part k")`` and
        ``uid("seg", "instance", "part k")``. A single part keeps the plain UIDs.
        """
        parted = ("part " + str(part[0]),) if part is not None and part[1] > 1 else ()
        instance = ("instance", *parted) if page is None else ("instance", str(page))
        return {
            "series_instance_uid": identity.uid(self.name.lower(), "series", *parted),
            "series_number": self.number(source_series_number),
            "sop_instance_uid": identity.uid(self.name.lower(), *instance),
            "instance_number": 1 if page is None else page,
            "series_description": self.description(model, part),
        }


@dataclass(frozen=True)
class Equipment:
    """musclenode as the equipment that made a result.

    Parameters
    ----------
    software_version : str
        musclenode's version.
    model : str
        The segmentation model's name and version, e.g. ``"musclenode-lumbar-dixon 1.0.0"``.
    device_serial_number : str
        The installation (for example the node's AE title).
    """

    software_version: str
    model: str
    device_serial_number: str = MANUFACTURER

    @property
    def software_versions(self) -> list[str]:
        """SoftwareVersions: musclenode's version, then the model's."""
        return [fit_lo(self.software_version), fit_lo(self.model)]

    @property
    def source(self) -> str:
        """musclenode and its version, as an algorithm's source."""
        return fit_lo(f"{MANUFACTURER} {self.software_version}")

    def general_equipment(self) -> dict[str, Any]:
        """Keyword arguments of highdicom's SOP class constructors for the General Equipment module."""
        return {
            "manufacturer": MANUFACTURER,
            "manufacturer_model_name": MANUFACTURER,
            "software_versions": self.software_versions,
            "device_serial_number": fit_lo(self.device_serial_number),
        }
