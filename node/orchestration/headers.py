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
_NUMBERS = ("EchoTime", "RepetitionTime", "InversionTime", "FlipAngle", "AcquisitionNumber", "InstanceNumber", "SeriesNumber")


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


def _first_item(dataset: Dataset | None, keyword: str) -> Dataset | None:
    if dataset is None:
        return None
    sequence = dataset.get(keyword)
    return sequence[0] if sequence else None


def _frame_geometry(ds: Dataset) -> list[dict[str, list[float] | None]]:
    """Orientation, position and pixel spacing of every frame, in frame order."""
    if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
        return [{
            "orientation": _floats(ds.get("ImageOrientationPatient"), 6),
            "position": _floats(ds.get("ImagePositionPatient"), 3),
            "spacing": _floats(ds.get("PixelSpacing"), 2),
        }]
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    frames = []
    for index in range(int(ds.get("NumberOfFrames", len(per_frame)) or len(per_frame) or 1)):
        item = per_frame[index] if index < len(per_frame) else None

        def lookup(group: str, keyword: str, count: int) -> list[float] | None:
            # A functional group sits either in the frame's own item or in the shared one.
            for source in (item, shared):
                group_item = _first_item(source, group)
                if group_item is not None and keyword in group_item:
                    return _floats(group_item.get(keyword), count)
            return None

        frames.append({
            "orientation": lookup("PlaneOrientationSequence", "ImageOrientationPatient", 6),
            "position": lookup("PlanePositionSequence", "ImagePositionPatient", 3),
            "spacing": lookup("PixelMeasuresSequence", "PixelSpacing", 2),
        })
    return frames


def _enhanced_contrast(ds: Dataset) -> dict[str, Any]:
    """Contrast parameters of an enhanced MR image, from its functional groups."""
    values: dict[str, Any] = {}
    values["AcquisitionContrast"] = _text(ds.get("AcquisitionContrast"))
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    frame = _first_item(ds, "PerFrameFunctionalGroupsSequence")
    for source in (frame, shared):
        timing = _first_item(source, "MRTimingAndRelatedParametersSequence")
        if timing is not None and values.get("RepetitionTime") is None:
            values["RepetitionTime"] = _number(timing.get("RepetitionTime"))
        echo = _first_item(source, "MREchoSequence")
        if echo is not None and values.get("EchoTime") is None:
            values["EchoTime"] = _number(echo.get("EffectiveEchoTime"))
        frame_type = _first_item(source, "MRImageFrameTypeSequence")
        if frame_type is not None and not values.get("FrameType"):
            values["FrameType"] = _multi(frame_type.get("FrameType"))
    return values


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
    if "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds:
        for key, value in _enhanced_contrast(ds).items():
            if value not in (None, "", []) and summary.get(key) in (None, "", []):
                summary[key] = value
    return summary
