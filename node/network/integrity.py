"""Structural check of an encoded dataset: every element's value lies inside the bytes received.

pydicom reads a truncated stream without complaint (a short last value is simply short), so a
sender that stopped mid-file would otherwise get Success for a file that no viewer can open. This
walks the element structure, nested sequences and encapsulated pixel data included, without
decoding any value, and on the way picks up the raw values of a few top-level elements (the UIDs
the store needs), so that the C-STORE handler needs no full parse.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

__all__ = ["DEFLATED", "inflate", "IncompleteDataset", "Scan", "scan"]

#: Deflated Explicit VR Little Endian (PS3.5 A.5): the dataset is a raw deflate stream.
DEFLATED = "1.2.840.10008.1.2.1.99"


def inflate(stream: bytes) -> bytes:
    """The dataset of a deflated transfer syntax, inflated (raw deflate, PS3.5 A.5)."""
    return zlib.decompress(stream, -zlib.MAX_WBITS)


_UNDEFINED = 0xFFFFFFFF
_ITEM = (0xFFFE, 0xE000)
_ITEM_END = (0xFFFE, 0xE00D)
_SEQUENCE_END = (0xFFFE, 0xE0DD)
_PIXEL_DATA = (0x7FE0, 0x0010)
# Explicit VRs whose length field is 4 bytes after 2 reserved bytes (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_SHORT_VRS = {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN", b"SH",
    b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
}


@dataclass
class Scan:
    """What a scan found: raw values of the wanted top-level elements and where pixel data starts."""

    values: dict[tuple[int, int], bytes] = field(default_factory=dict)
    pixel_data_offset: int | None = None

    def text(self, group: int, element: int) -> str:
        """A wanted value as text, without the padding DICOM adds to odd lengths."""
        return self.values.get((group, element), b"").decode("ascii", "replace").strip(" \x00")


class IncompleteDataset(ValueError):
    """The encoded dataset ends inside an element or lacks a delimiter."""


class _Reader:
    def __init__(self, data: bytes, implicit: bool, little: bool) -> None:
        self.data = memoryview(data)
        self.implicit = implicit
        self.order = "<" if little else ">"

    def tag(self, offset: int) -> tuple[int, int]:
        if offset + 4 > len(self.data):
            raise IncompleteDataset(f"dataset ends inside a tag at byte {offset}")
        return struct.unpack_from(self.order + "HH", self.data, offset)

    def header(self, offset: int) -> tuple[tuple[int, int], bytes | None, int, int]:
        """Tag, VR (None when implicit), value length and offset of the value."""
        tag = self.tag(offset)
        if tag[0] == 0xFFFE:  # item and delimiters have no VR in either encoding
            (length,) = self._unpack("L", offset + 4)
            return tag, None, length, offset + 8
        if self.implicit:
            (length,) = self._unpack("L", offset + 4)
            return tag, None, length, offset + 8
        if offset + 6 > len(self.data):
            raise IncompleteDataset(f"dataset ends inside the header of element {_name(tag)}")
        vr = bytes(self.data[offset + 4 : offset + 6])
        if vr in _LONG_VRS:
            (length,) = self._unpack("L", offset + 8)
            return tag, vr, length, offset + 12
        if vr not in _SHORT_VRS:
            raise IncompleteDataset(f"element {_name(tag)} has no valid VR ({vr!r}): garbled data")
        (length,) = self._unpack("H", offset + 6)
        return tag, vr, length, offset + 8

    def _unpack(self, code: str, offset: int) -> tuple[int]:
        size = struct.calcsize(self.order + code)
        if offset + size > len(self.data):
            raise IncompleteDataset(f"dataset ends inside an element header at byte {offset}")
        return struct.unpack_from(self.order + code, self.data, offset)


def _name(tag: tuple[int, int]) -> str:
    return f"({tag[0]:04X},{tag[1]:04X})"


def _skip_value(reader: _Reader, tag: tuple[int, int], vr: bytes | None, length: int, start: int, depth: int) -> int:
    if length != _UNDEFINED:
        end = start + length
        if end > len(reader.data):
            raise IncompleteDataset(
                f"element {_name(tag)} declares {length} bytes but only {len(reader.data) - start} remain"
            )
        return end
    # Undefined length: a sequence, or encapsulated pixel data (OB) made of items. In implicit VR
    # an undefined length can only be a sequence or pixel data, both made of items.
    if vr == b"UN":
        # PS3.5 6.2.2: an undefined-length UN holds a sequence encoded in implicit VR.
        nested = _Reader(b"", implicit=True, little=reader.order == "<")
        nested.data = reader.data
        return _walk_items(nested, start, tag, depth)
    return _walk_items(reader, start, tag, depth)


def _walk_items(reader: _Reader, offset: int, owner: tuple[int, int], depth: int) -> int:
    if depth > 32:
        raise IncompleteDataset("sequences nested deeper than 32 levels")
    while True:
        tag, _, length, start = reader.header(offset)
        if tag == _SEQUENCE_END:
            return start
        if tag != _ITEM:
            raise IncompleteDataset(f"expected an item in {_name(owner)}, found {_name(tag)}")
        if length == _UNDEFINED:
            offset = _walk_dataset(reader, start, depth + 1, until_item_end=True)
        else:
            end = start + length
            if end > len(reader.data):
                raise IncompleteDataset(f"an item of {_name(owner)} ends beyond the data received")
            offset = end


def _walk_dataset(
    reader: _Reader, offset: int, depth: int, until_item_end: bool = False, found: Scan | None = None,
    wanted: frozenset[tuple[int, int]] = frozenset(),
) -> int:
    previous = (-1, -1)
    while offset < len(reader.data):
        tag, vr, length, start = reader.header(offset)
        if tag == _ITEM_END:
            if not until_item_end:
                raise IncompleteDataset("an item delimiter outside any item")
            return start
        if tag <= previous:
            raise IncompleteDataset(f"element {_name(tag)} follows {_name(previous)}: out of order, garbled data")
        previous = tag
        if found is not None:
            if tag == _PIXEL_DATA:
                found.pixel_data_offset = offset
            elif tag in wanted and length != _UNDEFINED:
                found.values[tag] = bytes(reader.data[start : start + length])
        offset = _skip_value(reader, tag, vr, length, start, depth)
    if until_item_end:
        raise IncompleteDataset("dataset ends inside a sequence item")
    return offset


def scan(
    data: bytes, implicit: bool, little: bool = True, wanted: frozenset[tuple[int, int]] = frozenset()
) -> Scan:
    """Check an encoded dataset (without file meta) for completeness and pick up values.

    Parameters
    ----------
    data : bytes
        The dataset as encoded in its transfer syntax (deflated data must be inflated first).
    implicit : bool
        Whether the transfer syntax uses implicit VR.
    little : bool
        Whether it is little endian.
    wanted : frozenset of (group, element)
        Top-level elements whose raw values to return.

    Raises
    ------
    IncompleteDataset
        If any element, item or sequence extends beyond the data, a delimiter is missing, or the
        structure is garbled (an unknown VR, elements out of order).
    """
    if not data:
        raise IncompleteDataset("the dataset is empty")
    found = Scan()
    _walk_dataset(_Reader(data, implicit, little), 0, depth=0, found=found, wanted=wanted)
    return found
