"""Receiving with DCMTK as the sender: every syntax, refusals, idempotence, disk watermark."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE

from tests.dicomfiles import SAMPLES, STORESCU_PROPOSE, dataset_bytes, sample, transfer_syntax
from tests.peers import bit_preserving_reference, run_dcmtk


def _stored(node, sop_instance_uid: str) -> Path:
    matches = list(node.data.glob(f"studies/*/*/{sop_instance_uid}.dcm"))
    assert len(matches) == 1, f"{sop_instance_uid} stored {len(matches)} times"
    return matches[0]


def test_echoscu(node) -> None:
    result = run_dcmtk("echoscu", "-aec", "MUSCLENODE", "127.0.0.1", str(node.port))
    assert result.returncode == 0, result.stderr
    assert node.cli("echo", "--port", str(node.port)).returncode == 0


@pytest.mark.parametrize("syntax_name", sorted(SAMPLES))
def test_storescu_every_transfer_syntax_byte_for_byte(node, syntax_name: str, tmp_path: Path) -> None:
    path = sample(syntax_name)
    syntax = transfer_syntax(path)
    options = ("-R", STORESCU_PROPOSE[syntax])
    result = node.storescu([path], *options)
    assert "Store Failed" not in result.stderr + result.stdout, result.stderr
    uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
    stored = _stored(node, uid)
    reference = bit_preserving_reference(tmp_path / "reference", [path], *options)
    assert dataset_bytes(stored) == reference[uid]
    meta = dcmread(stored, stop_before_pixels=True).file_meta
    assert meta.TransferSyntaxUID == syntax
    assert meta.SourceApplicationEntityTitle == "STORESCU"
    status = node.wait_for(lambda s: s["counts"]["instances"] == 1, what="the instance indexed")
    assert status["series"][0]["instances"] == 1


def test_unknown_calling_ae_is_rejected(node_factory) -> None:
    node = node_factory(peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1"}])
    rejected = run_dcmtk("echoscu", "-aet", "STRANGER", "-aec", "MUSCLENODE", "127.0.0.1", str(node.port))
    assert rejected.returncode != 0
    assert "Rejected" in rejected.stderr + rejected.stdout
    assert "calling AE" in (rejected.stderr + rejected.stdout).replace("Calling AE", "calling AE")
    accepted = run_dcmtk("echoscu", "-aet", "ORTHANC", "-aec", "MUSCLENODE", "127.0.0.1", str(node.port))
    assert accepted.returncode == 0, accepted.stderr
    assert "not a configured peer" in node.log()


def test_known_ae_from_another_address_is_rejected(node_factory) -> None:
    node = node_factory(peers=[{"ae_title": "ORTHANC", "host": "10.9.9.9"}])
    rejected = run_dcmtk("echoscu", "-aet", "ORTHANC", "-aec", "MUSCLENODE", "127.0.0.1", str(node.port))
    assert rejected.returncode != 0


def test_open_node_accepts_anyone(node_factory) -> None:
    node = node_factory(node={"open": True}, peers=[{"ae_title": "ORTHANC", "host": "10.9.9.9"}])
    assert run_dcmtk("echoscu", "-aet", "ANYONE", "-aec", "MUSCLENODE", "127.0.0.1", str(node.port)).returncode == 0


def test_wrong_called_ae_is_rejected(node) -> None:
    result = run_dcmtk("echoscu", "-aec", "SOMEONEELSE", "127.0.0.1", str(node.port))
    assert result.returncode != 0


def _raw_store(port: int, folder: Path, dataset: bytes, sop_class: str, sop_instance: str):
    """C-STORE arbitrary encoded bytes, the way a broken modality would send them."""
    from pynetdicom import _config
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    syntax = "1.2.840.10008.1.2.1"
    meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax)
    path = folder / "broken.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + dataset)
    ae = AE(ae_title="BROKEN")
    ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="MUSCLENODE")
    assert assoc.is_established
    # Sent straight from the file, so that pynetdicom does not decode (and so repair) the bytes.
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        response = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assoc.release()
    return response


@pytest.mark.parametrize("damage", ["truncated", "garbled", "wrong instance uid", "bad uid"])
def test_malformed_dataset_is_refused_and_the_node_goes_on(node, damage: str, tmp_path: Path) -> None:
    path = sample("explicit VR little endian")
    ds = dcmread(path, stop_before_pixels=True)
    data = dataset_bytes(path)
    instance = str(ds.SOPInstanceUID)
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    elif damage == "garbled":
        data = data[:200] + bytes(range(256)) * 8
    elif damage == "wrong instance uid":
        instance = instance + ".9"
    else:
        data = data.replace(str(ds.StudyInstanceUID).encode(), b"../../etc/passwd"[: len(str(ds.StudyInstanceUID))].ljust(len(str(ds.StudyInstanceUID)), b"."))
    response = _raw_store(node.port, tmp_path, data, str(ds.SOPClassUID), instance)
    assert response.Status in (0xC210, 0xC211, 0xA900), hex(response.Status)
    assert not list(node.data.glob("studies/*/*/*.dcm"))
    assert "refused" in node.log()
    # The next association is served normally and the good instance is kept.
    result = node.storescu([path])
    assert "Store Failed" not in result.stderr, result.stderr
    _stored(node, str(ds.SOPInstanceUID))
    status = node.wait_for(lambda s: s["counts"]["instances"] == 1, what="good instance indexed")
    assert status["associations"][-1]["failures"] == 1


def test_same_instance_twice_is_idempotent(node) -> None:
    path = sample("explicit VR little endian")
    for _ in range(2):
        result = node.storescu([path])
        assert "Store Failed" not in result.stderr
    status = node.wait_for(lambda s: any(x["state"] == "ready" for x in s["series"]), what="series ready")
    assert status["counts"]["instances"] == 1
    assert status["series"][0]["instances"] == 1 and status["series"][0]["version"] == 1
    # Sent again after it was ready, with identical bytes: nothing changes.
    node.storescu([path])
    again = node.status()
    assert again["series"][0]["state"] == "ready" and again["series"][0]["version"] == 1


def test_changed_instance_after_ready_marks_the_series_changed(node, tmp_path: Path) -> None:
    path = sample("explicit VR little endian")
    node.storescu([path])
    node.wait_for(lambda s: s["series"] and s["series"][0]["state"] == "ready", what="series ready")
    ds = dcmread(path)
    ds.SeriesDescription = "corrected"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    node.storescu([changed])
    status = node.status()
    # The new version is recorded before the instance is acknowledged; the series is "changed"
    # until its quiet time has passed again, which a busy machine may already have seen through.
    assert status["series"][0]["version"] == 2 and status["series"][0]["state"] in ("changed", "ready")
    status = node.wait_for(lambda s: s["series"][0]["state"] == "ready", what="series ready again")
    assert status["series"][0]["version"] == 2
    assert dcmread(_stored(node, str(ds.SOPInstanceUID))).SeriesDescription == "corrected"


def test_below_the_disk_watermark_the_node_answers_out_of_resources(node_factory) -> None:
    node = node_factory(node={"min_free_mb": 100_000_000})
    path = sample("explicit VR little endian")
    result = node.storescu([path], "-d")
    assert "0xa700" in (result.stdout + result.stderr).lower() or "Out of Resources" in result.stdout + result.stderr
    assert not list(node.data.glob("studies/*/*/*.dcm"))
    assert not list(node.data.glob("incoming/*"))
    assert node.status()["counts"]["instances"] == 0
