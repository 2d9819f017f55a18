"""CPU seconds per study before and after the runtime's tuning, and how far the labels moved.

One real Dixon study (water and fat from the MyoSegmenTUM volumes, 29 slices of 400 x 400) goes
through the whole pipeline (:func:`reports.pipeline.run`: read, segment, measure, SEG, SR,
summary) in a process of its own per configuration:

* **untuned**: :data:`inference.runtime.UNTUNED`, the runtime before the tuning (windows over
  the whole canonical grid, spinning ONNX Runtime threads, the model's PRelu as exported, four
  windows a call, probabilities resampled over the whole frame);
* **tuned**: the default :class:`inference.runtime.Tuning` (body crop, no spinning, PRelu run as
  LeakyRelu, one window a call, probabilities resampled only where a muscle can win);
* with ``--quantised`` also **tuned + int8**: the same with the card's model quantised to int8
  by ONNX Runtime's static QDQ quantisation, calibrated on the windows of this very study (the
  most favourable calibration there can be).

each with 1 and with 2 ONNX Runtime threads (``--threads``). A worker runs the study once to
warm up (imports, first allocations: a cohort worker pays them once), then ``--studies`` times;
the CPU seconds are the process's (all its threads) per study, for the whole pipeline and for
the segmentation alone. The configurations alternate over ``--rounds`` and the medians are
compared. The machine is shared: CPU seconds are what a study costs whatever else runs, but a
busy machine still inflates them somewhat (caches, and spinning threads burn more while they
wait), so both columns come from the same run.

Labels: Dice per label between the tuned and the untuned runtime on all 29 slices, and each
one's Dice against the manual labels on the card's held-out slices (the allowed move is 0.005).

This is item 4 of the cohort issue; ``bench/cohort_throughput.py`` (the cohort branch) measures
studies per hour with one and two Dask workers. Run both for the issue's benchmark.

    python -m bench.study_cpu [--rounds 2] [--studies 2] [--threads 1 2] [--quantised]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import studies  # noqa: E402

CARD = REPO / "inference" / "models" / "musclenode-lumbar-dixon.json"
ALLOWED_DICE_MOVE = 0.005


# ---------------------------------------------------------------------------------------------
# Worker (one process per configuration)
# ---------------------------------------------------------------------------------------------


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _files(study: Path) -> dict[str, list[Path]]:
    by_suffix = {"W": "water", "F": "fat"}
    return {by_suffix[d.name.rsplit("_", 1)[-1]]: sorted(d.glob("*.dcm"))
            for d in sorted(study.iterdir()) if d.is_dir() and d.name.rsplit("_", 1)[-1] in by_suffix}


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    from inference.card import ModelCard
    from inference.runtime import UNTUNED, Segmenter, Tuning
    from reports.heap import settle_after_first_study
    from reports.pipeline import WorkItem, run

    card = ModelCard.load(job["card"])
    segmenter = Segmenter(card, providers="cpu", threads=job["threads"],
                          tuning=UNTUNED if job["untuned"] else Tuning())
    segment = segmenter.segment
    inference = [0.0]

    def timed(series):
        started = time.process_time()
        try:
            return segment(series)
        finally:
            inference[0] += time.process_time() - started

    segmenter.segment = timed
    item = WorkItem("dixon", _files(Path(job["study"])))
    run(item, segmenter, software_version="bench")  # warm-up
    settle_after_first_study()  # as every worker of the node and of process does after its first study
    totals, inferences = [], []
    for _ in range(job["studies"]):
        inference[0] = 0.0
        started = time.process_time()
        results = run(item, segmenter, software_version="bench")
        totals.append(time.process_time() - started)
        inferences.append(inference[0])
    np.save(job["labels"], np.stack(results.label_map.labels))
    frames = [studies.lps_to_voxel(job_affine(), g.pixel_to_lps(np.array([0.0]), np.array([0.0])))[0, 2]
              for g in results.label_map.series.geometry]
    return {"total": statistics.median(totals), "inference": statistics.median(inferences),
            "peak_mb": _peak_mb(), "slices": [int(round(k)) for k in frames]}


def job_affine() -> np.ndarray:
    return studies.load_volumes().affine


# ---------------------------------------------------------------------------------------------
# Quantised model (bench only)
# ---------------------------------------------------------------------------------------------


def quantised_card(study: Path, folder: Path) -> Path:
    """The card's model quantised to int8 (static QDQ), calibrated on this study's windows."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from inference.card import ModelCard, file_sha256
    from inference.geometry import read_series
    from inference.runtime import Segmenter

    card = ModelCard.load(CARD)
    segmenter = Segmenter(card, providers="cpu", threads=1)
    windows: list[np.ndarray] = []
    predict = segmenter._predict

    def keep(batch):
        windows.extend(batch[i:i + 1] for i in range(batch.shape[0]))
        return predict(batch)

    segmenter._predict = keep
    segmenter.segment(read_series(_files(study)["water"]))
    name = segmenter.session.get_inputs()[0].name

    class Windows(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(windows[::3])

        def get_next(self):
            window = next(self._items, None)
            return None if window is None else {name: window}

    prepared, quantised = folder / "prepared.onnx", folder / f"{card.name}-int8.onnx"
    # The quantisation tools leave temporary models in the working directory: keep them in the
    # bench's temporary folder.
    with contextlib.chdir(folder):
        quant_pre_process(str(card.onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantised), Windows(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    document = json.loads(CARD.read_text())
    document.update(onnx=quantised.name, sha256=file_sha256(quantised), version=document["version"] + "+int8")
    path = folder / f"{card.name}-int8.json"
    path.write_text(json.dumps(document, indent=2))
    return path


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    total = int(x.sum() + y.sum())
    return float("nan") if total == 0 else 2.0 * float((x & y).sum()) / total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="runs of every configuration, alternating (medians)")
    parser.add_argument("--studies", type=int, default=2, help="measured studies per run, after one warm-up")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="ONNX Runtime threads (default 1 2)")
    parser.add_argument("--quantised", action="store_true", help="also the int8-quantised model (tuned)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(_worker(job)))
        return 0
    studies.require_data()
    print(f"one Dixon study (water, fat; 29 slices of 400 x 400); {len(os.sched_getaffinity(0))} cores; "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory(prefix="musclenode-cpu-") as tmp:
        folder = Path(tmp)
        study = folder / "study"
        studies.write_dixon_study(study, seed="bench-study-cpu", contrasts=("water", "fat"))
        configs = [("untuned", CARD, True), ("tuned", CARD, False)]
        if args.quantised:
            configs.append(("tuned + int8", quantised_card(study, folder), False))
        measured: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for round_number in range(args.rounds):
            for threads in args.threads:
                for label, card, untuned in configs:
                    labels = folder / f"{label.replace(' ', '_')}-{threads}.npy"
                    job = {"card": str(card), "study": str(study), "threads": threads, "untuned": untuned,
                           "studies": args.studies, "labels": str(labels)}
                    output = subprocess.run([sys.executable, "-m", "bench.study_cpu", "--worker", json.dumps(job)],
                                            cwd=REPO, capture_output=True, text=True, check=False)
                    if output.returncode != 0:
                        raise SystemExit(f"{label}, {threads} threads failed:\n{output.stderr[-3000:]}")
                    result = json.loads(output.stdout.strip().splitlines()[-1])
                    result["labels"] = np.load(labels)
                    measured.setdefault((label, threads), []).append(result)
                    print(f"  round {round_number + 1}, {label}, {threads} thread(s): "
                          f"{result['total']:.2f} CPU s/study ({result['inference']:.2f} segmentation)")

        def median(label: str, threads: int, key: str) -> float:
            return statistics.median(r[key] for r in measured[(label, threads)])

        names = [c[0] for c in configs]
        print()
        print(f"{'CPU seconds per study':<34}" + "".join(f"{n:>16}" for n in names) + f"{'tuned/untuned':>16}")
        for threads in args.threads:
            for key, what in (("total", "whole pipeline"), ("inference", "segmentation")):
                cells = [median(n, threads, key) for n in names]
                print(f"{f'{what}, {threads} thread(s)':<34}" + "".join(f"{c:>16.2f}" for c in cells)
                      + f"{cells[1] / cells[0]:>16.2f}")
        for threads in args.threads:
            print(f"{f'peak memory (MiB), {threads} thread(s)':<34}"
                  + "".join(f"{max(r['peak_mb'] for r in measured[(n, threads)]):>16.0f}" for n in names))

        # Labels: agreement with the untuned runtime, and against the manual labels.
        volumes = studies.load_volumes()
        card = json.loads(CARD.read_text())
        held_out = sorted(k for group in card["accuracy"]["holdout_slices"].values() for k in group)
        threads = args.threads[0]
        base = measured[("untuned", threads)][-1]
        slice_of = base["slices"]
        frame_of = {k: i for i, k in enumerate(slice_of)}
        truth = np.stack([volumes.labels[:, :, k].T for k in held_out])
        values = [int(v) for v in card["output_labels"]]
        meaning = {int(v): f"{d['side'][0].upper()} {d['muscle'].replace('_', ' ')}" for v, d in card["labels"].items()}
        print(f"\nlabels ({threads} thread(s)); Dice per label: "
              + ", ".join(f"{v} {meaning[v]}" for v in values))
        manual: dict[str, list[float]] = {}
        for name in names:
            labels = measured[(name, threads)][-1]["labels"]
            manual[name] = [_dice(labels[[frame_of[k] for k in held_out]], truth, v) for v in values]
            line = f"  {name:<14} vs manual (held-out slices) " + " ".join(f"{d:.4f}" for d in manual[name])
            if name != "untuned":
                agreement = [_dice(labels, base["labels"], v) for v in values]
                moved = max(abs(a - b) for a, b in zip(manual[name], manual["untuned"]))
                line += ("; vs untuned (all slices) " + " ".join(f"{d:.4f}" for d in agreement)
                         + f"; largest move vs manual {moved:.4f} "
                         + ("(within" if moved < ALLOWED_DICE_MOVE else "(MORE than") + f" {ALLOWED_DICE_MOVE})")
            print(line)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
