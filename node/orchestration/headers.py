"""The few header values the node indexes for each instance, read without touching pixel data.

The summary is what the selection rules and ``musclenode status`` need: identity, description,
contrast parameters, and the geometry of every frame (classic single-frame images and enhanced
multi-frame images alike), so that a series can be judged without opening its files again.
"""

from __future__ import annotations

import io
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from inference.functional_groups import functional_group, is_enhanced

from ..network.integrity import DEFLATED

__all__ = ["parse_header", "summarise"]

_PIXEL_DATA = Tag(0x7FE0, 0x0010)


def parse_header(encoded: bytes, transfer_syntax: str) -> Dataset:
    """Read the elements of an encoded dataset up to its pixel data.

    ``encoded`` is already inflated for the deflated transfer syntax, which is then explicit VR
    little endian.
    """
    syntax = UID(transfer_syntax)
    implicit = False if syntax == DEFLATED else syntax.is_implicit_VR
    little = True if syntax == DEFLATED else syntax.is_little_endian
    return read_dataset(io.BytesIO(encoded), implicit, little, stop_when=lambda tag, vr, length: tag == _PIXEL_DATA)

_TEXT = (
    "Modality",
    "SeriesDescription",
    "StudyDescription",
    "ProtocolName",
    "BodyPartExamined",
    "FrameOfReferenceUID",
    "SequenceName",
    "Manufacturer",
)
_MULTI_TEXT = ("ImageType", "ScanningSequence", "SequenceVariant", "ScanOptions")
_NUMBERS = ("EchoTime", "RepetitionTime", "InversionTime", "FlipAngle", "AcquisitionNumber", "InstanceNumber", "SeriesNumber",
            "MagneticFieldStrength")


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _multi(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v).strip().upper() for v in value]
    return [str(value).strip().upper()]


def _number(value: Any) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _floats(value: Any, count: int) -> list[float] | None:
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def _frame_geometry(ds: Dataset) -> list[dict[str, list[float] | None]]:
    """Orientation, position and pixel spacing of every frame, in frame order."""
    if not is_enhanced(ds):
        return [{
            "orientation": _floats(ds.get("ImageOrientationPatient"), 6),
            "position": _floats(ds.get("ImagePositionPatient"), 3),
            "spacing": _floats(ds.get("PixelSpacing"), 2),
        }]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    count = int(ds.get("NumberOfFrames", len(per_frame)) or len(per_frame) or 1)

    def lookup(index: int, group: str, keyword: str, size: int) -> list[float] | None:
        item = functional_group(ds, index, group)
        return None if item is None else _floats(item.get(keyword), size)

    return [{
        "orientation": lookup(index, "PlaneOrientationSequence", "ImageOrientationPatient", 6),
        "position": lookup(index, "PlanePositionSequence", "ImagePositionPatient", 3),
        "spacing": lookup(index, "PixelMeasuresSequence", "PixelSpacing", 2),
    } for index in range(count)]


def _enhanced_contrast(ds: Dataset) -> dict[str, Any]:
    """Contrast parameters of an enhanced MR image, from the first frame's functional groups."""
    timing = functional_group(ds, 0, "MRTimingAndRelatedParametersSequence")
    echo = functional_group(ds, 0, "MREchoSequence")
    frame_type = functional_group(ds, 0, "MRImageFrameTypeSequence")
    return {
        "AcquisitionContrast": _text(ds.get("AcquisitionContrast")),
        "RepetitionTime": None if timing is None else _number(timing.get("RepetitionTime")),
        "EchoTime": None if echo is None else _number(echo.get("EffectiveEchoTime")),
        "FrameType": [] if frame_type is None else _multi(frame_type.get("FrameType")),
    }


def summarise(ds: Dataset) -> dict[str, Any]:
    """Return the indexed header values of one instance as a JSON-compatible dict.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The instance, read with or without its pixel data.
    """
    summary: dict[str, Any] = {k: _text(ds.get(k)) for k in _TEXT}
    summary.update({k: _multi(ds.get(k)) for k in _MULTI_TEXT})
    summary.update({k: _number(ds.get(k)) for k in _NUMBERS})
    summary["SOPClassUID"] = _text(ds.get("SOPClassUID"))
    summary["Rows"] = int(ds.get("Rows") or 0)
    summary["Columns"] = int(ds.get("Columns") or 0)
    summary["NumberOfFrames"] = int(ds.get("NumberOfFrames") or 1)
    summary["frames"] = _frame_geometry(ds)
    if is_enhanced(ds):
        for key, value in _enhanced_contrast(ds).items():
            if value not in (None, "", []) and summary.get(key) in (None, "", []):
                summary[key] = value
    return summary
