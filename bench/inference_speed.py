"""Inference speed: the node's runtime against MuscleMap's default settings, measured in the same run.

On the real 29-slice water series (MyoSegmenTUM, 400 x 400 x 29):

* **MuscleMap abdomen architecture** (``../shared/data/musclemap``; weights: ``torch.manual_seed(0)``,
  MuscleMap's trained weights are not available here, and the time does not depend on them):
  the node's runtime with the imported card (ONNX Runtime, the card's overlap) against
  MuscleMap's own pipeline at its defaults (:func:`inference.musclemap.reference_segmentation`:
  MONAI ``SliceInferer``, overlap 0.9, one window per call, torch), with the same number of
  threads. MuscleMap's default takes about 11 minutes for the 29 slices on 2 cores, so both sides
  are timed on the same fixed subset of slices (``--subset``) and MuscleMap's time per series is
  extrapolated from it (``--full`` runs all 29).
* **Bundled model** (``inference/models/musclenode-lumbar-dixon``, if installed): the node's
  runtime as its card says against the same network with MuscleMap's default settings
  (MONAI ``sliding_window_inference`` per slice, overlap 0.9, batch 1, torch) on the same
  canonical slices, all 29; and the fraction of labelled voxels whose label differs between the
  two. The torch network comes from the training checkpoint (``--checkpoint``); without one the
  reference is the ONNX model in ONNX Runtime at overlap 0.9, batch 1, and the output says so.

Every side runs in its own process so that the peak resident memory (VmHWM) printed for each
is its own. Times exclude reading the files and opening the model. The machine is shared, and
torch's spinning threads slow down far more than ONNX Runtime's when another process takes a
core, so the sides alternate over several rounds (``--rounds``) and the medians are compared;
the load average is printed at the start and the end.

    python -m bench.inference_speed [--threads N] [--subset 12:16] [--rounds 3] [--full]
        [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
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

ABDOMEN = studies.DATA_DIR / "musclemap" / "contrast_agnostic_abdomen_model.json"
BUNDLED = REPO / "inference" / "models" / "musclenode-lumbar-dixon.json"
DEFAULT_CHECKPOINT = REPO / "build" / "bundled" / "checkpoint.pt"  # where inference.training.bundled trains


# ---------------------------------------------------------------------------------------------
# Workers (one process each)
# ---------------------------------------------------------------------------------------------


def _read_water(dicom_dir: str, subset: list[int] | None):
    from inference.geometry import SeriesImage, group_stacks, read_series

    files = sorted(Path(dicom_dir).rglob("*.dcm"))
    series = read_series(files)
    if subset is None:
        return series
    order = series.stacks[0]  # the one stack, ascending along its normal: NIfTI slice order
    keep = [order[k] for k in subset]
    frames = [series.frames[i] for i in keep]
    geometry = [series.geometry[i] for i in keep]
    return SeriesImage(frames=tuple(frames), geometry=tuple(geometry), stacks=group_stacks(geometry),
                       series_instance_uid=series.series_instance_uid,
                       frame_of_reference_uid=series.frame_of_reference_uid, sop_class_uid=series.sop_class_uid,
                       study=series.study)


def _peak_mb() -> float:
    """Peak resident memory of this process (MB).

    VmHWM rather than ``ru_maxrss``: Linux carries ``ru_maxrss`` over ``fork`` and ``execve``,
    so a worker would report at least its parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _ours(job: dict[str, Any]) -> dict[str, Any]:
    from inference.card import ModelCard
    from inference.runtime import Segmenter

    series = _read_water(job["dicom"], job.get("subset"))
    card = ModelCard.load(job["card"])
    if job.get("overlap") is not None:
        card = dataclasses.replace(card, overlap=float(job["overlap"]))
    segmenter = Segmenter(card, providers="cpu", threads=job["threads"], batch_size=job.get("batch_size", 4))
    segmenter.segment_slice(series.frames[0], series.geometry[0])  # warm-up: first-call allocations
    started = time.perf_counter()
    label_map = segmenter.segment(series)
    seconds = time.perf_counter() - started
    np.save(job["labels"], np.stack(label_map.labels))
    return {"seconds": seconds, "frames": len(series)}


def _torch_default(job: dict[str, Any]) -> dict[str, Any]:
    """The bundled network in torch, windows as MuscleMap's defaults place them, the node's pre/post."""
    import torch
    from monai.inferers import sliding_window_inference

    from inference.card import ModelCard
    from inference.runtime import Segmenter
    from inference.training.train import NetworkConfig, build_network

    torch.set_num_threads(job["threads"])
    checkpoint = torch.load(job["checkpoint"], map_location="cpu", weights_only=True)
    shape = checkpoint["network"]
    network = build_network(NetworkConfig(channels=tuple(shape["channels"]), res_units=shape["num_res_units"],
                                          classes=shape["out_channels"], in_channels=shape["in_channels"]))
    network.load_state_dict(checkpoint["state_dict"])
    network.eval()
    card = ModelCard.load(job["card"])

    class TorchDefault(Segmenter):
        def _windows(self, normalised: np.ndarray, box: tuple[slice, slice]) -> np.ndarray:
            image = torch.from_numpy(np.ascontiguousarray(normalised[(slice(None),) + box][None]))
            with torch.inference_mode():
                scores = sliding_window_inference(image, roi_size=tuple(card.window), sw_batch_size=1,
                                                  predictor=network, overlap=0.9, mode="gaussian",
                                                  sigma_scale=card.sigma_scale)
            return scores[0].numpy()

    series = _read_water(job["dicom"], job.get("subset"))
    segmenter = TorchDefault(card, providers="cpu", threads=job["threads"])
    started = time.perf_counter()
    label_map = segmenter.segment(series)
    seconds = time.perf_counter() - started
    np.save(job["labels"], np.stack(label_map.labels))
    return {"seconds": seconds, "frames": len(series)}


def _musclemap_default(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from inference.musclemap import build_network, load_config, load_state_dict, reference_segmentation

    torch.set_num_threads(job["threads"])
    config = load_config(job["config"])
    network = build_network(config)
    network.load_state_dict(load_state_dict(job["checkpoint"]))
    started = time.perf_counter()
    labels = reference_segmentation(job["nifti"], network, config, overlap=job.get("overlap", 0.9), sw_batch_size=1)
    seconds = time.perf_counter() - started
    np.save(job["labels"], labels)
    return {"seconds": seconds, "frames": int(labels.shape[-1])}


_WORKERS = {"ours": _ours, "torch-default": _torch_default, "musclemap-default": _musclemap_default}


def _run_worker(kind: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run one side in a fresh process and return its timing and peak memory."""
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", "bench.inference_speed", "--worker", kind, json.dumps(job)],
                            cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def _alternate(jobs: dict[str, tuple[str, dict[str, Any]]], rounds: int) -> dict[str, dict[str, Any]]:
    """Run every job once per round, the order reversed every other round; medians of the times.

    The machine is shared: alternating spreads whatever else runs over both sides.
    """
    times: dict[str, list[float]] = {name: [] for name in jobs}
    last: dict[str, dict[str, Any]] = {}
    names = list(jobs)
    for round_ in range(rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            kind, job = jobs[name]
            result = _run_worker(kind, job)
            times[name].append(result["seconds"])
            peak = max(result["peak_mb"], last.get(name, {}).get("peak_mb", 0.0))
            last[name] = {**result, "peak_mb": peak}
    return {name: {**last[name], "seconds": statistics.median(times[name]), "all": times[name]} for name in names}


def _changed_fraction(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Fraction of voxels labelled in either map whose label differs, and how many are labelled."""
    labelled = (a != 0) | (b != 0)
    return float(np.mean(a[labelled] != b[labelled])) if labelled.any() else 0.0, int(labelled.sum())


def _times(result: dict[str, Any]) -> str:
    runs = ", ".join(f"{t:.1f}" for t in result["all"])
    return f"{result['seconds']:.1f} s (median of {runs}), peak {result['peak_mb']:.0f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inference_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="threads on both sides (default: every core)")
    parser.add_argument("--subset", default="12:16", help="slices (NIfTI k, start:stop) timed on both sides")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per comparison (medians)")
    parser.add_argument("--full", action="store_true", help="run MuscleMap's default on all 29 slices (slow)")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="training checkpoint of the bundled model (torch reference)")
    parser.add_argument("--overlap", type=float, default=0.5, help="overlap of the imported MuscleMap card")
    parser.add_argument("--skip-musclemap", action="store_true")
    parser.add_argument("--skip-bundled", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "JOB"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        out = _WORKERS[args.worker[0]](json.loads(args.worker[1]))
        print(json.dumps({**out, "peak_mb": _peak_mb()}), flush=True)
        return 0

    studies.require_data()
    from inference.runtime import available_cores

    threads = args.threads or available_cores()
    start, stop = (int(v) for v in args.subset.split(":"))
    subset = list(range(start, stop))
    series_frames = 29
    print(f"inference speed on the MyoSegmenTUM water series (400 x 400 x {series_frames}), {threads} thread(s)"
          f" on both sides, CPU, {args.rounds} alternating round(s), load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as folder:
        work = Path(folder)
        studies.write_dixon_study(work / "dicom", contrasts=("water",), seed="bench-inference")
        base = {"dicom": str(work / "dicom"), "threads": threads}
        if not args.skip_musclemap:
            _musclemap(work, base, subset, args, series_frames)
        if not args.skip_bundled:
            _bundled(work, base, args)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


def _musclemap(work: Path, base: dict[str, Any], subset: list[int], args: argparse.Namespace,
               series_frames: int) -> None:
    import nibabel as nib
    import torch

    from inference.musclemap import build_network, import_checkpoint, load_config

    config = load_config(ABDOMEN)
    torch.manual_seed(0)
    checkpoint = work / "abdomen.pth"
    torch.save(build_network(config).state_dict(), checkpoint)
    card = import_checkpoint(checkpoint, ABDOMEN, work / "models", overlap=args.overlap)
    water = nib.load(studies.MYOSEGMENTUM_DIR / "TUM01_water.nii.gz")
    nifti = work / "subset.nii.gz"
    nib.save(water.slicer[:, :, subset[0]:subset[-1] + 1], nifti)
    n = len(subset)
    print(f"\nMuscleMap abdomen architecture (UNet {config.network['channels']}, window {card.window[0]},"
          f" weights: seed 0)")
    results = _alternate({
        "ours": ("ours", {**base, "card": str(card.path), "subset": None if args.full else subset,
                          "labels": str(work / "ours.npy")}),
        "default": ("musclemap-default", {
            **base, "config": str(ABDOMEN), "checkpoint": str(checkpoint), "labels": str(work / "mm.npy"),
            "nifti": str(studies.MYOSEGMENTUM_DIR / "TUM01_water.nii.gz") if args.full else str(nifti)}),
    }, args.rounds)
    ours, default = results["ours"], results["default"]
    what = f"all {series_frames} slices" if args.full else f"slices {subset[0]}-{subset[-1]} ({n})"
    print(f"  {what}:")
    print(f"    node runtime (ONNX Runtime, overlap {card.overlap}, batch 4):             {_times(ours)}")
    print(f"    MuscleMap default (MONAI SliceInferer, overlap 0.9, batch 1, torch): {_times(default)}")
    print(f"  ratio (MuscleMap default / node runtime, same slices): {default['seconds'] / ours['seconds']:.1f}x")
    if not args.full:
        series = _alternate({"ours": ("ours", {**base, "card": str(card.path), "labels": str(work / "series.npy")})},
                            args.rounds)["ours"]
        print(f"  seconds per series ({series_frames} slices): node runtime {_times(series)};"
              f" MuscleMap default about {default['seconds'] / n * series_frames:.0f} s extrapolated from the subset"
              " (an underestimate: its crop box over 25 slices is larger than over 4)")


def _bundled(work: Path, base: dict[str, Any], args: argparse.Namespace) -> None:
    from inference.card import ModelCard

    if not BUNDLED.is_file():
        print(f"\nbundled model: {BUNDLED.relative_to(REPO)} not installed, skipped")
        return
    card = ModelCard.load(BUNDLED)
    print(f"\nbundled model {card.name} {card.version} (window {card.window[0]}, card overlap {card.overlap})")
    ours_job = ("ours", {**base, "card": str(BUNDLED), "labels": str(work / "bundled_ours.npy")})
    if args.checkpoint.is_file():
        reference = "the same network in torch, MONAI sliding_window_inference per slice, overlap 0.9, batch 1"
        default_job = ("torch-default", {**base, "card": str(BUNDLED), "checkpoint": str(args.checkpoint),
                                         "labels": str(work / "bundled_default.npy")})
    else:
        reference = (f"no torch checkpoint at {args.checkpoint}: the ONNX model in ONNX Runtime at overlap 0.9,"
                     " batch 1 stands in for MuscleMap's default settings")
        default_job = ("ours", {**base, "card": str(BUNDLED), "overlap": 0.9, "batch_size": 1,
                                "labels": str(work / "bundled_default.npy")})
    same_job = ("ours", {**base, "card": str(BUNDLED), "overlap": 0.9, "labels": str(work / "bundled_ours_09.npy")})
    results = _alternate({"ours": ours_job, "default": default_job, "same": same_job}, args.rounds)
    ours, default, same = results["ours"], results["default"], results["same"]
    default_labels = np.load(work / "bundled_default.npy")
    changed, labelled = _changed_fraction(np.load(work / "bundled_ours.npy"), default_labels)
    changed_09, _ = _changed_fraction(np.load(work / "bundled_ours_09.npy"), default_labels)
    print(f"  reference (default settings): {reference}")
    print(f"  seconds per series ({ours['frames']} slices):")
    print(f"    node runtime (ONNX Runtime, overlap {card.overlap}, batch 4): {_times(ours)}")
    print(f"    default settings:                                  {_times(default)}")
    print(f"    node runtime at overlap 0.9 (batch 4):             {_times(same)}")
    print(f"  ratio (default / node runtime): {default['seconds'] / ours['seconds']:.1f}x at overlap {card.overlap},"
          f" {default['seconds'] / same['seconds']:.1f}x at overlap 0.9")
    print(f"  labelled voxels (in either map, {labelled}) changing label against the default:"
          f" {changed:.3%} at overlap {card.overlap}, {changed_09:.3%} at overlap 0.9")


if __name__ == "__main__":
    sys.exit(main())
