"""Measure the level model on held-out subjects and write its card.

Usage::

    python -m inference.training.vertebrae_eval --data ../shared/data/vertebrae
        --onnx DIR/musclenode-lumbar-vertebrae.onnx --training DIR/training.json --out inference/models

Every held-out subject (:func:`.vertebrae.split_subjects`) is resliced, in memory, into a
clinical-like sagittal series (:func:`sagittal_series`: 0.9 mm pixels, 4 mm slices 4.4 mm apart,
13 slices centred on the bodies) and into axial series (:func:`axial_geometries`: straight,
tilted 15 degrees, and two angled slabs), all in one frame of reference, and measured through
the runtime (:mod:`inference.vertebrae`, ONNX Runtime, no torch):

- Dice per body, on the model grid of the sagittal series (2 mm x 2 mm x 4.4 mm), against the
  labels sampled there (nearest voxel), only where the label is known (not above the highest
  labelled body of the set);
- naming: the share of labelled bodies found with the right name (a found body of that name
  whose centroid lies within 12 mm of the labelled body's centroid), for each naming method of
  :func:`inference.vertebrae.name_candidates`;
- the level of every axial slice against the truth from the labels (:func:`true_level`).

``--robustness`` measures the card in ``--out`` on variants of the held-out sagittal series
(field of view cut, contrast inverted, other slice thickness and pixel size: :func:`robustness`).
The same reslicing helpers make the DICOM test studies (``tests/test_levels.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from inference.card import KIND_VERTEBRAE, ModelCard, VertebraLabel, file_sha256
from inference.geometry import FrameGeometry, SeriesImage, StudyInfo
from inference.vertebrae import bodies_from_labels, find_bodies, level_of, plane_crossing, predict
from inference.vocabulary import Level, Vertebra

from .vertebrae import (
    ARRAY_AXES,
    CLASS_NAMES,
    NORMALISATION,
    SPACING_MM,
    WINDOW,
    find_subjects,
    known_mask,
    split_subjects,
)

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
NAME_TOLERANCE_MM = 12.0
TRUTH_RADIUS_MM = 5.0

BURIAN = ("Burian E, Rohrmeier A, Schlaeger S, et al. Lumbar muscle and vertebral bodies segmentation of "
          "chemical shift encoding-based water-fat MRI: the reference database MyoSegmenTUM spine. "
          "BMC Musculoskelet Disord 2019;20:152. doi:10.1186/s12891-019-2528-x")
ZUKIC = ("Zukic D, Vlasak A, Egger J, Horinek D, Nimsky C, Kolb A. Robust detection and segmentation for "
         "diagnosis of vertebral diseases using routine MR images. Computer Graphics Forum 2014;33(6):190-204. "
         "doi:10.1111/cgf.12343")


# ---------------------------------------------------------------------------------------------
# Volumes and reslicing


class Volume:
    """A vertebrae subject: image and labels (arrays HF, AP, LR at 1 mm) with the LPS affine."""

    def __init__(self, name: str, dataset: str, image_path: Path, labels_path: Path) -> None:
        self.name, self.dataset = name, dataset
        nifti = nib.load(str(image_path))
        self.image = np.asarray(nifti.dataobj, dtype=np.float32)
        self.labels = np.asarray(nib.load(str(labels_path)).dataobj).astype(np.uint8)
        self.affine = RAS_TO_LPS @ nifti.affine  # voxel -> LPS mm
        self.inverse = np.linalg.inv(self.affine)
        self.known = np.broadcast_to(known_mask(self.labels)[:, :, None], self.labels.shape)

    def to_voxel(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points) @ self.inverse[:3, :3].T + self.inverse[:3, 3]

    def sample(self, points: np.ndarray, which: str = "image") -> np.ndarray:
        """Values at LPS points ``(..., 3)``: image trilinear (0 outside), labels/known nearest."""
        ijk = self.to_voxel(points)
        coords = [ijk[..., a] for a in range(3)]
        if which == "image":
            return ndimage.map_coordinates(self.image, coords, order=1, cval=0.0)
        source = self.labels if which == "labels" else self.known.astype(np.uint8)
        return ndimage.map_coordinates(source, coords, order=0, cval=0)

    def bodies(self) -> dict[Vertebra, np.ndarray]:
        """LPS centroid of each labelled body, head to foot."""
        if not hasattr(self, "_bodies"):
            vertebrae = list(Vertebra)
            values = np.arange(1, 8)
            counts = ndimage.sum_labels(np.ones(self.labels.shape), self.labels, values)
            with np.errstate(invalid="ignore", divide="ignore"):
                index = ndimage.center_of_mass(np.ones(self.labels.shape), self.labels, values)
            self._bodies = {vertebrae[v]: self.affine[:3, :3] @ np.asarray(c) + self.affine[:3, 3]
                            for v, c, n in zip(values, index, counts) if n > 0}
        return self._bodies

    def voxels_lps(self, value: int) -> np.ndarray:
        """``(n, 3)`` LPS of the voxels of one label value (cached)."""
        cache = self.__dict__.setdefault("_voxels", {})
        if value not in cache:
            cache[value] = np.argwhere(self.labels == value) @ self.affine[:3, :3].T + self.affine[:3, 3]
        return cache[value]

    @property
    def lps_box(self) -> tuple[np.ndarray, np.ndarray]:
        corners = np.array([[i, j, k] for i in (0, self.image.shape[0] - 1) for j in (0, self.image.shape[1] - 1)
                            for k in (0, self.image.shape[2] - 1)], dtype=np.float64)
        lps = corners @ self.affine[:3, :3].T + self.affine[:3, 3]
        return lps.min(axis=0), lps.max(axis=0)


def _frame(centre: np.ndarray, row_cosine, column_cosine, spacing: float, rows: int, columns: int,
           uid: str = "", thickness: float | None = None) -> FrameGeometry:
    row_c, col_c = np.asarray(row_cosine, float), np.asarray(column_cosine, float)
    origin = np.asarray(centre) - (columns - 1) / 2 * spacing * row_c - (rows - 1) / 2 * spacing * col_c
    return FrameGeometry(tuple(origin), tuple(row_c), tuple(col_c), (spacing, spacing), rows, columns,
                         sop_instance_uid=uid, frame_number=1 if uid else 0, slice_thickness=thickness)


def sagittal_frames(volume: Volume, n_slices: int = 13, spacing_between: float = 4.4, thickness: float = 4.0,
                    pixel: float = 0.9, lr_shift: float = 0.0) -> list[FrameGeometry]:
    """A sagittal stack over the whole volume (rows to the feet, columns to posterior), centred
    left-right on the labelled bodies; IOP (0, 1, 0, 0, 0, -1)."""
    low, high = volume.lps_box
    centre = (low + high) / 2
    centre[0] = np.mean([c[0] for c in volume.bodies().values()]) + lr_shift
    rows = int((high[2] - low[2]) / pixel) + 1
    columns = int((high[1] - low[1]) / pixel) + 1
    frames = []
    for s in range(n_slices):
        offset = (s - (n_slices - 1) / 2) * spacing_between
        # Row cosine +y, column cosine -z: normal (+y) x (-z) = -x; slices ascend along it.
        c = centre + np.array([-offset, 0.0, 0.0])
        frames.append(_frame(c, (0, 1, 0), (0, 0, -1), pixel, rows, columns, uid=f"sag.{s}", thickness=thickness))
    return frames


def render(volume: Volume, frames: Sequence[FrameGeometry], thickness: float) -> list[np.ndarray]:
    """Pixels of frames resliced from the volume, averaged over ``thickness`` (1 mm sub-slices)."""
    offsets = np.arange(thickness) - (thickness - 1) / 2 if thickness > 1 else np.zeros(1)
    images = []
    for frame in frames:
        rows, columns = np.meshgrid(np.arange(frame.rows), np.arange(frame.columns), indexing="ij")
        points = frame.pixel_to_lps(rows, columns)
        images.append(np.mean([volume.sample(points + o * frame.normal) for o in offsets], axis=0).astype(np.float32))
    return images


def series_of(frames: Sequence[FrameGeometry], images: Sequence[np.ndarray] | None, uid: str, frame_of_reference: str,
              description: str) -> SeriesImage:
    """An in-memory series (one stack per orientation in frame order)."""
    from inference.geometry import group_stacks

    images = images if images is not None else [np.zeros(f.shape, np.float32) for f in frames]
    return SeriesImage(frames=tuple(images), geometry=tuple(frames), stacks=group_stacks(frames),
                       series_instance_uid=uid, frame_of_reference_uid=frame_of_reference,
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.4", study=StudyInfo("1.2.3"),
                       modality="MR", series_description=description)


def sagittal_series(volume: Volume, frame_of_reference: str = "1.2.3.4", **kwargs) -> SeriesImage:
    thickness = kwargs.get("thickness", 4.0)
    frames = sagittal_frames(volume, **kwargs)
    return series_of(frames, render(volume, frames, thickness), "1.2.3.4.1", frame_of_reference, "t2_tse_sag")


def _tilted(tilt_deg: float) -> tuple[np.ndarray, np.ndarray]:
    a = math.radians(tilt_deg)
    return np.array([1.0, 0.0, 0.0]), np.array([0.0, math.cos(a), math.sin(a)])


def axial_geometries(volume: Volume, spacing: float = 4.0, pixel: float = 1.0, matrix: int = 256
                     ) -> dict[str, list[FrameGeometry]]:
    """Axial test geometries over the labelled range: ``straight`` (4 mm apart), ``tilted`` (15
    degrees about left-right), ``slabs`` (two slabs of 8 slices, +12 degrees centred on the
    L2-L3 disc and -10 degrees on the L4-L5 disc). In-plane centred 40 mm posterior to the
    bodies (where the muscles are)."""
    bodies = volume.bodies()
    centroids = np.array(list(bodies.values()))
    top = centroids[:, 2].max() + 25
    bottom = centroids[:, 2].min() - 30
    x, y = centroids[:, 0].mean(), centroids[:, 1].mean() + 40
    out: dict[str, list[FrameGeometry]] = {}
    zs = np.arange(top, bottom, -spacing)
    for name, tilt in (("straight", 0.0), ("tilted", 15.0)):
        row_c, col_c = _tilted(tilt)
        normal = np.cross(row_c, col_c)
        # Centres along the tilted normal through the spine's middle.
        middle = np.array([x, y, (top + bottom) / 2])
        out[name] = [_frame(middle + (z - middle[2]) / normal[2] * normal, row_c, col_c, pixel, matrix, matrix,
                            uid=f"{name}.{i}") for i, z in enumerate(zs)]
    slabs = []
    for (upper, lower), tilt in (((Vertebra.L2, Vertebra.L3), 12.0), ((Vertebra.L4, Vertebra.L5), -10.0)):
        disc = (bodies[upper] + bodies[lower]) / 2
        row_c, col_c = _tilted(tilt)
        normal = np.cross(row_c, col_c)
        centre = np.array([x, y, disc[2]]) + ((disc - np.array([x, y, disc[2]])) @ normal) * normal
        for i in range(8):
            slabs.append(_frame(centre + (i - 3.5) * spacing * normal, row_c, col_c, pixel, matrix, matrix,
                                uid=f"slab{tilt:+.0f}.{i}"))
    out["slabs"] = slabs
    return out


def true_level(volume: Volume, frame: FrameGeometry) -> tuple[str | None, bool]:
    """See :func:`true_level_and_share`, without the share."""
    return true_level_and_share(volume, frame)[:2]


def true_level_and_share(volume: Volume, frame: FrameGeometry) -> tuple[str | None, bool, float]:
    """The level of an axial frame from the labels: ``(level or None, known)``.

    The spine's true axis is the polyline through the labelled bodies' centroids (extended 40 mm
    beyond each end along the end segments). Around the point where the frame's plane cuts it,
    labels are sampled in the plane within :data:`TRUTH_RADIUS_MM`; a body holding at least half
    of the samples is the level; otherwise the disc between the bodies whose centroids bracket the
    cut. This is the issue's rule, "L3 when the slice crosses that vertebral body near the midline,
    L3-L4 when it lies between the two bodies", applied to the labels at the slice's central plane
    (a 4 mm slice half on a disc and half on a body takes the level at its centre); the runtime
    (:func:`inference.vertebrae.level_of`) applies it to the found bodies on the same axis, the
    line through their centroids. ``known`` is False where the labels cannot say (above the highest labelled body's
    centroid without that body in the samples, or more than 8 mm below where L5 ends on the line):
    such frames are not counted. The third value is the share of the samples in the most
    frequent body: between 0.2 and 0.8 the plane lies on an end plate (an ambiguous slice).
    """
    bodies = volume.bodies()
    names = list(bodies)
    centroids = np.array([bodies[n] for n in names])
    head = centroids[0] + 40 * (centroids[0] - centroids[1]) / np.linalg.norm(centroids[0] - centroids[1])
    foot = centroids[-1] + 40 * (centroids[-1] - centroids[-2]) / np.linalg.norm(centroids[-1] - centroids[-2])
    line = np.vstack([head, centroids, foot])
    crossings = plane_crossing(line, frame.centre, frame.normal)
    if not crossings:
        return None, False, 0.0
    segment, fraction = min(crossings, key=lambda c: np.linalg.norm(
        line[c[0]] + c[1] * (line[c[0] + 1] - line[c[0]]) - frame.centre))
    point = line[segment] + fraction * (line[segment + 1] - line[segment])
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    radii = np.linspace(0, TRUTH_RADIUS_MM, 4)
    offsets = (radii[:, None, None] * (np.cos(angles)[None, :, None] * np.asarray(frame.row_cosine)
                                        + np.sin(angles)[None, :, None] * np.asarray(frame.column_cosine))).reshape(-1, 3)
    samples = volume.sample(point + offsets, "labels")
    counts = np.bincount(samples, minlength=8)
    vertebrae = list(Vertebra)
    best = int(np.argmax(counts[1:]) + 1)
    share = float(counts[best] / len(samples))
    if counts[best] >= 0.5 * len(samples):
        return vertebrae[best].value, True, share
    # Disc: between the centroids that bracket the cut (segment 1..n-1 of the line).
    if segment == 0:  # above the highest labelled body's centroid
        return None, False, 0.0
    if segment == len(line) - 2:  # below L5's centroid
        lowest = names[-1]
        if lowest is not Vertebra.L5:
            return None, False, 0.0
        # Where L5 ends on the axis: labels sampled every 0.5 mm along the line below its centroid.
        direction = (foot - centroids[-1]) / np.linalg.norm(foot - centroids[-1])
        steps = np.arange(0.0, 40.0, 0.5)
        on_line = volume.sample(centroids[-1] + steps[:, None] * direction, "labels")
        end = steps[on_line == 7].max() if (on_line == 7).any() else 0.0
        below = float((point - centroids[-1]) @ direction) - float(end)
        return ("L5-S1", True, share) if below <= 8.0 else (None, False, share)
    upper = names[segment - 1]
    return Level(upper, disc=True).name, True, share


# ---------------------------------------------------------------------------------------------
# Measures


def dice_per_body(named: np.ndarray, truth: np.ndarray, known: np.ndarray) -> dict[str, float]:
    out = {}
    for value in range(1, 8):
        t = (truth == value) & known
        if not t.any():
            continue
        p = (named == value) & known
        out[list(Vertebra)[value].value] = float(2 * (p & t).sum() / (p.sum() + t.sum()))
    return out


def evaluate_subject(volume: Volume, card: ModelCard, namings: Sequence[str] = ("consensus", "direct", "order"),
                     **sagittal) -> dict:
    series = sagittal_series(volume, **sagittal)
    start = time.perf_counter()
    prediction = predict(series, card)
    seconds = time.perf_counter() - start
    truth = volume.sample(prediction.positions, "labels")
    known = volume.sample(prediction.positions, "known").astype(bool)
    true_centroids = volume.bodies()
    result: dict = {"subject": volume.name, "dataset": volume.dataset, "model_seconds": round(seconds, 2),
                    "labelled": [v.value for v in true_centroids]}
    for naming in namings:
        named = np.zeros_like(prediction.classes)
        bodies, problems = bodies_from_labels(prediction.classes, prediction.positions, prediction.voxel_ml,
                                              prediction.normal, naming, named)
        correct = {}
        for vertebra, centroid in true_centroids.items():
            found = [b for b in bodies if b.vertebra is vertebra]
            correct[vertebra.value] = bool(found and np.linalg.norm(found[0].centroid - centroid) <= NAME_TOLERANCE_MM)
        result[naming] = {"dice": dice_per_body(named, truth, known), "named_right": correct,
                          "found": [b.name for b in bodies], "problems": problems}
    return result


def axial_accuracy(volume: Volume, reference) -> dict:
    """Axial slices at the right level, per geometry: ``slices``, ``right``, ``within_half_level``
    (the right level or the neighbouring body or disc), ``clear_slices`` and ``right_clear``
    (slices not on an end plate: the labelled body holds under 20 % or over 80 % of the samples)."""
    assign = level_of(reference)
    out = {}
    for name, frames in axial_geometries(volume).items():
        right = total = tolerant = clear = right_clear = 0
        wrong = []
        for frame in frames:
            truth, known, share = true_level_and_share(volume, frame)
            if not known:
                continue
            predicted = assign(frame)
            total += 1
            right += predicted == truth
            near = predicted is not None and truth is not None and abs(Level.parse(predicted).order - Level.parse(truth).order) <= 0.5
            tolerant += predicted == truth or near
            if share <= 0.2 or share >= 0.8:
                clear += 1
                right_clear += predicted == truth
            if predicted != truth:
                wrong.append(f"{predicted} for {truth} (share {share:.2f})")
        out[name] = {"slices": total, "right": right, "within_half_level": tolerant, "clear_slices": clear,
                     "right_clear": right_clear, "wrong": wrong}
    return out


def _cropped(frames: Sequence[FrameGeometry], images: Sequence[np.ndarray], point: np.ndarray, keep_below: bool):
    """Frames and pixels cut at the row of ``point``: the part below (towards the feet) or above."""
    out_frames, out_images = [], []
    for frame, image in zip(frames, images):
        row = int(np.clip(frame.lps_to_pixel(point)[0], 1, frame.rows - 1))
        rows = slice(row, frame.rows) if keep_below else slice(0, row)
        sub = frame.crop(rows, slice(0, frame.columns))
        out_frames.append(FrameGeometry(sub.position, sub.row_cosine, sub.column_cosine, sub.pixel_spacing,
                                        sub.rows, sub.columns, frame.sop_instance_uid, 1, frame.slice_thickness))
        out_images.append(image[rows])
    return out_frames, out_images


def robustness(card: ModelCard, volumes: Sequence[Volume]) -> dict[str, dict[str, list[int]]]:
    """Bodies named right (of those whose labelled centroid lies in the field of view) on
    variants of the held-out sagittal series: the field of view cut through the middle of the
    second labelled body (L2 in MyoSegmenTUM, T12 in Zukic) or through the middle of L5,
    contrast inverted inside the body, 3 mm slices with 1.2 mm pixels, 5 mm slices with 0.5 mm
    pixels. ``{variant: {dataset: [right, bodies]}}``; for the variants that see the whole spine
    also ``"axial slices": [right, slices]``, the axial slices at their true level
    (:func:`axial_accuracy`)."""
    from inference.vertebrae import find_bodies as find

    out: dict[str, dict[str, list[int]]] = {}

    def count(variant: str, volume: Volume, frames, images, axial: bool = False) -> None:
        reference = find(series_of(frames, images, "1.2.3.4.1", "1.2.3.4", "sag"), card)
        if axial:
            tally = out.setdefault(variant, {}).setdefault("axial slices", [0, 0])
            for counts in axial_accuracy(volume, reference).values():
                tally[0] += counts["right"]
                tally[1] += counts["slices"]
        middle = frames[len(frames) // 2]
        tally = out.setdefault(variant, {}).setdefault(volume.dataset, [0, 0])
        for vertebra, centroid in volume.bodies().items():
            if not 0 <= middle.lps_to_pixel(centroid)[0] <= middle.rows - 1:
                continue
            body = reference.body(vertebra)
            tally[1] += 1
            tally[0] += bool(body is not None and np.linalg.norm(body.centroid - centroid) <= NAME_TOLERANCE_MM)

    for volume in volumes:
        frames = sagittal_frames(volume)
        images = render(volume, frames, 4.0)
        bodies = list(volume.bodies().values())
        count("field of view from the middle of the 2nd labelled body down", volume,
              *_cropped(frames, images, bodies[1], keep_below=True))
        count("field of view down to the middle of L5", volume,
              *_cropped(frames, images, volume.bodies()[Vertebra.L5], keep_below=False))
        inverted = []
        for image in images:
            top = np.percentile(image, 99)
            body = ndimage.gaussian_filter(image, 3) > 0.1 * top
            inverted.append(np.where(body, top - image, image).clip(0).astype(np.float32))
        count("contrast inverted inside the body", volume, frames, inverted, axial=True)
        for thickness, pixel, n in ((3.0, 1.2, 17), (5.0, 0.5, 11)):
            thin = sagittal_frames(volume, n_slices=n, spacing_between=thickness * 1.1, thickness=thickness, pixel=pixel)
            count(f"{thickness:g} mm slices, {pixel:g} mm pixels", volume, thin, render(volume, thin, thickness),
                  axial=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.training.vertebrae_eval")
    parser.add_argument("--data", required=True)
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--training", required=True, help="training.json written by inference.training.vertebrae")
    parser.add_argument("--out", required=True, help="folder for the card (the ONNX file is copied there)")
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--robustness", action="store_true",
                        help="only measure the card in --out on variants of the held-out series (see robustness)")
    parser.add_argument("--limit", type=int, help="at most this many subjects per set (a quick check, not for a card)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "musclenode-lumbar-vertebrae"
    if args.robustness:
        card = ModelCard.load(out / f"{name}.json")
        found = find_subjects(args.data)
        _, held = split_subjects([f[0] for f in found])
        result = robustness(card, [Volume(*f) for f in found if f[0] in held][:args.limit or None])
        for variant, sets in result.items():
            print(f"{variant}: " + ", ".join(f"{d} {r}/{t}" for d, (r, t) in sets.items()))
        return 0
    onnx = out / f"{name}.onnx"
    if Path(args.onnx).resolve() != onnx.resolve():
        onnx.write_bytes(Path(args.onnx).read_bytes())
    training = json.loads(Path(args.training).read_text())
    card = make_card(out / f"{name}.json", onnx, args.version, training, accuracy={})

    found = find_subjects(args.data)
    trained, held = split_subjects([f[0] for f in found])
    # Calibration: every training subject (--limit: that many of each set).
    per_set = args.limit or len(trained)
    chosen_for_calibration = ([n for n in trained if n.startswith("myosegmentum")][:per_set]
                              + [n for n in trained if n.startswith("zukic")][:per_set])
    if args.limit:
        held = [n for n in held if n.startswith("myosegmentum")][:args.limit] + \
               [n for n in held if n.startswith("zukic")][:args.limit]
    postprocess = calibrate(card, [Volume(*f) for f in found if f[0] in chosen_for_calibration])
    print("calibration on training subjects:", json.dumps(postprocess), flush=True)
    card = make_card(out / f"{name}.json", onnx, args.version, training, accuracy={}, postprocess=postprocess)
    results = []
    for subject in found:
        if subject[0] not in held:
            continue
        volume = Volume(*subject)
        result = evaluate_subject(volume, card)
        results.append((volume, result))
        print(volume.name, {k: (v["found"], sum(v["named_right"].values()), v["problems"]) for k, v in result.items()
                            if isinstance(v, dict) and "found" in v}, flush=True)

    def share(naming: str, dataset: str | None = None) -> tuple[int, int]:
        hits = [ok for v, r in results if dataset in (None, v.dataset) for ok in r[naming]["named_right"].values()]
        return sum(hits), len(hits)

    namings = ("consensus", "direct", "order")
    chosen = card.postprocess["naming"]
    dice: dict[str, dict[str, float]] = {}
    for dataset in ("myosegmentum", "zukic", None):
        per_body: dict[str, list[float]] = {}
        for volume, result in results:
            if dataset in (None, volume.dataset):
                for body, value in result[chosen]["dice"].items():
                    per_body.setdefault(body, []).append(value)
        dice[dataset or "all"] = {b: round(float(np.mean(v)), 3) for b, v in per_body.items()}
    axial: dict[str, dict[str, int]] = {}
    wrong = {}
    for volume, result in results:
        reference = find_bodies(sagittal_series(volume), card)
        for geometry, counts in axial_accuracy(volume, reference).items():
            total = axial.setdefault(geometry, {"slices": 0, "right": 0, "within_half_level": 0,
                                                "clear_slices": 0, "right_clear": 0})
            for key in total:
                total[key] += counts[key]
            if counts["wrong"]:
                wrong[f"{volume.name} {geometry}"] = counts["wrong"]
    all_slices = sum(a["slices"] for a in axial.values())
    all_right = sum(a["right"] for a in axial.values())
    all_near = sum(a["within_half_level"] for a in axial.values())
    all_clear = sum(a["clear_slices"] for a in axial.values())
    all_right_clear = sum(a["right_clear"] for a in axial.values())
    naming_shares = {n: {"all": "%d/%d" % share(n), "myosegmentum": "%d/%d" % share(n, "myosegmentum"),
                         "zukic": "%d/%d" % share(n, "zukic")} for n in namings}
    right, total = share(chosen)
    mean_dice = float(np.mean(list(dice["all"].values())))
    accuracy = {
        "summary": (f"held-out: mean Dice {mean_dice:.2f} over T11-L5, {right}/{total} bodies named right, "
                    f"{all_right}/{all_slices} axial slices at the right level ({all_right_clear}/{all_clear} of those "
                    f"not on an end plate; {all_near}/{all_slices} within half a level)"),
        "metric": "Dice per body; share of bodies named right; share of axial slices at the right level",
        "held_out_subjects": [v.name for v, _ in results],
        "description": (
            "Held-out subjects (split by subject; never trained on nor used for any choice made in training) "
            "resliced in memory into a clinical-like sagittal series: 0.9 mm pixels, 4 mm slices 4.4 mm apart, "
            "13 slices centred left-right on the bodies, the volume's whole field of view (MyoSegmenTUM: about "
            "T12 to the top of the sacrum; Zukic: about T10 to the sacrum). Dice on the model grid (2 x 2 x 4.4 mm) "
            "against the labels sampled there, only where the label is known (MyoSegmenTUM labels nothing above "
            "L1). A body is named right when a body of that name is found with its centroid within 12 mm of the "
            "labelled body's centroid. Axial slices: straight (4 mm apart), tilted 15 degrees, and two angled "
            "slabs (+12 degrees at L2-L3, -10 degrees at L4-L5), true level from the labels around the point "
            "where the slice cuts the line through the labelled bodies' centroids (inference.training."
            "vertebrae_eval.true_level; the runtime maps a slice through the same axis, the line through the "
            "found bodies' centroids); slices whose level the labels cannot give are not counted. The naming "
            f"method ({chosen!r}), the end-plate offsets of the card's postprocess and the offsets and weight of "
            "its end_plate_edge (the image's steepest rise into the disc, averaged with the model's end plate) "
            f"were measured on the {len(chosen_for_calibration)} training subjects (calibrate), never on these."),
        "dice": dice,
        "naming": naming_shares,
        "naming_method": chosen,
        "axial_levels": axial,
        "axial_errors": wrong,
        "per_subject": [r for _, r in results],
        "model_seconds_per_series": round(float(np.mean([r["model_seconds"] for _, r in results])), 2),
    }
    card = make_card(out / f"{name}.json", onnx, args.version, training, accuracy=accuracy, postprocess=postprocess)
    print(json.dumps({k: v for k, v in accuracy.items() if k not in ("per_subject",)}, indent=1))
    return 0


#: Planes swept through the labelled range to measure end-plate errors (:func:`boundary_errors`):
#: name, tilt about left-right (degrees), as the axial test geometries.
SWEEP_TILTS = (("straight", 0.0), ("tilted", 15.0), ("tilted -12", -12.0))
#: Errors larger than this (mm) are a body missed or misnamed, not an end plate off.
END_PLATE_OUTLIER_MM = 4.0
#: Shares of the image's edge in the end plates tried by :func:`calibrate` (0: the model's alone).
EDGE_WEIGHTS = (0.0, 0.5, 1.0)


def boundary_errors(volume: Volume, reference, step: float = 0.25) -> list[tuple[str, str, str, float]]:
    """How far the found bodies end beyond the labelled ones, where slices cross the spine's axis.

    Planes of each tilt of :data:`SWEEP_TILTS` are swept head to foot every ``step`` mm through
    the labelled range (centred as :func:`axial_geometries`); each gets its true level
    (:func:`true_level`) and its level from ``reference`` (:func:`inference.vertebrae.level_of`).
    For every change body -> disc (an inferior end plate) and disc -> body (a superior one) that
    both give, the signed distance (mm, head-foot, between the plane positions where each changes)
    is the error: positive when the found body reaches farther than the labelled one (too tall).

    Returns
    -------
    list of (vertebra, side, sweep name, error mm)
        ``side`` is ``"superior"`` or ``"inferior"``.
    """
    centroids = np.array(list(volume.bodies().values()))
    top, bottom = centroids[:, 2].max() + 25, centroids[:, 2].min() - 30
    middle = np.array([centroids[:, 0].mean(), centroids[:, 1].mean() + 40, (top + bottom) / 2])
    assign = level_of(reference)
    zs = np.arange(top, bottom, -step)
    out = []

    def changes(levels: list) -> dict:
        found = {}
        for i in range(1, len(levels)):
            if levels[i] != levels[i - 1] and None not in (levels[i], levels[i - 1]):
                found[(levels[i - 1], levels[i])] = float(zs[i] + zs[i - 1]) / 2
        return found

    for name, tilt in SWEEP_TILTS:
        row_c, col_c = _tilted(tilt)
        normal = np.cross(row_c, col_c)
        frames = [_frame(middle + (z - middle[2]) / normal[2] * normal, row_c, col_c, 1.0, 256, 256) for z in zs]
        truth = changes([level if known else None for level, known in (true_level(volume, f) for f in frames)])
        found = changes([assign(f) for f in frames])
        for (upper, lower), z in truth.items():
            if (upper, lower) not in found:
                continue
            if Level.parse(upper).disc:  # disc -> body: the lower body's superior end plate
                out.append((lower, "superior", name, found[(upper, lower)] - z))
            else:  # body -> disc: the upper body's inferior end plate
                out.append((upper, "inferior", name, z - found[(upper, lower)]))
    return out


def calibrate(card: ModelCard, volumes: Sequence[Volume], min_per_vertebra: int = 20) -> dict:
    """End-plate offsets and the naming method, measured on TRAINING subjects.

    The offsets (``postprocess.end_plate_offset_mm``: superior, inferior; positive moves an end
    plate into its body, :func:`inference.vertebrae.move_end_plates`) are the median errors of the
    model's end plates without offsets (:func:`boundary_errors`: how far its bodies end beyond
    the labelled ones where slices cross the spine's axis), rounded to 0.25 mm, over all
    vertebrae; ``end_plate_offset_mm_by_vertebra`` the same per vertebra with at least
    ``min_per_vertebra`` errors measured. Errors over :data:`END_PLATE_OUTLIER_MM` (a body
    missed or misnamed) are left out. The naming method is the one that names most bodies right
    on these subjects (ties: ``consensus``). The axial slices of these subjects at their true
    level without and with the offsets are recorded too.

    The image's own edges (:func:`inference.vertebrae.image_edges`) are measured the same way:
    ``postprocess.end_plate_edge.offset_mm`` are their median errors, and its ``weight`` (the
    edge's share in the end plate used, :func:`inference.vertebrae.place_end_plates`) is the one
    of :data:`EDGE_WEIGHTS` that puts most of these subjects' axial slices at their true level;
    with weight 0 the card has no ``end_plate_edge``.
    """
    from inference.end_plate_edge import EdgeSettings
    from inference.vertebrae import LevelReference, end_plate_offsets, image_edges, place_end_plates

    bare = ModelCard.from_dict({**card.to_dict(), "postprocess": {}}, card.path)
    hits = {n: 0 for n in ("consensus", "direct", "order")}
    cases = []
    errors: list[tuple[str, str, str, float]] = []
    edge_errors: list[tuple[str, str, str, float]] = []
    unoffset = EdgeSettings({"offset_mm": [0.0, 0.0], "weight": 1.0})
    for volume in volumes:
        series = sagittal_series(volume)
        reference = find_bodies(series, bare, naming="consensus")
        frames = [f for frames in axial_geometries(volume).values() for f in frames]
        truths = [true_level(volume, f) for f in frames]
        edges = {b.name: image_edges(b, series, np.asarray(series.geometry[0].normal), unoffset)
                 for b in reference.bodies}
        cases.append((reference, [(f, t) for f, (t, known) in zip(frames, truths) if known], edges))
        errors += boundary_errors(volume, reference)
        # The image's edges alone (no offset), measured the same way, where the image gave one.
        at_edges = LevelReference(**{**reference.__dict__, "bodies": tuple(
            place_end_plates(b, (0.0, 0.0), edges[b.name], unoffset) for b in reference.bodies)})
        found = {(b.name, side) for b in reference.bodies
                 for side, edge in zip(("superior", "inferior"), edges[b.name]) if edge is not None}
        edge_errors += [e for e in boundary_errors(volume, at_edges) if (e[0], e[1]) in found]
        result = evaluate_subject(volume, bare)
        for naming in hits:
            hits[naming] += sum(result[naming]["named_right"].values())
    kept = [e for e in errors if abs(e[3]) <= END_PLATE_OUTLIER_MM]

    def median(values: list[float]) -> float:
        return round(float(np.median(values)) * 4) / 4 if values else 0.0

    offsets = [median([e[3] for e in kept if e[1] == side]) for side in ("superior", "inferior")]
    by_vertebra: dict[str, list[float]] = {}
    measured: dict[str, dict[str, list]] = {}
    for vertebra in [v.value for v in Vertebra]:
        row = list(offsets)
        for k, side in enumerate(("superior", "inferior")):
            values = [e[3] for e in kept if e[0] == vertebra and e[1] == side]
            if values:
                measured.setdefault(vertebra, {})[side] = [round(float(np.median(values)), 2),
                                                           round(float(np.mean(values)), 2), len(values)]
            if len(values) >= min_per_vertebra:
                row[k] = median(values)
        if vertebra in measured:
            by_vertebra[vertebra] = row
    postprocess: dict = {"end_plate_offset_mm": offsets, "end_plate_offset_mm_by_vertebra": by_vertebra}
    offset_card = ModelCard.from_dict({**card.to_dict(), "postprocess": postprocess}, card.path)
    kept_edges = [e for e in edge_errors if abs(e[3]) <= END_PLATE_OUTLIER_MM]
    edge_sides = {side: [e[3] for e in kept_edges if e[1] == side] for side in ("superior", "inferior")}
    edge_offsets = [median(edge_sides["superior"]), median(edge_sides["inferior"])]

    def right(moved_card: ModelCard | None, weight: float = 0.0) -> int:
        settings = EdgeSettings({"offset_mm": edge_offsets, "weight": weight}) if weight else None
        count = 0
        for reference, frames, edges in cases:
            if moved_card is not None:
                reference = LevelReference(**{**reference.__dict__, "bodies": tuple(
                    place_end_plates(b, end_plate_offsets(moved_card, b.name), edges[b.name], settings)
                    for b in reference.bodies)})
            assign = level_of(reference)
            count += sum(assign(f) == t for f, t in frames)
        return count

    # The edge's share: the weight that puts most training slices at their level (ties: the smaller).
    by_weight = {weight: right(offset_card, weight) for weight in EDGE_WEIGHTS}
    weight = max(EDGE_WEIGHTS, key=lambda w: (by_weight[w], -w))
    if weight:
        postprocess["end_plate_edge"] = {"offset_mm": edge_offsets, "weight": weight,
                                         "min_disc_to_body": unoffset.min_disc_to_body,
                                         "max_move_mm": unoffset.max_move_mm}
    total = sum(len(frames) for _, frames, _ in cases)
    naming = max(hits, key=lambda n: (hits[n], n == "consensus"))
    sides = {side: [e[3] for e in kept if e[1] == side] for side in ("superior", "inferior")}

    def spread(values: list[float]) -> dict:
        return {"median": round(float(np.median(values)), 2), "mean": round(float(np.mean(values)), 2),
                "sd": round(float(np.std(values)), 2), "n": len(values)}

    return {"naming": naming, **postprocess,
            "calibration": {"subjects": [v.name for v in volumes], "axial_slices": total,
                            "right_without_offsets": right(None), "right_with_offsets": right(offset_card),
                            "right_by_edge_weight": {str(w): n for w, n in by_weight.items()},
                            "bodies_named_right": hits,
                            "end_plate_errors_mm": {side: spread(v) for side, v in sides.items()},
                            "edge_errors_mm": {side: spread(v) for side, v in edge_sides.items()},
                            "end_plate_errors_by_vertebra_mm": measured,
                            "outliers_left_out": len(errors) - len(kept),
                            "note": ("measured on training subjects only (inference.training.vertebrae_eval."
                                     "calibrate): end-plate errors without offsets (boundary_errors: planes "
                                     "swept every 0.25 mm, straight and tilted +15 and -12 degrees; positive: "
                                     "the model's body ends beyond the labelled one where the slice crosses "
                                     "the axis through the centroids); offsets = median errors, rounded to "
                                     "0.25 mm; [median, mean, count] per vertebra and side; errors over 4 mm "
                                     "(a body missed or misnamed) left out. edge_errors_mm: the same for the "
                                     "image's edges alone (inference.end_plate_edge, no offset), where the image "
                                     "gave one; end_plate_edge.offset_mm = their median errors; its weight is the "
                                     "one of right_by_edge_weight that puts most of these slices at their level")}}


def make_card(path: Path, onnx: Path, version: str, training: dict, accuracy: dict,
              postprocess: dict | None = None) -> ModelCard:
    labels = {k: VertebraLabel(v) for k, v in enumerate(CLASS_NAMES, 1)}
    history = training.get("history") or []
    training = {k: v for k, v in training.items() if k != "history"}
    if history:
        training["loss_last_500_steps"] = round(float(np.mean([h["loss"] for h in history[-10:]])), 4)
    card = ModelCard(
        name=path.stem, version=version, onnx=onnx.name, sha256=file_sha256(onnx), labels=labels,
        output_labels=sorted(labels), contrasts=["t2", "t1", "water"], channels=1,
        array_axes=list(ARRAY_AXES), spacing_mm=[SPACING_MM, SPACING_MM], normalisation=dict(NORMALISATION),
        window=list(WINDOW), overlap=0.0, blend="constant", largest_component=False, crop_foreground=False,
        kind=KIND_VERTEBRAE,
        postprocess=dict(postprocess or {}),
        licence=("Model weights and card: Apache-2.0, as the musclenode project. Training data: the vertebrae "
                 "volumes of MyoSegmenTUM spine and of Zukic et al. as redistributed (1 mm, 8 bit) in the public "
                 "repository JonathanRamos/fastcleverseg; the terms of the original data sets were not verified "
                 "for redistribution of derived weights: check them before use outside research."),
        provenance={
            "data": [
                "MyoSegmenTUM spine: 40 healthy adults, water images of a chemical-shift-encoded (Dixon) "
                "acquisition covering the lumbar spine, 224 x 224 x 77 at 1 mm, bodies L1-L5 labelled",
                "Zukic et al.: 13 healthy adults, sagittal T2-weighted turbo spin echo at 1.5 T, 381 x 381 x 77 at "
                "1 mm, bodies T11-L5 labelled"],
            "data_source": "https://github.com/JonathanRamos/fastcleverseg (as in ../shared/data/vertebrae)",
            "references": [BURIAN, ZUKIC],
            "use": ("Sagittal lumbar MR series (T2 preferred, T1 or fat-suppressed also trained for by contrast "
                    "augmentation): segments the vertebral bodies T11-L5 and names them. S1 is NOT named (neither "
                    "data set labels it; the sacrum was background in training): the L5-S1 disc is derived from "
                    "L5's inferior end plate (inference.vertebrae). Bodies above T11 are not named."),
            "input": ("one sagittal slice resampled in its own plane to 2 mm (rows towards the feet, columns "
                      "towards posterior; Gaussian pre-smoothing sigma 0.4 grid pixels), normalised per slice "
                      "(percentiles 0.5 and 99.5 to 0 and 1, clipped), at least 192 x 192 (multiples of 16), the "
                      "whole slice at once (no sliding window)"),
        },
        accuracy=accuracy,
        training={**training, "partial_labels": (
            "a body a set does not label is unknown: voxels above the top end plate of the highest labelled "
            "body (L1 in MyoSegmenTUM, T11 in Zukic) less 4 mm, per anterior-posterior column, are left out of "
            "the loss; below L5 nothing is masked (the sacrum is background in both sets)"),
            "augmentation": [
                "slice thickness 1-5 mm (mean over 1 mm left-right neighbours)",
                "rotation +-15 degrees, scale 0.85-1.2, shift +-35 mm in the sagittal plane",
                "field of view cut at the top between about T10 and L1 (p 0.4) and at the bottom through the "
                "sacrum (p 0.4)",
                "contrast: inversion (p 0.35), random intensity curve with 4-7 points, monotone half the time "
                "(p 0.7), gamma exp(N(0, 0.35)); applied inside the body, air kept dark (T1/T2/STIR-like)",
                "bias field exp(random quadratic, coefficients N(0, 0.25)) (p 0.6), Gaussian blur 0.3-1 px "
                "(p 0.2), Rician-like noise sigma up to 0.06 (p 0.7)",
                "in-plane pixel size of clinical series (0.4-1.2 mm) is not simulated separately: the runtime "
                "resamples every series to 2 mm with the same anti-aliasing as training"],
        },
    )
    card.save(path)
    return ModelCard.load(path)


if __name__ == "__main__":
    sys.exit(main())
