"""Health, Prometheus metrics, structured logs without patient data, and the audit log."""

from __future__ import annotations

import json
import urllib.request

from pydicom import dcmread

from tests.dicomfiles import sample
from tests.peers import run_dcmtk


def _get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.read().decode()


def test_health_metrics_logs_and_audit(node_factory) -> None:
    node = node_factory(peers=[{"ae_title": "STORESCU", "host": "127.0.0.1"}])
    path = sample("explicit VR little endian")
    node.storescu([path])
    run_dcmtk("echoscu", "-aet", "STRANGER", "-aec", "MUSCLENODE", "127.0.0.1", str(node.port))
    node.wait_for(lambda s: s["series"] and s["series"][0]["state"] == "ready", what="series ready")

    status, body = _get(node.http_port, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, metrics = _get(node.http_port, "/metrics")
    assert status == 200
    assert "musclenode_instances_received_total 1" in metrics
    assert "musclenode_series_ready 1" in metrics
    assert 'musclenode_jobs{state="queued"}' in metrics
    assert "musclenode_export_failures_total 0" in metrics

    lines = [json.loads(line) for line in node.log().splitlines() if line.startswith("{")]
    assert any("accepted from STORESCU" in entry["message"] for entry in lines)
    patient = dcmread(path, stop_before_pixels=True)
    text = node.log()
    for identifier in (str(patient.PatientName), str(patient.PatientID)):
        assert identifier not in text, f"the log shows {identifier!r}"

    audit = [json.loads(line) for line in (node.data / "audit.log").read_text().splitlines()]
    events = [(entry["event"], entry.get("calling_ae")) for entry in audit]
    assert ("association accepted", "STORESCU") in events
    assert ("association rejected", "STRANGER") in events
    ended = next(entry for entry in audit if entry["event"] == "association ended")
    assert ended["stored"] == 1 and ended["refused"] == 0
