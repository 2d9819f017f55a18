"""The completeness check on encoded datasets, with real files in many transfer syntaxes."""

from __future__ import annotations

import zlib

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from node.integrity import IncompleteDataset, check_complete
from node.scp import read_header

# Real files shipped with pydicom: native and encapsulated pixel data, implicit, explicit, big endian.
FILES = [
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_RLE.dcm",
    "JPEG2000.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "JPEG-lossy.dcm",
    "image_dfl.dcm",
    "emri_small.dcm",
]


def _dataset_bytes(name: str) -> tuple[bytes, object]:
    path = get_testdata_file(name)
    ds = dcmread(path)
    raw = open(path, "rb").read()
    return raw[ds.file_meta.get("FileMetaInformationGroupLength") + 144 :], ds.file_meta.TransferSyntaxUID


@pytest.mark.parametrize("name", FILES)
def test_complete_files_pass_and_headers_read(name: str) -> None:
    stream, syntax = _dataset_bytes(name)
    ds = read_header(stream, syntax)
    assert ds.SOPInstanceUID == dcmread(get_testdata_file(name)).SOPInstanceUID


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("keep", [0.98, 0.6, 0.1])
def test_truncated_files_are_caught(name: str, keep: float) -> None:
    stream, syntax = _dataset_bytes(name)
    cut = stream[: int(len(stream) * keep)]
    if syntax == "1.2.840.10008.1.2.1.99":
        # A truncated deflate stream is caught by the inflater or by the walk after it.
        cut = zlib.compress(zlib.decompress(stream, -15)[: int(len(stream) * keep)])[2:-4]
    with pytest.raises(IncompleteDataset):
        read_header(cut, syntax)


def test_garbage_is_caught() -> None:
    with pytest.raises(IncompleteDataset):
        check_complete(b"\x08\x00\x18\x00UI\xff\x7f" + b"1.2.3", implicit=False)
    with pytest.raises(IncompleteDataset):
        check_complete(b"", implicit=True)
