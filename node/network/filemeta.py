"""File meta information (PS3.10 7.1) for a received dataset, encoded directly.

Building a pydicom FileMetaDataset and encoding it costs about 0.2 ms, a sixth of what the node
may spend per instance; the group has seven short elements, so it is written here by hand.
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID

from .. import IMPLEMENTATION_VERSION_NAME

__all__ = ["file_preamble_and_meta"]

_PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(element: int, vr: bytes, value: bytes, padding: bytes) -> bytes:
    if len(value) % 2:
        value += padding
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_preamble_and_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae_title: str | None = None
) -> bytes:
    """Preamble, ``DICM`` prefix and file meta group, explicit VR little endian.

    Parameters
    ----------
    sop_class_uid, sop_instance_uid, transfer_syntax : str
        Media Storage SOP Class and Instance UIDs and the Transfer Syntax UID of the dataset.
    source_ae_title : str, optional
        The AE title of the sender, recorded as Source Application Entity Title.
    """
    body = b"".join((
        _element(0x0001, b"OB", b"\x00\x01", b"\x00"),
        _element(0x0002, b"UI", sop_class_uid.encode("ascii"), b"\x00"),
        _element(0x0003, b"UI", sop_instance_uid.encode("ascii"), b"\x00"),
        _element(0x0010, b"UI", transfer_syntax.encode("ascii"), b"\x00"),
        _element(0x0012, b"UI", str(PYNETDICOM_IMPLEMENTATION_UID).encode("ascii"), b"\x00"),
        _element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" "),
        _element(0x0016, b"AE", source_ae_title.encode("ascii"), b" ") if source_ae_title else b"",
    ))
    return _PREAMBLE + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body
