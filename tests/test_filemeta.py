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
