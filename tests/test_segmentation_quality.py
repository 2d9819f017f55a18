"""Quality control of the segmentation: each slice passes or is excluded, and a series whose slices
mostly fail gets no numbers.

Built from the real data: the TUM01 Dixon study in every contrast the bundled model takes (every
slice must pass); the same series upside down (pixels mirrored front to back under unchanged
headers); sagittal spine images sent as an axial lumbar series (real anatomy, not lumbar axial
anatomy); axial images from above the lumbar spine (Zukić T2 TSE, T11-T12, resliced from the
vertebrae data); a lumbar series with three upside-down slices in the middle (limited: those
three excluded, the rest measured). Noise-only, blank and fat-suppressed inputs are refused before
inference (tests/test_input_quality.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from inference.geometry import LabelMap
from inference.registry import DEFAULT_MODEL, load_model
from inference.runtime import Segmenter, mask_uncertainty
from inference.segmentation_quality import (MAX_AREA_CHANGE, MAX_CENTROID_SHIFT_MM, MAX_UNCERTAINTY, Verdict,
                                            check_segmentation, slice_features)
from inference.vocabulary import DIXON_COMPONENTS
from reports import codes as mn
from reports.pipeline import WorkItem, cohort_rows, read_inputs, run
from reports.render import render_pages
from tests import studies, validators
from tests.studies import require_data

SOFTWARE = "0.1.0"


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter(load_model(DEFAULT_MODEL), threads=1)


@pytest.fixture(scope="module")
def dixon(tmp_path_factory) -> dict:
    require_data()
    study = studies.write_dixon_study(tmp_path_factory.mktemp("dixon"), seed="qc-dixon")
    return read_inputs(WorkItem("dixon", {role: s.files for role, s in study.series.items()}))


@pytest.fixture(scope="module")
def dixon_labels(dixon, segmenter) -> LabelMap:
    return segmenter.segment_components({r: dixon[r] for r in DIXON_COMPONENTS if r in dixon})


def _with_frames(label_map_series, frames):
    return dataclasses.replace(label_map_series, frames=tuple(np.ascontiguousarray(f, dtype=np.float32)
                                                              for f in frames))


def _canvas(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``image`` centred on a zero canvas of ``shape`` (cut where larger)."""
    out = np.zeros(shape, np.float32)
    image = image[:shape[0], :shape[1]]
    top, left = (shape[0] - image.shape[0]) // 2, (shape[1] - image.shape[1]) // 2
    out[top:top + image.shape[0], left:left + image.shape[1]] = image
    return out


# ---------------------------------------------------------------------------------------------
# The pure pieces
# ---------------------------------------------------------------------------------------------


def test_mask_uncertainty_is_zero_when_certain_and_one_when_uniform() -> None:
    labels = np.array([[0, 1], [2, 2]], np.uint8)
    certain = np.zeros((3, 2, 2), np.float32)
    certain[labels.astype(int), np.arange(2)[:, None], np.arange(2)[None, :]] = 1
    assert mask_uncertainty(certain, labels) == pytest.approx({1: 0.0, 2: 0.0}, abs=1e-9)
    uniform = np.full((3, 2, 2), 1 / 3, np.float32)
    assert mask_uncertainty(uniform, labels) == pytest.approx({1: 1.0, 2: 1.0}, abs=1e-6)


def test_every_slice_of_the_real_dixon_study_passes_in_every_contrast(dixon, dixon_labels, segmenter) -> None:
    """The calibration subject: every check passes on all 29 slices, with the margins the
    constants document."""
    quality = check_segmentation(dixon_labels)
    assert quality.verdict is Verdict.PASS, quality.reason
    assert len(quality.checks) == 29 and not quality.excluded
    worst = max(max(u.values()) for u in dixon_labels.uncertainty if u)
    assert worst < MAX_UNCERTAINTY / 3
    # Continuity margins: neighbouring slices change area by less than the limit, and move less.
    features = [slice_features(l, i, g, dixon_labels.meaning)[1]
                for l, i, g in zip(dixon_labels.labels, dixon_labels.series.frames, dixon_labels.series.geometry)]
    for value in dixon_labels.meaning:
        areas = np.array([f[value].area_mm2 for f in features])
        assert np.max(np.maximum(areas[1:] / areas[:-1], areas[:-1] / areas[1:])) < MAX_AREA_CHANGE / 1.5
        centres = np.array([f[value].centroid[:2] for f in features])
        assert np.max(np.linalg.norm(np.diff(centres, axis=0), axis=1)) < MAX_CENTROID_SHIFT_MM / 2
    for role in ("fat", "in_phase", "water"):
        alone = check_segmentation(segmenter.segment_components({role: dixon[role]}))
        assert alone.verdict is Verdict.PASS, f"{role}: {alone.reason}"


def test_an_upside_down_series_is_not_measured(dixon, segmenter) -> None:
    """Pixels mirrored front to back under unchanged headers: what a wrong orientation in the
    headers, or a reconstruction flipped on the scanner, looks like."""
    flipped = {r: _with_frames(s, [f[::-1] for f in s.frames]) for r, s in dixon.items()}
    label_map = segmenter.segment_components({r: flipped[r] for r in DIXON_COMPONENTS if r in flipped})
    quality = check_segmentation(label_map)
    assert quality.verdict is Verdict.NOT_MEASURED, quality.reason
    assert len(quality.excluded) >= 25
    assert "too few remain to measure" in quality.reason


def test_sagittal_spine_images_sent_as_an_axial_lumbar_series_are_not_measured(dixon, segmenter) -> None:
    """Real spine MRI that is not lumbar axial anatomy (the MyoSegmenTUM vertebrae water volume's
    sagittal planes) behind the headers of an axial lumbar series."""
    volume = _vertebrae_volume("myosegmentum", "myosegmentum-01")
    water = dixon["water"]
    planes = np.linspace(10, volume.shape[2] - 10, len(water)).astype(int)
    fake = _with_frames(water, [_canvas(volume[:, :, k], water.frames[0].shape) for k in planes])
    quality = check_segmentation(segmenter.segment_components({"water": fake}))
    assert quality.verdict is Verdict.NOT_MEASURED, quality.reason
    assert len(quality.excluded) == len(water)


def test_slices_from_above_the_lumbar_spine_are_excluded(dixon, segmenter) -> None:
    """Axial images at T11 and T12 (their level known from the manual vertebra labels), resliced
    from a real T2 TSE volume of the Zukić set. The volume is a 76 mm slab: what excludes these
    slices is the muscle checks (outlines cut off, missing or outside the body), not a
    recognition of the thoracic level, which needs the vertebral level model."""
    volume = _vertebrae_volume("zukic", "zukic-02")
    labels = np.asarray(nib.load(str(_vertebrae_path("zukic", "zukic-02", "vertebrae"))).dataobj)
    thoracic = [k for k in range(volume.shape[0]) if set(np.unique(labels[k])) & {1, 2}
                and not set(np.unique(labels[k])) & {3, 4, 5, 6, 7}]
    assert len(thoracic) > 20
    water = dixon["water"]
    chosen = np.linspace(thoracic[0], thoracic[-1], len(water)).astype(int)
    fake = _with_frames(water, [_canvas(volume[k], water.frames[0].shape) for k in chosen])
    quality = check_segmentation(segmenter.segment_components({"water": fake}))
    assert quality.verdict is Verdict.NOT_MEASURED, quality.reason


def _vertebrae_path(group: str, name: str, kind: str) -> Path:
    return studies._data_dir() / "vertebrae" / group / f"{name}_{kind}.nii.gz"


def _vertebrae_volume(group: str, name: str) -> np.ndarray:
    path = _vertebrae_path(group, name, "image")
    require_data([path])
    return np.asarray(nib.load(str(path)).dataobj).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Through the pipeline: numbers only from slices that pass; "not measured" says so
# ---------------------------------------------------------------------------------------------


def test_a_series_with_some_upside_down_slices_is_measured_without_them(tmp_path: Path, segmenter) -> None:
    require_data()
    study = studies.write_t2_study(tmp_path, seed="qc-limited")
    files = study.series["t2"].files
    numbers = {int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in files}
    middle = sorted(numbers)[13:16]
    studies.flip_front_to_back(files, set(middle))
    results = run(WorkItem("t2", {"t2": files}), segmenter, software_version=SOFTWARE)
    quality = results.quality
    assert quality.verdict is Verdict.LIMITED, quality.reason
    excluded = {c.instance_number for c in quality.excluded}
    assert excluded == set(middle), quality.reason
    # Excluded slices enter no metric; a volume across the gap is not given.
    measured = {area.frame_index for m in results.metrics for area in m.slices}
    assert not measured & quality.excluded_frames
    assert all(m.volume_cm3 is None for m in results.metrics)
    assert all(m.n_slices <= 29 - len(excluded) for m in results.metrics)
    rows = cohort_rows(results, "study")
    assert rows and {r["quality"] for r in rows} == {"limited"}
    assert {r["excluded_images"] for r in rows} == {len(excluded)}
    # The SR codes the verdict and names every excluded image with its problems.
    report = results.report
    verdicts = _coded(report, mn.SEGMENTATION_QUALITY.value)
    assert verdicts == [mn.verdict_value("limited").value]
    texts = _texts(report, mn.EXCLUDED_IMAGE.value)
    assert len(texts) == len(excluded)
    assert all(c.sop_instance_uid in " ".join(texts) for c in quality.excluded)
    path = tmp_path / "sr.dcm"
    report.save_as(path, enforce_file_format=True)
    checked = validators.dciodvfy(path)
    assert checked.errors == [], checked.describe()


def test_a_series_that_is_not_measured_gets_an_sr_and_a_page_that_say_so(tmp_path: Path, segmenter) -> None:
    require_data()
    study = studies.write_t2_study(tmp_path, seed="qc-upside-down")
    files = study.series["t2"].files
    studies.flip_front_to_back(files)
    results = run(WorkItem("t2", {"t2": files}), segmenter, software_version=SOFTWARE)
    assert results.quality.verdict is Verdict.NOT_MEASURED
    assert results.metrics == [] and results.assessments == []
    assert cohort_rows(results, "study") == []
    report = results.report
    assert _coded(report, mn.SEGMENTATION_QUALITY.value) == [mn.verdict_value("not measured").value] * 2
    assert not _numbers(report), "a series that was not measured must carry no number"
    assert any("not measured" in t for t in _texts(report, "121106"))
    path = tmp_path / "sr.dcm"
    report.save_as(path, enforce_file_format=True)
    checked = validators.dciodvfy(path)
    assert checked.errors == [], checked.describe()
    # One summary page, which says it.
    assert len(results.summary) == 1
    assert "Not measured" in str(results.summary[0].ImageComments)
    # The SEG is still made, so that the reader can see what the model drew.
    assert len(results.segmentations) == 1


def test_the_summary_marks_excluded_images(dixon_labels) -> None:
    """A limited series: one of the key-slice panels shows an excluded image, titled as such."""
    labels = list(dixon_labels.labels)
    labels[3] = np.zeros_like(labels[3])  # one slice without outlines fails (no muscle)
    label_map = dataclasses.replace(dixon_labels, labels=tuple(labels))
    quality = check_segmentation(label_map)
    assert quality.verdict is Verdict.LIMITED and quality.excluded_frames == {3}
    from inference.patient import from_dataset
    pages = render_pages(label_map, [], from_dataset(pydicom.Dataset()), model_name="m", model_version="1",
                         software_version=SOFTWARE, quality=quality)
    assert pages and "Key slices" in pages[0].title
    # The alert colour (#ff5a5a) of the excluded panel's frame and title is on the page.
    pixels = pages[0].pixels.reshape(-1, 3).astype(int)
    assert np.any((np.abs(pixels - [255, 90, 90]).sum(axis=1) < 30))


# ---------------------------------------------------------------------------------------------
# Helpers reading the SR
# ---------------------------------------------------------------------------------------------


def _walk(items):
    for item in items:
        yield item
        yield from _walk(getattr(item, "ContentSequence", []))


def _coded(report, concept: str) -> list[str]:
    return [item.ConceptCodeSequence[0].CodeValue for item in _walk(report.ContentSequence)
            if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == concept]


def _texts(report, concept: str) -> list[str]:
    return [item.TextValue for item in _walk(report.ContentSequence)
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == concept]


def _numbers(report) -> list:
    """Measurements: NUM items other than the observation context (the subject's age)."""
    return [item for item in _walk(report.ContentSequence)
            if item.ValueType == "NUM" and item.RelationshipType != "HAS OBS CONTEXT"]
