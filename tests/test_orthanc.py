"""Orthanc as the PACS: it sends whole real test studies to the node through its REST API."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from tests import studies
from tests.dicomfiles import dataset_bytes
from tests.peers import Orthanc


@pytest.fixture
def pacs_and_node(tmp_path: Path, node_factory):
    studies.require_data()
    node = node_factory(peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1"}])
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"musclenode": ["MUSCLENODE", "127.0.0.1", node.port]})
    orthanc.start()
    yield orthanc, node
    orthanc.stop()


def _decisions_by_description(status: dict) -> dict[str, dict]:
    return {s["description"]: s["decision"] for s in status["series"]}


def test_orthanc_sends_a_study_and_the_node_holds_every_instance_byte_for_byte(pacs_and_node, tmp_path: Path) -> None:
    orthanc, node = pacs_and_node
    study = studies.write_dixon_study(tmp_path / "study", contrasts=("water", "fat", "in_phase"))
    studies.write_t2_study(tmp_path / "study", study=study)
    studies.write_sagittal_series(tmp_path / "study", study=study)
    files = study.files
    ids = orthanc.upload(files)
    assert len(ids) == len(files) == 3 * 29 + 29 + 15
    orthanc_study = orthanc.get(f"/instances/{ids[0]}/study")["ID"]
    orthanc.send("musclenode", [orthanc_study])

    status = node.wait_for(
        lambda s: s["counts"]["instances"] == len(files) and all(x["decision"] for x in s["series"]),
        timeout=120, what="every instance indexed and every series judged",
    )
    # Byte for byte: Orthanc sends the dataset it stored, which is the dataset of our file.
    for path in files:
        sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        stored = list(node.data.glob(f"studies/{study.study_uid}/*/{sop}.dcm"))
        assert len(stored) == 1
        assert dataset_bytes(stored[0]) == dataset_bytes(path)
    assert all(a["calling_ae"] == "ORTHANC" for a in status["associations"])

    decisions = _decisions_by_description(status)
    water, fat, in_phase = (decisions[f"t1_vibe_dixon_tra_{s}"] for s in ("W", "F", "in"))
    assert water["selected"] and water["kind"] == "dixon" and water["role"] == "water"
    assert fat["selected"] and fat["grouping"] == water["grouping"]
    assert in_phase["selected"] and in_phase["role"] == "in_phase"
    t2 = decisions["t2_tse_tra"]
    assert t2["selected"] and t2["kind"] == "t2"
    sagittal = decisions["t2_tse_sag"]
    # The sagittal series is not measured: it is the study's level reference.
    assert not sagittal["selected"] and sagittal["role"] == "level_reference" and "not axial" in sagittal["reason"]

    text = node.cli("status").stdout
    assert "SELECTED Dixon water" in text and "level reference: the sagittal series, T2-weighted" in text


def test_non_lumbar_study_is_skipped_with_its_reason(pacs_and_node, tmp_path: Path) -> None:
    orthanc, node = pacs_and_node
    study = studies.write_non_lumbar_study(tmp_path / "head")
    ids = orthanc.upload(study.files)
    orthanc.send("musclenode", ids)
    status = node.wait_for(lambda s: s["series"] and s["series"][0]["decision"], what="decision")
    decision = status["series"][0]["decision"]
    assert not decision["selected"]
    assert decision["reason"].startswith("not lumbar: BodyPartExamined HEAD")


def test_enhanced_and_two_slab_studies_are_selected(pacs_and_node, tmp_path: Path) -> None:
    orthanc, node = pacs_and_node
    enhanced = studies.write_enhanced_study(tmp_path / "enhanced")
    slabs = studies.write_two_slab_study(tmp_path / "slabs")
    ids = orthanc.upload(enhanced.files + slabs.files)
    orthanc.send("musclenode", ids)
    status = node.wait_for(
        lambda s: len(s["series"]) == 4 and all(x["decision"] for x in s["series"]), timeout=120,
        what="four series judged",
    )
    for series in status["series"]:
        assert series["decision"]["selected"], series
        assert series["decision"]["kind"] == "dixon"
    slab_reasons = [s["decision"]["reason"] for s in status["series"] if s["study_uid"] == slabs.study_uid]
    assert all("2 orientations (angled slabs)" in r for r in slab_reasons)
