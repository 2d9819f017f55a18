"""The dashboard in a real browser: headless Chromium driven by playwright-core (as the OHIF test).

A node processes a real Dixon study (built from ../shared/data) while its only destination is
down. ``tests/viewer/dashboard.mjs`` then logs in as an operator, sees a new arrival appear
without reloading, opens the study and the job (summary pages as images, the measurement table),
sees the deliveries retrying; the test starts the destination (DCMTK storescp); the operator
retries from the page and sees them delivered, again without reloading. A viewer sees no button,
and POSTs without a valid token are refused; a browser without a session gets the login page.
Screenshots are kept in the artefacts folder. No address the browser asked for holds a patient
identifier.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from inference.vocabulary import Muscle
from node.dashboard.access import hash_password
from tests import studies
from tests.dicomfiles import sample
from tests.peers import REPO, dcmtk_env, free_port, require_tool, wait_port
from tests.test_viewer import INSTALL, VIEWER
from tests.validators import missing

pytestmark = pytest.mark.slow

USERS = {"operator": ("it-olga", "correct horse battery"), "viewer": ("dr-vera", "staple tuna kiln")}


def _requirements() -> tuple[str, str]:
    chromium = shutil.which("chromium") or os.environ.get("CHROMIUM")
    if not chromium:
        missing("chromium", INSTALL)
    node = shutil.which("node")
    if not node:
        missing("node", INSTALL)
    if not (VIEWER / "node_modules" / "playwright-core").is_dir():
        missing("playwright-core (tests/viewer/node_modules)", INSTALL)
    return chromium, node


def test_dashboard_in_a_browser(tmp_path: Path, node_factory) -> None:
    chromium, node_binary = _requirements()
    studies.require_data()
    archive_port = free_port()
    node = node_factory(
        jobs={"workers": 1, "threads": 2, "retry_seconds": 1},
        destinations=[{"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive_port}],
        dashboard={"users": [{"name": name, "role": role, "password_hash": hash_password(password)}
                             for role, (name, password) in USERS.items()]},
    )
    assert wait_port(node.dashboard_port), node.log()
    dixon = studies.write_dixon_study(tmp_path / "dixon", seed="dashboard", contrasts=("water", "fat"))
    sent = node.storescu(sorted(dixon.root.rglob("*.dcm")))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    status = node.wait_for(lambda s: s["job_counts"]["done"] == 1 and s["export_counts"]["retrying"] > 0,
                           timeout=400, what="the job done and its deliveries retrying")
    job = status["jobs"][0]
    measured = job["result"]["measurements"]

    artifacts = Path(os.environ.get("MUSCLENODE_ARTIFACTS", REPO / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    arrival = dcmread(sample("explicit VR little endian"), stop_before_pixels=True)
    arrival_name = str(arrival.PatientName).replace("^", " ")
    settings = {
        "origin": f"http://127.0.0.1:{node.dashboard_port}", "artifacts": str(artifacts), "job": job["id"],
        "destination": "archive", "arrivalName": arrival_name,
        "patientName": dixon.patient.name.replace("^", " "),
        "operator": {"name": USERS["operator"][0], "password": USERS["operator"][1]},
        "viewer": {"name": USERS["viewer"][0], "password": USERS["viewer"][1]},
    }
    received = tmp_path / "archive"
    received.mkdir()
    browser = subprocess.Popen([node_binary, str(VIEWER / "dashboard.mjs"), json.dumps(settings)], cwd=VIEWER,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "CHROMIUM": chromium})
    archive = None
    output: list[str] = []
    try:
        for line in browser.stdout:
            output.append(line)
            if line.startswith("WAITING studies-open"):
                # Someone sends a study while the operator looks at the studies page.
                arrived = node.storescu([sample("explicit VR little endian")])
                assert arrived.returncode == 0, arrived.stdout + arrived.stderr
                browser.stdin.write("sent\n")
                browser.stdin.flush()
            elif line.startswith("WAITING destination-down-seen"):
                archive = subprocess.Popen(
                    [require_tool("storescp"), "-aet", "ARCHIVE", "-od", str(received), str(archive_port)],
                    env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                assert wait_port(archive_port), "storescp did not listen"
                browser.stdin.write("up\n")
                browser.stdin.flush()
        browser.wait(timeout=60)
    finally:
        if browser.poll() is None:
            browser.kill()
        if archive is not None:
            archive.terminate()
            archive.wait(timeout=10)
    text = "".join(output)
    assert browser.returncode == 0, f"browser script failed:\n{text}\n{node.log()[-3000:]}"
    result = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])

    # Logging in.
    assert result["loginPage"] == {"path": "/login", "password": 1} and result["afterLogin"] == "/jobs"
    assert result["strangerPath"] == "/login" and "Log in" in result["strangerText"]
    assert dixon.patient.name.split("^")[0] not in result["strangerText"]
    assert result["strangerImage"] == 303

    # Studies, decisions, arrivals live.
    assert settings["patientName"] in result["studiesText"] and "selected" in result["studyText"]
    assert result["arrivalLive"]["navigations"] == 0
    # The job's results: every summary page shown as an image, the numbers of the job.
    assert len(result["summaries"]) == sum(1 for _ in (node.data / "results").rglob("*.dcm")) - 2
    assert all(s["width"] > 200 and s["height"] > 200 for s in result["summaries"])
    shown = sorted((r["muscle"], r["side"], float(r["mean CSA (mm²)"])) for r in result["measurements"])
    sides = {"left": "left", "right": "right", "both": "left + right"}
    assert shown == sorted((Muscle(r["muscle"]).display, sides[r["side"]], r["mean_csa_mm2"]) for r in measured)
    assert {Muscle.MULTIFIDUS.display, Muscle.ERECTOR_SPINAE.display} <= {row[0] for row in shown}
    assert [d for d in result["downloads"] if "SEG" in d] and [d for d in result["downloads"] if "SR" in d]
    assert "Cohort rows (CSV)" in result["downloads"]
    assert result["segDownload"] == {"status": 200, "type": "application/dicom", "magic": "DICM"}

    # The failed delivery, retried by the operator, delivered, shown without reloading.
    last_error = result["downRow"].split("\t")[5]
    assert "retrying" in result["downRow"] and last_error not in ("", "–"), result["downRow"]
    assert "being tried now" in result["retryMessage"]
    assert result["delivered"]["navigations"] == 0 and result["delivered"]["pendingLeft"] == 0
    assert "delivered" in result["delivered"]["row"]
    stored = [dcmread(p, stop_before_pixels=True) for p in received.iterdir()]
    assert {ds.Modality for ds in stored} == {"SEG", "SR", "OT"} and len(stored) == len(result["summaries"]) + 2
    assert result["operatorForged"] == 403

    # The viewer: sees the deliveries, no action button, and cannot act.
    assert result["viewerLanding"] == "/deliveries" and "delivered" in result["viewerDeliveriesText"]
    assert result["viewerButtons"] == 0 and result["viewerJobButtons"] == 0  # only "Log out", in the header
    assert result["viewerForged"] == 403 and result["viewerForgedJob"] == 403

    # The narrow screen: nothing wider than the screen but tables that scroll in their box.
    assert result["narrow"]["page"] <= result["narrow"]["screen"] and result["narrow"]["image"] <= 390

    # No patient identifier in any address the browser asked for.
    identifiers = [dixon.study_uid, dixon.patient.patient_id, dixon.patient.name, str(arrival.PatientID),
                   str(arrival.StudyInstanceUID)] + [s.series_uid for s in dixon.series.values()]
    for url in result["urls"]:
        for identifier in identifiers:
            assert identifier not in url, f"{url} holds a patient identifier"

    audit = [json.loads(line) for line in (node.data / "audit.log").read_text().splitlines()]
    actions = [(e["event"], e.get("user")) for e in audit if e["event"].startswith("dashboard")]
    assert ("dashboard login", USERS["operator"][0]) in actions and ("dashboard login", USERS["viewer"][0]) in actions
    assert ("dashboard retry deliveries", USERS["operator"][0]) in actions
    assert ("dashboard action refused", USERS["viewer"][0]) in actions
    assert ("dashboard action refused", USERS["operator"][0]) in actions
    for shot in ("dashboard-job.png", "dashboard-deliveries.png", "dashboard-job-narrow.png"):
        assert (artifacts / shot).stat().st_size > 10_000
