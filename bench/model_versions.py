"""Bundled model versions side by side: Dice per contrast on held-out slices, and CPU time per series.

For ``musclenode-lumbar-dixon`` 1.0.0 and 2.0.0 (both in ``inference/models/``), in one run:

* **Dice** per label on the held-out slices of TUM01 (contiguous 12-15, interleaved 4, 8, 20,
  24, and all eight together), for the real Dixon contrasts (water, fat, in-phase) and the fixed
  synthetic T1-, T2- and PD-like test volumes (:func:`inference.training.synthetic.test_volume`,
  seeded, so the numbers are reproducible), measured through each ONNX file as
  ``inference.training.evaluate`` does. Two harder rows follow: synthetic T2 acquired with 2 mm
  in-plane pixels, synthetic T1 with 8 mm slices (each slice blended with its neighbours,
  weights 1/4, 1/2, 1/4).
* **Time per series**: the node's runtime (:class:`inference.runtime.Segmenter`, the card's
  settings, ONNX Runtime on the CPU) segmenting the 29-slice TUM01 water series written as
  DICOM, both models alternating over ``--rounds`` rounds, medians compared (the machine is
  shared; alternating spreads other load over both). Reading files and opening the model are
  not timed; one warm-up slice is run first.

Targets of version 2 (issue 13): Dice >= 0.90 for erector spinae and multifidus on the held-out
slices of every synthetic contrast; time per series <= 1.5 x version 1.

    python -m bench.model_versions [--threads 2] [--rounds 3] [--json out.json] [--no-timing]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import studies  # noqa: E402

NAME = "musclenode-lumbar-dixon"
VERSIONS = ("1.0.0", "2.0.0")
CONTRASTS = ("water", "fat", "in_phase", "t1", "t2", "pd")
TARGET_DICE = 0.90
TARGET_TIME_RATIO = 1.5


def _card(version: str):
    from inference.registry import load_model

    card = load_model(f"{NAME}@{version}")
    card.verify()
    return card


def _thick(volume: np.ndarray, axis: int) -> np.ndarray:
    """Slices twice as thick: each slice 1/4 previous + 1/2 itself + 1/4 next (edges repeated)."""
    v = np.moveaxis(volume, axis, 0)
    prev = np.concatenate([v[:1], v[:-1]])
    nxt = np.concatenate([v[1:], v[-1:]])
    return np.moveaxis(0.25 * prev + 0.5 * v + 0.25 * nxt, 0, axis)


def _coarse(volume: np.ndarray, axis: int, factor: float) -> np.ndarray:
    from inference.training.synthetic import degrade_resolution

    v = np.moveaxis(volume, axis, 0)
    return np.moveaxis(np.stack([degrade_resolution(s, (factor, factor)) for s in v]), 0, axis)


def dice_tables(threads: int) -> dict[str, dict]:
    """``{version: {row: {group: {label: Dice}}}}`` on the held-out slices."""
    from inference.training import evaluate
    from inference.training.data import find_cases, labelled_slices

    studies.require_data()
    case = find_cases(studies.MYOSEGMENTUM_DIR)[0]
    labelled = set(labelled_slices(case))
    out: dict[str, dict] = {}
    for version in VERSIONS:
        card = _card(version)
        groups = card.accuracy["holdout_slices"]
        groups = {**groups, "all": sorted({i for s in groups.values() for i in s})}
        predictor = evaluate.SlidingWindowPredictor(card, threads=threads)
        rows = {c: evaluate.input_volume(case, c) for c in CONTRASTS}
        rows["t2 2mm in-plane"] = _coarse(rows["t2"], case.layout.slice_axis, 2.0)
        rows["t1 8mm slices"] = _thick(rows["t1"], case.layout.slice_axis)
        table = {}
        for row, volume in rows.items():
            table[row] = {}
            for group, slices in groups.items():
                chosen = [i for i in slices if i in labelled]
                scores = evaluate.evaluate_slices(predictor, volume, case.labels, case.layout, chosen)
                table[row][group] = {str(k): round(float(v), 4) for k, v in scores.items()}
        out[version] = table
    return out


def _segment_seconds(card, series, threads: int) -> float:
    from inference.runtime import Segmenter

    segmenter = Segmenter(card, providers="cpu", threads=threads)
    segmenter.segment_slice(series.frames[0], series.geometry[0])  # warm-up
    started = time.perf_counter()
    segmenter.segment(series)
    return time.perf_counter() - started


def timing(threads: int, rounds: int) -> dict[str, dict]:
    """Median seconds per 29-slice series for each version, alternating the order every round."""
    from inference.geometry import read_series

    studies.require_data()
    cards = {v: _card(v) for v in VERSIONS}
    with tempfile.TemporaryDirectory() as tmp:
        study = studies.write_dixon_study(Path(tmp), contrasts=("water",), seed="model-versions")
        series = read_series(study.series["water"].files)
        times: dict[str, list[float]] = {v: [] for v in VERSIONS}
        for round_ in range(rounds):
            for version in (VERSIONS if round_ % 2 == 0 else VERSIONS[::-1]):
                times[version].append(_segment_seconds(cards[version], series, threads))
    return {v: {"median_s": round(statistics.median(t), 3), "all_s": [round(x, 3) for x in t],
                "frames": len(series.frames)} for v, t in times.items()}


def _label_names() -> dict[str, str]:
    card = _card(VERSIONS[-1])
    return {str(v): card.labels[v].name for v in card.output_labels}


def format_dice(tables: dict[str, dict], group: str = "all") -> str:
    names = _label_names()
    header = f"| input | {' | '.join(f'{n} v1 / v2' for n in names.values())} | min v2 |"
    lines = [f"Dice on held-out slices ({group})", "", header, "|" + "---|" * (len(names) + 2)]
    for row in tables[VERSIONS[-1]]:
        cells = []
        for label in names:
            a = tables[VERSIONS[0]][row][group][label]
            b = tables[VERSIONS[-1]][row][group][label]
            cells.append(f"{a:.3f} / {b:.3f}")
        worst = min(tables[VERSIONS[-1]][row][group].values())
        lines.append(f"| {row} | {' | '.join(cells)} | {worst:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model_versions", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (medians compared)")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    tables = dice_tables(args.threads)
    for group in ("all", "contiguous", "interleaved"):
        print(format_dice(tables, group) + "\n", flush=True)
    synthetic_rows = ("t1", "t2", "pd")
    misses = [(row, label, score) for row in synthetic_rows
              for label, score in tables[VERSIONS[-1]][row]["all"].items() if score < TARGET_DICE]
    print(f"target Dice >= {TARGET_DICE} on every synthetic contrast (all held-out slices): "
          + ("met" if not misses else "missed: " + ", ".join(f"{r} label {lab} {s:.3f}" for r, lab, s in misses)))
    result = {"dice": tables}
    if not args.no_timing:
        times = timing(args.threads, args.rounds)
        ratio = times[VERSIONS[-1]]["median_s"] / times[VERSIONS[0]]["median_s"]
        for version, t in times.items():
            print(f"{NAME} {version}: {t['median_s']:.2f} s per {t['frames']}-slice series "
                  f"(median of {t['all_s']}, {args.threads} threads)")
        print(f"time ratio v2 / v1: {ratio:.2f} (target <= {TARGET_TIME_RATIO}: "
              f"{'met' if ratio <= TARGET_TIME_RATIO else 'missed'})")
        result["seconds_per_series"] = times
        result["time_ratio"] = round(ratio, 3)
        sizes = {v: _card(v).onnx_path.stat().st_size for v in VERSIONS}
        print("ONNX sizes: " + ", ".join(f"{v} {s / 2**20:.2f} MiB" for v, s in sizes.items()))
        result["onnx_bytes"] = sizes
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
