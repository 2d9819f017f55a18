"""Tests for inference.training: slice layout, left-right flips, training, export and card.

The training test runs a two-epoch training of a tiny network on a synthetic NIfTI case, so it
checks that the pipeline runs end to end and exports a faithful ONNX file, not that it learns.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
nib = pytest.importorskip("nibabel")
ort = pytest.importorskip("onnxruntime")

from inference.card import LabelInfo, ModelCard  # noqa: E402
from inference.training import train  # noqa: E402
from inference.training.augment import RandLeftRightFlipd, lr_axis  # noqa: E402
from inference.training.data import (  # noqa: E402
    MYOSEGMENTUM_LABELS,
    DataError,
    SliceLayout,
    check_label_sides,
    find_cases,
    parse_slices,
    prepare_labels,
    resample_2d,
    side_swap,
)
from tests import studies  # noqa: E402

SWAP = side_swap(MYOSEGMENTUM_LABELS)
RIGHT = {v for v, info in MYOSEGMENTUM_LABELS.items() if info.side == "right"}
LEFT = {v for v, info in MYOSEGMENTUM_LABELS.items() if info.side == "left"}


# ---------------------------------------------------------------------------------------------
# Left-right flip
# ---------------------------------------------------------------------------------------------


def _two_blobs(array_axes: tuple[str, str]) -> dict:
    """A [1, 32, 32] item: a left multifidus blob on the patient's left, a right erector
    spinae blob on the right, with image intensity equal to the label value."""
    label = np.zeros((1, 32, 32), np.float32)
    left_is_high = array_axes[lr_axis(array_axes)] == "L"
    high, low = slice(22, 28), slice(3, 9)
    left, right = (high, low) if left_is_high else (low, high)
    if lr_axis(array_axes) == 1:
        label[0, 10:16, left] = 3
        label[0, 12:20, right] = 1
    else:
        label[0, left, 10:16] = 3
        label[0, right, 12:20] = 1
    return {"image": label.copy(), "label": label, "array_axes": array_axes}


def _side_of_labels(item: dict) -> dict[int, str]:
    """Patient side of each label value's centroid, read through the item's array_axes."""
    axis = lr_axis(item["array_axes"])
    towards_left = item["array_axes"][axis] == "L"
    label = np.asarray(item["label"])[0]
    middle = (label.shape[axis] - 1) / 2
    sides = {}
    for value in np.unique(label[label > 0]).astype(int):
        position = np.argwhere(label == value)[:, axis].mean()
        sides[int(value)] = "left" if (position > middle) == towards_left else "right"
    return sides


@pytest.mark.parametrize("array_axes", [("P", "L"), ("A", "R"), ("L", "A"), ("R", "P")])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_left_right_flip_keeps_labels_on_their_anatomical_side(array_axes, as_tensor):
    item = _two_blobs(array_axes)
    assert _side_of_labels(item) == {1: "right", 3: "left"}
    if as_tensor:
        item = {**item, "image": torch.from_numpy(item["image"]), "label": torch.from_numpy(item["label"])}
    flip = RandLeftRightFlipd(["image", "label"], label_key="label", swap=SWAP, prob=1.0)
    flipped = flip(item)
    image, label = (np.asarray(flipped[k]) for k in ("image", "label"))

    # The anatomy moved to the other side and took the other side's names: still consistent.
    assert _side_of_labels(flipped) == {4: "left", 2: "right"}
    # Pixels moved exactly as a mirror along the left-right axis, and only that axis.
    axis = lr_axis(array_axes) + 1
    np.testing.assert_array_equal(image, np.flip(np.asarray(item["image"]), axis=axis))
    expected = np.vectorize(lambda v: SWAP.get(int(v), int(v)))(np.flip(np.asarray(item["label"]), axis=axis))
    np.testing.assert_array_equal(label, expected)


def test_flip_with_probability_zero_changes_nothing():
    item = _two_blobs(("P", "L"))
    flipped = RandLeftRightFlipd(["image", "label"], label_key="label", swap=SWAP, prob=0.0)(item)
    np.testing.assert_array_equal(flipped["label"], item["label"])


def test_flip_refuses_a_swap_table_that_is_not_symmetric():
    with pytest.raises(ValueError):
        RandLeftRightFlipd(["image", "label"], label_key="label", swap={1: 4, 4: 2}, prob=1.0)


def test_side_swap_pairs_each_muscle_with_its_other_side():
    assert SWAP == {1: 4, 4: 1, 2: 3, 3: 2}
    with pytest.raises(DataError):
        side_swap({1: LabelInfo("multifidus", "left")})


# ---------------------------------------------------------------------------------------------
# Layout derived from the affine
# ---------------------------------------------------------------------------------------------


_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _affine(lps_columns: list[list[int]]) -> np.ndarray:
    """Voxel-to-RAS affine, 1 mm voxels, whose voxel axes i, j, k run along the given LPS
    unit vectors."""
    affine = np.eye(4)
    affine[:3, :3] = np.array(lps_columns, float).T
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return _RAS_TO_LPS @ affine


@pytest.mark.parametrize("lps_columns", [
    [[1, 0, 0], [0, 1, 0], [0, 0, 1]],     # i to L, j to P (as MyoSegmenTUM)
    [[-1, 0, 0], [0, -1, 0], [0, 0, 1]],   # i to R, j to A (RAS, as MONAI's Orientation gives)
    [[0, 1, 0], [1, 0, 0], [0, 0, -1]],    # i to P, j to L, k to I
    [[0, 0, 1], [-1, 0, 0], [0, -1, 0]],   # i to S, j to R, k to A: slices along i
])
def test_layout_puts_patient_directions_on_rows_and_columns(lps_columns):
    """A point 5 mm posterior and 3 mm left of another lands 5 rows down and 3 columns right
    of it in the laid-out slice, whatever the order and direction of the voxel axes."""
    affine = _affine(lps_columns)
    layout = SliceLayout.from_affine(affine, ("P", "L"))
    to_lps = _RAS_TO_LPS @ affine
    first = np.array([6, 7, 8])
    second_lps = (to_lps @ np.append(first, 1.0))[:3] + [3.0, 5.0, 0.0]
    second = np.round(np.linalg.solve(to_lps, np.append(second_lps, 1.0))[:3]).astype(int)
    volume = np.zeros((20, 20, 20), np.float32)
    volume[tuple(first)], volume[tuple(second)] = 1, 2
    assert second[layout.slice_axis] == first[layout.slice_axis]
    plane = layout.slice(volume, first[layout.slice_axis])
    (r1, c1), (r2, c2) = np.argwhere(plane == 1)[0], np.argwhere(plane == 2)[0]
    assert (r2 - r1, c2 - c1) == (5, 3)


def test_layout_refuses_a_direction_no_voxel_axis_follows():
    # The patient's x axis lies 55 degrees from every voxel axis.
    rows = np.array([[1, 1, 1] / np.sqrt(3), [1, -1, 0] / np.sqrt(2), [1, 1, -2] / np.sqrt(6)])
    affine = np.eye(4)
    affine[:3, :3] = _RAS_TO_LPS[:3, :3] @ rows
    with pytest.raises(DataError, match="45 degrees"):
        SliceLayout.from_affine(affine, ("P", "L"))


def test_real_data_left_labels_lie_on_higher_columns():
    studies.require_data()
    case = find_cases(studies.MYOSEGMENTUM_DIR)[0]
    assert case.layout.array_axes == ("P", "L")
    rows, columns = case.layout.directions(case.affine, case.labels.shape)
    np.testing.assert_allclose(rows, [0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(columns, [1, 0, 0], atol=1e-6)
    labels = np.stack([prepare_labels(case, k, (1.0, 1.0)) for k in range(case.slices)])
    assert labels.shape[1:] == (407, 407)  # 400 pixels of 1.0185 mm at 1 mm
    column = {v: np.argwhere(labels == v)[:, 2].mean() for v in MYOSEGMENTUM_LABELS}
    assert min(column[v] for v in LEFT) > max(column[v] for v in RIGHT)
    # Medial to lateral: the multifidus lies between the two erector spinae.
    assert column[1] < column[2] < column[3] < column[4]


def test_real_data_label_sides_are_checked_from_centroids():
    studies.require_data()
    case = find_cases(studies.MYOSEGMENTUM_DIR)[0]
    check_label_sides(case.labels, case.affine, MYOSEGMENTUM_LABELS)
    mislabelled = {1: MYOSEGMENTUM_LABELS[4], 4: MYOSEGMENTUM_LABELS[1],
                   2: MYOSEGMENTUM_LABELS[2], 3: MYOSEGMENTUM_LABELS[3]}
    with pytest.raises(DataError, match="label 1"):
        check_label_sides(case.labels, case.affine, mislabelled)


def test_resampling_keeps_positions_in_millimetres():
    plane = np.zeros((100, 100), np.float32)
    plane[40:50, 60:70] = 1.0
    spacing = (1.0185, 1.0185)
    out = resample_2d(plane, spacing, (1.0, 1.0), order=1)
    assert out.shape == (102, 102)
    before = (np.argwhere(plane > 0).mean(axis=0) + 0.5) * 1.0185
    weights = out / out.sum()
    after = (np.stack(np.indices(out.shape), -1) * weights[..., None]).sum(axis=(0, 1)) + 0.5
    np.testing.assert_allclose(after, before, atol=0.05)
    back = resample_2d(out, (1.0, 1.0), spacing, order=1, shape=plane.shape)
    assert np.abs(back - plane).mean() < 0.02


def test_parse_slices_reads_ranges_and_rejects_out_of_range():
    assert parse_slices("12-15, 4,8", 29) == [4, 8, 12, 13, 14, 15]
    with pytest.raises(DataError):
        parse_slices("28-29", 29)


# ---------------------------------------------------------------------------------------------
# Training, export, card
# ---------------------------------------------------------------------------------------------


def _write_synthetic_case(folder: Path) -> None:
    """A 48 x 48 x 6 case on a grid like MyoSegmenTUM's (i to L, j to P): a body disc with four
    muscle blocks, two per side, brighter in water and darker in fat."""
    affine = np.diag([-1.1, -1.1, 4.0, 1.0])
    yy, xx = np.mgrid[0:48, 0:48]
    body = ((xx - 24) ** 2 / 20**2 + (yy - 24) ** 2 / 16**2) < 1
    labels = np.zeros((48, 48), np.int16)  # indexed [j, i] = [row, column] of the layout
    labels[26:34, 8:16], labels[26:34, 17:22] = 1, 2
    labels[26:34, 26:31], labels[26:34, 32:40] = 3, 4
    rng = np.random.default_rng(0)
    water = np.stack([(body * 100 + (labels > 0) * 200 + rng.normal(0, 5, (48, 48)) * body)
                      for _ in range(6)], axis=-1)
    fat = np.stack([body * 300 - (labels > 0) * 250 for _ in range(6)], axis=-1)
    volumes = {"water": water, "fat": fat, "labels": np.repeat(labels[..., None], 6, axis=-1)}
    for name, volume in volumes.items():
        # Voxel (i, j, k): transpose the [row, column] pictures into [i, j].
        data = np.transpose(volume, (1, 0, 2)).astype(np.int16 if name == "labels" else np.float32)
        nib.save(nib.Nifti1Image(data, affine), folder / f"SYN01_{name}.nii.gz")


def test_two_epoch_training_exports_onnx_matching_torch_and_a_loadable_card(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    _write_synthetic_case(data)
    status = train.main([
        "--data", str(data), "--out", str(out), "--epochs", "2", "--samples-per-epoch", "8",
        "--batch-size", "4", "--window", "32", "32", "--channels", "4", "8", "16",
        "--res-units", "1", "--holdout", "block=2-3", "--threads", "1", "--name", "tiny",
        "--version", "0.1.0",
    ])
    assert status == 0
    card = ModelCard.load(out / "tiny.json")
    card.verify()
    assert card.array_axes == ["P", "L"] and card.spacing_mm == [1.0, 1.0]
    assert card.window == [32, 32] and card.output_labels == [1, 2, 3, 4]
    assert card.labels == MYOSEGMENTUM_LABELS
    assert card.training["holdout"] == {"block": [2, 3]} and card.training["slices_trained"] == 4
    assert set(card.accuracy["dice"]) == {"water", "fat", "in_phase"}
    assert set(card.accuracy["dice"]["water"]["block"]) == {"1", "2", "3", "4"}
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]

    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    network = train.build_network(train.NetworkConfig((4, 8, 16), 1, 5))
    network.load_state_dict(checkpoint["state_dict"])
    network.eval()
    x = np.random.default_rng(1).standard_normal((3, 1, 48, 64)).astype(np.float32)
    session = ort.InferenceSession(str(card.onnx_path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"image": x})
    with torch.no_grad():
        torch_out = network(torch.from_numpy(x)).numpy()
    assert onnx_out.shape == (3, 5, 48, 64)
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-4, rtol=0)
