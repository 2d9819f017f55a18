"""``musclenode process`` on Dask: a real scheduler and two workers on 127.0.0.1 give exactly the
results of a single-process run, survive the loss of a worker, and contain a broken study.

The cohort is written from the real Dixon volumes (water and fat, a few central slices, one
patient per study). The single-process run (``--workers 0``) is the reference: a distributed run
must give the same result UIDs, the same SEG pixel bits and the same numbers.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import pytest
from pydicom import dcmread

from reports.pipeline import COHORT_COLUMNS
from tests import studies
from tests.peers import REPO, free_port

pytestmark = pytest.mark.slow

N_STUDIES = 6
SEXES = "MF"


def _write_cohort(folder: Path, count: int, prefix: str, n_slices: int = 4) -> list[studies.Study]:
    written = []
    for i in range(count):
        age = 25 + 9 * i
        patient = studies.Patient(f"{prefix}-{i}", f"COHORT^P{i}", f"{2024 - age}0101", f"{age:03d}Y", SEXES[i % 2],
                                  1.62 + 0.04 * i, 58.0 + 5 * i)
        written.append(studies.write_cohort_study(folder / f"study{i}", patient, seed=f"{prefix}/{i}",
                                                  study_date="20240612", n_slices=n_slices))
    return written


def _process(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", "process", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, list[studies.Study], Path]:
    """The cohort's folder, its studies, and the output of a single-process run over it."""
    studies.require_data()
    folder = tmp_path_factory.mktemp("cohort")
    written = _write_cohort(folder / "in", N_STUDIES, "dask")
    reference = folder / "reference"
    run = _process(str(folder / "in"), "--out", str(reference), "--workers", "0")
    assert run.returncode == 0, run.stdout + run.stderr
    return folder / "in", written, reference


@contextmanager
def dask_cluster(folder: Path, workers: int = 2) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 (workers without a nanny:
    killing one takes it away, as a lost machine would)."""
    from distributed import Client

    dask = str(Path(sys.executable).parent / "dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    folder.mkdir(parents=True, exist_ok=True)
    processes = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                  env=env, stdout=open(folder / "scheduler.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)]
    try:
        for number in range(workers):
            processes.append(subprocess.Popen(
                [dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny", "--no-dashboard",
                 "--name", f"worker-{number}", "--memory-limit", "0"],
                env=env, stdout=open(folder / f"worker-{number}.log", "w"), stderr=subprocess.STDOUT,
                start_new_session=True))
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(workers, timeout=120)
        yield address, processes[1:]
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _sr_numbers(path: Path) -> list[tuple[str, float]]:
    values = []

    def walk(items) -> None:
        for item in items:
            for measured in item.get("MeasuredValueSequence", []):
                values.append((item.ConceptNameCodeSequence[0].CodeMeaning, float(measured.NumericValue)))
            walk(item.get("ContentSequence", []))

    walk(dcmread(path).ContentSequence)
    return values


def assert_same_results(reference: Path, out: Path, written: list[studies.Study]) -> None:
    """The same result files (named by their UIDs), SEG bits, SR numbers and cohort tables."""
    for study in written:
        expected = sorted(p.name for p in (reference / study.study_uid).glob("*.dcm"))
        assert expected and sorted(p.name for p in (out / study.study_uid).glob("*.dcm")) == expected
        for name in expected:
            ours, theirs = dcmread(out / study.study_uid / name), dcmread(reference / study.study_uid / name)
            assert (ours.SOPInstanceUID, ours.SeriesInstanceUID) == (theirs.SOPInstanceUID, theirs.SeriesInstanceUID)
            if name.startswith("seg-"):
                assert ours.PixelData == theirs.PixelData
            if name.startswith("sr-"):
                assert _sr_numbers(out / study.study_uid / name) == _sr_numbers(reference / study.study_uid / name)
    assert (out / "cohort.csv").read_text() == (reference / "cohort.csv").read_text()
    assert pq.read_table(out / "cohort.parquet").equals(pq.read_table(reference / "cohort.parquet"))


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/study.json"))]


def test_two_dask_workers_give_the_results_of_a_single_process_run(cohort, tmp_path: Path) -> None:
    folder, written, reference = cohort
    out = tmp_path / "out"
    with dask_cluster(tmp_path / "cluster") as (address, _):
        run = _process(str(folder), "--out", str(out), "--scheduler", address)
    assert run.returncode == 0, run.stdout + run.stderr
    assert_same_results(reference, out, written)
    records = _records(out)
    assert {r["status"] for r in records} == {"done"} and len(records) == N_STUDIES
    workers = {r["worker"] for r in records}
    assert len(workers) == 2, f"both workers should have processed studies: {workers}"
    # One segmenter per worker process, however many studies it processed.
    assert {r["segmenter_loads"] for r in records} == {1}
    assert (out / "skipped_and_failed.csv").read_text().splitlines() == ["study,series,description,outcome,reason"]


def test_killing_a_worker_mid_run_still_completes_the_cohort(cohort, tmp_path: Path) -> None:
    folder, written, reference = cohort
    out = tmp_path / "out"
    with dask_cluster(tmp_path / "cluster") as (address, workers):
        run = subprocess.Popen([sys.executable, "-m", "node", "process", str(folder), "--out", str(out),
                                "--scheduler", address], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 600
        while not list(out.glob("*/study.json")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        first = _records(out)
        assert first and run.poll() is None, "the run should be under way"
        # The worker that just finished a study has taken the next one: kill it.
        pid = int(first[0]["worker"].rsplit(":", 1)[1])
        victim = next(w for w in workers if w.pid == pid)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        output, _ = run.communicate(timeout=900)
    assert run.returncode == 0, output
    assert_same_results(reference, out, written)
    records = _records(out)
    assert len(records) == N_STUDIES and {r["status"] for r in records} == {"done"}
    survivor = next(f"{r['worker']}" for r in records if int(r["worker"].rsplit(":", 1)[1]) != pid)
    assert sum(r["worker"] == survivor for r in records) >= N_STUDIES // 2


def _break_pixels(series: studies.SeriesInfo) -> None:
    """Empty Pixel Data in every instance of a series: nothing of it can be decoded."""
    for path in series.files:
        ds = dcmread(path)
        ds.PixelData = b""
        ds.save_as(path)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_one_broken_study_among_good_ones(tmp_path: Path) -> None:
    studies.require_data()
    good = _write_cohort(tmp_path / "in", 2, "good", n_slices=3)
    broken = studies.write_cohort_study(tmp_path / "in" / "broken", seed="broken", n_slices=3)
    _break_pixels(broken.series["water"])
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    out = tmp_path / "out"
    run = _process(str(tmp_path / "in"), "--out", str(out), "--workers", "0")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "exit status 1: some selected series failed" in run.stdout
    assert "19 files (1 not DICOM) in 3 studies" in run.stdout

    rows = _csv(out / "cohort.csv")
    assert list(rows[0]) == list(COHORT_COLUMNS)
    # The tables' columns are the pipeline's: no column of cohort_rows is left out.
    assert list(json.loads((out / good[0].study_uid / "study.json").read_text())["rows"][0]) == list(COHORT_COLUMNS)
    assert {r["study"] for r in rows} == {s.study_uid for s in good}
    assert len(rows) == 2 * len({(r["muscle"], r["side"]) for r in rows})
    assert pq.read_table(out / "cohort.parquet").num_rows == len(rows)

    failed = _csv(out / "skipped_and_failed.csv")
    assert {(r["study"], r["series"], r["outcome"]) for r in failed} == {
        (broken.study_uid, s.series_uid, "failed") for s in broken.series.values()}
    assert all("cannot" in r["reason"] for r in failed)
    by_study = {r["study"]: r for r in _csv(out / "studies.csv")}
    assert by_study[broken.study_uid]["status"] == "failed" and by_study[broken.study_uid]["reason"]
    assert {by_study[s.study_uid]["status"] for s in good} == {"done"}

    # Run again, with the results inside the input folder this time: the good studies are not
    # processed again (the results are not taken for input), the broken one is tried again.
    inside = tmp_path / "in" / "results"
    shutil.move(out, inside)
    kept = {s.study_uid: (inside / s.study_uid / "study.json").stat().st_mtime_ns for s in good}
    again = _process(str(tmp_path / "in"), "--out", str(inside), "--workers", "0")
    assert again.returncode == 1 and "(2 by an earlier run)" in again.stdout, again.stdout
    assert "processing (2 done by an earlier run): 1/1 (0 done, 1 failed, 0 nothing selected)" in again.stderr, \
        again.stderr
    assert "19 files (1 not DICOM) in 3 studies" in again.stdout
    assert {uid: (inside / uid / "study.json").stat().st_mtime_ns for uid in kept} == kept
    assert _csv(inside / "cohort.csv") == rows


def test_a_study_whose_segmentation_fails_quality_control_is_listed_as_not_measured(tmp_path: Path) -> None:
    """Pixels mirrored front to back under unchanged headers: the study is processed (its SEG, SR
    and summary say "not measured"), gives no cohort row, and is listed with its reason."""
    studies.require_data()
    good = _write_cohort(tmp_path / "in", 1, "qc-good", n_slices=4)[0]
    flipped = studies.write_cohort_study(tmp_path / "in" / "flipped", seed="qc-flipped", n_slices=4)
    for series in flipped.series.values():
        studies.flip_front_to_back(series.files)
    out = tmp_path / "out"
    run = _process(str(tmp_path / "in"), "--out", str(out), "--workers", "0")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 of 2 selected groups processed (1 not measured" in run.stdout, run.stdout
    assert f"not measured {flipped.study_uid}" in run.stdout
    rows = _csv(out / "cohort.csv")
    assert {r["study"] for r in rows} == {good.study_uid} and {r["quality"] for r in rows} == {"pass"}
    listed = _csv(out / "skipped_and_failed.csv")
    assert {(r["study"], r["outcome"]) for r in listed} == {(flipped.study_uid, "not measured")}
    assert all("quality control" in r["reason"] for r in listed)
    by_study = {r["study"]: r for r in _csv(out / "studies.csv")}
    assert by_study[flipped.study_uid]["groups_not_measured"] == "1"
    assert by_study[good.study_uid]["groups_not_measured"] == "0"
    record = json.loads((out / flipped.study_uid / "study.json").read_text())
    assert record["groups"][0]["quality"]["verdict"] == "not measured"
    assert any(name.startswith("sr-") for name in record["results"])


def test_an_unexpected_error_fails_its_group_only(tmp_path: Path) -> None:
    """An error the pipeline does not expect (here: a cluster method the configuration would have
    refused) fails that group with its reason and traceback; the study's other group is done."""
    from dataclasses import replace

    from node import __version__
    from node.config import load_config
    from node.orchestration.study_task import ModelSpec, StudyTask, run_study
    from reports.pipeline import PipelineSettings

    studies.require_data()
    study = studies.write_cohort_study(tmp_path / "in", seed="mixed", n_slices=3, series=(
        ("water", "t1_vibe_dixon_tra_W"), ("fat", "t1_vibe_dixon_tra_F"), ("t2", "t2_tse_tra")))
    config = load_config(environ={})
    task = StudyTask(study_uid=study.study_uid, files=tuple(str(p) for p in study.files),
                     inputs={s.series_uid: len(s.files) for s in study.series.values()}, out=str(tmp_path / "out"),
                     model=ModelSpec(config.model_name, threads=1), model_id="test", software_version=__version__,
                     rules=config.rules, settings=replace(PipelineSettings(), cluster_method="nonsense"))
    record = run_study(task)
    assert record["status"] == "partial"
    outcomes = {g["label"]: (g["outcome"], g["reason"]) for g in record["groups"]}
    assert outcomes["dixon (fat, water)"] == ("done", None)
    assert outcomes["t2 (t2)"][0] == "failed"
    assert outcomes["t2 (t2)"][1].startswith("unexpected error: ValueError: unknown cluster method 'nonsense'")
    assert "Traceback" in record["tracebacks"][0]
    assert json.loads((tmp_path / "out" / study.study_uid / "study.json").read_text())["status"] == "partial"


def test_nothing_to_process_still_writes_the_tables(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    run = _process(str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "0")
    assert run.returncode == 3, run.stdout + run.stderr
    assert (tmp_path / "out" / "cohort.csv").read_text().strip() == ",".join(COHORT_COLUMNS)
    assert pq.read_table(tmp_path / "out" / "skipped_and_failed.parquet").column_names == [
        "study", "series", "description", "outcome", "reason"]
