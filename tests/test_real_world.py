"""Series as scanners and archives send them: every one gives results or a stated reason.

Each case is one kind of real-world deviation, built from the real MyoSegmenTUM Dixon volumes
(tests/studies.py, changed by tests/odd_studies.py), run through the real pipeline with the
bundled model, and checked where it matters: the SEG frames reference exactly the source
instances that were used, the muscles lie on the right side in patient coordinates (DICOM LPS:
+x is the patient's left), the SR references every SEG and every segment it measures from and
names each image that was set aside with its reason, and a series that cannot be processed fails
with a reason a person understands. The last test runs a node with a series that makes the
segmenter raise among good ones: the job fails with a readable reason, and the good ones still
give results.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from inference.geometry import SeriesImage, read_series
from inference.registry import DEFAULT_MODEL, load_model
from inference.runtime import Segmenter
from inference.set_aside import MIN_FRAMES, SetAside, SetAsideKind
from node.config import load_config
from node.orchestration.headers import summarise
from node.orchestration.rules import SeriesHeaders, decide_study
from reports import codes
from reports.pipeline import PipelineError, Results, WorkItem, read_inputs, run
from reports.render import _page1_notes
from reports.seg import segments
from tests import odd_studies, studies, validators
from tests.peers import REPO, NodeProcess, free_port

SOFTWARE = "0.1.0"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: Slices of the 29 that cover the labelled muscles well; fewer slices keep inference short.
WINDOW = slice(9, 19)


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    studies.require_data()
    return Segmenter(load_model(DEFAULT_MODEL), providers="cpu", threads=2)


def _dixon(folder: Path, seed: str, patient: studies.Patient = studies.DEFAULT_PATIENT) -> studies.Study:
    """A classic water + fat study, cut to :data:`WINDOW` (the files outside it are removed)."""
    study = studies.write_dixon_study(folder, patient=patient, seed=seed, contrasts=("water", "fat"))
    for info in study.series.values():
        for path in info.files[:WINDOW.start] + info.files[WINDOW.stop:]:
            path.unlink()
        info.files = info.files[WINDOW]
        info.sop_instance_uids = info.sop_instance_uids[WINDOW]
        info.frame_affines = info.frame_affines[WINDOW]
    return study


def _item(study: studies.Study, roles=("water", "fat")) -> WorkItem:
    return WorkItem("dixon", {role: list(study.series[role].files) for role in roles})


@dataclass
class Checked:
    """Results written to files and read back, with what the checks found."""

    results: Results
    series: SeriesImage
    segs: list[Dataset]
    sr: Dataset
    paths: list[Path] = field(default_factory=list)

    def set_aside_texts(self) -> list[str]:
        notes = self.sr.ContentSequence[-1].ContentSequence
        return [item.TextValue for item in notes
                if item.ConceptNameCodeSequence[0].CodeValue == codes.SET_ASIDE.value]


def _frame_sources(seg: Dataset) -> list[tuple[int, str, int]]:
    """Per SEG frame: (segment number, source SOP Instance UID, source frame number)."""
    found = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        found.append((int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber),
                      str(source.ReferencedSOPInstanceUID), int(source.get("ReferencedFrameNumber", 1) or 1)))
    return found


def _check_results(results: Results, folder: Path, used_uids: set[str]) -> Checked:
    """Write the results, read them back and check SEG, SR and sides; ``used_uids`` are the
    water instances that must be segmented (every other instance must not be)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, dataset in results.datasets:
        path = folder / f"{kind}-{dataset.SOPInstanceUID}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    segs = [pydicom.dcmread(p) for p in paths if p.name.startswith("seg-")]
    sr = pydicom.dcmread(next(p for p in paths if p.name.startswith("sr-")))
    series = read_series([results.label_map.series.source_paths[u] for u in used_uids])

    # Every used source frame in exactly one SEG, once per segment; nothing else referenced; each
    # SEG frame lies where its source frame lies.
    referenced: dict[str, int] = {}
    for seg in segs:
        numbers = {ref.number for ref in segments(seg).values()}
        per_source: dict[str, set[int]] = {}
        for (number, uid, _), item in zip(_frame_sources(seg), seg.PerFrameFunctionalGroupsSequence):
            per_source.setdefault(uid, set()).add(number)
            position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
            np.testing.assert_allclose(position, series.geometry[series.frame_index(uid)].position, atol=1e-3)
        assert all(found == numbers for found in per_source.values())
        for uid in per_source:
            referenced[uid] = referenced.get(uid, 0) + 1
        assert {str(r.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence
                for r in s.ReferencedInstanceSequence} == set(per_source)
    assert set(referenced) == used_uids and set(referenced.values()) == {1}, (len(referenced), len(used_uids))

    # Muscles on the right side in LPS: the left segment's mean x is greater than the right one's.
    xs: dict[tuple[str, str], list[float]] = {}
    for seg in segs:
        by_number = {ref.number: key for key, ref in segments(seg).items()}
        pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
        for frame, (number, uid, _) in zip(pixels, _frame_sources(seg)):
            rows, columns = np.nonzero(frame)
            if rows.size:
                lps = series.geometry[series.frame_index(uid)].pixel_to_lps(rows, columns)
                xs.setdefault(by_number[number], []).extend(lps[:, 0].tolist())
    for muscle in ("multifidus", "erector_spinae"):
        left, right = np.mean(xs[(muscle, "left")]), np.mean(xs[(muscle, "right")])
        assert left > right + 10, (muscle, left, right)

    # The SR references every SEG and, through its slice groups, every segment that has pixels.
    evidence = {str(r.ReferencedSOPInstanceUID) for study in sr.CurrentRequestedProcedureEvidenceSequence
                for s in study.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert {str(seg.SOPInstanceUID) for seg in segs} <= evidence
    assert used_uids <= evidence

    referenced_frames: set[tuple[str, int]] = set()

    def walk(items) -> None:
        for item in items:
            for reference in item.get("ReferencedSOPSequence", []):
                if reference.ReferencedSOPClassUID == SEG_CLASS and "ReferencedFrameNumber" in reference:
                    referenced_frames.add((str(reference.ReferencedSOPInstanceUID), int(reference.ReferencedFrameNumber)))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    for seg, pixels in ((s, s.pixel_array.reshape(int(s.NumberOfFrames), -1)) for s in segs):
        sources = _frame_sources(seg)
        with_pixels = {sources[f][0] for f in range(len(sources)) if pixels[f].any()}
        measured = {sources[f - 1][0] for uid, f in referenced_frames if uid == seg.SOPInstanceUID}
        assert with_pixels and with_pixels <= measured, (seg.SeriesDescription, with_pixels, measured)
    return Checked(results, series, segs, sr, paths)


def _set_aside(results: Results, kind: SetAsideKind) -> list[SetAside]:
    return [item for item in results.set_aside if item.kind is kind]


# ---------------------------------------------------------------------------------------------
# Angled slabs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tilts", [(6.0, -8.0), (30.0, -25.0)], ids=["small-angles", "large-angles"])
def test_two_angled_slabs_give_one_seg_per_orientation_and_one_sr(tmp_path: Path, segmenter, tilts) -> None:
    study = studies.write_two_slab_study(tmp_path / "study", seed=f"slabs{tilts}", tilts_deg=tilts)
    water = study.series["water"]
    results = run(_item(study), segmenter, software_version=SOFTWARE)
    assert not results.set_aside
    checked = _check_results(results, tmp_path / "results", set(water.sop_instance_uids))

    assert len(checked.segs) == 2
    slabs = [set(water.sop_instance_uids[:8]), set(water.sop_instance_uids[8:])]
    for seg, stack, slab in zip(checked.segs, water.stacks, slabs):
        assert {uid for _, uid, _ in _frame_sources(seg)} == slab
        orientation = [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                       .ImageOrientationPatient]
        np.testing.assert_allclose(orientation, stack.row_cosine + stack.column_cosine, atol=1e-5)
    # One series each (a viewer shows one SEG per series), deterministic per part, same segments.
    assert len({seg.SeriesInstanceUID for seg in checked.segs}) == 2
    assert [seg.SeriesDescription for seg in checked.segs] == [
        f"Paraspinal muscles {k}/2 (musclenode-lumbar-dixon 2.0.0)" for k in (1, 2)]
    assert segments(checked.segs[0]) == segments(checked.segs[1])
    again = run(_item(study), segmenter, software_version=SOFTWARE)
    assert [s.SOPInstanceUID for s in again.segmentations] == [s.SOPInstanceUID for s in checked.segs]
    for path in checked.paths[:3]:  # both SEGs and the SR
        result = validators.dciodvfy(path)
        assert result.errors == [], result.describe()


# ---------------------------------------------------------------------------------------------
# Repeated slice
# ---------------------------------------------------------------------------------------------


def test_a_repeated_slice_keeps_the_later_acquisition(tmp_path: Path, segmenter) -> None:
    study = _dixon(tmp_path / "study", "repeat")
    first = {role: study.series[role].sop_instance_uids[4] for role in ("water", "fat")}
    repeats = odd_studies.repeat_slice(study, ("water", "fat"), 4)
    results = run(_item(study), segmenter, software_version=SOFTWARE)

    aside = _set_aside(results, SetAsideKind.REPEATED)
    assert {item.sop_instance_uid for item in aside} == set(first.values()) and len(results.set_aside) == 2
    assert all("latest by acquisition time" in item.detail and "instance 20" in item.detail for item in aside)
    water = study.series["water"]
    used = set(water.sop_instance_uids) - {first["water"]}
    assert repeats["water"] in used
    checked = _check_results(results, tmp_path / "results", used)
    texts = checked.set_aside_texts()
    assert len(texts) == 2 and all("repeated at the same position" in t for t in texts)
    assert any(first["water"] in t for t in texts) and any(first["fat"] in t for t in texts)
    assert "2 images set aside: 2 repeated at the same position" in " ".join(
        _page1_notes(results.label_map, results.assessments))


def test_without_acquisition_times_the_higher_instance_number_is_kept(tmp_path: Path) -> None:
    study = _dixon(tmp_path / "study", "repeat-numbers")
    first = study.series["water"].sop_instance_uids[2]
    repeats = odd_studies.repeat_slice(study, ("water",), 2)
    for path in study.series["water"].files:
        ds = pydicom.dcmread(path)
        del ds.AcquisitionTime
        ds.save_as(path, enforce_file_format=True)
    series = read_series(study.series["water"].files)
    assert repeats["water"] in {g.sop_instance_uid for g in series.geometry}
    (item,) = series.set_aside
    assert item.sop_instance_uid == first and "latest by InstanceNumber" in item.detail


# ---------------------------------------------------------------------------------------------
# Slices without position, orientation or spacing
# ---------------------------------------------------------------------------------------------


def test_a_slice_without_position_is_set_aside_and_the_rest_processed(tmp_path: Path, segmenter) -> None:
    study = _dixon(tmp_path / "study", "no-position")
    lacking = odd_studies.remove_attribute(study, "water", 3, "ImagePositionPatient")
    partner = study.series["fat"].sop_instance_uids[3]
    results = run(_item(study), segmenter, software_version=SOFTWARE)
    (missing,) = _set_aside(results, SetAsideKind.NO_GEOMETRY)
    assert missing.sop_instance_uid == lacking and missing.detail == "no ImagePositionPatient"
    (unpaired,) = _set_aside(results, SetAsideKind.UNPAIRED)
    assert unpaired.sop_instance_uid == partner and "water series has no image at this position" in unpaired.detail
    used = set(study.series["water"].sop_instance_uids) - {lacking}
    checked = _check_results(results, tmp_path / "results", used)
    assert len(checked.set_aside_texts()) == 2


@pytest.mark.parametrize("keyword", ["ImageOrientationPatient", "PixelSpacing"])
def test_a_slice_without_orientation_or_spacing_is_set_aside(tmp_path: Path, keyword: str) -> None:
    study = _dixon(tmp_path / "study", f"no-{keyword}")
    lacking = odd_studies.remove_attribute(study, "fat", 0, keyword)
    images = read_inputs(_item(study))
    assert len(images["water"]) == len(images["fat"]) == len(study.series["water"].files) - 1
    (item,) = images["fat"].set_aside
    assert (item.sop_instance_uid, item.kind, item.detail) == (lacking, SetAsideKind.NO_GEOMETRY, f"no {keyword}")


def test_too_few_usable_slices_fail_with_the_reasons(tmp_path: Path) -> None:
    study = _dixon(tmp_path / "study", "too-few")
    for info in study.series.values():
        for path in info.files[MIN_FRAMES:]:
            path.unlink()
        info.files = info.files[:MIN_FRAMES]
    odd_studies.remove_attribute(study, "water", 1, "PixelSpacing")
    with pytest.raises(PipelineError) as raised:
        read_inputs(_item(study))
    message = str(raised.value)
    assert f"keeps {MIN_FRAMES - 1} usable images" in message and f"at least {MIN_FRAMES} are needed" in message
    assert "no position, orientation or pixel spacing" in message


# ---------------------------------------------------------------------------------------------
# A localizer inside the axial series
# ---------------------------------------------------------------------------------------------


def test_a_localizer_inside_the_series_is_set_aside(tmp_path: Path, segmenter) -> None:
    study = _dixon(tmp_path / "study", "localizer")
    localizer = odd_studies.insert_localizer(study, "water")
    rules = load_config(environ={}).rules
    headers = [SeriesHeaders(info.series_uid, study.study_uid, 1,
                             tuple(summarise(pydicom.dcmread(p, stop_before_pixels=True)) for p in info.files))
               for info in study.series.values()]
    decisions = {d.series_uid: d for d in decide_study(headers, rules)}
    water = decisions[study.series["water"].series_uid]
    assert water.selected and decisions[study.series["fat"].series_uid].selected
    assert "1 off-plane (sagittal) of 11 slices will be set aside" in water.reason

    results = run(_item(study), segmenter, software_version=SOFTWARE)
    (item,) = results.set_aside
    assert item.sop_instance_uid == localizer and item.kind is SetAsideKind.OFF_PLANE
    assert item.detail.startswith("sagittal, 90 degrees from the axial plane")
    used = set(study.series["water"].sop_instance_uids) - {localizer}
    _check_results(results, tmp_path / "results", used)


# ---------------------------------------------------------------------------------------------
# Pixel data that cannot be decoded
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how, expected", [
    ("empty", "the Pixel Data element is empty"),
    ("short", "the Pixel Data holds 32000 bytes, but 1 frame of 400 x 400 pixels at 16 bits need 320000 "
              "(the instance is truncated)"),
])
def test_undecodable_pixel_data_is_set_aside_with_a_readable_reason(tmp_path: Path, segmenter, how: str,
                                                                    expected: str) -> None:
    study = _dixon(tmp_path / "study", f"pixels-{how}")
    damaged = odd_studies.damage_pixel_data(study, "water", 5, how)
    results = run(_item(study), segmenter, software_version=SOFTWARE)
    (item,) = _set_aside(results, SetAsideKind.UNDECODABLE)
    assert item.sop_instance_uid == damaged and item.detail == expected and item.frame_number is None
    assert "NoneType" not in item.describe()
    used = set(study.series["water"].sop_instance_uids) - {damaged}
    checked = _check_results(results, tmp_path / "results", used)
    assert any(expected in text for text in checked.set_aside_texts())


def test_a_series_of_undecodable_instances_fails_with_the_reason(tmp_path: Path) -> None:
    study = _dixon(tmp_path / "study", "all-empty")
    for index in range(len(study.series["water"].files)):
        odd_studies.damage_pixel_data(study, "water", index, "empty")
    with pytest.raises(PipelineError, match="none of the 10 instances has a usable image: undecodable pixel data "
                                            r"\(the Pixel Data element is empty\)"):
        read_inputs(_item(study))


# ---------------------------------------------------------------------------------------------
# A node keeps working when one series makes it fail
# ---------------------------------------------------------------------------------------------

FAULTY_PATIENT = studies.Patient("MN-FAULT", "MUSCLENODE^FAULT", "19900101", "034Y", "F", 1.65, 60.0)
_FAULT_HOOK = '''\
"""musclenode serve, with a segmenter that raises on the series of patient MN-FAULT."""
import sys

import inference.runtime as runtime

_segment = runtime.Segmenter.segment


def segment(self, series):
    channels = [series] if isinstance(series, runtime.SeriesImage) else list(series)
    if any(channel.patient.patient_id == "MN-FAULT" for channel in channels):
        raise RuntimeError("fault injected by tests/test_real_world.py: the segmenter fails on this series")
    return _segment(self, series)


runtime.Segmenter.segment = segment
from node.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
'''


class FaultyNode(NodeProcess):
    """A node process whose segmenter raises on one patient's series (see :data:`_FAULT_HOOK`)."""

    def start(self, wait: bool = True) -> "FaultyNode":
        import subprocess

        self.write_config()
        hook = self.folder / "faulty_node.py"
        hook.write_text(_FAULT_HOOK)
        log = open(self.log_path, "w")
        path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        self.process = subprocess.Popen(
            [sys.executable, str(hook), "--config", str(self.config_path), "serve"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path})
        log.close()
        if wait:
            self.wait_listening()
        return self


def test_a_failing_series_fails_its_job_and_the_worker_goes_on(tmp_path: Path) -> None:
    studies.require_data()
    node = FaultyNode(folder=tmp_path / "node", port=free_port(),
                      settings={"jobs": {"workers": 1, "threads": 2, "retry_seconds": 1}})
    node.folder.mkdir(parents=True)
    faulty = _dixon(tmp_path / "faulty", "faulty", patient=FAULTY_PATIENT)
    odd = _dixon(tmp_path / "odd", "odd")
    localizer = odd_studies.insert_localizer(odd, "water")
    empty = odd_studies.damage_pixel_data(odd, "fat", 2, "empty")
    slabs = studies.write_two_slab_study(tmp_path / "slabs", seed="node-slabs", tilts_deg=(8.0, -6.0),
                                         slices_per_slab=4)
    node.start()
    try:
        assert node.storescu(faulty.files).returncode == 0
        status = node.wait_for(lambda s: s["job_counts"]["failed"] == 1, timeout=240, what="the faulty job failed")
        (failed,) = status["jobs"]
        assert failed["reason"].startswith("musclenode failed unexpectedly while processing this series "
                                           "(RuntimeError: fault injected by tests/test_real_world.py")
        assert "the traceback is in the node's log" in failed["reason"]
        assert "Traceback (most recent call last)" in node.log() and "fault injected" in node.log()

        # Accepted: the SCP checks the encoding, not whether the pixels fill Rows x Columns.
        assert node.storescu(odd.files).returncode == 0
        assert node.storescu(slabs.files).returncode == 0
        status = node.wait_for(lambda s: s["job_counts"]["done"] == 2, timeout=400, what="both good jobs done")
        assert node.process.poll() is None
        jobs = {job["study_uid"]: job for job in status["jobs"]}
        assert jobs[faulty.study_uid]["state"] == "failed"

        odd_job = jobs[odd.study_uid]["result"]
        records = {r["sop_instance_uid"]: r for r in odd_job["set_aside"]}
        assert records[localizer]["kind"] == "off-plane" and records[empty]["kind"] == "undecodable pixel data"
        assert len(records) == 3  # and the water image at the empty fat image's position: unpaired
        assert jobs[slabs.study_uid]["result"]["segmentations"] == 2

        text = node.cli("status").stdout
        assert "3 images set aside: 1 no partner in the other Dixon series, 1 off-plane, 1 undecodable pixel data" \
            in text
        assert "the Pixel Data element is empty" in text and "musclenode failed unexpectedly" in text
        modalities = {pydicom.dcmread(p, stop_before_pixels=True).Modality
                      for p in (node.data / "results").glob("*/*.dcm")}
        assert modalities == {"SEG", "SR", "OT"}
        seg_series = {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID
                      for p in (node.data / "results").glob("*/*.dcm")
                      if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"}
        assert len(seg_series) == 3  # one for the odd study, two for the slabs
    finally:
        node.stop()
