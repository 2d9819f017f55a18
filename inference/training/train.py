"""Train a MONAI 2D UNet on NIfTI image and label pairs, export it to ONNX and measure it.

Usage::

    python -m inference.training.train --data DIR --out DIR [--epochs N]
        [--holdout contiguous=12-15 --holdout interleaved=4,8,20,24] [--window 160 160] ...

``DIR`` holds cases as :func:`.data.find_cases` reads them. Slices are laid out as the card will
say (rows towards posterior, columns towards the patient's left, 1 mm in-plane), each training
sample is one augmented window (:mod:`.augment`). Held-out slices never enter training nor any
choice made during it: the model trained for the set number of steps is the one exported, and
the held-out slices are then measured through the exported ONNX file (:mod:`.evaluate`) for
every contrast. ``OUT`` receives ``NAME.onnx``, its card ``NAME.json``, ``checkpoint.pt`` and
``history.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.losses import DiceCELoss
from monai.utils import set_determinism

from inference.card import LabelInfo

from . import evaluate, export, synthetic
from .augment import neighbour_key, training_transforms
from .data import (
    MYOSEGMENTUM_LABELS,
    Case,
    check_label_sides,
    find_cases,
    labelled_slices,
    parse_slices,
    prepare_image,
    prepare_labels,
    side_swap,
)
from .network import NetworkConfig, build_network

__all__ = ["NetworkConfig", "build_network", "main", "training_items"]

log = logging.getLogger("inference.training")

ARRAY_AXES = ("P", "L")
SPACING_MM = (1.0, 1.0)


def training_items(cases: Sequence[Case], held_out: set[int], neighbours: bool = False) -> list[dict]:
    """One item per labelled, not held-out slice: every contrast, labels and crop indices.

    With ``neighbours``, the slices before and after (``neighbour_key(contrast, "prev"/"next")``)
    come too, for simulating thicker slices; a neighbour that is held out or outside the volume
    is replaced by the slice itself, so no held-out image enters training.
    """
    items = []
    for case in cases:
        for index in labelled_slices(case):
            if index in held_out:
                continue
            label = prepare_labels(case, index, SPACING_MM)
            images = {c: prepare_image(case, c, index, SPACING_MM)[None] for c in case.images}
            if neighbours:
                for side, other in (("prev", index - 1), ("next", index + 1)):
                    if 0 <= other < case.slices and other not in held_out:
                        for c in case.images:
                            images[neighbour_key(c, side)] = prepare_image(case, c, other, SPACING_MM)[None]
            body = np.any([im[0] != 0 for im in images.values()], axis=0)
            items.append({
                **images,
                "label": label[None].astype(np.float32),
                "fg": np.flatnonzero(label > 0),
                "bg": np.flatnonzero(body & (label == 0)),
                "array_axes": case.layout.array_axes,
            })
    return items


def _parse_holdout(specs: Sequence[str], count: int) -> dict[str, list[int]]:
    groups = {}
    for number, spec in enumerate(specs, 1):
        name, _, slices = spec.rpartition("=")
        groups[name or f"holdout{number}"] = parse_slices(slices, count)
    return groups


def _load_labels(path: str | None) -> dict[int, LabelInfo]:
    if path is None:
        return dict(MYOSEGMENTUM_LABELS)
    raw = json.loads(Path(path).read_text())
    return {int(k): LabelInfo(**v) for k, v in raw.items()}


def _learning_rate(base: float, progress: float, warmup: float = 0.03) -> float:
    """Linear warm-up, then cosine decay to zero at ``progress`` 1."""
    if progress < warmup:
        return base * max(progress / warmup, 0.01)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def fit(network: torch.nn.Module, loader: DataLoader, epochs: int, learning_rate: float,
        time_limit_s: float | None, history: list[dict]) -> dict:
    """Train with AdamW and a cosine schedule; stop early only if the time limit comes first.

    The schedule runs on progress = the larger of the fractions of steps and of time used, so a
    run slowed by a busy machine still anneals before its time limit instead of stopping at a
    high learning rate.
    """
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    optimiser = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-4)
    total = epochs * len(loader)
    start = time.monotonic()
    step = 0
    progress = 0.0
    network.train()
    for epoch in range(1, epochs + 1):
        losses = []
        for batch in loader:
            elapsed = time.monotonic() - start
            progress = max(step / total, elapsed / time_limit_s if time_limit_s else 0.0)
            if progress >= 1.0:
                break
            for group in optimiser.param_groups:
                group["lr"] = _learning_rate(learning_rate, progress)
            optimiser.zero_grad(set_to_none=True)
            # Plain tensors: MetaTensor bookkeeping through the network only costs time here.
            image, label = _plain(batch["image"]), _plain(batch["label"])
            loss = loss_fn(network(image), label)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            step += 1
        record = {"epoch": epoch, "steps": step, "loss": float(np.mean(losses)) if losses else None,
                  "lr": optimiser.param_groups[0]["lr"], "seconds": round(time.monotonic() - start, 1)}
        history.append(record)
        log.info("epoch %(epoch)d  step %(steps)d  loss %(loss).4f  lr %(lr).2e  %(seconds).0f s", record)
        if progress >= 1.0:
            break
    network.eval()
    return {"epochs_completed": history[-1]["epoch"] if history else 0, "steps": step,
            "seconds": round(time.monotonic() - start, 1), "stopped_by_time_limit": step < total}


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inference.training.train", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="folder of <case>_<contrast>.nii.gz and <case>_labels.nii.gz")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--samples-per-epoch", type=int, default=512, help="augmented windows per epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--holdout", action="append", default=[], metavar="[NAME=]SLICES",
                        help="slices of every case never trained on, e.g. contiguous=12-15; repeatable")
    parser.add_argument("--window", type=int, nargs=2, default=[160, 160])
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--res-units", type=int, default=2)
    parser.add_argument("--contrast-weights", type=float, nargs=3, default=[0.5, 0.25, 0.25],
                        metavar=("WATER", "FAT", "IN_PHASE"), help="probability of each input contrast")
    parser.add_argument("--synthetic-weights", type=float, nargs=3, metavar=("T1", "T2", "PD"),
                        help="also train on synthetic T1-, T2-, PD-like images from water and fat, "
                             "with these relative probabilities (needs water and fat images)")
    parser.add_argument("--synthetic-prob", type=float, default=0.6,
                        help="probability that a sample is synthetic rather than a Dixon contrast")
    parser.add_argument("--degrade", action="store_true",
                        help="simulate other acquisitions: slice thickness 3-8 mm, in-plane 1-2 mm, "
                             "field of view, ghosting, Gibbs ringing, Rician noise, bias field")
    parser.add_argument("--init-card", help="start from the weights of this model card's ONNX file "
                                             "(same network shape) instead of random weights")
    parser.add_argument("--contrasts", nargs="+",
                        help="contrasts the card lists (default: water fat in_phase, plus t1 t2 with "
                             "--synthetic-weights)")
    parser.add_argument("--labels-json", help="label value -> {muscle, side}; default: MyoSegmenTUM's")
    parser.add_argument("--seed", type=int, default=20240612)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="data loader processes")
    parser.add_argument("--time-limit-min", type=float, help="stop (annealed) after this many minutes")
    parser.add_argument("--name", default="model")
    parser.add_argument("--version", default="0.0.0")
    parser.add_argument("--card-info", help="JSON with licence, provenance and training notes for the card")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)

    labels = _load_labels(args.labels_json)
    swap = side_swap(labels)
    cases = find_cases(args.data, ARRAY_AXES)
    count = min(case.slices for case in cases)
    holdout = _parse_holdout(args.holdout, count)
    held_out = {i for group in holdout.values() for i in group}
    for case in cases:
        check_label_sides(case.labels, case.affine, labels)
    items = training_items(cases, held_out, neighbours=args.degrade)
    if not items:
        raise SystemExit("no training slices left after the hold-out")
    log.info("%d cases, %d training slices, held out %s", len(cases), len(items), holdout)

    weights = dict(zip(("water", "fat", "in_phase"), args.contrast_weights))
    synthetic_weights = (dict(zip(synthetic.SYNTHETIC_CONTRASTS, args.synthetic_weights))
                         if args.synthetic_weights else None)
    transforms = training_transforms(
        args.window, swap, {k: v for k, v in weights.items() if v > 0},
        synthetic_weights={k: v for k, v in synthetic_weights.items() if v > 0} if synthetic_weights else None,
        synthetic_prob=args.synthetic_prob, degrade=args.degrade)
    transforms.set_random_state(seed=args.seed)
    samples = [items[i % len(items)] for i in range(args.samples_per_epoch)]
    loader = DataLoader(Dataset(samples, transforms), batch_size=args.batch_size, shuffle=True,
                        num_workers=args.workers, drop_last=True)

    config = NetworkConfig(tuple(args.channels), args.res_units, classes=len(labels) + 1)
    network = build_network(config)
    init = None
    if args.init_card:
        from inference.card import ModelCard

        from .onnx_weights import network_from_onnx

        base = ModelCard.load(args.init_card)
        network, base_config, init_difference = network_from_onnx(base)
        if tuple(base_config.channels) != config.channels or base_config.res_units != config.res_units \
                or base_config.classes != config.classes:
            raise SystemExit(f"--init-card {args.init_card}: its network {base_config} is not {config}")
        init = {"card": f"{base.name} {base.version}", "sha256": base.sha256,
                "onnx_to_torch_max_abs_difference": init_difference}
        log.info("starting from %s %s (ONNX to torch difference %.2e)", base.name, base.version, init_difference)
    history: list[dict] = []
    limit = args.time_limit_min * 60 if args.time_limit_min else None
    outcome = fit(network, loader, args.epochs, args.learning_rate, limit, history)
    torch.save({"state_dict": network.state_dict(), "network": config.as_dict()}, out / "checkpoint.pt")
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")

    onnx_path = out / f"{args.name}.onnx"
    export.export_onnx(network, onnx_path, args.window)
    difference = export.compare_with_torch(network, onnx_path, (2, 1, args.window[0] + 32, args.window[1]))
    log.info("exported %s; ONNX Runtime vs torch max abs difference %.2e", onnx_path, difference)

    info = json.loads(Path(args.card_info).read_text()) if args.card_info else {}
    parameters = sum(p.numel() for p in network.parameters())
    training = {
        **info.get("training", {}),
        "command": "python -m inference.training.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cases": [case.name for case in cases],
        "slices_trained": len(items),
        "holdout": holdout,
        "network": {**config.as_dict(), "parameters": parameters},
        "input": {"array_axes": list(ARRAY_AXES), "spacing_mm": list(SPACING_MM),
                  "normalisation": "zscore_nonzero per slice"},
        "contrast_weights": weights,
        **({"synthetic": {"weights": synthetic_weights, "probability": args.synthetic_prob,
                          "tissue_ranges": synthetic.TISSUE_RANGES}} if synthetic_weights else {}),
        **({"initial_weights": init} if init else {}),
        "augmentation": _augmentation_summary(bool(synthetic_weights), args.degrade),
        "loss": "DiceCELoss (softmax, Dice without background, batch Dice)",
        "optimiser": f"AdamW lr {args.learning_rate} weight decay 1e-4, warm-up then cosine",
        "epochs": args.epochs, "samples_per_epoch": args.samples_per_epoch, "batch_size": args.batch_size,
        **outcome,
        "minutes": round(outcome["seconds"] / 60, 1),
        "seed": args.seed,
        "hardware": f"{_cpu_name()}, {args.threads} torch threads, no GPU",
        "software": {"torch": torch.__version__, "monai": _version("monai"), "python": platform.python_version()},
        "onnx_vs_torch_max_abs_difference": difference,
    }
    contrasts = args.contrasts or (["water", "fat", "in_phase", "t1", "t2"] if synthetic_weights
                                   else ["water", "fat", "in_phase"])
    card = export.write_card(
        out / f"{args.name}.json", onnx_path, name=args.name, version=args.version, labels=labels,
        window=args.window, array_axes=ARRAY_AXES, spacing_mm=SPACING_MM, contrasts=contrasts,
        licence=info.get("licence", ""), provenance=info.get("provenance", {}), training=training,
        accuracy={})

    if holdout:
        accuracy = evaluate.holdout_accuracy(card, cases, holdout, description=info.get("accuracy_note", ""),
                                             synthetic=synthetic.SYNTHETIC_CONTRASTS if synthetic_weights else ())
        card = export.write_card(
            out / f"{args.name}.json", onnx_path, name=args.name, version=args.version, labels=labels,
            window=args.window, array_axes=ARRAY_AXES, spacing_mm=SPACING_MM, contrasts=contrasts,
            licence=card.licence, provenance=card.provenance, training=training, accuracy=accuracy)
        print(evaluate.format_accuracy(accuracy, labels))
    return 0


def _augmentation_summary(synthetic_contrasts: bool = False, degrade: bool = False) -> list[str]:
    extra = []
    if synthetic_contrasts:
        extra.append("synthetic T1-, T2-, PD-like input from water and fat (inference.training.synthetic): "
                     "tissue classes fat, muscle-like water, fluid-like water (water above 1.2-1.45 x "
                     "the slice's typical water level), background; one random intensity per class "
                     "and sample within the card's training.synthetic.tissue_ranges, mixed by fat "
                     "fraction, 20-90 % of the original texture kept")
    if degrade:
        extra.append("other acquisitions: slice thickness 3-8 mm by blending neighbouring non-held-out "
                     "slices (p 0.5), in-plane pixels 1-2 mm by low-pass, down- and up-sampling (p 0.4), "
                     "smaller field of view keeping the muscles (p 0.3), phase-encoding ghost 3-15 % "
                     "(p 0.15), Gibbs ringing (MONAI RandGibbsNoise, alpha 0.1-0.5, p 0.1), Rician noise "
                     "up to 0.15 x image SD (p 0.5), bias field up to 0.4 (p 0.4)")
    return extra + [
        "input contrast drawn per sample among water, fat, in-phase (water + fat)",
        "gamma contrast 0.6-1.6 (p 0.5), histogram shift 5-10 control points (p 0.3), "
        "bias field coefficients up to 0.3 (p 0.3), all before normalisation",
        "crop around a labelled pixel (2/3) or any body pixel (1/3)",
        "rotation +-15 degrees, scaling +-15 %, translation +-8 px (p 0.9)",
        "left-right flip along the axis the affine says runs left-right, swapping left and right "
        "label values (p 0.5)",
        "Gaussian smoothing sigma 0.25-1 px (p 0.2), intensity scaling +-10 % after normalisation (p 0.3)",
    ]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    return getattr(__import__(module), "__version__", "unknown")


if __name__ == "__main__":
    sys.exit(main())
