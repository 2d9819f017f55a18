"""The recipe of the bundled default model ``musclenode-lumbar-dixon``.

Usage::

    python -m inference.training.bundled [--data ../shared/data/myosegmentum] [--work build/bundled]
        [--install]

Trains with :mod:`.train` on the one labelled MyoSegmenTUM subject with the hold-out, seed and
card texts below, and with ``--install`` copies the ONNX file and its card into
``inference/models/``. Kept as code so that the bundled model can be rebuilt exactly as it was
made, and so that its card states how.

Hold-out: slices 12-15 (a contiguous 16 mm block in the middle of L2-L5) and 4, 8, 20, 24
(single slices, 16 mm apart from each other and from the block). Neighbouring 4 mm slices look
alike, so a lone held-out slice sits between two trained ones and gives an optimistic number;
the contiguous block is stricter, its middle slices being 8 mm from anything trained on. Both
are reported. Neither says how the model does on another subject: there is only one labelled
subject here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

from . import train

__all__ = ["CARD_INFO", "HOLDOUT", "NAME", "PREVIOUS_VERSION", "VERSION", "main", "previous_card", "train_arguments"]

NAME = "musclenode-lumbar-dixon"
VERSION = "2.0.0"
#: The version 2 starts from, kept beside it in ``inference/models/`` for comparison.
PREVIOUS_VERSION = "1.0.0"
HOLDOUT = ("contiguous=12-15", "interleaved=4,8,20,24")
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "myosegmentum"

CARD_INFO = {
    "licence": (
        "Model weights and card: Apache-2.0, as the musclenode project. Training data: subject TUM01 "
        "of the MyoSegmenTUM spine database (Burian et al. 2019, originally published at "
        "https://osf.io/3j54b/), cropped to L2-L5 with multifidus and erector spinae labels, as "
        "redistributed under Apache-2.0 in https://github.com/johnnydfci/LPM_Segmentator. The "
        "terms of the original OSF database were not verified for this card; check them before "
        "redistributing the model outside this project."
    ),
    "provenance": {
        "data": "MyoSegmenTUM spine, subject TUM01 (one healthy adult), chemical-shift-encoded "
                "water-fat MRI, 400 x 400 x 29 voxels, 1.0185 x 1.0185 x 4 mm axial, cropped to L2-L5; "
                "T1-, T2- and PD-like inputs synthesised from its water and fat images",
        "data_source": "https://github.com/johnnydfci/LPM_Segmentator (Apache-2.0)",
        "reference": "Burian E, et al. Lumbar muscle and vertebral bodies segmentation of chemical "
                     "shift encoding-based water-fat MRI: the reference database MyoSegmenTUM spine. "
                     "BMC Musculoskelet Disord 2019;20:152",
        "labels": "manual labels as distributed there; values assigned to sides from their "
                  "centroids in patient space (1 right erector spinae, 2 right multifidus, "
                  "3 left multifidus, 4 left erector spinae), checked by the training script",
        "geometry": "water image's qform (the label file has no sform; fat and label qforms "
                    "differ from water's only by a translation and by 2e-5 in pixdim)",
        "recipe": "python -m inference.training.bundled",
    },
    "accuracy_note": (
        "Measured on slices of the training subject that were never trained on: a contiguous "
        "block (slices 12-15, 16 mm; the stricter test, its inner slices 8 mm from any trained "
        "slice) and interleaved single slices (4, 8, 20, 24; optimistic, each between trained "
        "neighbours 4 mm away). Water, fat and in_phase are the real Dixon images; t1, t2 and pd "
        "are SYNTHETIC images drawn from the same water and fat images with fixed seeds "
        "(synthetic_inputs; inference.training.synthetic.test_volume), not images from a "
        "scanner. Same subject, scanner and session as the training data: this says the model "
        "learnt the anatomy of this subject and copes with contrast changes of the synthetic "
        "kind, not how it does on other subjects (not measured: only one labelled subject "
        "exists here; the project's field notes report Dice about 0.84-0.89 on another "
        "MyoSegmenTUM subject for version 1's recipe) nor on real T1- or T2-weighted TSE "
        "images (not measured: none with labels exist here)."
    ),
    "training": {
        "purpose": "default model so that a node works out of the box on Dixon, T1- and "
                   "T2-weighted axial lumbar series; retrain on more subjects "
                   "(python -m inference.training.train) for real use",
        "limitations": [
            "one subject: not shown to work on other subjects (only one labelled subject exists "
            "here); weak on slices beyond L2-L5 (sacrum, iliac crest, thoracolumbar junction), "
            "not shown to work on other levels than L2-L5",
            "T1 and T2: trained and measured on synthetic T1-, T2- and PD-like images made from "
            "Dixon water and fat images (tissue classes with random intensities); not shown to "
            "work on real T1 or real T2 TSE images from scanners: their chemical-shift and flow "
            "artefacts, dark cortical bone and ligaments, fat-suppressed variants (STIR, T2 FS) "
            "and vendor filters were not simulated beyond what the water image shows",
            "healthy adult only: not shown to work on pathology (fatty atrophy, scoliosis, "
            "post-operative anatomy, implants)",
            "psoas major and quadratus lumborum are not labelled and are segmented as background",
            "started from version 1.0.0's weights and stopped by a time limit: a rerun on a "
            "machine under another load trains for another number of steps, so it reproduces "
            "the recipe, not the exact weights",
        ],
    },
}


def previous_card() -> Path:
    """The card of version 1.0.0, kept in ``inference/models/`` as ``NAME-1.0.0.json``."""
    return MODELS_DIR / f"{NAME}-{PREVIOUS_VERSION}.json"


def train_arguments(data: Path, work: Path) -> list[str]:
    """Arguments of :func:`.train.main` that produce the bundled model (version 2).

    Version 2 starts from version 1's weights (same network) and trains on Dixon input (40 % of
    samples) and synthetic T1-, T2-, PD-like input (60 %), with simulated slice thickness,
    in-plane resolution, field of view, noise, bias field, ghosting and Gibbs ringing.
    Version 1 was trained with ``--epochs 180 --learning-rate 2e-3 --threads 2 --time-limit-min
    32`` from random weights on Dixon input only (its card holds the full command).
    """
    return [
        "--data", str(data), "--out", str(work),
        "--epochs", "180", "--samples-per-epoch", "512", "--batch-size", "16",
        "--window", "160", "160",
        "--channels", "16", "32", "64", "128", "256", "--res-units", "2",
        "--contrast-weights", "0.5", "0.25", "0.25",
        "--synthetic-weights", "0.35", "0.4", "0.25", "--synthetic-prob", "0.6", "--degrade",
        "--init-card", str(previous_card()),
        "--learning-rate", "1e-3", "--seed", "20240613", "--threads", "1",
        "--time-limit-min", "45",
        *[a for spec in HOLDOUT for a in ("--holdout", spec)],
        "--name", NAME, "--version", VERSION,
        "--card-info", str(work / "card-info.json"),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.training.bundled", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding TUM01_*.nii.gz")
    parser.add_argument("--work", type=Path, default=Path("build/bundled"), help="training output folder")
    parser.add_argument("--install", action="store_true", help=f"copy the model and card into {MODELS_DIR}")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "card-info.json").write_text(json.dumps(CARD_INFO, indent=2) + "\n")
    status = train.main(train_arguments(args.data, args.work))
    if status == 0 and args.install:
        MODELS_DIR.mkdir(exist_ok=True)
        for suffix in (".onnx", ".json"):
            shutil.copyfile(args.work / f"{NAME}{suffix}", MODELS_DIR / f"{NAME}{suffix}")
        print(f"installed {NAME} {VERSION} into {MODELS_DIR}")
    return status


if __name__ == "__main__":
    sys.exit(main())
