"""Tests of the bundled default model ``musclenode-lumbar-dixon`` without torch.

Two versions are bundled: 2.0.0 (the default, trained for Dixon, T1- and T2-weighted input) and
1.0.0 (Dixon only, kept as ``musclenode-lumbar-dixon-1.0.0`` for comparison, selected by
``NAME@1.0.0``). Each card must match its ONNX file, describe the input the model was trained
on, and state the accuracy that the evaluation actually measures on the held-out slices of the
MyoSegmenTUM subject, for every contrast it claims (version 2: water, fat, in-phase and the
fixed synthetic T1-, T2- and PD-like test volumes). Version 2 must reach Dice 0.90 on every
label and contrast there, version 1 0.85 on water. The DICOM runtime must reach the same on
DICOM series written from the same volumes, and a synthetic T2-like series must go through the
whole pipeline with every held-out slice passing quality control; the verdict "pass" for the
whole series is a known miss (one edge slice excluded, marked xfail).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.card import ModelCard
from inference.registry import DEFAULT_MODEL, load_model, scan_models
from inference.training import synthetic
from inference.training.data import MYOSEGMENTUM_LABELS, find_cases
from inference.training.evaluate import SlidingWindowPredictor, dice, evaluate_slices, input_volume
from tests import studies

MODELS = Path(__file__).resolve().parents[1] / "inference" / "models"
CARD_PATH = MODELS / "musclenode-lumbar-dixon.json"
V1_CARD_PATH = MODELS / "musclenode-lumbar-dixon-1.0.0.json"
V2_CONTRASTS = ["water", "fat", "in_phase", "t1", "t2"]
MEASURED = [*V2_CONTRASTS, "pd"]
TARGET_DICE = 0.85  # version 1, water
V2_TARGET_DICE = 0.90  # version 2, every label and contrast, all held-out slices together
# The card stores what inference.training.evaluate measured, rounded to 4 digits; ONNX Runtime
# on another CPU may differ in the last bits of a few logits.
CARD_TOLERANCE = 0.002


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard.load(CARD_PATH)


@pytest.fixture(scope="module")
def case():
    studies.require_data()
    return find_cases(studies.MYOSEGMENTUM_DIR)[0]


@pytest.fixture(scope="module")
def v1_card() -> ModelCard:
    return ModelCard.load(V1_CARD_PATH)


@pytest.fixture(scope="module")
def predictor(card) -> SlidingWindowPredictor:
    return SlidingWindowPredictor(card)


@pytest.fixture(scope="module")
def v1_predictor(v1_card) -> SlidingWindowPredictor:
    return SlidingWindowPredictor(v1_card)


@pytest.mark.parametrize("path, version", [(CARD_PATH, "2.0.0"), (V1_CARD_PATH, "1.0.0")])
def test_card_matches_its_onnx_file(path, version):
    card = ModelCard.load(path)
    card.verify()  # the ONNX file's sha256 is the card's
    assert (card.name, card.version) == ("musclenode-lumbar-dixon", version)
    assert card.onnx_path.stat().st_size < 10 * 2**20


def test_plain_name_selects_version_2_and_version_1_stays_loadable():
    assert load_model(DEFAULT_MODEL).version == "2.0.0"
    assert load_model(f"{DEFAULT_MODEL}@2.0.0").path == CARD_PATH.resolve()
    v1 = load_model(f"{DEFAULT_MODEL}@1.0.0")
    assert v1.version == "1.0.0" and v1.path == V1_CARD_PATH.resolve()
    v1.verify()
    scan = scan_models()
    assert not [p for p in scan.problems if DEFAULT_MODEL in p], scan.problems
    assert [c.version for c in scan.versions if c.name == DEFAULT_MODEL] == ["1.0.0", "2.0.0"]


def test_card_describes_the_input_the_model_was_trained_on(card, v1_card):
    assert card.labels == MYOSEGMENTUM_LABELS and card.output_labels == [1, 2, 3, 4]
    assert card.contrasts == V2_CONTRASTS and card.channels == 1
    assert card.array_axes == ["P", "L"] and card.spacing_mm == [1.0, 1.0]
    assert card.normalisation == {"method": "zscore_nonzero"}
    assert card.training["input"]["array_axes"] == card.array_axes
    assert card.licence and card.provenance and card.training["seed"] is not None
    # The runtime needs no change: the same contract as version 1.
    for field in ("channels", "array_axes", "spacing_mm", "window", "normalisation", "overlap", "blend",
                  "labels", "output_labels", "largest_component", "crop_foreground"):
        assert getattr(card, field) == getattr(v1_card, field), field
    assert v1_card.contrasts == ["water", "fat", "in_phase"]
    assert card.training["initial_weights"]["sha256"] == v1_card.sha256
    assert card.training["network"] == v1_card.training["network"]


def test_card_has_a_dice_table_for_every_contrast_it_claims(card):
    dice_table = card.accuracy["dice"]
    assert set(dice_table) == set(MEASURED)
    for contrast in MEASURED:
        assert set(dice_table[contrast]) == {"contiguous", "interleaved", "all"}, contrast
        for scores in dice_table[contrast].values():
            assert set(scores) == {"1", "2", "3", "4"} and all(0 <= v <= 1 for v in scores.values())
    for contrast in synthetic.SYNTHETIC_CONTRASTS:
        made = card.accuracy["synthetic_inputs"][contrast]
        assert made["seed"] == synthetic.TEST_SEEDS[contrast]
        assert made["tissue_intensities"] == synthetic.test_intensities(contrast).as_dict()


def test_card_says_what_the_model_has_not_been_shown_to_work_on(card):
    text = " ".join([card.accuracy["description"], *card.training["limitations"]]).lower()
    for phrase in ("other subjects", "real t1", "real t2", "pathology", "l2-l5", "synthetic"):
        assert phrase in text, phrase


@pytest.mark.parametrize("path", [CARD_PATH, V1_CARD_PATH])
def test_held_out_slices_were_not_trained_on(path):
    card = ModelCard.load(path)
    held_out = card.accuracy["holdout_slices"]
    assert held_out == card.training["holdout"]
    assert held_out == {"contiguous": [12, 13, 14, 15], "interleaved": [4, 8, 20, 24]}
    count = len({i for slices in held_out.values() for i in slices})
    assert card.training["slices_trained"] == 29 - count


def test_onnx_model_takes_any_batch_and_window_size(card, predictor):
    session = predictor.session
    x = np.zeros((3, 1, 160, 224), np.float32)
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    assert out.shape == (3, card.classes, 160, 224) and out.dtype == np.float32


def _groups(card: ModelCard) -> dict[str, list[int]]:
    held_out = card.accuracy["holdout_slices"]
    return {**held_out, "all": sorted({i for s in held_out.values() for i in s})}


@pytest.mark.parametrize("contrast", MEASURED)
def test_held_out_dice_is_what_the_card_states(card, case, predictor, contrast):
    stated = card.accuracy["dice"][contrast]
    volume = input_volume(case, contrast)
    for group, slices in _groups(card).items():
        measured = evaluate_slices(predictor, volume, case.labels, case.layout, slices)
        for value, score in measured.items():
            assert abs(score - stated[group][str(value)]) < CARD_TOLERANCE, (contrast, group, value)
            if group == "all":
                assert score >= V2_TARGET_DICE, f"{card.labels[value].name} on {contrast}: Dice {score:.3f}"


@pytest.mark.parametrize("contrast", ["water", "fat", "in_phase"])
def test_version_1_held_out_dice_is_what_its_card_states(v1_card, case, v1_predictor, contrast):
    stated = v1_card.accuracy["dice"][contrast]
    for group, slices in v1_card.accuracy["holdout_slices"].items():
        measured = evaluate_slices(v1_predictor, case.volume(contrast), case.labels, case.layout, slices)
        for value, score in measured.items():
            assert abs(score - stated[group][str(value)]) < CARD_TOLERANCE, (contrast, group, value)
            if contrast == "water":
                assert score >= TARGET_DICE, f"{v1_card.labels[value].name} on {group} slices: Dice {score:.3f}"


def _dicom_frames_by_slice(series, affine) -> dict[int, int]:
    """NIfTI slice index of each frame, checking that frame pixel (row, column) is voxel
    (column, row, k), as tests.studies writes them."""
    frames = {}
    for index, frame in enumerate(series.geometry):
        corners = frame.pixel_to_lps(np.array([0, 0, 1]), np.array([0, 1, 0]))
        voxels = studies.lps_to_voxel(affine, corners)
        k = int(round(voxels[0, 2]))
        np.testing.assert_allclose(voxels, [[0, 0, k], [1, 0, k], [0, 1, k]], atol=1e-3)
        frames[k] = index
    return frames


@pytest.mark.slow
def test_runtime_segments_dicom_dixon_series_on_held_out_slices(card, tmp_path):
    runtime = pytest.importorskip("inference.runtime")
    geometry = pytest.importorskip("inference.geometry")
    studies.require_data()
    volumes = studies.load_volumes()
    study = studies.write_dixon_study(tmp_path / "study", seed="bundled-model")
    # Windows over the whole grid, as the evaluation places them (the body crop moves the window
    # positions; tests/test_runtime.py checks how far that moves the labels).
    segmenter = runtime.Segmenter(card, providers="cpu", threads=2, tuning=runtime.UNTUNED)
    for contrast in ("water", "fat", "in_phase"):
        series = geometry.read_series(study.series[contrast].files)
        by_slice = _dicom_frames_by_slice(series, volumes.affine)
        for group, slices in card.accuracy["holdout_slices"].items():
            predicted = np.stack([segmenter.segment_slice(series.frames[by_slice[k]], series.geometry[by_slice[k]])
                                  for k in slices])
            truth = np.stack([volumes.labels[:, :, k].T for k in slices])
            for value in card.output_labels:
                score = dice(predicted, truth, value)
                stated = card.accuracy["dice"][contrast][group][str(value)]
                # The runtime blends probabilities, the evaluation logits: close, not equal.
                assert abs(score - stated) < 0.01, (contrast, group, value, score, stated)
                assert score >= TARGET_DICE, (contrast, group, value, score)


@pytest.fixture(scope="module")
def t2_results(tmp_path_factory):
    """A T2-like series (headers of a T2 TSE, pixels synthesised from water and fat with the
    card's fixed T2 test seed, Rician noise in the background) through reports.pipeline.run as a
    "t2" work item with the bundled default model."""
    runtime = pytest.importorskip("inference.runtime")
    from reports.pipeline import WorkItem, run

    studies.require_data()
    study = studies.write_t2_study(tmp_path_factory.mktemp("t2") / "study", seed="bundled-model-t2",
                                   source="t2_synthetic")
    segmenter = runtime.Segmenter(load_model(DEFAULT_MODEL), providers="cpu", threads=2)
    assert segmenter.card.version == "2.0.0"
    return run(WorkItem("t2", {"t2": study.series["t2"].files}), segmenter, software_version="0.1.0")


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "known miss of version 2.0.0: on the topmost slice (image 29, a trained slice) of the synthetic "
    "T2 series the right multifidus is not found and a blob in the noise of the image corner takes "
    "its label, so quality control excludes that slice and the verdict is 'limited', not 'pass' "
    "(version 1.0.0: 'limited' with 2 slices excluded). See README, Models: what is weak."))
def test_pipeline_quality_verdict_on_a_synthetic_t2_series_is_pass(t2_results):
    from inference.segmentation_quality import Verdict

    assert t2_results.quality.verdict is Verdict.PASS, t2_results.quality.reason


@pytest.mark.slow
def test_pipeline_segments_a_synthetic_t2_series(card, t2_results):
    """Every held-out slice passes quality control and matches the manual labels as the card
    says; at most one slice of the 29 is excluded (see the xfail above)."""
    from inference.segmentation_quality import Verdict

    results = t2_results
    volumes = studies.load_volumes()
    assert results.quality.verdict in (Verdict.PASS, Verdict.LIMITED), results.quality.reason
    assert len(results.quality.excluded) <= 1 and results.metrics
    label_map = results.label_map
    assert (label_map.model_name, label_map.model_version) == ("musclenode-lumbar-dixon", "2.0.0")
    by_slice = _dicom_frames_by_slice(label_map.series, volumes.affine)
    slices = _groups(card)["all"]
    assert not {by_slice[k] for k in slices} & set(results.quality.excluded_frames)
    predicted = np.stack([label_map.labels[by_slice[k]] for k in slices])
    truth = np.stack([volumes.labels[:, :, k].T for k in slices])
    for value, info in card.labels.items():
        ours = [v for v, other in label_map.meaning.items() if other == info]
        assert len(ours) == 1, (info, label_map.meaning)
        score = dice(np.where(predicted == ours[0], value, 0), truth, value)
        stated = card.accuracy["dice"]["t2"]["all"][str(value)]
        assert abs(score - stated) < 0.02, (info.name, score, stated)
