"""The completeness check on encoded datasets, with real files in many transfer syntaxes."""

from __future__ import annotations

import zlib

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from node.network.integrity import IncompleteDataset, scan
from node.network.integrity import inflate
from node.orchestration.headers import parse_header
from node.network.scp import inspect

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
    found, header = inspect(stream, syntax)
    original = dcmread(get_testdata_file(name))
    assert found.text(0x0008, 0x0018) == original.SOPInstanceUID
    assert found.text(0x0020, 0x000E) == original.SeriesInstanceUID
    ds = parse_header(header, syntax)
    assert ds.SOPInstanceUID == original.SOPInstanceUID and "PixelData" not in ds
    if found.pixel_data_offset is not None:
        plain = inflate(stream) if syntax == "1.2.840.10008.1.2.1.99" else stream
        assert plain[found.pixel_data_offset : found.pixel_data_offset + 4] in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("keep", [0.98, 0.6, 0.1])
def test_truncated_files_are_caught(name: str, keep: float) -> None:
    stream, syntax = _dataset_bytes(name)
    cut = stream[: int(len(stream) * keep)]
    if syntax == "1.2.840.10008.1.2.1.99":
        # A truncated deflate stream is caught by the inflater or by the walk after it.
        cut = zlib.compress(zlib.decompress(stream, -15)[: int(len(stream) * keep)])[2:-4]
    with pytest.raises(IncompleteDataset):
        inspect(cut, syntax)


def test_out_of_order_and_bad_vr_are_caught() -> None:
    ordered = b"\x08\x00\x18\x00UI\x02\x001\x00" + b"\x08\x00\x16\x00UI\x02\x002\x00"
    with pytest.raises(IncompleteDataset, match="out of order"):
        scan(ordered, implicit=False)
    with pytest.raises(IncompleteDataset, match="no valid VR"):
        scan(b"\x08\x00\x18\x00\x01\x02\x02\x001\x00", implicit=False)


def test_garbage_is_caught() -> None:
    with pytest.raises(IncompleteDataset):
        scan(b"\x08\x00\x18\x00UI\xff\x7f" + b"1.2.3", implicit=False)
    with pytest.raises(IncompleteDataset):
        scan(b"", implicit=True)
