"""Input quality control: what cannot be measured is refused or set aside before inference.

Built from the real TUM01 volumes (tests/studies.py): the pure checks on every slice of every
Dixon contrast, then DICOM series through the pipeline. A "T2" series carrying the water image
alone behind neutral headers (what a fat-suppressed series exported without its fat-suppression
headers looks like) passes the header rules and must be refused from its pixels; the same headers
on a fat-containing image (in-phase, water + fat) must pass. Noise-only series, half-blank series
and 2.5 mm pixels must be refused or set aside, never measured. A segmenter that fails the test
when called shows that refusals come before inference.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.input_quality import (MAX_PIXEL_SPACING_MM, MIN_BAND_RATIO, SliceQuality, fat_suppression_problem,
                                     measure_slice, resolution_problem, slice_problem)
from inference.registry import DEFAULT_MODEL, load_model
from inference.runtime import Segmenter
from inference.set_aside import MIN_FRAMES, SetAsideKind
from node.config import load_config
from node.orchestration.headers import summarise
from node.orchestration.rules import SeriesHeaders, decide_study
from reports.pipeline import PipelineError, WorkItem, check_inputs, read_inputs, run
from tests import studies
from tests.peers import REPO

SOFTWARE = "0.1.0"
#: Slices of the 29 that cover the labelled muscles well; fewer slices keep inference short.
WINDOW = slice(9, 19)


def _spacing() -> tuple[float, float]:
    affine = studies.load_volumes().affine
    return float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 0]))


def _slices(contrast: str) -> list[np.ndarray]:
    volume = studies.contrast_volume(contrast)
    return [np.asarray(volume[:, :, k].T, dtype=np.float32) for k in range(volume.shape[2])]


# ---------------------------------------------------------------------------------------------
# The pure checks on the real volumes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("contrast, fat_signal", [("water", False), ("in_phase", True), ("fat", True),
                                                  ("opposed_phase", True)])
def test_subcutaneous_fat_tells_a_fat_free_image_from_one_with_fat(contrast: str, fat_signal: bool) -> None:
    studies.require_data()
    qualities = [measure_slice(pixels, _spacing()) for pixels in _slices(contrast)]
    ratios = [q.band_ratio for q in qualities]
    assert all(r is not None for r in ratios)
    # Every slice on its side of the threshold, not only the median: the margin is per slice.
    if fat_signal:
        assert min(ratios) > 1.5 * MIN_BAND_RATIO, ratios
        assert fat_suppression_problem(qualities) is None
    else:
        assert max(ratios) < 0.75 * MIN_BAND_RATIO, ratios
        reason = fat_suppression_problem(qualities)
        assert reason is not None and "looks fat suppressed" in reason and "29 slices" in reason


@pytest.mark.parametrize("contrast", ["water", "fat", "in_phase", "opposed_phase"])
def test_every_real_slice_holds_anatomy(contrast: str) -> None:
    studies.require_data()
    for k, pixels in enumerate(_slices(contrast)):
        quality = measure_slice(pixels, _spacing())
        assert slice_problem(quality) is None, (k, quality)


def _zero_filled_noise(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Complex noise on half the matrix, zero-filled to the full one: as scanners interpolate."""
    half = (shape[0] // 2, shape[1] // 2)
    spectrum = np.fft.fftshift(np.fft.fft2(rng.normal(0, 20, half) + 1j * rng.normal(0, 20, half)))
    padded = np.zeros(shape, dtype=complex)
    padded[half[0] // 2:half[0] // 2 + half[0], half[1] // 2:half[1] // 2 + half[1]] = spectrum
    return np.abs(np.fft.ifft2(np.fft.ifftshift(padded)))


def test_noise_and_blank_slices_are_found() -> None:
    rng = np.random.default_rng(13)
    shape = (400, 400)
    noises = {
        "gaussian": rng.normal(100, 20, shape),
        "rician": np.hypot(rng.normal(0, 20, shape), rng.normal(0, 20, shape)),
        "zero-filled": _zero_filled_noise(rng, shape),
    }
    for name, pixels in noises.items():
        problem = slice_problem(measure_slice(pixels, (1.0, 1.0)))
        assert problem is not None and problem[0] is SetAsideKind.NOISE, name
        assert "neighbouring pixels correlate" in problem[1]
    assert slice_problem(measure_slice(np.zeros(shape), (1.0, 1.0))) == (SetAsideKind.BLANK, "a uniform image")
    # A black slice with one small bright spot: structure, but no body.
    spot = np.zeros(shape)
    spot[200:210, 200:210] = 1000.0
    problem = slice_problem(measure_slice(spot, (1.0, 1.0)))
    assert problem is not None and problem[0] is SetAsideKind.BLANK and "the body covers 0.1 %" in problem[1]


def test_pixel_spacing_limit() -> None:
    assert resolution_problem([(1.0185, 1.0185)] * 3) is None
    assert resolution_problem([(MAX_PIXEL_SPACING_MM, MAX_PIXEL_SPACING_MM)]) is None
    reason = resolution_problem([(1.0, 1.0), (1.0, 2.5)])
    assert reason is not None and "2.5 mm is coarser than the 2 mm" in reason


@pytest.mark.parametrize("contrast", ["water", "in_phase"])
def test_a_body_cut_by_a_narrow_field_of_view_cannot_be_checked_for_fat_signal(contrast: str) -> None:
    """The real slices cut to a 77-pixel strip through the spine (the body runs off left and right,
    as in a small field of view) are refused as "cannot be checked", not as fat suppressed or
    fat-containing from a ratio the strip cannot give; the whole slices are never called cut."""
    studies.require_data()
    whole, strips = [], []
    for pixels in _slices(contrast):
        columns = np.flatnonzero((pixels > 0.1 * pixels.max()).any(axis=0))
        middle = (int(columns[0]) + int(columns[-1])) // 2
        whole.append(measure_slice(pixels, _spacing()))
        strips.append(measure_slice(pixels[:, middle - 38:middle + 39], _spacing()))
    assert not any(q.body_cut for q in whole) and all(q.body_cut for q in strips)
    reason = fat_suppression_problem(strips)
    assert reason is not None and reason.startswith("the fat signal cannot be checked")
    assert "29 of 29 slices" in reason
    # A minority of cut slices is left out and the rest decide, as for the whole slices.
    mixed = whole[:20] + strips[20:]
    assert fat_suppression_problem(mixed) == fat_suppression_problem(whole[:20])


def test_no_ratio_decides_nothing() -> None:
    assert fat_suppression_problem([SliceQuality(0.0, 0.0, None)]) is None
    assert fat_suppression_problem([]) is None


# ---------------------------------------------------------------------------------------------
# DICOM series through the pipeline
# ---------------------------------------------------------------------------------------------


def _t2(folder: Path, seed: str, source: str) -> studies.Study:
    """A neutral-header T2 series carrying ``source``'s pixels, cut to :data:`WINDOW`."""
    study = studies.write_t2_study(folder, seed=seed, source=source)
    info = study.series["t2"]
    for path in info.files[:WINDOW.start] + info.files[WINDOW.stop:]:
        path.unlink()
    info.files = info.files[WINDOW]
    info.sop_instance_uids = info.sop_instance_uids[WINDOW]
    return study


def _item(study: studies.Study) -> WorkItem:
    return WorkItem("t2", {"t2": study.series["t2"].files})


def _rewrite_pixels(path: Path, pixels: np.ndarray) -> None:
    ds = pydicom.dcmread(path)
    ds.PixelData = np.clip(np.rint(pixels), 0, 65535).astype(np.uint16).tobytes()
    ds.save_as(path)


class NoInference:
    """A segmenter that fails the test when called: refusals must come before inference."""

    def segment(self, *args, **kwargs):
        raise AssertionError("inference was run on a series that should have been refused")

    segment_components = segment


def test_a_water_image_behind_neutral_t2_headers_is_refused_before_inference(tmp_path: Path) -> None:
    studies.require_data()
    study = _t2(tmp_path / "study", "water-as-t2", "water")
    # The headers do not tell: the rules select it as a T2 series.
    headers = [SeriesHeaders(info.series_uid, study.study_uid, 1,
                             tuple(summarise(pydicom.dcmread(p, stop_before_pixels=True)) for p in info.files))
               for info in study.series.values()]
    (decision,) = decide_study(headers, load_config(environ={}).rules)
    assert decision.selected and decision.kind == "t2"

    with pytest.raises(PipelineError) as raised:
        run(_item(study), NoInference(), software_version=SOFTWARE)
    message = str(raised.value)
    assert message.startswith("the t2 series cannot be measured: the image looks fat suppressed")
    assert "median of 10 slices" in message and not raised.value.transient


def test_a_fat_containing_image_behind_the_same_headers_passes(tmp_path: Path) -> None:
    studies.require_data()
    study = _t2(tmp_path / "study", "in-phase-as-t2", "in_phase")
    images = read_inputs(_item(study))
    assert len(images["t2"]) == 10 and images["t2"].set_aside == ()
    check_inputs(_item(study), images)  # raises nothing


def test_a_lone_water_component_is_not_refused_as_fat_suppressed(tmp_path: Path) -> None:
    """Fat-free by design, and measured without fat: the content check does not apply."""
    studies.require_data()
    study = _t2(tmp_path / "study", "lone-water", "water")
    item = WorkItem("water", {"water": study.series["t2"].files})
    check_inputs(item, read_inputs(item))


def test_a_noise_only_series_is_refused_before_inference(tmp_path: Path) -> None:
    studies.require_data()
    study = _t2(tmp_path / "study", "noise", "in_phase")
    rng = np.random.default_rng(7)
    for path in study.series["t2"].files:
        shape = pydicom.dcmread(path, stop_before_pixels=True)
        size = (int(shape.Rows), int(shape.Columns))
        _rewrite_pixels(path, np.hypot(rng.normal(0, 200, size), rng.normal(0, 200, size)))
    with pytest.raises(PipelineError) as raised:
        run(_item(study), NoInference(), software_version=SOFTWARE)
    message = str(raised.value)
    assert message.startswith("the t2 series holds no anatomy to measure") and "noise only" in message


def test_pixel_spacing_of_2_5_mm_is_refused_before_inference(tmp_path: Path) -> None:
    studies.require_data()
    study = _t2(tmp_path / "study", "coarse", "in_phase")
    for path in study.series["t2"].files:
        ds = pydicom.dcmread(path)
        ds.PixelSpacing = ["2.5", "2.5"]
        ds.save_as(path)
    with pytest.raises(PipelineError) as raised:
        run(_item(study), NoInference(), software_version=SOFTWARE)
    assert "in-plane pixel spacing 2.5 mm is coarser than the 2 mm" in str(raised.value)


def _blank(study: studies.Study, indices: list[int]) -> set[str]:
    info = study.series["t2"]
    for i in indices:
        ds = pydicom.dcmread(info.files[i], stop_before_pixels=True)
        _rewrite_pixels(info.files[i], np.zeros((int(ds.Rows), int(ds.Columns))))
    return {info.sop_instance_uids[i] for i in indices}


def test_too_few_slices_left_after_blank_ones_fail_with_the_reason(tmp_path: Path) -> None:
    studies.require_data()
    study = _t2(tmp_path / "study", "mostly-blank", "in_phase")
    _blank(study, list(range(MIN_FRAMES - 1, 10)))
    with pytest.raises(PipelineError) as raised:
        run(_item(study), NoInference(), software_version=SOFTWARE)
    message = str(raised.value)
    assert f"keeps {MIN_FRAMES - 1} usable images" in message and "blank: it holds no body to measure" in message


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    studies.require_data()
    return Segmenter(load_model(DEFAULT_MODEL), providers="cpu", threads=2)


def test_half_the_slices_blank_are_set_aside_and_the_rest_measured(tmp_path: Path, segmenter) -> None:
    study = _t2(tmp_path / "study", "half-blank", "in_phase")
    blanked = _blank(study, list(range(0, 10, 2)))
    results = run(_item(study), segmenter, software_version=SOFTWARE)
    assert {item.sop_instance_uid for item in results.set_aside} == blanked
    assert {item.kind for item in results.set_aside} == {SetAsideKind.BLANK}
    assert len(results.label_map.series) == 5
    used = {g.sop_instance_uid for g in results.label_map.series.geometry}
    assert used.isdisjoint(blanked) and results.metrics
    assert all(m.mean_csa_mm2 > 0 for m in results.metrics)


def test_process_fails_a_refused_series_with_its_reason_and_no_rows(tmp_path: Path) -> None:
    studies.require_data()
    study = _t2(tmp_path / "in" / "water", "process-water-as-t2", "water")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "node", "process", str(tmp_path / "in"), "--out", str(out),
                           "--workers", "0"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 0, done.stdout + done.stderr
    with open(out / "studies.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["study"] == study.study_uid and row["status"] == "failed"
    assert "the image looks fat suppressed" in row["reason"]
    with open(out / "cohort.csv") as handle:
        assert list(csv.DictReader(handle)) == []
    assert list(out.glob(f"{study.study_uid}/*.dcm")) == []
