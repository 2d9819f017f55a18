"""The whole loop with a real Orthanc: studies in, SEG + SR + summary back in the same study,
through crashes and outages, and the offline command giving the same numbers."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread

from inference.registry import DEFAULT_MODEL, ModelNotFound, load_model
from tests import studies
from tests.peers import REPO, NodeProcess, Orthanc, free_port
from tests.validators import dciodvfy

pytestmark = pytest.mark.slow

RESULT_MODALITIES = {"SEG", "SR", "OT"}


@pytest.fixture(scope="module")
def bundled_model() -> None:
    try:
        load_model(DEFAULT_MODEL)
    except ModelNotFound as exc:
        pytest.fail(f"the bundled model is missing: {exc}")


def _start_pair(tmp_path: Path, **node_settings) -> tuple[Orthanc, NodeProcess]:
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"musclenode": ["MUSCLENODE", "127.0.0.1", node_port]})
    orthanc.start()
    node = NodeProcess(folder=tmp_path / "node", port=node_port, settings={
        "peers": [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}],
        "jobs": {"workers": 1, "threads": 2, "retry_seconds": 1},
        **node_settings,
    })
    node.folder.mkdir(parents=True, exist_ok=True)
    node.start()
    return orthanc, node


def _results_in(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict]]:
    """Result series Orthanc holds in a study, by modality."""
    found = orthanc.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
    if not found:
        return {}
    series = orthanc.get(f"/studies/{found[0]}/series")
    by_modality: dict[str, list[dict]] = {}
    for item in series:
        modality = item["MainDicomTags"].get("Modality")
        if modality in RESULT_MODALITIES:
            by_modality.setdefault(modality, []).append(item)
    return by_modality


def _wait_results(orthanc: Orthanc, study_uid: str, summary_pages: int | None = None, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    results: dict = {}
    while time.monotonic() < deadline:
        results = _results_in(orthanc, study_uid)
        if all(m in results for m in RESULT_MODALITIES):
            pages = len(results["OT"][0]["Instances"])
            if summary_pages is None or pages >= summary_pages:
                return results
        time.sleep(1)
    raise AssertionError(f"results did not reach Orthanc within {timeout} s: {sorted(results)}")


def _send_study(orthanc: Orthanc, files: list[Path]) -> None:
    ids = orthanc.upload(files)
    study = orthanc.get(f"/instances/{ids[0]}/study")["ID"]
    orthanc.send("musclenode", [study])


def test_dixon_t2_and_non_lumbar_studies_through_orthanc(tmp_path: Path, bundled_model) -> None:
    studies.require_data()
    orthanc, node = _start_pair(tmp_path)
    try:
        dixon = studies.write_dixon_study(tmp_path / "dixon", contrasts=("water", "fat", "in_phase"))
        t2 = studies.write_t2_study(tmp_path / "t2")
        head = studies.write_non_lumbar_study(tmp_path / "head")
        for study in (dixon, t2, head):
            _send_study(orthanc, study.files)

        results = _wait_results(orthanc, dixon.study_uid)
        assert len(results["SEG"]) == len(results["SR"]) == len(results["OT"]) == 1
        t2_results = _wait_results(orthanc, t2.study_uid)
        assert len(t2_results["SEG"]) == 1

        for series in results.values():
            instance = orthanc.get(f"/series/{series[0]['ID']}/instances")[0]["ID"]
            path = tmp_path / f"{instance}.dcm"
            path.write_bytes(orthanc.get(f"/instances/{instance}/file", raw=True))
            checked = dciodvfy(path)
            assert checked.returncode == 0 and not checked.errors, checked.describe()
            ds = dcmread(path, stop_before_pixels=True)
            assert ds.StudyInstanceUID == dixon.study_uid and ds.PatientID == dixon.patient.patient_id

        status = node.wait_for(lambda s: s["job_counts"]["done"] == 2, what="two jobs done")
        kinds = sorted(job["kind"] for job in status["jobs"])
        assert kinds == ["dixon", "t2"]
        head_series = [s for s in status["series"] if s["study_uid"] == head.study_uid]
        assert head_series and not head_series[0]["decision"]["selected"]
        assert "not lumbar" in head_series[0]["decision"]["reason"]
        assert _results_in(orthanc, head.study_uid) == {}
        # Both series pass the segmentation quality control: the verdict in the job record, in
        # status and on the metrics endpoint.
        assert [job["result"]["quality"]["verdict"] for job in status["jobs"]] == ["pass", "pass"]
        text = node.cli("status").stdout
        assert "acknowledged" in text and "not lumbar" in text and "quality: pass" in text
        with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=30) as response:
            assert 'musclenode_segmentation_quality{verdict="pass"} 2.0' in response.read().decode()
    finally:
        node.stop()
        orthanc.stop()


def test_kill_during_inference_and_orthanc_down_during_export(tmp_path: Path, bundled_model) -> None:
    studies.require_data()
    orthanc, node = _start_pair(tmp_path)
    try:
        dixon = studies.write_dixon_study(tmp_path / "dixon", contrasts=("water", "fat"))
        _send_study(orthanc, dixon.files)
        # Kill the node while the job runs.
        node.wait_for(lambda s: s["job_counts"]["running"] == 1, timeout=120, what="the job running")
        node.kill9()
        # Orthanc goes away before the node comes back: the results must wait for it.
        orthanc.stop()
        node.restarts += 1
        node.start()
        status = node.wait_for(lambda s: s["job_counts"]["done"] == 1, timeout=240, what="the job done again")
        job = status["jobs"][0]
        assert job["attempts"] == 2 and "interrupted" not in (job["reason"] or "")
        node.wait_for(lambda s: s["export_counts"]["retrying"] > 0, timeout=60, what="deliveries retrying")
        # Killed again while its results wait for export: they are kept and sent after the restart.
        node.kill9()
        node.restarts += 1
        node.start()
        orthanc.start()
        results = _wait_results(orthanc, dixon.study_uid)
        assert {m: len(s) for m, s in results.items()} == {"SEG": 1, "SR": 1, "OT": 1}
        node.wait_for(lambda s: s["export_counts"]["pending"] == 0, timeout=120, what="every delivery acknowledged")
    finally:
        node.stop()
        orthanc.stop()


def test_offline_process_gives_the_same_results_as_the_node(tmp_path: Path, bundled_model) -> None:
    studies.require_data()
    orthanc, node = _start_pair(tmp_path)
    try:
        dixon = studies.write_dixon_study(tmp_path / "dixon", contrasts=("water", "fat"))
        _send_study(orthanc, dixon.files)
        results = _wait_results(orthanc, dixon.study_uid)
    finally:
        node.stop()
        orthanc.stop()
    node_sr = next(node.data.glob(f"results/{results['SR'][0]['MainDicomTags']['SeriesInstanceUID']}/*.dcm"))
    node_seg = next(node.data.glob(f"results/{results['SEG'][0]['MainDicomTags']['SeriesInstanceUID']}/*.dcm"))
    out = tmp_path / "offline"
    run = subprocess.run(
        [sys.executable, "-m", "node", "process", str(tmp_path / "dixon"), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (out / "cohort.csv").exists()
    offline = {dcmread(p).SOPInstanceUID: p for p in (out / dixon.study_uid).glob("*.dcm")}
    node_seg_ds, node_sr_ds = dcmread(node_seg), dcmread(node_sr)
    # Same source, model and software: the same UIDs, the same mask bits and the same numbers.
    assert node_seg_ds.SOPInstanceUID in offline and node_sr_ds.SOPInstanceUID in offline
    assert dcmread(offline[node_seg_ds.SOPInstanceUID]).PixelData == node_seg_ds.PixelData
    offline_sr = dcmread(offline[node_sr_ds.SOPInstanceUID])

    def numbers(ds) -> list[float]:
        values = []

        def walk(items) -> None:
            for item in items:
                for measured in item.get("MeasuredValueSequence", []):
                    values.append(float(measured.NumericValue))
                walk(item.get("ContentSequence", []))

        walk(ds.ContentSequence)
        return values

    assert numbers(offline_sr) == numbers(node_sr_ds) and numbers(node_sr_ds)
    rows = (out / "cohort.csv").read_text().splitlines()
    assert rows[0].startswith("study,") and len(rows) > 4
