"""ONNX Runtime segmentation: providers, windows, blending, left/right, and tiny real models.

The models are ONNX graphs built here with ``onnx.helper`` whose outputs are known exactly:

* a *side* model that labels bright pixels by which half of the window's columns they are in:
  what a trained network does implicitly (it learns where the patient's left lies in its input
  array), so it shows whether the runtime puts the patient's left where the card says, whatever
  the orientation of the DICOM frame;
* a *pointwise* model whose class is the nearest of three intensity levels, so that windowing
  and blending must give back exactly the per-pixel answer;
* a two-channel model (water above fat) for Dixon inputs matched by position.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from inference.card import CardError, LabelInfo, ModelCard, file_sha256
from inference.geometry import FrameGeometry, SeriesImage, StudyInfo, group_stacks
from inference.runtime import (
    BODY_MARGIN,
    CPU,
    CUDA,
    UNTUNED,
    InputError,
    Segmenter,
    Tuning,
    body_box,
    available_cores,
    check_laterality,
    choose_contrast,
    choose_providers,
    gaussian_weights,
    keep_largest_components,
    normalise,
    select_inputs,
    sliding_window,
    window_starts,
)
from tests import studies

_REPO = Path(__file__).resolve().parents[1]
AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
MULTIFIDUS = {1: LabelInfo("multifidus", "left"), 2: LabelInfo("multifidus", "right")}


# ---------------------------------------------------------------------------------------------
# Test models and cards
# ---------------------------------------------------------------------------------------------


def _onnx():
    """The onnx package, which builds the test models; tests that need a model skip without it."""
    return pytest.importorskip("onnx", reason="onnx builds the test models (pip install onnx, or the [train] extra)")


def _save_model(nodes, inputs, output, initializers, path: Path) -> None:
    onnx, helper = _onnx(), _onnx().helper
    graph = helper.make_graph(nodes, "test", inputs, [output], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime of the last years reads
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def side_model(path: Path, window: int) -> None:
    """Bright pixels (> 0.5) in the window's right half of columns are class 1, left half class 2."""
    onnx = _onnx()
    helper, numpy_helper, TensorProto = onnx.helper, onnx.numpy_helper, onnx.TensorProto
    right_half = np.zeros((1, 1, window, window), np.float32)
    right_half[..., window // 2:] = 1
    nodes = [
        helper.make_node("Greater", ["x", "half"], ["bright"]),
        helper.make_node("Cast", ["bright"], ["fg"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "fg"], ["bg"]),
        helper.make_node("Mul", ["fg", "right"], ["first"]),
        helper.make_node("Sub", ["fg", "first"], ["second"]),
        helper.make_node("Concat", ["bg", "first", "second"], ["y"], axis=1),
    ]
    _save_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, window, window])],
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, window, window]),
        [numpy_helper.from_array(np.array(0.5, np.float32), "half"),
         numpy_helper.from_array(np.array(1.0, np.float32), "one"),
         numpy_helper.from_array(right_half, "right")], path)


LEVELS = (0.0, 0.5, 1.0)


def pointwise_model(path: Path, batch: int) -> None:
    """Score of class k is -(x - LEVELS[k])^2: the nearest level wins. Fixed batch size."""
    onnx = _onnx()
    helper, numpy_helper, TensorProto = onnx.helper, onnx.numpy_helper, onnx.TensorProto
    nodes = [helper.make_node("Sub", ["x", "levels"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["d2"]),
             helper.make_node("Neg", ["d2"], ["y"])]
    _save_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, "h", "w"])],
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3, "h", "w"]),
        [numpy_helper.from_array(np.array(LEVELS, np.float32).reshape(1, 3, 1, 1), "levels")], path)


def two_channel_model(path: Path) -> None:
    """Class 1 where channel 0 exceeds channel 1 (water brighter than fat)."""
    onnx = _onnx()
    helper, numpy_helper, TensorProto = onnx.helper, onnx.numpy_helper, onnx.TensorProto
    nodes = [helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1),
             helper.make_node("Sub", ["a", "b"], ["d"]),
             helper.make_node("Sub", ["b", "a"], ["e"]),
             helper.make_node("Concat", ["e", "d"], ["y"], axis=1)]
    _save_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, "h", "w"])],
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, "h", "w"]),
        [numpy_helper.from_array(np.array([1, 1], np.int64), "sizes")], path)


def make_card(folder: Path, name: str, build, **overrides) -> ModelCard:
    onnx_path = folder / f"{name}.onnx"
    build(onnx_path)
    values = dict(
        name=name, version="0.1", onnx=onnx_path.name, sha256=file_sha256(onnx_path),
        labels=MULTIFIDUS, output_labels=[1, 2], contrasts=["water"], channels=1,
        array_axes=["P", "L"], spacing_mm=[1.0, 1.0],
        normalisation={"method": "percentile", "low": 0, "high": 100},
        window=[96, 96], overlap=0.5, largest_component=True)
    values.update(overrides)
    card = ModelCard(**values)
    card.save(folder / f"{name}.json")
    return ModelCard.load(folder / f"{name}.json")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def side_card(folder: Path) -> ModelCard:
    return make_card(folder, "side", lambda p: side_model(p, 96))


@pytest.fixture(scope="module")
def side(side_card: ModelCard) -> Segmenter:
    return Segmenter(side_card, providers="cpu", threads=1)


# ---------------------------------------------------------------------------------------------
# Synthetic frames in patient space
# ---------------------------------------------------------------------------------------------


def _rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def _frame(row_cosine, column_cosine, centre=(0.0, 0.0, 0.0), size=(48, 48), spacing=(1.0, 1.0),
           uid="1.2.3", number=1) -> FrameGeometry:
    row_c, col_c = np.asarray(row_cosine, float), np.asarray(column_cosine, float)
    origin = (np.asarray(centre) - (size[1] - 1) / 2 * spacing[1] * row_c
              - (size[0] - 1) / 2 * spacing[0] * col_c)
    return FrameGeometry(tuple(origin), tuple(row_c), tuple(col_c), spacing, size[0], size[1], uid, number)


TILTED = _rotation("x", 20) @ _rotation("z", 30)
ORIENTATIONS = {
    "axial": AXIAL,
    "mirrored": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),  # columns run from the patient's left to right
    "rotated": ((0.0, 1.0, 0.0), (-1.0, 0.0, 0.0)),  # turned 90 degrees in-plane
    "upside_down": ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),  # rows run posterior to anterior
    "oblique": (TILTED @ np.array(AXIAL[0]), TILTED @ np.array(AXIAL[1])),
}
#: Two discs 15 mm either side of the midline (LPS x), the left one larger.
DISCS = {"left": ((15.0, 4.0, 0.0), 7.0), "right": ((-15.0, 4.0, 0.0), 5.0)}


def _positions(frame: FrameGeometry) -> np.ndarray:
    rows, columns = np.meshgrid(np.arange(frame.rows), np.arange(frame.columns), indexing="ij")
    return frame.pixel_to_lps(rows, columns)


def _phantom(frame: FrameGeometry) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Image (1 inside the discs, 0.2 body elsewhere) and each disc's core (1.5 mm inside it)."""
    p = _positions(frame)
    image = np.full(frame.shape, 0.2, np.float32)
    cores = {}
    for side, (centre, radius) in DISCS.items():
        distance = np.linalg.norm(p - np.array(centre), axis=-1)
        image[distance <= radius] = 1.0
        cores[side] = distance <= radius - 1.5
    return image, cores


def _series(images: list[np.ndarray], frames: list[FrameGeometry], uid: str = "1.2.9") -> SeriesImage:
    return SeriesImage(frames=tuple(images), geometry=tuple(frames), stacks=group_stacks(frames),
                       series_instance_uid=uid, frame_of_reference_uid="1.2.8", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                       study=StudyInfo("1.2.7"))


# ---------------------------------------------------------------------------------------------
# Providers and sessions
# ---------------------------------------------------------------------------------------------


def test_provider_choice() -> None:
    gpu = ["TensorrtExecutionProvider", CUDA, CPU]
    assert choose_providers(gpu) == [CUDA, CPU]
    assert choose_providers(gpu, "auto") == [CUDA, CPU]
    assert choose_providers(gpu, "cpu") == [CPU]
    assert choose_providers(gpu, "cuda") == [CUDA, CPU]
    assert choose_providers([CPU]) == [CPU]
    assert choose_providers(["AzureExecutionProvider", CPU]) == [CPU]
    assert choose_providers(gpu, ["TensorrtExecutionProvider", CUDA]) == ["TensorrtExecutionProvider", CUDA, CPU]
    assert choose_providers([CPU], [CUDA, CPU]) == [CPU]
    with pytest.raises(ValueError, match="CUDA execution was required"):
        choose_providers([CPU], "cuda")
    with pytest.raises(ValueError, match="not auto, cpu, cuda"):
        choose_providers([CPU], "gpu")


def test_cpu_session_and_threads(side_card: ModelCard, side: Segmenter) -> None:
    assert side.providers == [CPU] and side.device == "cpu"
    assert side.session.get_session_options().intra_op_num_threads == 1
    default = Segmenter(side_card, providers="cpu")
    assert default.threads == available_cores()
    assert default.session.get_session_options().intra_op_num_threads == available_cores()


def test_cuda_provider_is_used_where_available(side_card: ModelCard) -> None:
    if CUDA not in ort.get_available_providers():
        pytest.skip("CUDAExecutionProvider is not available in this onnxruntime "
                    f"({', '.join(ort.get_available_providers())}): needs onnxruntime-gpu and a GPU")
    segmenter = Segmenter(side_card)
    assert segmenter.providers[0] == CUDA and segmenter.device == "cuda"
    image, cores = _phantom(_frame(*AXIAL))
    labels = segmenter.segment_slice(image, _frame(*AXIAL))
    assert np.all(labels[cores["left"]] == 1) and np.all(labels[cores["right"]] == 2)


def test_required_cuda_that_the_session_cannot_use_is_an_error(side_card: ModelCard,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu lists CUDA even on a machine without a GPU or driver; the session then
    falls back to the CPU. A node configured with jobs.device = "cuda" must refuse, not run slowly.
    (Nothing real can give this here: the listing of a GPU build is the one thing stood in for.)"""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.raises(ValueError, match="CUDA execution was required, but ONNX Runtime could not use it"):
        Segmenter(side_card, providers="cuda")
    # With "auto" the fallback is a warning and the CPU is used.
    assert Segmenter(side_card, providers="auto").device == "cpu"


def test_checksum_and_label_range_are_enforced(folder: Path, side_card: ModelCard) -> None:
    damaged = ModelCard.from_dict({**side_card.to_dict(), "sha256": "0" * 64}, path=side_card.path)
    with pytest.raises(CardError, match="does not match its card's sha256"):
        Segmenter(damaged, providers="cpu")
    with pytest.raises(CardError, match="label values must be 1 to 255"):
        ModelCard.from_dict({**side_card.to_dict(), "output_labels": [1, 5101],
                             "labels": {"1": {"muscle": "multifidus", "side": "left"},
                                        "5101": {"muscle": "multifidus", "side": "right"}}},
                            path=side_card.path)
    with pytest.raises(CardError, match="3 output classes, the card says 4"):
        three = ModelCard.from_dict({**side_card.to_dict(), "output_labels": [1, 2, 3],
                                     "labels": {**side_card.to_dict()["labels"],
                                                "3": {"muscle": "psoas_major", "side": "left"}}},
                                    path=side_card.path)
        Segmenter(three, providers="cpu").segment_slice(*_phantom_and_frame())


def _phantom_and_frame():
    frame = _frame(*AXIAL)
    return _phantom(frame)[0], frame


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------


def test_window_starts_cover_the_axis() -> None:
    assert window_starts(96, 96, 0.5) == [0]
    assert window_starts(200, 96, 0.5) == [0, 48, 96, 104]
    assert window_starts(200, 96, 0.0) == [0, 96, 104]
    assert window_starts(97, 96, 0.99) == [0, 1]
    for size, window, overlap in ((300, 128, 0.5), (129, 128, 0.9), (500, 64, 0.25)):
        starts = window_starts(size, window, overlap)
        assert starts[-1] + window == size and starts[0] == 0
        assert all(b - a <= max(1, int(window * (1 - overlap))) for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError, match="pad first"):
        window_starts(50, 96, 0.5)


def test_gaussian_weights() -> None:
    weights = gaussian_weights([65, 33], 0.125)
    assert weights.shape == (65, 33) and weights[32, 16] == pytest.approx(1.0)
    sigma = 0.125 * 65
    # One sigma from the centre along the rows: exp(-1/2).
    assert float(np.interp(32 + sigma, np.arange(65), weights[:, 16])) == pytest.approx(math.exp(-0.5), abs=2e-3)
    np.testing.assert_allclose(weights, weights[::-1, ::-1])
    assert weights.min() > 0


def test_sliding_window_of_a_pointwise_function_is_that_function() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 150, 130)).astype(np.float32)

    def predict(batch: np.ndarray) -> np.ndarray:
        return np.concatenate([batch, batch ** 2, -batch], axis=1)

    for overlap in (0.0, 0.5, 0.8):
        for batch_size in (1, 3):
            out = sliding_window(image, predict, [64, 48], overlap, gaussian_weights([64, 48], 0.125), batch_size)
            np.testing.assert_allclose(out, predict(image[None])[0], rtol=1e-5, atol=1e-5)


def test_gaussian_blending_weights_each_window_by_distance_from_its_centre() -> None:
    # Two windows of 32 rows over 48 rows (starts 0 and 16); each predicts its own start row.
    image = np.zeros((1, 48, 32), np.float32)
    calls = []

    def predict(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return np.stack([np.full((1, 32, 32), 16.0 * (len(calls) - 1) + k * 16.0, np.float32)
                         for k in range(len(batch))])

    out = sliding_window(image, predict, [32, 32], 0.5, gaussian_weights([32, 32], 0.125), 2)
    g = np.exp(-0.5 * ((np.arange(32) - 15.5) / 4.0) ** 2)
    for row in (0, 10, 20, 24, 30, 47):
        w0 = g[row] if row < 32 else 0.0
        w1 = g[row - 16] if row >= 16 else 0.0
        assert out[0, row, 5] == pytest.approx((0 * w0 + 16 * w1) / (w0 + w1), rel=1e-4, abs=1e-4)
    constant = sliding_window(image, lambda b: np.stack([np.full((1, 32, 32), float(i)) for i in range(len(b))]),
                              [32, 32], 0.5, np.ones((32, 32), np.float32), 2)
    assert constant[0, 20, 0] == pytest.approx(0.5)  # both windows, equal weights


def test_normalisation() -> None:
    image = np.zeros((1, 20, 20), np.float32)
    image[0, 5:15, 5:15] = np.linspace(10, 30, 100).reshape(10, 10)
    z = normalise(image, {"method": "zscore_nonzero"})[0]
    assert np.all(z[image[0] == 0] == 0)
    assert z[5:15, 5:15].mean() == pytest.approx(0, abs=1e-6) and z[5:15, 5:15].std() == pytest.approx(1, abs=1e-5)
    assert normalise(image, {"method": "zscore"})[0].std() == pytest.approx(1, abs=1e-5)
    p = normalise(image, {"method": "percentile", "low": 0, "high": 100})[0]
    assert p.min() == 0 and p.max() == pytest.approx(1)
    assert np.all(normalise(np.full((1, 4, 4), 7.0), {"method": "zscore_nonzero"}) == 0)


def test_keep_largest_components() -> None:
    labels = np.zeros((20, 20), np.uint8)
    labels[1:6, 1:6] = 1  # 25 pixels
    labels[10:12, 10:12] = 1  # 4 pixels, dropped
    labels[15, 15] = 2
    labels[16, 16] = 2  # diagonal neighbour: one component with 8-connectivity
    kept = keep_largest_components(labels)
    assert (kept == 1).sum() == 25 and (kept == 2).sum() == 2 and kept[10, 10] == 0


# ---------------------------------------------------------------------------------------------
# Left and right
# ---------------------------------------------------------------------------------------------


def _two_blobs(frame: FrameGeometry, at_left: int, at_right: int) -> np.ndarray:
    """Label ``at_left`` on the disc at the patient's left, ``at_right`` on the one at the right."""
    _, cores = _phantom(frame)
    labels = np.zeros(frame.shape, np.uint8)
    labels[cores["left"]] = at_left
    labels[cores["right"]] = at_right
    return labels


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_laterality_check_policy(name: str) -> None:
    frame = _frame(*ORIENTATIONS[name])
    right = _two_blobs(frame, 1, 2)
    same, findings = check_laterality(right, frame, MULTIFIDUS, 7)
    assert findings == [] and same is right

    swapped, findings = check_laterality(_two_blobs(frame, 2, 1), frame, MULTIFIDUS, 7)
    np.testing.assert_array_equal(swapped, right)
    assert [(f.frame_index, f.muscle, f.action) for f in findings] == [(7, "multifidus", "swapped")]

    # Left label on the left disc, right label on a small spot further to the patient's left.
    one_wrong = _two_blobs(frame, 1, 0)
    one_wrong[np.linalg.norm(_positions(frame) - np.array([22.0, 4.0, 0.0]), axis=-1) <= 1.6] = 2
    kept, findings = check_laterality(one_wrong, frame, MULTIFIDUS)
    assert kept is one_wrong
    assert [(f.muscle, f.action) for f in findings] == [("multifidus", "kept")]
    assert findings[0].detail.startswith("right centroid ") and "across the midline" in findings[0].detail


def test_laterality_check_on_real_manual_labels() -> None:
    """The MyoSegmenTUM manual labels on the written DICOM geometry pass; mirrored meanings are fixed."""
    studies.require_data()
    volumes = studies.load_volumes()
    stack = studies.StackGeometry.from_voxel_affine(volumes.affine, volumes.labels.shape)
    meaning = {1: LabelInfo("erector_spinae", "right"), 2: LabelInfo("multifidus", "right"),
               3: LabelInfo("multifidus", "left"), 4: LabelInfo("erector_spinae", "left")}
    mirrored = {v: LabelInfo(i.muscle, "left" if i.side == "right" else "right") for v, i in meaning.items()}
    checked = 0
    for k in range(stack.n_slices):
        labels = np.ascontiguousarray(volumes.labels[:, :, k].T).astype(np.uint8)
        if not labels.any():
            continue
        frame = FrameGeometry(tuple(stack.position(k)), stack.row_cosine, stack.column_cosine,
                              stack.pixel_spacing, stack.rows, stack.columns)
        assert check_laterality(labels, frame, meaning, k)[1] == []
        fixed, findings = check_laterality(labels, frame, mirrored, k)
        assert {(f.muscle, f.action) for f in findings} == {("multifidus", "swapped"), ("erector_spinae", "swapped")}
        # Swapping under the mirrored meaning gives values whose mirrored meaning is the truth.
        assert np.all((fixed == 1) == (labels == 4)) and np.all((fixed == 2) == (labels == 3))
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_side_model_labels_the_same_patient_positions_in_every_orientation(side: Segmenter, name: str) -> None:
    frame = _frame(*ORIENTATIONS[name])
    image, cores = _phantom(frame)
    result = side.segment(_series([image], [frame]))
    # Right without help: the left/right check found nothing to correct.
    assert result.findings == ()
    labels = result.labels[0]
    np.testing.assert_array_equal(side.segment_slice(image, frame), labels)
    assert labels.dtype == np.uint8 and labels.shape == frame.shape
    assert np.all(labels[cores["left"]] == 1), "the patient's left disc must be left multifidus"
    assert np.all(labels[cores["right"]] == 2), "the patient's right disc must be right multifidus"
    assert set(np.unique(labels)) == {0, 1, 2}
    # The labels sit on the discs: nothing far outside them.
    p = _positions(frame)
    far = np.all([np.linalg.norm(p - np.array(c), axis=-1) > r + 1.5 for c, r in DISCS.values()], axis=0)
    assert not labels[far].any()


def test_a_card_with_its_axes_mirrored_is_caught_and_swapped(folder: Path) -> None:
    # The same network described as if its columns ran towards the patient's right: it now
    # labels the patient's right disc "left". Both sides wrong -> swapped and reported.
    card = make_card(folder, "side_mirrored_card", lambda p: side_model(p, 96), array_axes=["P", "R"])
    segmenter = Segmenter(card, providers="cpu", threads=1)
    frames = [_frame(*ORIENTATIONS[name], uid=f"1.2.{i}") for i, name in enumerate(("axial", "mirrored"))]
    phantoms = [_phantom(f) for f in frames]
    result = segmenter.segment(_series([p[0] for p in phantoms], frames))
    for labels, (_, cores) in zip(result.labels, phantoms):
        assert np.all(labels[cores["left"]] == 1) and np.all(labels[cores["right"]] == 2)
    assert [(f.frame_index, f.action) for f in result.findings] == [(0, "swapped"), (1, "swapped")]


# ---------------------------------------------------------------------------------------------
# Whole slices and series
# ---------------------------------------------------------------------------------------------


def test_pointwise_model_through_windows_and_a_fixed_batch(folder: Path) -> None:
    card = make_card(folder, "pointwise", lambda p: pointwise_model(p, batch=2), window=[32, 32],
                     overlap=0.25, largest_component=False, labels={1: LabelInfo("psoas_major", "left"),
                                                                       2: LabelInfo("psoas_major", "right")})
    segmenter = Segmenter(card, providers="cpu", threads=1)
    assert segmenter.batch_size == 2
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, size=(70, 90))
    image = (truth * 50.0 + rng.uniform(-8, 8, size=truth.shape)).astype(np.float32)
    frame = _frame(*AXIAL, size=(70, 90))
    # Both labels are spread evenly over the slice: their centroids sit on the midline, so the
    # left/right check leaves them alone.
    np.testing.assert_array_equal(segmenter.segment_slice(image, frame), truth.astype(np.uint8))


def test_segment_series_returns_a_label_map_on_the_source_frames(side: Segmenter) -> None:
    frames = [_frame(*ORIENTATIONS[name], centre=(0, 0, 4.0 * i), uid=f"1.2.{i}")
              for i, name in enumerate(("axial", "rotated", "mirrored"))]
    images = [_phantom(f)[0] for f in frames]
    images[1] = np.zeros_like(images[1])  # a blank slice stays blank without running the model
    result = side.segment(_series(images, frames))
    assert result.model_name == "side" and result.model_version == "0.1"
    assert result.meaning == MULTIFIDUS and result.findings == ()
    assert len(result.labels) == 3 and not result.labels[1].any()
    assert result.values_present() == [1, 2]
    assert result.series.series_instance_uid == "1.2.9"


def test_dixon_inputs_are_chosen_and_paired(folder: Path, side_card: ModelCard) -> None:
    card = ModelCard.from_dict({**side_card.to_dict(), "contrasts": ["water", "in_phase", "fat"]},
                               path=side_card.path)
    assert choose_contrast(card, {"fat", "in_phase"}) == "in_phase"
    assert choose_contrast(card, ["fat", "water", "in_phase"]) == "water"
    with pytest.raises(InputError, match="accepts water, in_phase, fat; the acquisition has opposed_phase"):
        choose_contrast(card, {"opposed_phase"})

    two = make_card(folder, "two_channel", two_channel_model, channels=2, contrasts=["water", "fat"],
                    output_labels=[1], labels={1: LabelInfo("multifidus", "left")}, window=[32, 32],
                    largest_component=False, normalisation={"method": "zscore_nonzero"})
    frames = [_frame(*AXIAL, centre=(0, 0, 4.0 * k), size=(32, 32), uid=f"1.3.{k}") for k in range(3)]
    rng = np.random.default_rng(2)
    water = [rng.uniform(10, 20, (32, 32)).astype(np.float32) for _ in frames]
    # The same values mirrored: equal statistics per channel, water brighter on about half the pixels.
    fat = [np.ascontiguousarray(w[:, ::-1]) for w in water]
    fat_series = _series(fat[::-1], frames[::-1], uid="1.2.10")  # listed in the other order
    components = {"water": _series(water, frames), "fat": fat_series, "in_phase": fat_series}
    chosen = select_inputs(two, components)
    assert [s.series_instance_uid for s in chosen] == ["1.2.9", "1.2.10"]
    with pytest.raises(InputError, match="missing fat"):
        select_inputs(two, {"water": components["water"]})
    segmenter = Segmenter(two, providers="cpu", threads=1)
    result = segmenter.segment_components(components)
    for k in range(3):
        normal_water = normalise(water[k][None], two.normalisation)[0]
        normal_fat = normalise(fat[k][None], two.normalisation)[0]
        np.testing.assert_array_equal(result.labels[k] == 1, normal_water > normal_fat)


def test_real_water_series_through_the_side_model(side: Segmenter, tmp_path: Path) -> None:
    """A real two-slab series (tilted slabs, 320 x 320) goes through end to end on the CPU."""
    studies.require_data()
    from inference.geometry import read_series

    study = studies.write_two_slab_study(tmp_path, contrasts=("water",), slices_per_slab=2, matrix=80)
    series = read_series(study.series["water"].files)
    result = side.segment(series)
    assert [labels.shape for labels in result.labels] == [(80, 80)] * 4
    # Bright pixels right of the canonical array's centre are "left": had the tilted frames been
    # laid out mirrored, both sides would be wrong and reported as swapped.
    assert result.findings == ()
    for labels, frame in zip(result.labels, series.geometry):
        # Whatever the side model finds on real anatomy, left labels lie left of right ones.
        if (labels == 1).any() and (labels == 2).any():
            x = {v: frame.pixel_to_lps(*np.nonzero(labels == v))[:, 0].mean() for v in (1, 2)}
            assert x[1] > x[2]


# ---------------------------------------------------------------------------------------------
# CPU tuning: body crop, no spinning
# ---------------------------------------------------------------------------------------------


def test_body_box_is_the_bright_part_with_a_margin_and_at_least_a_window() -> None:
    rng = np.random.default_rng(3)
    image = np.abs(rng.normal(0.0, 0.004, (1, 300, 260))).astype(np.float32)  # air: noise near zero
    image[0, 100:180, 40:220] = 1.0  # the body: 80 rows deep, 180 columns wide
    image[0, 10, 10] = 1.0  # one bright noise pixel: not body
    rows, columns = body_box(image, (64, 64))
    assert (rows.start, rows.stop) == (100 - BODY_MARGIN, 180 + BODY_MARGIN)
    assert (columns.start, columns.stop) == (40 - BODY_MARGIN, 220 + BODY_MARGIN)
    # Narrower than a window: grown to the window, centred, and kept inside the image.
    rows, columns = body_box(image, (160, 250))
    assert rows.stop - rows.start == 160 and rows.start == 140 - 80
    assert (columns.start, columns.stop) == (5, 255)
    assert body_box(np.zeros((1, 50, 50), np.float32), (32, 32)) is None
    # A body touching the border is clipped there.
    image[0, 250:300, 0:30] = 1.0
    rows, columns = body_box(image, (64, 64))
    assert rows.stop == 300 and columns.start == 0


def _whole_and_box(inside: np.ndarray, grid, box, frame):
    """Three-class probabilities over ``box`` resampled onto ``frame`` the long way (the whole grid,
    background outside the box) and by Segmenter._box_to_frame."""
    from inference.resample import resample

    background = [1.0, 0.0, 0.0]
    whole = np.zeros((3,) + grid.shape, np.float32)
    whole[0] = 1.0
    whole[(slice(None),) + box] = inside
    return (resample(whole, grid, frame, fill=background),
            Segmenter._box_to_frame(inside, grid, box, frame, background))


def test_box_probabilities_go_onto_the_frame_as_the_whole_grid_would() -> None:
    """Resampling only the box's footprint gives the numbers of resampling the whole grid."""
    from inference.resample import canonical_grid

    frame = _frame(*ORIENTATIONS["oblique"], size=(90, 110), spacing=(0.9, 1.3))
    grid = canonical_grid(frame, ["P", "L"], [1.0, 1.0])
    box = (slice(20, 61), slice(30, 95))
    rng = np.random.default_rng(5)
    inside = rng.random((3, 41, 65)).astype(np.float32)
    expected, (found, _) = _whole_and_box(inside, grid, box, frame)
    np.testing.assert_allclose(found, expected, atol=1e-6)


def test_body_box_erosion_is_scipys() -> None:
    """The body box reads the opening's bounding box off the erosion (see body_box): the erosion
    is scipy's, and one pixel around its box is the opening's box, on random masks of all sizes."""
    from scipy import ndimage

    from inference.runtime import _eroded_3x3

    rng = np.random.default_rng(11)
    square = np.ones((3, 3), dtype=bool)
    for _ in range(300):
        mask = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.random()
        eroded = _eroded_3x3(mask)
        assert np.array_equal(eroded, ndimage.binary_erosion(mask, structure=square))
        opened = ndimage.binary_opening(mask, structure=square)
        assert opened.any() == eroded.any()
        for axis in (0, 1) if opened.any() else ():
            want = np.flatnonzero(opened.any(axis=1 - axis))
            found = np.flatnonzero(eroded.any(axis=1 - axis))
            assert (want[0], want[-1]) == (max(0, found[0] - 1), min(mask.shape[axis] - 1, found[-1] + 1))


def test_probabilities_go_onto_the_frame_only_where_a_muscle_can_win() -> None:
    """Where the box is certain background, nothing is resampled: the labels (argmax) are those
    of resampling the whole grid, and so are the probabilities at every labelled pixel; outside
    the returned region every frame pixel is background."""
    from inference.resample import canonical_grid

    frame = _frame(*ORIENTATIONS["oblique"], size=(120, 140), spacing=(0.9, 1.3))
    grid = canonical_grid(frame, ["P", "L"], [1.0, 1.0])
    box = (slice(10, 90), slice(20, 120))
    rng = np.random.default_rng(6)
    inside = np.zeros((3, 80, 100), np.float32)
    inside[0] = rng.uniform(0.6, 1.0, (80, 100))  # certain background ...
    blob = (slice(30, 45), slice(50, 70))
    inside[0][blob] = rng.uniform(0.0, 0.6, (15, 20))  # ... but for a blob where muscles can win
    inside[1] = (1.0 - inside[0]) * rng.uniform(0.0, 1.0, (80, 100))
    inside[2] = 1.0 - inside[0] - inside[1]
    expected, (found, region) = _whole_and_box(inside, grid, box, frame)
    labels = np.argmax(expected, axis=0)
    assert labels.any() and np.array_equal(np.argmax(found, axis=0), labels)
    np.testing.assert_allclose(found[:, labels > 0], expected[:, labels > 0], atol=1e-6)
    outside = np.ones(frame.shape, bool)
    outside[region] = False
    assert outside.sum() > 0.5 * outside.size  # most of the frame was never resampled
    assert np.all(found[0][outside] == 1.0) and np.all(labels[outside] == 0)
    # A box that is background everywhere resamples nothing.
    found, region = Segmenter._box_to_frame(np.stack([np.ones((80, 100), np.float32), *np.zeros((2, 80, 100),
                                                                                             np.float32)]),
                                            grid, box, frame, [1.0, 0.0, 0.0])
    assert np.all(found[0] == 1.0) and found[0][region].size == 0


def test_windows_per_call_follow_the_tuning(side_card: ModelCard) -> None:
    """One window a call on the CPU (faster per window there; each window's scores are the same
    whatever its batch), four untuned, and what the caller asks for."""
    assert Segmenter(side_card, providers="cpu", threads=1).batch_size == 1
    assert Segmenter(side_card, providers="cpu", threads=1, tuning=UNTUNED).batch_size == 4
    assert Segmenter(side_card, providers="cpu", threads=1, batch_size=3).batch_size == 3


def test_sessions_do_not_spin_unless_untuned(side_card: ModelCard) -> None:
    tuned = Segmenter(side_card, providers="cpu", threads=2)
    untuned = Segmenter(side_card, providers="cpu", threads=2, tuning=UNTUNED)
    assert tuned.tuning == Tuning(body_crop=True, spinning=False, leaky_relu=True, cpu_windows_per_call=1)
    spinning = "session.intra_op.allow_spinning"
    assert tuned.session.get_session_options().get_session_config_entry(spinning) == "0"
    assert untuned.session.get_session_options().get_session_config_entry(spinning) == "1"


@pytest.mark.slow
def test_body_crop_runs_fewer_windows_and_keeps_the_labels_on_the_real_study(tmp_path: Path) -> None:
    """On the real Dixon study, the tuned runtime runs under half the windows; its labels agree
    with the untuned runtime's at Dice >= 0.98 per label, and its Dice against the manual labels
    on the card's held-out slices moves by less than 0.005."""
    from inference.geometry import read_series
    from inference.training.evaluate import dice

    studies.require_data()
    volumes = studies.load_volumes()
    card = ModelCard.load(_REPO / "inference" / "models" / "musclenode-lumbar-dixon.json")
    study = studies.write_dixon_study(tmp_path, seed="body-crop", contrasts=("water",))
    series = read_series(study.series["water"].files)
    slices = sorted(k for group in card.accuracy["holdout_slices"].values() for k in group)
    frame_of = {}
    for index, frame in enumerate(series.geometry):
        corner = frame.pixel_to_lps(np.array([0.0]), np.array([0.0]))
        frame_of[int(round(studies.lps_to_voxel(volumes.affine, corner)[0, 2]))] = index
    truth = np.stack([volumes.labels[:, :, k].T for k in slices])
    labels, windows = {}, {}
    for name, tuning in (("untuned", UNTUNED), ("tuned", Tuning())):
        segmenter = Segmenter(card, providers="cpu", threads=1, tuning=tuning)
        counted = segmenter._predict
        windows[name] = 0

        def predict(batch, counted=counted, name=name):
            windows[name] += batch.shape[0]
            return counted(batch)

        segmenter._predict = predict
        labels[name] = np.stack([segmenter.segment_slice(series.frames[frame_of[k]], series.geometry[frame_of[k]])
                                 for k in slices])
    assert windows["tuned"] < 0.5 * windows["untuned"], windows
    for value in card.output_labels:
        # Windows elsewhere give slightly other labels: 1.0.0 0.984-0.990 per label, 2.0.0 down to
        # 0.979 (right multifidus); what counts is that Dice against the manual labels stays.
        assert dice(labels["tuned"], labels["untuned"], value) >= 0.975, value
        moved = dice(labels["tuned"], truth, value) - dice(labels["untuned"], truth, value)
        assert abs(moved) < 0.005, (value, moved)


@pytest.mark.slow
def test_exact_tuning_keeps_every_label_on_the_real_study(tmp_path: Path) -> None:
    """LeakyRelu for PRelu and one window a call change no label of the real study's 29 slices
    (nor the laterality findings), and the uncertainty only in float64 rounding."""
    from inference.geometry import read_series

    studies.require_data()
    card = ModelCard.load(_REPO / "inference" / "models" / "musclenode-lumbar-dixon.json")
    study = studies.write_dixon_study(tmp_path, seed="exact-tuning", contrasts=("water",))
    series = read_series(study.series["water"].files)
    found = {}
    for name, tuning in (("as exported", Tuning(leaky_relu=False, cpu_windows_per_call=4)), ("tuned", Tuning())):
        found[name] = Segmenter(card, providers="cpu", threads=1, tuning=tuning).segment(series)
    before, after = found["as exported"], found["tuned"]
    assert all(np.array_equal(a, b) for a, b in zip(before.labels, after.labels))
    assert sum(int(np.count_nonzero(a)) for a in after.labels) > 0
    assert before.findings == after.findings
    for a, b in zip(before.uncertainty, after.uncertainty):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-12 for k in a)


def test_runtime_imports_no_torch() -> None:
    code = ("import sys; import inference.runtime, inference.geometry, inference.registry, inference.resample, "
            "node.cli, node.service; assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert 'monai' not in sys.modules; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=_REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_card_json_written_by_make_card_is_the_schema(side_card: ModelCard) -> None:
    data = json.loads(Path(side_card.path).read_text())
    assert data["schema"] == "musclenode-model-card/1" and data["array_axes"] == ["P", "L"]
