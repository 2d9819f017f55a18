"""Train the level model: a 2D UNet that segments and names vertebral bodies on sagittal MR slices.

Usage::

    python -m inference.training.vertebrae --data ../shared/data/vertebrae --out DIR
        [--minutes 35] [--threads 1]

Data: ``vertebrae/myosegmentum/*`` (40 subjects, water images, L1-L5 labelled) and
``vertebrae/zukic/*`` (13 subjects, T2 TSE, T11-L5 labelled), arrays head->foot, anterior->
posterior, left-right at 1 mm, label values 1 = T11 ... 7 = L5 (see ``../shared/data/README.md``).

Subjects are split once, by subject, with :func:`split_subjects` (both sets in the held-out part);
held-out subjects never enter training nor any choice made during it.

Partial labels: a body a set does not label is *unknown*, not background. Every voxel above the
top end plate of the highest labelled body (L1 in MyoSegmenTUM, T11 in Zukic), less a 4 mm
margin, is left out of the loss (per anterior-posterior column, so tilted end plates are
followed). Below L5 nothing is masked: neither set labels the sacrum, and the model learns that
the body below L5 is not a lumbar body (it cannot name S1).

Each sample is one sagittal slice drawn at random, made to look like a clinical sagittal series:
slice thickness 1-5 mm (mean over neighbouring left-right slices), a random in-plane rotation,
scale and shift, resampled to the model grid (2 mm, rows towards the feet, columns towards
posterior, 192 x 192), field of view cut at the top (T10 to L1) or bottom (through the sacrum),
contrast remapped (random monotone or non-monotone curves, inversion: T1/T2/STIR-like), gamma,
bias field, blur and noise, then normalised per slice as the runtime does (percentiles 0.5 and
99.5 to 0 and 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

log = logging.getLogger("inference.training.vertebrae")

#: Model grid: rows towards the feet (I), columns towards posterior (P), 2 mm, 192 x 192.
ARRAY_AXES = ("I", "P")
SPACING_MM = 2.0
WINDOW = (192, 192)
#: Output class k (1..7) -> label value k of the data: T11, T12, L1, L2, L3, L4, L5.
CLASS_NAMES = ("T11", "T12", "L1", "L2", "L3", "L4", "L5")
#: Percentile normalisation, as the card states and the runtime applies.
NORMALISATION = {"method": "percentile", "low": 0.5, "high": 99.5}
UNKNOWN_MARGIN_MM = 4


@dataclass
class Subject:
    name: str
    dataset: str
    image: np.ndarray  # (HF, AP, LR) float32 0..1
    labels: np.ndarray  # (HF, AP, LR) uint8, 0 background, 1..7 T11..L5
    known: np.ndarray  # (HF, AP) bool: voxels whose label counts in the loss


def find_subjects(root: str | Path) -> list[tuple[str, str, Path, Path]]:
    """(name, dataset, image path, labels path) of every subject under ``root``, sorted by name."""
    found = []
    for dataset in ("myosegmentum", "zukic"):
        for image in sorted((Path(root) / dataset).glob("*_image.nii.gz")):
            labels = image.with_name(image.name.replace("_image", "_vertebrae"))
            found.append((image.name.split("_")[0], dataset, image, labels))
    return found


def split_subjects(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Training and held-out subject names: every 5th MyoSegmenTUM subject (8 of 40) and the
    2nd, 7th and 12th Zukic subject (3 of 13) in sorted order are held out."""
    myo = sorted(n for n in names if n.startswith("myosegmentum"))
    zuk = sorted(n for n in names if n.startswith("zukic"))
    held = set(myo[::5]) | {zuk[i] for i in (1, 6, 11) if i < len(zuk)}
    return sorted(set(names) - held), sorted(held)


def known_mask(labels: np.ndarray, margin: int = UNKNOWN_MARGIN_MM) -> np.ndarray:
    """(HF, AP) mask of voxels whose label is known: below the top end plate of the highest
    labelled body less ``margin`` voxels, per AP column (columns without that body take the
    nearest column's top)."""
    present = [v for v in range(1, 8) if (labels == v).any()]
    top_body = labels == present[0]
    projection = top_body.any(axis=2)  # (HF, AP)
    columns = np.flatnonzero(projection.any(axis=0))
    top = np.full(labels.shape[1], np.nan)
    for j in columns:
        top[j] = np.flatnonzero(projection[:, j])[0]
    # Columns without the body: the top of the nearest column that has it.
    idx = np.arange(labels.shape[1])
    nearest = columns[np.abs(idx[:, None] - columns[None, :]).argmin(axis=1)]
    top = top[nearest] - margin
    rows = np.arange(labels.shape[0])[:, None]
    return rows >= top[None, :]


def load_subject(name: str, dataset: str, image_path: Path, labels_path: Path) -> Subject:
    image = np.asarray(nib.load(str(image_path)).dataobj, dtype=np.float32) / 255.0
    labels = np.asarray(nib.load(str(labels_path)).dataobj).astype(np.uint8)
    return Subject(name, dataset, image, labels, known_mask(labels))


def percentile_normalise(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, [NORMALISATION["low"], NORMALISATION["high"]])
    return np.clip((image - low) / (high - low), 0, 1).astype(np.float32) if high > low else np.zeros_like(image)


# ---------------------------------------------------------------------------------------------
# Samples


def _remap(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random contrast: inversion (p 0.35), a random curve (p 0.7, monotone half the time), gamma."""
    y = x
    if rng.random() < 0.35:
        y = 1.0 - y
    if rng.random() < 0.7:
        points = rng.integers(4, 8)
        xs = np.linspace(0, 1, points)
        ys = rng.uniform(0, 1, points)
        if rng.random() < 0.5:
            ys = np.sort(ys) if rng.random() < 0.5 else np.sort(ys)[::-1]
        y = np.interp(y, xs, ys)
    y = np.clip(y, 0, 1) ** math.exp(rng.normal(0, 0.35))
    return y


def make_sample(subject: Subject, rng: np.random.Generator, augment: bool = True,
                lr_index: int | None = None, thickness: int | None = None):
    """One (image, labels, weight) triple of shape WINDOW: a sagittal slice as the runtime sees it.

    Without ``augment``: no geometric or intensity change, thickness 1 mm unless given, the
    slice centred on the model grid (used for measuring)."""
    hf, ap, lr = subject.image.shape
    body_lr = np.flatnonzero(subject.labels.any(axis=(0, 1)))
    if lr_index is None:
        if rng.random() < 0.8:
            lr_index = int(rng.integers(body_lr[0] - 4, body_lr[-1] + 5))
        else:
            lr_index = int(rng.integers(0, lr))
        lr_index = int(np.clip(lr_index, 0, lr - 1))
    if thickness is None:
        thickness = int(rng.choice([1, 2, 3, 4, 5], p=[0.15, 0.1, 0.25, 0.3, 0.2])) if augment else 1
    first = max(0, lr_index - thickness // 2)
    image = subject.image[:, :, first:first + thickness].mean(axis=2)
    labels = subject.labels[:, :, lr_index]
    known = subject.known.astype(np.float32)

    # Output grid (rows I, columns P at SPACING_MM) -> source voxel (HF, AP) coordinates.
    scale = SPACING_MM
    angle = 0.0
    shift = np.zeros(2)
    if augment:
        scale *= math.exp(rng.uniform(math.log(0.85), math.log(1.2)))
        angle = math.radians(rng.uniform(-15, 15))
        shift = rng.uniform(-35, 35, 2)
    centre_src = np.array([hf / 2, ap / 2]) + shift
    c, s = math.cos(angle), math.sin(angle)
    matrix = scale * np.array([[c, -s], [s, c]])
    centre_out = (np.array(WINDOW) - 1) / 2
    offset = centre_src - matrix @ centre_out
    # Anti-aliasing as the runtime does before resampling (source 1 mm to grid ~2 mm).
    smoothed = ndimage.gaussian_filter(image, 0.4 * scale)
    out_image = ndimage.affine_transform(smoothed, matrix, offset, output_shape=WINDOW, order=1, cval=0.0)
    out_labels = ndimage.affine_transform(labels, matrix, offset, output_shape=WINDOW, order=0, cval=0)
    out_known = ndimage.affine_transform(known, matrix, offset, output_shape=WINDOW, order=0, cval=1.0)
    inside = ndimage.affine_transform(np.ones_like(image), matrix, offset, output_shape=WINDOW, order=0, cval=0.0) > 0

    if augment:
        rows = np.arange(WINDOW[0])[:, None]
        lab_rows = np.flatnonzero(out_labels.any(axis=1))
        if lab_rows.size and rng.random() < 0.4:  # top of the FOV somewhere between T10 and L1
            top = int(rng.integers(max(0, lab_rows[0] - 25), lab_rows[0] + 12))
            cut = rows < top
            inside &= ~cut
        if lab_rows.size and rng.random() < 0.4:  # bottom through the sacrum
            bottom = int(rng.integers(lab_rows[-1] + 4, lab_rows[-1] + 40))
            inside &= ~(rows > bottom)
        x = out_image / max(float(np.percentile(out_image[inside], 99.5)) if inside.any() else 1.0, 1e-3)
        x = np.clip(x, 0, 1)
        # Tissue weight: contrast changes inside the body, air stays dark.
        weight = np.clip(ndimage.gaussian_filter(x, 2.0) / 0.12, 0, 1)
        y = weight * _remap(x, rng) + (1 - weight) * x * rng.uniform(0.0, 0.4)
        if rng.random() < 0.6:  # bias field: exp of a random quadratic
            u, v = np.meshgrid(np.linspace(-1, 1, WINDOW[0]), np.linspace(-1, 1, WINDOW[1]), indexing="ij")
            terms = [u, v, u * v, u * u, v * v]
            field = sum(rng.normal(0, 0.25) * t for t in terms)
            y = y * np.exp(field)
        if rng.random() < 0.2:
            y = ndimage.gaussian_filter(y, rng.uniform(0.3, 1.0))
        if rng.random() < 0.7:
            sigma = rng.uniform(0.0, 0.06)
            y = np.abs(y + rng.normal(0, sigma, y.shape) + 1j * rng.normal(0, sigma, y.shape))
        y = np.where(inside, y, 0.0)
        out_image = y
        out_labels = np.where(inside, out_labels, 0)
    return percentile_normalise(out_image.astype(np.float32)), out_labels.astype(np.int64), out_known.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Network and loss


def build_network(channels: Sequence[int] = (16, 32, 64, 128, 128), res_units: int = 1):
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=len(CLASS_NAMES) + 1, channels=tuple(channels),
                strides=(2,) * (len(channels) - 1), num_res_units=res_units)


def masked_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice (foreground classes, batch-pooled), both only where ``weight``
    is 1 (voxels of unknown label contribute nothing)."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    ce = (ce * weight).sum() / weight.sum().clamp_min(1.0)
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).float()
    w = weight[:, None]
    inter = (probs * onehot * w).sum(dim=(0, 2, 3))[1:]
    denom = ((probs + onehot) * w).sum(dim=(0, 2, 3))[1:]
    present = onehot[:, 1:].mul(w).sum(dim=(0, 2, 3)) > 0
    dice = 1 - (2 * inter + 1e-5) / (denom + 1e-5)
    dice = dice[present].mean() if present.any() else logits.sum() * 0
    return ce + dice


def _lr(base: float, progress: float, warmup: float = 0.03) -> float:
    if progress < warmup:
        return base * max(progress / warmup, 0.01)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.training.vertebrae")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=35.0, help="training time limit (annealed)")
    parser.add_argument("--max-steps", type=int, default=100000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=20250112)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128, 128])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    found = find_subjects(args.data)
    train_names, held_names = split_subjects([f[0] for f in found])
    subjects = [load_subject(*f) for f in found if f[0] in train_names]
    log.info("training on %d subjects, holding out %s", len(subjects), held_names)
    myo = [s for s in subjects if s.dataset == "myosegmentum"]
    zuk = [s for s in subjects if s.dataset == "zukic"]

    network = build_network(args.channels)
    parameters = sum(p.numel() for p in network.parameters())
    log.info("network parameters %d", parameters)
    optimiser = torch.optim.AdamW(network.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    limit = args.minutes * 60
    start = time.monotonic()
    history = []
    step = 0
    losses = []
    network.train()
    while step < args.max_steps:
        progress = max(step / args.max_steps, (time.monotonic() - start) / limit)
        if progress >= 1:
            break
        for group in optimiser.param_groups:
            group["lr"] = _lr(args.learning_rate, progress)
        batch = [make_sample(zuk[rng.integers(len(zuk))] if rng.random() < 0.45 else myo[rng.integers(len(myo))], rng)
                 for _ in range(args.batch_size)]
        image = torch.from_numpy(np.stack([b[0] for b in batch])[:, None])
        labels = torch.from_numpy(np.stack([b[1] for b in batch]))
        weight = torch.from_numpy(np.stack([b[2] for b in batch]))
        optimiser.zero_grad(set_to_none=True)
        loss = masked_loss(network(image), labels, weight)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            record = {"step": step, "loss": float(np.mean(losses)), "lr": optimiser.param_groups[0]["lr"],
                      "seconds": round(time.monotonic() - start, 1)}
            history.append(record)
            losses = []
            log.info("step %(step)d loss %(loss).4f lr %(lr).2e %(seconds).0f s", record)
        if step % 500 == 0:
            torch.save({"state_dict": network.state_dict(), "channels": args.channels}, out / "checkpoint.pt")
    network.eval()
    seconds = round(time.monotonic() - start, 1)
    torch.save({"state_dict": network.state_dict(), "channels": args.channels}, out / "checkpoint.pt")
    from .export import compare_with_torch, export_onnx

    onnx_path = out / "musclenode-lumbar-vertebrae.onnx"
    export_onnx(network, onnx_path, WINDOW)
    difference = compare_with_torch(network, onnx_path, (2, 1, 224, 160))
    summary = {
        "command": "python -m inference.training.vertebrae " + " ".join(argv if argv is not None else sys.argv[1:]),
        "subjects_trained": train_names, "subjects_held_out": held_names,
        "network": {"architecture": "monai.networks.nets.UNet", "spatial_dims": 2, "in_channels": 1,
                    "out_channels": len(CLASS_NAMES) + 1, "channels": list(args.channels),
                    "strides": [2] * (len(args.channels) - 1), "num_res_units": 1, "norm": "instance",
                    "parameters": parameters},
        "steps": step, "batch_size": args.batch_size, "seconds": seconds, "minutes": round(seconds / 60, 1),
        "optimiser": f"AdamW lr {args.learning_rate} weight decay 1e-4, warm-up then cosine on time",
        "loss": "cross-entropy + soft Dice (foreground, batch-pooled), both masked to voxels of known label",
        "seed": args.seed, "threads": args.threads,
        "hardware": f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s), no GPU",
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "onnx_vs_torch_max_abs_difference": difference,
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    log.info("done: %d steps in %.0f s; ONNX difference %.2e", step, seconds, difference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
