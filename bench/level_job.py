"""Vertebral levels: the whole job's extra time, with and without the study's sagittal series.

The real per-level study (:func:`tests.studies.write_dixon_study_with_sagittal`: the TUM01 Dixon
water and fat series, 29 slices of 400 x 400, with a sagittal series of the same subject in the
same frame of reference) goes through the whole pipeline (:func:`reports.pipeline.run`: read,
segment, quality control, levels, measure, SEG, SR, summary) in one process, alternately

* **without levels**: the work item has no level reference (the study as it was before levels);
* **with levels**: the work item carries the sagittal series, as the node's jobs do: the level
  model finds the bodies, every slice gets its level, the metrics, SR groups, planar ROIs at the
  disc key slices and summary pages grow per level.

Wall and CPU seconds (the process's, all threads) per job; the first run of each opens the ONNX
sessions and is not counted. The two alternate over ``--rounds``, and the medians and their
difference are printed: the difference is what levels add to a study (the issue's target: under
2 s on this 2-core machine). The machine is shared; both columns come from the same run.

    python -m bench.level_job [--rounds 5] [--threads 1]
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

from inference.registry import load_model  # noqa: E402
from inference.runtime import Segmenter  # noqa: E402
from reports.pipeline import WorkItem, run  # noqa: E402
from tests import studies  # noqa: E402


def _timed(item: WorkItem, segmenter: Segmenter) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    results = run(item, segmenter, software_version="bench")
    return time.perf_counter() - wall, time.process_time() - cpu, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1, as a cohort worker)")
    args = parser.parse_args(argv)
    studies.require_data()
    with tempfile.TemporaryDirectory() as folder:
        study, _ = studies.write_dixon_study_with_sagittal(Path(folder), seed="bench/level-job")
        components = {c: study.series[c].files for c in ("water", "fat")}
        without = WorkItem("dixon", components)
        with_levels = WorkItem("dixon", components, level_reference=tuple(study.series["sagittal"].files))
        segmenter = Segmenter(load_model("musclenode-lumbar-dixon"), threads=args.threads)
        load = os.getloadavg()[0]
        _timed(without, segmenter)
        _, _, results = _timed(with_levels, segmenter)  # opens the level model's session too
        levels = results.levels.as_dict()["frames"]
        times: dict[str, list[tuple[float, float]]] = {"without levels": [], "with levels": []}
        for _ in range(args.rounds):
            for name, item in (("without levels", without), ("with levels", with_levels)):
                wall, cpu, _ = _timed(item, segmenter)
                times[name].append((wall, cpu))
        print(f"study: TUM01 Dixon water + fat, 29 slices; sagittal reference 13 slices; levels of the slices {levels}")
        print(f"{args.rounds} rounds, {args.threads} ONNX Runtime thread(s), load average {load:.1f} -> "
              f"{os.getloadavg()[0]:.1f}")
        print(f"{'':16s} {'wall s':>8s} {'CPU s':>8s}")
        medians = {}
        for name, values in times.items():
            medians[name] = (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values))
            print(f"{name:16s} {medians[name][0]:8.2f} {medians[name][1]:8.2f}")
        added_wall = medians["with levels"][0] - medians["without levels"][0]
        added_cpu = medians["with levels"][1] - medians["without levels"][1]
        print(f"{'added by levels':16s} {added_wall:8.2f} {added_cpu:8.2f}  "
              f"(ratio {medians['with levels'][0] / medians['without levels'][0]:.2f}x wall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
