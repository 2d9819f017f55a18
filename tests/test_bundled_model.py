"""Tests of the bundled default model ``musclenode-lumbar-dixon`` without torch.

The card must match its ONNX file, describe the input the model was trained on, and state the
accuracy that the evaluation actually measures on the held-out slices of the MyoSegmenTUM
subject; on water input every label must reach Dice 0.85 there. The DICOM runtime must reach
the same on DICOM series written from the same volumes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.card import ModelCard
from inference.training.data import MYOSEGMENTUM_LABELS, find_cases
from inference.training.evaluate import SlidingWindowPredictor, dice, evaluate_slices
from tests import studies

CARD_PATH = Path(__file__).resolve().parents[1] / "inference" / "models" / "musclenode-lumbar-dixon.json"
TARGET_DICE = 0.85
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
def predictor(card) -> SlidingWindowPredictor:
    return SlidingWindowPredictor(card)


def test_card_matches_its_onnx_file(card):
    card.verify()
    assert (card.name, card.version) == ("musclenode-lumbar-dixon", "1.0.0")
    assert card.onnx_path.stat().st_size < 10 * 2**20


def test_card_describes_the_input_the_model_was_trained_on(card):
    assert card.labels == MYOSEGMENTUM_LABELS and card.output_labels == [1, 2, 3, 4]
    assert card.contrasts == ["water", "fat", "in_phase"] and card.channels == 1
    assert card.array_axes == ["P", "L"] and card.spacing_mm == [1.0, 1.0]
    assert card.normalisation == {"method": "zscore_nonzero"}
    assert card.training["input"]["array_axes"] == card.array_axes
    assert card.licence and card.provenance and card.training["seed"] is not None


def test_held_out_slices_were_not_trained_on(card):
    held_out = card.accuracy["holdout_slices"]
    assert held_out == card.training["holdout"]
    assert set(held_out) == {"contiguous", "interleaved"}
    count = len({i for slices in held_out.values() for i in slices})
    assert card.training["slices_trained"] == 29 - count


def test_onnx_model_takes_any_batch_and_window_size(card, predictor):
    session = predictor.session
    x = np.zeros((3, 1, 160, 224), np.float32)
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    assert out.shape == (3, card.classes, 160, 224) and out.dtype == np.float32


@pytest.mark.parametrize("contrast", ["water", "fat", "in_phase"])
def test_held_out_dice_is_what_the_card_states(card, case, predictor, contrast):
    stated = card.accuracy["dice"][contrast]
    for group, slices in card.accuracy["holdout_slices"].items():
        measured = evaluate_slices(predictor, case.volume(contrast), case.labels, case.layout, slices)
        for value, score in measured.items():
            assert abs(score - stated[group][str(value)]) < CARD_TOLERANCE, (contrast, group, value)
            if contrast == "water":
                assert score >= TARGET_DICE, f"{card.labels[value].name} on {group} slices: Dice {score:.3f}"


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
                if contrast == "water":
                    assert score >= TARGET_DICE, (group, value, score)
