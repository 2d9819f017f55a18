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


# ---------------------------------------------------------------------------------------------
# Synthetic contrasts and simulated acquisitions (model version 2)
# ---------------------------------------------------------------------------------------------


def _tissue_slice() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A 64 x 64 slice: background, muscle (typical water), fluid (water 2 x typical), fat."""
    water, fat = np.zeros((64, 64), np.float32), np.zeros((64, 64), np.float32)
    regions = {"muscle": (slice(8, 56), slice(8, 30)), "fluid": (slice(28, 36), slice(30, 36)),
               "fat": (slice(8, 56), slice(36, 56))}
    water[regions["muscle"]] = 400
    water[regions["fluid"]] = 800
    fat[regions["muscle"]] = 20
    fat[regions["fat"]] = 1000
    water[regions["fat"]] = 30
    masks = {}
    for name, box in regions.items():
        mask = np.zeros((64, 64), bool)
        mask[box] = True
        masks[name] = mask
    masks["background"] = ~(masks["muscle"] | masks["fluid"] | masks["fat"])
    return water, fat, masks


@pytest.mark.parametrize("seed", range(5))
def test_synthetic_contrasts_order_tissues_as_their_weighting_says(seed):
    from dataclasses import replace

    from inference.training import synthetic

    water, fat, masks = _tissue_slice()
    rng = np.random.default_rng(seed)
    for contrast in synthetic.SYNTHETIC_CONTRASTS:
        tissue = replace(synthetic.draw_intensities(contrast, rng), texture=0.0)
        image = synthetic.synthesize_slice(water, fat, tissue)
        # Inner pixels: away from the partial-volume rims of the soft body mask.
        level = {name: float(np.median(image[ndimage_erode(mask)])) for name, mask in masks.items()}
        assert level["background"] == 0
        assert level["fat"] > level["muscle"], (contrast, level)
        if contrast == "t1":
            assert level["muscle"] > level["fluid"], level
        else:
            assert level["fluid"] > level["muscle"], (contrast, level)


def ndimage_erode(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=2)


def test_synthetic_test_volumes_are_reproducible():
    from inference.training import synthetic

    water, fat, _ = _tissue_slice()
    water3, fat3 = np.stack([water] * 3, axis=-1), np.stack([fat] * 3, axis=-1)
    for contrast in synthetic.SYNTHETIC_CONTRASTS:
        a, tissue_a = synthetic.test_volume(water3, fat3, contrast, slice_axis=2)
        b, tissue_b = synthetic.test_volume(water3, fat3, contrast, slice_axis=2)
        assert tissue_a == tissue_b == synthetic.test_intensities(contrast)
        np.testing.assert_array_equal(a, b)
        assert a.shape == water3.shape and (a > 0).all()  # Rician noise: no exact zero left


def test_coarser_resolution_keeps_the_grid_and_blurs():
    from inference.training.synthetic import degrade_resolution

    image = np.zeros((40, 40), np.float32)
    image[:, ::2] = 1.0  # 1 mm stripes vanish at 2 mm pixels
    out = degrade_resolution(image, (2.0, 2.0))
    assert out.shape == image.shape
    assert np.ptp(out[10:30, 10:30]) < 0.3 * np.ptp(image)
    np.testing.assert_array_equal(degrade_resolution(image, (1.0, 1.0)), image)


def test_thick_slice_neighbours_never_come_from_held_out_slices(tmp_path):
    from inference.training.augment import neighbour_key

    _write_synthetic_case(tmp_path)
    case = find_cases(tmp_path)[0]
    items = train.training_items([case], held_out={2, 3}, neighbours=True)
    by_slice = dict(zip([0, 1, 4, 5], items))
    assert neighbour_key("water", "prev") not in by_slice[0]  # outside the volume
    assert neighbour_key("water", "next") in by_slice[0]
    assert neighbour_key("water", "next") not in by_slice[1]  # slice 2 is held out
    assert neighbour_key("fat", "prev") not in by_slice[4]  # slice 3 is held out
    assert neighbour_key("fat", "next") in by_slice[4]


def test_v2_augmentation_gives_windows_of_every_kind_with_labels_on_their_side(tmp_path):
    from inference.training.augment import RandFieldOfViewd, RandSyntheticContrastd, training_transforms

    _write_synthetic_case(tmp_path)
    case = find_cases(tmp_path)[0]
    items = train.training_items([case], held_out=set(), neighbours=True)
    transforms = training_transforms([32, 32], SWAP, {"water": 0.5, "fat": 0.25, "in_phase": 0.25},
                                     synthetic_weights={"t1": 1, "t2": 1, "pd": 1}, synthetic_prob=0.6,
                                     degrade=True)
    transforms.set_random_state(seed=3)
    synthetic_step = next(t for t in transforms.transforms if isinstance(t, RandSyntheticContrastd))
    drawn = set()
    for i in range(40):
        (sample,) = transforms(items[i % len(items)])
        drawn.add(synthetic_step.tissue.contrast if synthetic_step.tissue else "dixon")
        assert tuple(sample["image"].shape) == (1, 32, 32) and tuple(sample["label"].shape) == (1, 32, 32)
        assert np.isfinite(np.asarray(sample["image"])).all()
        assert set(np.unique(np.asarray(sample["label"]))) <= {0, 1, 2, 3, 4}
    assert drawn == {"t1", "t2", "pd", "dixon"}

    fov = RandFieldOfViewd(["water", "label"], prob=1.0)
    fov.set_random_state(seed=0)
    item = items[0]
    for _ in range(10):
        cut = fov({k: item[k] for k in ("water", "label", "fg", "bg")})
        assert (np.asarray(cut["label"]) > 0).sum() == (np.asarray(item["label"]) > 0).sum()
        assert cut["fg"].max() < cut["label"].size


def test_training_with_synthetic_contrasts_starts_from_a_card_and_measures_every_contrast(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write_synthetic_case(data)
    common = ["--data", str(data), "--epochs", "1", "--samples-per-epoch", "8", "--batch-size", "4",
              "--window", "32", "32", "--channels", "4", "8", "16", "--res-units", "1",
              "--holdout", "block=2-3", "--threads", "1", "--name", "tiny"]
    assert train.main([*common, "--out", str(tmp_path / "v1"), "--version", "1.0.0"]) == 0
    status = train.main([*common, "--out", str(tmp_path / "v2"), "--version", "2.0.0",
                         "--synthetic-weights", "0.35", "0.4", "0.25", "--degrade",
                         "--init-card", str(tmp_path / "v1" / "tiny.json")])
    assert status == 0
    card = ModelCard.load(tmp_path / "v2" / "tiny.json")
    card.verify()
    assert card.contrasts == ["water", "fat", "in_phase", "t1", "t2"] and card.channels == 1
    assert set(card.accuracy["dice"]) == {"water", "fat", "in_phase", "t1", "t2", "pd"}
    assert set(card.accuracy["synthetic_inputs"]) == {"t1", "t2", "pd"}
    assert card.training["initial_weights"]["card"] == "tiny 1.0.0"
    assert card.training["initial_weights"]["onnx_to_torch_max_abs_difference"] < 1e-3
    assert card.training["synthetic"]["weights"] == {"t1": 0.35, "t2": 0.4, "pd": 0.25}
    assert any("slice thickness" in line for line in card.training["augmentation"])
