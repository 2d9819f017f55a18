"""Level model: seconds added per study on this CPU.

For held-out vertebrae subjects (``../shared/data/vertebrae``, one of each data set by default)
a DICOM study is written (:func:`tests.studies.write_vertebrae_study`: a sagittal T2 series of
13 slices, 0.9 mm pixels, and an axial series of about 50-70 slices) and timed, per round:

* ``read``: reading the sagittal series (:func:`inference.geometry.read_series`);
* ``model``: :func:`inference.vertebrae.find_bodies` (resampling onto the model grid, ONNX Runtime
  with ``--threads`` threads, bodies and end plates), the session already open (it is cached per
  process, as in the node);
* ``levels``: :func:`inference.vertebrae.assign_levels` for the axial series (geometry only);
* ``total``: the three together, the time a study gains from levels (the axial series is read
  for the muscles anyway, so its reading is not counted).

It also prints how many axial slices got their true level (from the labels,
:func:`inference.training.vertebrae_eval.true_level`; slices the labels cannot tell are not counted).

The first call (opening the ONNX session) is reported separately. The machine is shared: the
median of ``--rounds`` rounds is printed with the load average at the start and the end.

    python -m bench.level_model [--subjects zukic-10,myosegmentum-07] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.card import KIND_VERTEBRAE  # noqa: E402
from inference.geometry import read_series  # noqa: E402
from inference.registry import DEFAULT_LEVEL_MODEL, load_model  # noqa: E402
from inference.training.vertebrae_eval import true_level  # noqa: E402
from inference.vertebrae import _Session, assign_levels, find_bodies  # noqa: E402
from tests import studies  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.level_model", description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", default="zukic-10,myosegmentum-07")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    card = load_model(DEFAULT_LEVEL_MODEL, kind=KIND_VERTEBRAE)
    print(f"model {card.name} {card.version}, {card.onnx_path.stat().st_size / 1e6:.1f} MB, "
          f"{args.threads} ONNX Runtime threads; load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        for subject in args.subjects.split(","):
            studies.require_data(studies.vertebrae_files(subject))
            study, volume = studies.write_vertebrae_study(Path(tmp) / subject, subject, seed=f"bench/{subject}",
                                                          axial=("straight",))
            axial = read_series(study.series["axial_straight"].files)
            _Session._cache.clear()
            start = time.perf_counter()
            first = find_bodies(read_series(study.series["sagittal"].files), card, threads=args.threads)
            cold = time.perf_counter() - start
            times: dict[str, list[float]] = {"read": [], "model": [], "levels": [], "total": []}
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                sagittal = read_series(study.series["sagittal"].files)
                t1 = time.perf_counter()
                reference = find_bodies(sagittal, card, threads=args.threads)
                t2 = time.perf_counter()
                levels = assign_levels(reference, axial)
                t3 = time.perf_counter()
                for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                    value and times[key].append(value)
            frame = sagittal.geometry[0]
            truths = [true_level(volume, g) for g in axial.geometry]
            right = sum(level == truth for level, (truth, known) in zip(levels.levels, truths) if known)
            known = sum(known for _, known in truths)
            print(f"{subject}: sagittal {len(sagittal)} x {frame.rows} x {frame.columns}, axial {len(axial)} slices; "
                  f"bodies {', '.join(first.names)}; {sum(l is not None for l in levels.levels)} axial slices with a level, "
                  f"{right}/{known} at their true level")
            print("  median s: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in times.items())
                  + f"; first call with session opening {cold:.2f} s")
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
