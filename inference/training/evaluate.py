"""Dice per label of an exported ONNX model against manual labels on NIfTI slices.

Usage::

    python -m inference.training.evaluate --card MODEL.json [--onnx MODEL.onnx]
        --image water.nii.gz [--image fat.nii.gz] --labels labels.nii.gz [--slices 12-15,4,8]

Several ``--image`` files are added voxel by voxel (water + fat = in-phase). Each slice is
prepared as the card says: laid out along ``array_axes`` (derived from the NIfTI affine),
resampled to ``spacing_mm``, normalised, run through ONNX Runtime in overlapping windows
blended with a Gaussian; the blended class scores are resampled back to the slice's own grid,
turned into labels and, if the card asks, reduced to each label's largest connected component.
Dice is computed on that native grid, pooling the voxels of all chosen slices per label.

This is a deliberately plain sliding-window loop for measuring models; the DICOM runtime that
serves them lives elsewhere. Nothing here needs torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from inference.card import CardError, LabelInfo, ModelCard, file_sha256

from . import synthetic as _synthetic_module
from .data import (
    Case,
    SliceLayout,
    labelled_slices,
    load_case,
    parse_slices,
    resample_2d,
    zscore_nonzero,
)

__all__ = [
    "SlidingWindowPredictor",
    "dice",
    "evaluate_slices",
    "format_accuracy",
    "holdout_accuracy",
    "keep_largest_components",
    "main",
    "segment_slice",
]


class SlidingWindowPredictor:
    """Class scores of a whole prepared slice from overlapping windows of an ONNX model.

    Parameters
    ----------
    card : ModelCard
        Gives the window, overlap, blending and the ONNX file.
    onnx_path : Path, optional
        Another ONNX file than the card's (its checksum is then not checked).
    batch_size : int
        Windows per ONNX Runtime call.
    threads : int
        Intra-op threads of ONNX Runtime.
    """

    def __init__(self, card: ModelCard, onnx_path: str | Path | None = None, batch_size: int = 16,
                 threads: int = 2) -> None:
        import onnxruntime as ort

        if card.normalisation.get("method") != "zscore_nonzero":
            raise CardError(f"this evaluation implements zscore_nonzero only, not {card.normalisation}")
        if card.crop_foreground or card.channels != 1:
            raise CardError("this evaluation implements single-channel models without foreground cropping")
        if onnx_path is None:
            card.verify()
            onnx_path = card.onnx_path
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.card = card
        self.window = tuple(card.window)
        self.batch_size = batch_size
        self.weights = _importance(self.window, card.blend, card.sigma_scale)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Blended class scores ``[classes, H, W]`` of a normalised slice ``[H, W]``."""
        height, width = image.shape
        padded = np.zeros((max(height, self.window[0]), max(width, self.window[1])), np.float32)
        padded[:height, :width] = image
        starts = [(r, c) for r in _starts(padded.shape[0], self.window[0], self.card.overlap)
                  for c in _starts(padded.shape[1], self.window[1], self.card.overlap)]
        scores = np.zeros((self.card.classes, *padded.shape), np.float64)
        total = np.zeros(padded.shape, np.float64)
        for first in range(0, len(starts), self.batch_size):
            chunk = starts[first:first + self.batch_size]
            batch = np.stack([padded[r:r + self.window[0], c:c + self.window[1]] for r, c in chunk])[:, None]
            out = self.session.run(None, {self.input_name: batch})[0]
            for (r, c), window_scores in zip(chunk, out):
                scores[:, r:r + self.window[0], c:c + self.window[1]] += window_scores * self.weights
                total[r:r + self.window[0], c:c + self.window[1]] += self.weights
        return (scores / total)[:, :height, :width].astype(np.float32)


def _starts(size: int, window: int, overlap: float) -> list[int]:
    """Window origins along one axis: evenly stepped, the last flush with the end."""
    step = max(1, int(window * (1 - overlap)))
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def _importance(window: Sequence[int], blend: str, sigma_scale: float) -> np.ndarray:
    """Per-pixel weight of a window's scores: centres count more than edges (Gaussian)."""
    if blend == "constant":
        return np.ones(window, np.float64)
    axes = []
    for size in window:
        x = np.arange(size) - (size - 1) / 2
        axes.append(np.exp(-0.5 * (x / (sigma_scale * size)) ** 2))
    weights = np.outer(*axes)
    # A floor keeps every pixel covered by some weight where only window edges reach.
    return np.maximum(weights / weights.max(), 1e-6)


def keep_largest_components(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Keep, per label value, only its largest connected component (8-connected) in a slice.

    Stray blobs on the wrong side are the typical error of a slice-wise network; the muscles
    here are each one connected region per slice.
    """
    out = labels.copy()
    structure = np.ones((3, 3), bool)
    for value in values:
        components, count = ndimage.label(labels == value, structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            out[(components > 0) & (components != 1 + int(np.argmax(sizes)))] = 0
    return out


def segment_slice(predictor: SlidingWindowPredictor, plane: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Label map of one laid-out slice on its own grid.

    Parameters
    ----------
    predictor : SlidingWindowPredictor
        Model and card.
    plane : numpy.ndarray
        The slice laid out along the card's ``array_axes`` at its own ``spacing``.
    spacing : sequence of two float
        Its spacing, rows then columns.
    """
    card = predictor.card
    image = resample_2d(plane.astype(np.float32), spacing, card.spacing_mm, order=1)
    scores = predictor(zscore_nonzero(image))
    # Scores, not labels, go back to the native grid, so boundaries fall between native pixels
    # as the blended scores say rather than on the model grid's nearest pixel.
    native = resample_2d(scores, card.spacing_mm, spacing, order=1, shape=plane.shape)
    values = np.array([0, *card.output_labels], np.int16)
    labels = values[np.argmax(native, axis=0)]
    if card.largest_component:
        labels = keep_largest_components(labels, card.output_labels)
    return labels


def dice(prediction: np.ndarray, truth: np.ndarray, value: int) -> float:
    """Dice of one label value (NaN when it is absent from both)."""
    p, t = prediction == value, truth == value
    denominator = int(p.sum()) + int(t.sum())
    return 2.0 * int((p & t).sum()) / denominator if denominator else float("nan")


def evaluate_slices(predictor: SlidingWindowPredictor, volume: np.ndarray, labels: np.ndarray,
                    layout: SliceLayout, slices: Sequence[int]) -> dict[int, float]:
    """Dice per output label over the given slices, voxels of all slices pooled."""
    predicted, truth = [], []
    for index in slices:
        predicted.append(segment_slice(predictor, layout.slice(volume, index), layout.spacing_mm))
        truth.append(layout.slice(labels, index))
    predicted_all, truth_all = np.stack(predicted), np.stack(truth)
    return {value: dice(predicted_all, truth_all, value) for value in predictor.card.output_labels}


def input_volume(case: Case, contrast: str) -> np.ndarray | None:
    """The case's volume of a contrast: its own, or the fixed synthetic test volume of a
    synthetic contrast (:func:`.synthetic.test_volume`) where it has water and fat; None if neither."""
    if contrast in case.contrasts:
        return case.volume(contrast)
    if contrast in _synthetic_module.SYNTHETIC_CONTRASTS and {"water", "fat"} <= set(case.images):
        return _synthetic_module.test_volume(case.images["water"], case.images["fat"], contrast, case.layout.slice_axis)[0]
    return None


def holdout_accuracy(card: ModelCard, cases: Sequence[Case], groups: Mapping[str, Sequence[int]],
                     description: str = "", synthetic: Sequence[str] = (), onnx_path: str | Path | None = None,
                     threads: int = 2) -> dict:
    """The card's ``accuracy``: Dice per contrast, hold-out group and label on labelled cases.

    Every group is measured on its own and all groups together (``"all"``). Contrasts are the
    card's and those in ``synthetic`` (among :data:`.synthetic.SYNTHETIC_CONTRASTS`); a contrast a
    case lacks but that can be synthesised from its water and fat images is measured on the fixed
    synthetic test volume (:func:`input_volume`), and the accuracy's ``synthetic_inputs`` says so.
    """
    predictor = SlidingWindowPredictor(card, onnx_path, threads=threads)
    everything = sorted({i for group in groups.values() for i in group})
    measured = {**groups, "all": everything} if len(groups) > 1 else dict(groups)
    results: dict[str, dict] = {}
    synthesised: dict[str, dict] = {}
    for contrast in dict.fromkeys([*map(str, card.contrasts), *synthetic]):
        per_group = {}
        volumes = {case.name: input_volume(case, contrast) for case in cases}
        for name, slices in measured.items():
            pooled: dict[int, list] = {}
            for case in cases:
                volume = volumes[case.name]
                if volume is None:
                    continue
                if contrast not in case.contrasts:
                    tissue = _synthetic_module.test_intensities(contrast)
                    synthesised[contrast] = {
                        "from": "water and fat images of the same cases (inference.training.synthetic.test_volume)",
                        "seed": _synthetic_module.TEST_SEEDS[contrast],
                        "tissue_intensities": tissue.as_dict(),
                        "rician_noise_sd": f"{_synthetic_module.TEST_NOISE} x brightest tissue"}
                labelled = set(labelled_slices(case))
                chosen = [i for i in slices if i in labelled]
                scores = evaluate_slices(predictor, volume, case.labels, case.layout, chosen)
                for value, score in scores.items():
                    pooled.setdefault(value, []).append(score)
            if pooled:
                per_group[name] = {str(v): round(float(np.nanmean(s)), 4) for v, s in pooled.items()}
        if per_group:
            results[contrast] = per_group
    return {
        "metric": "Dice",
        "description": description,
        "cases": [case.name for case in cases],
        "holdout_slices": {name: list(map(int, s)) for name, s in groups.items()},
        "method": ("python -m inference.training.evaluate: slices laid out as the card says, "
                   f"window {list(card.window)}, overlap {card.overlap}, {card.blend} blending, "
                   f"largest component {card.largest_component}; Dice on the images' own "
                   "grid, voxels of each group's slices pooled per label (mean over cases)"),
        "dice": results,
        **({"synthetic_inputs": synthesised} if synthesised else {}),
    }


def format_accuracy(accuracy: Mapping, labels: Mapping[int, LabelInfo]) -> str:
    """A plain-text table of :func:`holdout_accuracy`'s Dice values."""
    values = sorted(labels)
    header = f"{'contrast':10} {'slices':12} " + " ".join(f"{labels[v].name:>22}" for v in values)
    lines = [header]
    for contrast, groups in accuracy["dice"].items():
        for group, scores in groups.items():
            cells = " ".join(f"{scores.get(str(v), float('nan')):22.4f}" for v in values)
            lines.append(f"{contrast:10} {group:12} {cells}")
    return "\n".join(lines)


def _load_input(images: Sequence[str], labels: str, array_axes: Sequence[str]) -> tuple[np.ndarray, Case]:
    """The summed input volume and the case (labels, layout) of the first image."""
    cases = [load_case(Path(p).name, {"water": Path(p)}, Path(labels), array_axes) for p in images]
    volume = np.sum([case.images["water"] for case in cases], axis=0, dtype=np.float32)
    return volume, cases[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.training.evaluate",
                                     description="Dice per label of an ONNX model on NIfTI slices.")
    parser.add_argument("--card", required=True, help="model card JSON")
    parser.add_argument("--onnx", help="ONNX file (default: the card's, checksum checked)")
    parser.add_argument("--image", action="append", required=True,
                        help="NIfTI image; repeat to add images voxel by voxel (water + fat = in-phase)")
    parser.add_argument("--labels", required=True, help="NIfTI manual labels on the image's grid")
    parser.add_argument("--slices", help="slice indices, e.g. 12-15,4,8 (default: all labelled slices)")
    parser.add_argument("--json", help="also write the Dice values to this JSON file")
    args = parser.parse_args(argv)

    card = ModelCard.load(args.card)
    if args.onnx and file_sha256(Path(args.onnx)) != card.sha256:
        print(f"note: {args.onnx} is not the file the card describes (checksum differs)", file=sys.stderr)
    predictor = SlidingWindowPredictor(card, args.onnx)
    volume, case = _load_input(args.image, args.labels, card.array_axes)
    slices = parse_slices(args.slices, case.slices) if args.slices else labelled_slices(case)
    scores = evaluate_slices(predictor, volume, case.labels, case.layout, slices)
    print(f"{card.name} {card.version}: Dice on slices {slices}")
    for value, score in scores.items():
        name = card.labels[value].name if value in card.labels else str(value)
        print(f"  {value}  {name:22} {score:.4f}")
    print(f"  mean {np.nanmean(list(scores.values())):.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"slices": slices, "dice": {str(k): v for k, v in scores.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
