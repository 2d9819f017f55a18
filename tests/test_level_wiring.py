"""Vertebral levels in the pipeline: the study's sagittal series is the level reference of its
axial series, in ``musclenode process`` and in the node, and the reason is recorded when there is
none.

The studies are resliced from a held-out vertebrae volume (tests/studies.py
``write_vertebrae_study``): a sagittal T2 series and an axial series in one frame of reference.
Their axial images are a 76 mm wide slab without subcutaneous fat, which the pipeline refuses
before inference (no fat signal), so the choice of the reference and the levels it gives are
checked with the functions both paths call; the records are checked through ``process`` on a
study without a sagittal series. Per-level numbers from a muscle series with its own sagittal
series are tested in tests/test_level_results.py.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from reports.pipeline import SLICE_COLUMNS
from tests import studies
from tests.peers import REPO

SUBJECT = "zukic-10"  # held out from the level model's training (its card)


def _process(folder: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", "process", str(folder), "--out", str(out), "--workers", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def _study_headers(study) -> tuple[list, dict]:
    from pydicom import dcmread

    from node.orchestration.headers import summarise
    from node.orchestration.rules import SeriesHeaders

    headers, files = [], {}
    for info in study.series.values():
        summaries = tuple(summarise(dcmread(f, stop_before_pixels=True)) for f in info.files)
        headers.append(SeriesHeaders(info.series_uid, study.study_uid, 1, summaries))
        files[info.series_uid] = list(info.files)
    return headers, files


def _reference_files(study) -> tuple[str, list]:
    """The series the rules decide is the study's level reference, and its files."""
    from node.config import load_config
    from node.orchestration.rules import LEVEL_REFERENCE, decide_study

    headers, files = _study_headers(study)
    (decision,) = [d for d in decide_study(headers, load_config(environ={}).rules) if d.role == LEVEL_REFERENCE]
    assert not decision.selected and decision.reason.startswith("level reference: the sagittal series, T2-weighted")
    return decision.series_uid, files[decision.series_uid]


def test_the_sagittal_series_is_the_level_reference_of_the_axial_series(tmp_path: Path) -> None:
    """What ``process`` and the node's worker both do: the rules decide that the study's sagittal
    series is its level reference, :func:`reports.pipeline.series_levels` gives the axial frames
    their levels."""
    from inference.geometry import read_series
    from reports.pipeline import WorkItem, series_levels

    studies.require_data(list(studies.vertebrae_files(SUBJECT)))
    study, _ = studies.write_vertebrae_study(tmp_path / "in", SUBJECT, seed="wiring/levels", axial=("straight",))
    uid, files = _reference_files(study)
    assert uid == study.series["sagittal"].series_uid
    axial = study.series["axial_straight"].files
    item = WorkItem("t2", {"t2": axial}, level_reference=tuple(files))
    levels = series_levels(item, read_series(axial))
    assert levels.reason is None and levels.as_dict()["reference"] == uid
    assert {"L2", "L3", "L4", "L3-L4"} <= set(levels.levels), levels.as_dict()


def test_a_sagittal_series_in_another_frame_of_reference_gives_no_levels(tmp_path: Path) -> None:
    from inference.geometry import read_series
    from reports.pipeline import WorkItem, series_levels

    studies.require_data(list(studies.vertebrae_files(SUBJECT)))
    study, _ = studies.write_vertebrae_study(tmp_path / "in", SUBJECT, seed="wiring/other", axial=("straight",),
                                             sagittal_frame_of_reference="1.2.826.0.1.3680043.8.498.1")
    _, files = _reference_files(study)
    axial = study.series["axial_straight"].files
    levels = series_levels(WorkItem("t2", {"t2": axial}, level_reference=tuple(files)), read_series(axial))
    assert set(levels.levels) == {None} and "frame of reference" in levels.reason


def test_without_a_sagittal_series_the_reason_is_in_the_records_and_the_report(tmp_path: Path) -> None:
    studies.require_data()
    study = studies.write_cohort_study(tmp_path / "in", seed="wiring/none", n_slices=4)
    run = _process(tmp_path / "in", tmp_path / "out")
    assert run.returncode == 0, run.stdout + run.stderr
    record = json.loads((tmp_path / "out" / study.study_uid / "study.json").read_text())
    assert record["level_reference"]["series"] is None
    assert "no sagittal series" in record["level_reference"]["reason"]
    (group,) = record["groups"]
    assert "no sagittal series" in group["levels"]["reason"]
    # The whole-series comparison says why it is not per level.
    import pydicom

    sr = next(pydicom.dcmread(tmp_path / "out" / study.study_uid / name) for name in group["results"]
              if name.startswith("sr-"))
    texts = []

    def walk(items):
        for item in items:
            if item.ValueType == "TEXT":
                texts.append(item.TextValue)
            walk(getattr(item, "ContentSequence", []))

    walk(sr.ContentSequence)
    assert any("levels of the slices were not identified (no sagittal series" in t for t in texts)
    with open(tmp_path / "out" / "slices.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and tuple(rows[0]) == SLICE_COLUMNS
    assert {r["study"] for r in rows} == {study.study_uid} and {r["level"] for r in rows} == {""}
    assert {(r["muscle"], r["side"]) for r in rows} == {(m, s) for m in ("multifidus", "erector_spinae")
                                                        for s in ("left", "right")}


def test_a_sagittal_series_arriving_after_the_axial_one_makes_the_job_again(tmp_path: Path, node_factory) -> None:
    """The node: an axial series is processed as soon as it is ready; when the study's sagittal
    series arrives later, the rules make it the level reference and the axial group's job is
    queued again with it (its results replace the first ones: same result UIDs)."""
    studies.require_data(list(studies.vertebrae_files(SUBJECT)))
    study, _ = studies.write_vertebrae_study(tmp_path / "in", SUBJECT, seed="wiring/late", axial=("straight",))
    axial, sagittal = study.series["axial_straight"], study.series["sagittal"]
    node = node_factory(jobs={"workers": 1, "threads": 1})
    assert node.storescu(axial.files).returncode == 0
    first = node.wait_for(lambda s: s["jobs"] and s["jobs"][0]["state"] in ("done", "failed"), timeout=120,
                          what="the axial series' job")["jobs"][0]
    assert set(first["series"]) == {"t2"}  # no level reference yet
    assert node.storescu(sagittal.files).returncode == 0
    status = node.wait_for(lambda s: len(s["jobs"]) == 2 and all(j["state"] in ("done", "failed") for j in s["jobs"]),
                           timeout=120, what="the axial series' job made again")
    again = next(j for j in status["jobs"] if j["id"] != first["id"])
    assert again["grouping"] == first["grouping"]
    assert again["series"] == {"t2": axial.series_uid, "level_reference": sagittal.series_uid}
    decision = next(s["decision"] for s in status["series"] if s["series_uid"] == sagittal.series_uid)
    assert decision["role"] == "level_reference" and not decision["selected"]
    assert "level reference: the sagittal series, T2-weighted" in node.cli("status").stdout


def test_results_are_made_again_with_levels_when_the_sagittal_series_comes_later(tmp_path: Path, node_factory) -> None:
    """The real per-level study (TUM01 Dixon with its subject's sagittal series): the Dixon
    group's results are made without levels, then again with them once the sagittal series has
    arrived, under the same result UIDs, so that the second results replace the first."""
    import pydicom

    from reports.equipment import ResultSeries

    studies.require_data()
    studies.require_data(studies.vertebrae_files(studies.TUM01_VERTEBRAE_SUBJECT))
    study, _ = studies.write_dixon_study_with_sagittal(tmp_path / "in", seed="wiring/late-results")
    node = node_factory(jobs={"workers": 1, "threads": 2})
    assert node.storescu(study.series["water"].files + study.series["fat"].files).returncode == 0
    first = node.wait_for(lambda s: any(j["state"] == "done" for j in s["jobs"]), timeout=300,
                          what="the Dixon job without levels")["jobs"][0]
    assert "no sagittal series" in first["result"]["levels"]["reason"]
    results = node.data / "results"
    before = {p.relative_to(results) for p in results.rglob("*.dcm")}

    def description(path: Path) -> str:
        return str(pydicom.dcmread(results / path, stop_before_pixels=True).SeriesDescription)

    def report() -> pydicom.Dataset:
        (path,) = [p for p in before if description(p) == ResultSeries.SR.description()]
        return pydicom.dcmread(results / path)

    def disc_sites(sr: pydicom.Dataset) -> int:
        found = 0

        def walk(items) -> None:
            nonlocal found
            for item in items:
                if item.ValueType == "CODE" and item.ConceptCodeSequence[0].CodeMeaning.endswith("disc"):
                    found += 1
                walk(getattr(item, "ContentSequence", []))

        walk(sr.ContentSequence)
        return found

    assert disc_sites(report()) == 0
    assert node.storescu(study.series["sagittal"].files).returncode == 0
    status = node.wait_for(lambda s: sum(j["state"] == "done" for j in s["jobs"]) == 2, timeout=300,
                           what="the Dixon job made again with levels")
    again = next(j for j in status["jobs"] if j["id"] != first["id"])
    assert again["series"]["level_reference"] == study.series["sagittal"].series_uid
    assert again["result"]["levels"]["reason"] is None
    assert again["result"]["levels"]["reference"] == study.series["sagittal"].series_uid
    # Same result UIDs: the first results' files were replaced, not joined by a second SEG or SR
    # (beside them only what levels add: more summary pages, the key-slice outline document).
    after = {p.relative_to(results) for p in results.rglob("*.dcm")}
    assert before <= after

    def count(files, prefix: str) -> int:
        return sum(description(p).startswith(prefix) for p in files)

    for prefix in (ResultSeries.SR.description(), "Paraspinal muscles ("):
        assert count(after, prefix) == count(before, prefix) == 1, prefix
    assert disc_sites(report()) > 0


def test_a_study_with_only_a_sagittal_series_lists_it_with_its_reason(tmp_path: Path) -> None:
    """Nothing to measure: the level reference gave no numbers either, and skipped_and_failed.csv
    says so, as it does for every series that gave none."""
    studies.require_data(list(studies.vertebrae_files(SUBJECT)))
    study, _ = studies.write_vertebrae_study(tmp_path / "in", SUBJECT, seed="wiring/sagittal-only", axial=())
    run = _process(tmp_path / "in", tmp_path / "out")
    assert run.returncode == 3, run.stdout + run.stderr  # nothing selected
    # The progress line and the closing summary count the study alike.
    assert "(0 done, 0 failed, 1 nothing selected)" in run.stderr, run.stderr
    assert "0 done (0 by an earlier run), 0 failed, 1 with nothing selected" in run.stdout, run.stdout
    with open(tmp_path / "out" / "skipped_and_failed.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["series"] == study.series["sagittal"].series_uid and row["outcome"] == "skipped"
    assert row["reason"].startswith("no axial series was selected; level reference: the sagittal series"), row
