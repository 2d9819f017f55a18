"""MuscleMap import: label mapping, the card, and the same label map as MuscleMap's own MONAI pipeline.

MuscleMap's trained weights are published outside any package registry and are not available
here, so the equivalence test imports a checkpoint of the identical architecture built from the
configuration in ``../shared/data/musclemap`` with ``torch.manual_seed(0)`` (MONAI's default
initialisation, unchanged). Such a network labels the real volume with a speckle of all nine
classes: nearly every pixel is close to a tie, so any difference in resampling, normalisation,
cropping, window placement, blending or back-projection flips labels. That makes it a harsh test.

The volume is 4 slices of the real water image. Why 4: MONAI's ``Spacing`` resamples the volume
in 3D in float64 through normalised coordinates; for most slice counts the round trip of the
slice coordinate is off by about 1e-16, so exactly-zero voxels next to non-zero voxels of the
neighbouring slice become about 1e-16, which ``NormalizeIntensity(nonzero=True)`` then counts as
foreground (MONAI 1.3.2 and 1.6 alike). For 2^n slices the round trip is exact. The node's
runtime keeps zero voxels at zero; with the speckling random network that numerical difference
alone changes about 2 % of voxels of a 6-slice volume (a trained network's confident output
would barely notice it), so the test uses a volume on which MONAI's arithmetic is exact.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inference.card import LabelInfo, ModelCard
from inference.geometry import FrameGeometry, SeriesImage, StudyInfo, group_stacks
from inference.musclemap import (
    MUSCLEMAP_DEFAULT_OVERLAP,
    NODE_VALUES,
    ImportErrorMM,
    label_mapping,
    load_config,
    make_card,
)
from inference.runtime import Segmenter, foreground_box, volume_grid
from tests import studies

_REPO = Path(__file__).resolve().parents[1]
MUSCLEMAP_DIR = studies.DATA_DIR / "musclemap"
ABDOMEN = MUSCLEMAP_DIR / "contrast_agnostic_abdomen_model.json"
WHOLEBODY = MUSCLEMAP_DIR / "contrast_agnostic_wholebody_model.json"


def _require_configs() -> None:
    studies.require_data([ABDOMEN, WHOLEBODY])


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


def test_abdomen_labels_keep_musclemaps_values() -> None:
    _require_configs()
    config = load_config(ABDOMEN)
    mapping = label_mapping(config)
    assert config.out_channels == 9 and config.roi_size == (128, 128)
    assert mapping.musclemap_values == list(range(1, 9)) and mapping.output_labels == list(range(1, 9))
    # As the configuration's labels say: muscle by muscle, right then left.
    assert mapping.labels == {
        1: LabelInfo("multifidus", "right"), 2: LabelInfo("multifidus", "left"),
        3: LabelInfo("erector_spinae", "right"), 4: LabelInfo("erector_spinae", "left"),
        5: LabelInfo("psoas_major", "right"), 6: LabelInfo("psoas_major", "left"),
        7: LabelInfo("quadratus_lumborum", "right"), 8: LabelInfo("quadratus_lumborum", "left")}


def test_wholebody_classes_follow_sorted_values_and_only_lumbar_muscles_are_kept() -> None:
    _require_configs()
    config = load_config(WHOLEBODY)
    mapping = label_mapping(config)
    values = sorted(int(e["value"]) for e in json.loads(WHOLEBODY.read_text())["labels"])
    assert config.out_channels == 100 and config.roi_size == (256, 256) and len(mapping.output_labels) == 99
    # mm_segment's id_map: class k is the k-th smallest label value.
    assert mapping.musclemap_values == values
    to_node = mapping.to_node()
    expected = {5101: ("multifidus", "left"), 5102: ("multifidus", "right"),
                5111: ("erector_spinae", "left"), 5112: ("erector_spinae", "right"),
                5121: ("psoas_major", "left"), 5122: ("psoas_major", "right"),
                5131: ("quadratus_lumborum", "left"), 5132: ("quadratus_lumborum", "right")}
    for value, (muscle, side) in expected.items():
        node = to_node[value]
        assert node == NODE_VALUES[(muscle, side)] and mapping.labels[node] == LabelInfo(muscle, side)
    assert sorted(v for v in mapping.output_labels if v) == list(range(1, 9))
    # The neck's "semispinalis cervicis and multifidus" and the latissimus are not lumbar muscles.
    assert to_node[1111] == to_node[1112] == to_node[5141] == 0
    assert sum(1 for v in mapping.output_labels if v == 0) == 91


def test_configuration_errors_are_clear(tmp_path: Path) -> None:
    _require_configs()
    data = json.loads(ABDOMEN.read_text())
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**data, "model": {k: v for k, v in data["model"].items() if k != "strides"}}))
    with pytest.raises(ImportErrorMM, match="strides"):
        load_config(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**data, "model": {**data["model"], "out_channels": 12}}))
    with pytest.raises(ImportErrorMM, match="8 labels but 12 network outputs"):
        label_mapping(load_config(wrong))
    three_d = tmp_path / "3d.json"
    three_d.write_text(json.dumps({**data, "model": {**data["model"], "spatial_dims": 3}}))
    with pytest.raises(ImportErrorMM, match="only 2D"):
        load_config(three_d)


# ---------------------------------------------------------------------------------------------
# Runtime pieces of MONAI's volume preprocessing
# ---------------------------------------------------------------------------------------------


def _axial_frame(k: int = 0, rows: int = 400, spacing: float = 1.0185185, z: float = 0.0) -> FrameGeometry:
    """An LPS-oriented frame like the MyoSegmenTUM slices (columns towards L, rows towards P)."""
    return FrameGeometry(position=(0.0, 0.0, z + 4.0 * k), row_cosine=(1.0, 0.0, 0.0), column_cosine=(0.0, 1.0, 0.0),
                         pixel_spacing=(spacing, spacing), rows=rows, columns=rows, sop_instance_uid=f"1.2.3.{k}",
                         frame_number=1)


def test_volume_grid_is_monai_spacing_grid() -> None:
    frame = _axial_frame()
    grid = volume_grid(frame, ["R", "A"], [1.0, 1.0])
    # Spacing(pixdim=1): round(399 x 1.0185185 + 1) = 407 points from the first voxel centre of
    # the RAS-oriented array, i.e. the frame's most left-posterior pixel centre.
    assert grid.shape == (407, 407)
    np.testing.assert_allclose(grid.position, frame.pixel_to_lps(399, 399), atol=1e-9)
    np.testing.assert_allclose(grid.column_cosine, (-1, 0, 0))  # rows towards R
    np.testing.assert_allclose(grid.row_cosine, (0, -1, 0))  # columns towards A


def test_foreground_box_is_monai_crop_foreground_with_allow_smaller() -> None:
    volume = np.zeros((1, 6, 100, 80), np.float32)
    volume[0, 2, 30:40, 5:10] = 1.0
    volume[0, 3, 50, 70] = 2.0
    volume[0, 1, 10, 10] = -3.0  # negative after z-scoring: not foreground
    assert foreground_box(volume, 20) == (slice(0, 6), slice(10, 71), slice(0, 80))
    assert foreground_box(volume[:, 2], 0) == (slice(30, 40), slice(5, 10))
    assert foreground_box(np.zeros((1, 5, 5)), 3) is None


def _constant_class_model(path: Path, classes: int, winner: int) -> None:
    """An ONNX model whose scores are 1 for class ``winner`` and 0 for every other class."""
    onnx = pytest.importorskip("onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    bias = np.zeros((1, classes, 1, 1), np.float32)
    bias[0, winner] = 1.0
    nodes = [helper.make_node("Mul", ["image", "zero"], ["nothing"]),
             helper.make_node("Add", ["nothing", "bias"], ["logits"])]
    graph = helper.make_graph(
        nodes, "constant",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", classes, "h", "w"])],
        initializer=[numpy_helper.from_array(np.zeros((1, 1, 1, 1), np.float32), "zero"),
                     numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def _square_series(n: int = 4, size: int = 160) -> SeriesImage:
    frames, images = [], []
    for k in range(n):
        frames.append(_axial_frame(k, rows=size, spacing=1.0))
        image = np.zeros((size, size), np.float32)
        image[50:110, 50:110] = 100.0 + k
        image[70:90, 70:90] = 300.0
        images.append(image)
    return SeriesImage(frames=tuple(images), geometry=tuple(frames), stacks=group_stacks(frames),
                       series_instance_uid="1.2.9", frame_of_reference_uid="1.2.8",
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.4", study=StudyInfo("1.2.7"))


@pytest.mark.parametrize("value, expected", [(5122, 5), (5101, 2), (1111, 0)])
def test_wholebody_class_reaches_the_label_map_as_the_node_value(tmp_path: Path, value: int, expected: int) -> None:
    _require_configs()
    config = load_config(WHOLEBODY)
    winner = sorted(int(e["value"]) for e in config.labels).index(value) + 1
    onnx_path = tmp_path / "wb.onnx"
    _constant_class_model(onnx_path, config.out_channels, winner)
    card = make_card(config, onnx_path, name="wb", checkpoint_sha256="0" * 64)
    card.save(tmp_path / "wb.json")
    card = ModelCard.load(tmp_path / "wb.json")
    assert card.classes == 100 and card.window == [256, 256] and card.array_axes == ["R", "A"]
    labels = Segmenter(card, threads=1).segment(_square_series()).labels
    for frame_labels in labels:
        # The crop: pixels brighter than the volume's mean (the 300 core) plus 20 pixels.
        inside = np.zeros_like(frame_labels, bool)
        inside[50:110, 50:110] = True
        assert np.all(frame_labels[inside] == expected)
        assert np.all(frame_labels[:30] == 0) and np.all(frame_labels[:, 130:] == 0)


# ---------------------------------------------------------------------------------------------
# Import and equivalence with MuscleMap's MONAI pipeline
# ---------------------------------------------------------------------------------------------


def test_the_command_and_the_importer_module_import_no_torch() -> None:
    code = ("import sys, node.cli, inference.musclemap; "
            "sys.exit(1 if 'torch' in sys.modules or 'monai' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=_REPO).returncode == 0


def test_checkpoint_wrappers_are_unwrapped(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from inference.musclemap import load_state_dict

    weights = {"model.0.conv.weight": torch.ones(2, 1, 3, 3), "model.0.conv.bias": torch.zeros(2)}
    for stored in (weights, {"state_dict": weights}, {f"module.{k}": v for k, v in weights.items()}):
        torch.save(stored, tmp_path / "x.pth")
        assert set(load_state_dict(tmp_path / "x.pth")) == set(weights)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ImportErrorMM, match="cannot read"):
        load_state_dict(tmp_path / "bad.pth")


def _series_from_volume(voxels: np.ndarray, affine: np.ndarray) -> SeriesImage:
    """The frames a DICOM series of this NIfTI volume has (as tests.studies writes them)."""
    stack = studies.StackGeometry.from_voxel_affine(affine, voxels.shape)
    frames = [FrameGeometry(position=tuple(stack.position(k)), row_cosine=stack.row_cosine,
                            column_cosine=stack.column_cosine, pixel_spacing=stack.pixel_spacing,
                            rows=stack.rows, columns=stack.columns, sop_instance_uid=f"1.2.3.{k}", frame_number=1)
              for k in range(voxels.shape[2])]
    images = [np.ascontiguousarray(voxels[:, :, k].T, dtype=np.float32) for k in range(voxels.shape[2])]
    return SeriesImage(frames=tuple(images), geometry=tuple(frames), stacks=group_stacks(frames),
                       series_instance_uid="1.2.9", frame_of_reference_uid="1.2.8",
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.4", study=StudyInfo("1.2.7"))


@pytest.mark.slow
def test_imported_checkpoint_gives_monais_label_map_on_the_real_volume(tmp_path: Path, capsys) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("monai")
    nib = pytest.importorskip("nibabel")
    studies.require_data()
    _require_configs()
    from inference.musclemap import build_network, reference_segmentation
    from node.cli import main

    torch.set_num_threads(2)
    config = load_config(ABDOMEN)
    torch.manual_seed(0)
    network = build_network(config)
    checkpoint = tmp_path / "contrast_agnostic_abdomen_model.pth"
    torch.save(network.state_dict(), checkpoint)  # how MuscleMap stores its checkpoints

    overlap = 0.25  # the same on both sides; 0.25 keeps the torch side short
    assert main(["models", "import-musclemap", str(checkpoint), str(ABDOMEN), "--out", str(tmp_path / "models"),
                 "--overlap", str(overlap)]) == 0
    assert "musclemap-contrast-agnostic-abdomen" in capsys.readouterr().out
    card = ModelCard.load(tmp_path / "models" / "musclemap-contrast-agnostic-abdomen.json")
    assert card.array_axes == ["R", "A"] and card.spacing_mm == [1.0, 1.0] and card.window == [128, 128]
    assert card.normalisation == {"method": "zscore_nonzero", "scope": "volume", "max_slices": 25}
    assert card.crop_foreground and card.blend == "gaussian" and card.sigma_scale == 0.125
    assert card.overlap == overlap and card.provenance["musclemap_defaults"]["overlap"] == MUSCLEMAP_DEFAULT_OVERLAP
    assert card.output_labels == list(range(1, 9)) and card.provenance["onnx_vs_torch_max_abs_difference"] < 1e-3

    # Four slices of the real water image (see the module notes), as a NIfTI file for MONAI.
    water = nib.load(studies.MYOSEGMENTUM_DIR / "TUM01_water.nii.gz").slicer[:, :, 12:16]
    nib.save(water, tmp_path / "water.nii.gz")
    expected = reference_segmentation(tmp_path / "water.nii.gz", network, config, overlap=overlap,
                                      largest_component=False)

    # MuscleMap keeps the largest 3D component over the volume, the node the largest 2D one per
    # slice: compare the label maps before that step.
    segmenter = Segmenter(dataclasses.replace(card, largest_component=False), threads=2)
    label_map = segmenter.segment(_series_from_volume(np.asarray(water.dataobj), water.affine))
    got = np.stack([labels.T for labels in label_map.labels], axis=-1)
    # The node's left/right check may exchange a pair on a frame: exchange it in MONAI's too.
    for finding in label_map.findings:
        if finding.action == "swapped":
            frame = expected[:, :, finding.frame_index]
            left, right = (label_map.value_of(finding.muscle, side) for side in ("left", "right"))
            frame[...] = np.where(frame == left, right, np.where(frame == right, left, frame))

    counts = np.bincount(expected.ravel(), minlength=9)
    assert expected.shape == got.shape == (400, 400, 4)
    # A meaningful map: every class occurs, none dominates the labelled voxels.
    labelled = counts[1:].sum()
    assert labelled > 0.2 * expected.size and counts[1:].min() > 0.02 * labelled and counts[1:].max() < 0.5 * labelled
    agreement = float(np.mean(got == expected))
    print(f"MuscleMap abdomen (seed 0), 4 real slices, overlap {overlap}: {agreement:.6%} of voxels equal")
    assert agreement >= 0.999
