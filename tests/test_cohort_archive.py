"""``musclenode cohort query`` and ``cohort fetch`` against a real Orthanc holding 56 studies.

The studies are built from the real Dixon volumes (a few slices per series) with varied
patients (age, sex, names), dates, study and series descriptions, body parts and modalities.
Each query's manifest is compared with the studies and series the generator knows match; each
retrieve route (C-MOVE into a running node, C-GET and DICOMweb into a folder) must bring every
instance with the dataset bytes Orthanc holds; a fetch killed part way resumes without fetching
anything twice.
"""

from __future__ import annotations

import csv
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest
from pydicom import dcmread

from tests import studies
from tests.dicomfiles import dataset_bytes
from tests.peers import REPO, NodeProcess, Orthanc, free_port
from tests.test_viewer import DICOMWEB_PLUGIN
from tests.validators import missing

pytestmark = pytest.mark.slow

FAMILY_NAMES = ("MUELLER", "GARCIA", "NGUYEN", "OKAFOR", "ROSSI", "KOWALSKI", "TANAKA", "SILVA", "HANSEN", "DUBOIS",
                "OSEI")
#: (StudyDescription, BodyPartExamined, Modality)
KINDS = (
    ("MR LUMBAR SPINE", "LSPINE", "MR"),
    ("MR LWS NATIV", "LSPINE", "MR"),
    ("MR L-SPINE W/O CONTRAST", "SPINE", "MR"),
    ("MR BRAIN", "HEAD", "MR"),
    ("MR KNEE RIGHT", "KNEE", "MR"),
    ("CT ABDOMEN", "ABDOMEN", "CT"),
    ("Lumbar spine MRI", "", "MR"),
)
SERIES_SETS = (
    (("water", "t1_vibe_dixon_tra_W"), ("fat", "t1_vibe_dixon_tra_F")),
    (("t2", "t2_tse_tra"),),
    (("in_phase", "t1_vibe_dixon_tra_in"), ("t2", "t2_tse_tra_fs")),
    (("opposed_phase", "DIXON opp"), ("water", "DIXON W"), ("fat", "DIXON F")),
)
N_STUDIES = 56


@dataclass(frozen=True)
class Written:
    """A study in the archive, as the generator made it."""

    study: studies.Study
    age: int
    when: date

    @property
    def series(self) -> dict[str, studies.SeriesInfo]:
        return {info.series_uid: info for info in self.study.series.values()}


def _cohort(folder: Path) -> list[Written]:
    written = []
    for i in range(N_STUDIES):
        age = 18 + (i * 7) % 70
        when = date(2019 + i % 6, 2 + (i * 5) % 11, 1 + (i * 3) % 28)
        sex = "MFO"[i % 3] if i % 11 else "F"
        patient = studies.Patient(f"MN-COH-{i:03d}", f"{FAMILY_NAMES[i % len(FAMILY_NAMES)]}^P{i}",
                                  f"{when.year - age}0101", f"{age:03d}Y", sex, 1.6 + (i % 5) * 0.06, 55.0 + i % 40)
        description, body_part, modality = KINDS[i % len(KINDS)]
        study = studies.write_cohort_study(
            folder / f"study{i:03d}", patient, seed=f"cohort-archive/{i}", description=description,
            body_part=body_part, modality=modality, study_date=when.strftime("%Y%m%d"),
            series=SERIES_SETS[(i // len(KINDS)) % len(SERIES_SETS)], n_slices=4 if i % 13 == 0 else 2)
        written.append(Written(study, age, when))
    return written


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Orthanc (with DICOMweb) holding the cohort, and a node it may C-MOVE to."""
    studies.require_data()
    if not DICOMWEB_PLUGIN.exists():
        missing(str(DICOMWEB_PLUGIN), "apt-get install orthanc-dicomweb")
    folder = tmp_path_factory.mktemp("cohort-archive")
    cohort = _cohort(folder / "written")
    node_port = free_port()
    orthanc = Orthanc(folder / "orthanc", modalities={"musclenode": ["MUSCLENODE", "127.0.0.1", node_port]},
                      ready_path="/dicom-web/studies", extra_config={
                          "Plugins": [str(DICOMWEB_PLUGIN)],
                          "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Ssl": False}})
    orthanc.start()
    node = NodeProcess(folder=folder / "node", port=node_port, settings={"pacs": [{
        "name": "archive", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port,
        "retrieve": "get", "dicomweb": orthanc.url + "/dicom-web"}]})
    node.folder.mkdir(parents=True)
    try:
        for item in cohort:
            orthanc.upload(item.study.files)
        node.start()
        yield orthanc, node, cohort
    finally:
        node.stop()
        orthanc.stop()


def _cli(node: NodeProcess, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", "--config", str(node.config_path), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _manifest(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["study_uid"]: row for row in csv.DictReader(handle)}


def _query(node: NodeProcess, out: Path, *filters: str) -> dict[str, dict[str, str]]:
    result = _cli(node, "cohort", "query", "--out", str(out), *filters)
    assert result.returncode == 0, result.stdout + result.stderr
    return _manifest(out)


QUERIES = {
    "lumbar Dixon, women 30-65, 2020-2023": (
        ("--from", "2020-01-01", "--to", "2023-12-31", "--modality", "MR", "--body-part", "LSPINE", "--body-part",
         "SPINE", "--study-description", r"lumb|\blws\b|l-spine", "--series-description", "dixon", "--age-min", "30",
         "--age-max", "65", "--sex", "F"),
        lambda w, s: (date(2020, 1, 1) <= w.when <= date(2023, 12, 31) and w.study.modality == "MR"
                      and w.study.body_part in ("LSPINE", "SPINE")
                      and re.search(r"lumb|\blws\b|l-spine", w.study.study_description, re.I) is not None
                      and "dixon" in s.description.lower() and 30 <= w.age <= 65 and w.study.patient.sex == "F"),
    ),
    "men and other, up to 40": (
        ("--sex", "M", "--sex", "O", "--age-max", "40"),
        lambda w, s: w.study.patient.sex in ("M", "O") and w.age <= 40,
    ),
    "CT": (("--modality", "CT"), lambda w, s: w.study.modality == "CT"),
    "T2 series of 2024": (("--from", "2024-01-01", "--series-description", "^t2_"),
                          lambda w, s: w.when >= date(2024, 1, 1) and s.description.startswith("t2_")),
    "everything": ((), lambda w, s: True),
}


def test_query_returns_exactly_the_matching_studies_and_series(archive, tmp_path: Path) -> None:
    orthanc, node, cohort = archive
    for number, (name, (filters, matches)) in enumerate(QUERIES.items()):
        manifest = _query(node, tmp_path / f"query{number}.csv", *filters)
        expected = {w.study.study_uid: w for w in cohort if any(matches(w, s) for s in w.study.series.values())}
        assert set(manifest) == set(expected), name
        assert expected, f"{name}: the cohort should hold matching studies"
        for uid, row in manifest.items():
            written = expected[uid]
            wanted = [s for s in written.study.series.values() if matches(written, s)]
            assert set(row["series_uids"].split(";")) == {s.series_uid for s in wanted}, name
            assert int(row["instances"]) == sum(len(s.files) for s in wanted)
            assert row["accession"] == written.study.accession_number
            assert row["study_date"] == written.when.isoformat()
            assert row["patient_id"] == written.study.patient.patient_id
            assert row["sex"] == written.study.patient.sex and int(row["age"]) == written.age
            assert row["study_description"] == written.study.study_description
    assert len(_manifest(tmp_path / f"query{len(QUERIES) - 1}.csv")) == N_STUDIES


def _orthanc_bytes(orthanc: Orthanc, sop_instance_uid: str) -> bytes:
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}})
    assert len(found) == 1
    return dataset_bytes(orthanc.get(f"/instances/{found[0]}/file", raw=True))


def _expected_instances(cohort: list[Written], manifest: dict[str, dict[str, str]]) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (study, series) of every instance the manifest's series hold."""
    by_uid = {w.study.study_uid: w for w in cohort}
    expected = {}
    for study_uid, row in manifest.items():
        for series_uid in row["series_uids"].split(";"):
            for sop in by_uid[study_uid].series[series_uid].sop_instance_uids:
                expected[sop] = (study_uid, series_uid)
    return expected


def _folder_instances(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in folder.glob("*/*/*.dcm")}


@pytest.mark.parametrize("route", ["get", "dicomweb"])
def test_fetch_into_a_folder_brings_every_instance_byte_for_byte(archive, tmp_path: Path, route: str) -> None:
    orthanc, node, cohort = archive
    manifest_path = tmp_path / "manifest.csv"
    manifest = _query(node, manifest_path, "--study-description", "lumb|lws", "--series-description", "dixon")
    expected = _expected_instances(cohort, manifest)
    out = tmp_path / "fetched"
    result = _cli(node, "cohort", "fetch", str(manifest_path), "--via", route, "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(manifest)} of {len(manifest)} studies complete" in result.stdout
    fetched = _folder_instances(out)
    assert set(fetched) == set(expected)
    for sop, path in fetched.items():
        assert path.parent.parent.name == expected[sop][0] and path.parent.name == expected[sop][1]
        assert dataset_bytes(path) == _orthanc_bytes(orthanc, sop), sop

    again = _cli(node, "cohort", "fetch", str(manifest_path), "--via", route, "--out", str(out))
    assert again.returncode == 0 and f"0 instances fetched, {len(expected)} were already there" in again.stdout


def test_fetch_by_move_lands_in_the_node_store_byte_for_byte(archive, tmp_path: Path) -> None:
    orthanc, node, cohort = archive
    manifest_path = tmp_path / "manifest.csv"
    manifest = _query(node, manifest_path, "--modality", "MR", "--age-min", "50", "--series-description", "^t2_tse_tra$")
    expected = _expected_instances(cohort, manifest)
    result = _cli(node, "cohort", "fetch", str(manifest_path), "--via", "move")
    assert result.returncode == 0, result.stdout + result.stderr
    stored = {p.stem: p for p in (node.data / "studies").glob("*/*/*.dcm")}
    assert set(expected) <= set(stored)
    for sop in expected:
        assert dataset_bytes(stored[sop]) == _orthanc_bytes(orthanc, sop), sop
    received = sum(a["instances"] for a in node.status()["associations"])

    again = _cli(node, "cohort", "fetch", str(manifest_path), "--via", "move")
    assert again.returncode == 0 and f"0 instances fetched, {len(expected)} were already there" in again.stdout
    assert sum(a["instances"] for a in node.status()["associations"]) == received  # nothing sent twice


def test_fetch_by_accession_numbers_written_by_hand(archive, tmp_path: Path) -> None:
    orthanc, node, cohort = archive
    chosen = [cohort[3], cohort[20], cohort[41]]
    manifest_path = tmp_path / "by-hand.csv"
    manifest_path.write_text("accession\n" + "".join(f"{w.study.accession_number}\n" for w in chosen) + "NOSUCH1\n")
    out = tmp_path / "fetched"
    result = _cli(node, "cohort", "fetch", str(manifest_path), "--via", "get", "--out", str(out), "--attempts", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 of 4 studies complete, 1 failed" in result.stdout
    assert "failed accession NOSUCH1: no study has accession number 'NOSUCH1'" in result.stdout
    assert set(_folder_instances(out)) == {sop for w in chosen for s in w.study.series.values()
                                           for sop in s.sop_instance_uids}


@pytest.mark.parametrize("route", ["get", "dicomweb"])
def test_an_interrupted_fetch_resumes_without_fetching_anything_twice(archive, tmp_path: Path, route: str) -> None:
    orthanc, node, cohort = archive
    manifest_path = tmp_path / "everything.csv"
    manifest = _query(node, manifest_path)
    expected = _expected_instances(cohort, manifest)
    out = tmp_path / "fetched"
    command = [sys.executable, "-m", "node", "--config", str(node.config_path), "cohort", "fetch",
               str(manifest_path), "--via", route, "--out", str(out), "--concurrency", "1"]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(_folder_instances(out)) < 10 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = {sop: (p.stat().st_ino, p.stat().st_mtime_ns) for sop, p in _folder_instances(out).items()}
    assert 10 <= len(before) < len(expected), "the fetch should have been killed part way"

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert (f"{len(expected) - len(before)} instances fetched, {len(before)} were already there"
            in second.stdout), second.stdout
    after = _folder_instances(out)
    assert set(after) == set(expected)
    for sop, identity in before.items():  # what was there was not written again
        assert (after[sop].stat().st_ino, after[sop].stat().st_mtime_ns) == identity
    assert not list((out / ".incoming").iterdir())
    for sop in list(expected)[:: max(1, len(expected) // 20)]:
        assert dataset_bytes(after[sop]) == _orthanc_bytes(orthanc, sop)
        assert dcmread(after[sop], stop_before_pixels=True).SOPInstanceUID == sop
