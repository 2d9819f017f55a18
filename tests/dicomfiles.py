"""Helpers on DICOM files for tests: the dataset bytes of a file, and sample files in many syntaxes."""

from __future__ import annotations

import struct
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file

# storescu's option that proposes each transfer syntax (it converts to uncompressed otherwise).
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}

# Real files from pydicom's test data, one per transfer syntax the node must accept.
SAMPLES = {
    "implicit VR little endian": "MR_small_implicit.dcm",
    "explicit VR little endian": "MR_small.dcm",
    "explicit VR big endian": "MR_small_bigendian.dcm",
    "deflated": "image_dfl.dcm",
    "JPEG baseline": "SC_rgb_jpeg_dcmtk.dcm",
    "JPEG extended": "JPEG-lossy.dcm",
    "JPEG lossless SV1": "JPEG-LL.dcm",
    "JPEG-LS lossless": "MR_small_jpeg_ls_lossless.dcm",
    "JPEG 2000 lossless": "emri_small_jpeg_2k_lossless.dcm",
    "JPEG 2000": "JPEG2000.dcm",
    "RLE lossless": "MR_small_RLE.dcm",
}


def sample(name: str) -> Path:
    return Path(get_testdata_file(SAMPLES[name]))


def dataset_bytes(path: Path | bytes) -> bytes:
    """The encoded dataset of a Part 10 file (a path, or the file's bytes), without preamble and file meta."""
    raw = path if isinstance(path, bytes) else Path(path).read_bytes()
    assert raw[128:132] == b"DICM", f"{'data' if isinstance(path, bytes) else path} is not a DICOM Part 10 file"
    (meta_length,) = struct.unpack_from("<I", raw, 140)
    return raw[144 + meta_length :]


def transfer_syntax(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
