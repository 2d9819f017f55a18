"""The hand-encoded file meta group reads back as pydicom's own."""

from __future__ import annotations

import io

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from node.network.filemeta import file_preamble_and_meta


def test_file_meta_reads_back() -> None:
    ds = Dataset()
    ds.PatientName = "X"
    body = io.BytesIO()
    dcmwrite(body, ds, implicit_vr=False, little_endian=True)  # dataset only, no meta
    for source in ("STORESCU", None, "ODD"):
        data = file_preamble_and_meta("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", "1.2.840.10008.1.2.1", source)
        read = dcmread(io.BytesIO(data + body.getvalue()))
        meta = read.file_meta
        assert meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
        assert meta.MediaStorageSOPInstanceUID == "1.2.3.45"
        assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert meta.FileMetaInformationVersion == b"\x00\x01"
        assert meta.get("SourceApplicationEntityTitle") == source
        assert meta.FileMetaInformationGroupLength == len(data) - 132 - 12
        assert read.PatientName == "X"


def test_dataset_offset_finds_the_dataset_after_any_file_meta(tmp_path) -> None:
    import pytest
    from pydicom.data import get_testdata_file

    from node.network.filemeta import dataset_offset

    for source in ("STORESCU", None, "ODD"):
        meta = file_preamble_and_meta("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", "1.2.840.10008.1.2.1", source)
        assert dataset_offset(meta + b"\x08\x00") == len(meta)
    # A file pydicom wrote, with its own file meta group.
    raw = open(get_testdata_file("MR_small.dcm"), "rb").read()
    read = dcmread(io.BytesIO(raw))
    assert dataset_offset(raw) == 132 + 12 + read.file_meta.FileMetaInformationGroupLength
    with pytest.raises(ValueError, match="not a DICOM file"):
        dataset_offset(b"\x00" * 200)
