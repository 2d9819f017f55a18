"""Vertebral levels: time to draw the summary pages of a study with eight levels.

Two cases, each measured and assessed once, then drawn with :func:`reports.render.render_pages`
``--rounds`` times (median wall seconds printed, with the page count):

* **synthetic**: the 29-image Dixon stack of ``tests/test_summary.py`` with eight levels L1-L2 to
  L5 (:data:`tests.test_summary.EIGHT_LEVELS`) and the four discs' key slices;
* **TUM01** (when the data is there, ``MUSCLENODE_TEST_DATA``): the real study's 29 slices with
  their manual labels, the same eight levels spread over its head-foot range by height.

``--save FOLDER`` writes each case's pages as PNG files there.

    python -m bench.summary_levels [--rounds 3] [--save /tmp/pages]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from inference.geometry import LabelMap, read_series  # noqa: E402
from inference.patient import from_dataset  # noqa: E402
from reports.assessment import assess  # noqa: E402
from reports.levels import levels_by_height  # noqa: E402
from reports.metrics import FatSource, measure  # noqa: E402
from reports.render import render_pages  # noqa: E402
from tests import studies  # noqa: E402
from tests.test_metrics import MEANING  # noqa: E402
from tests.test_summary import EIGHT_KEYS, EIGHT_LEVELS, _levelled_study  # noqa: E402

#: Eight levels, head to foot, over a fraction of a study's head-foot range each (sums to 1).
_SHARES = (("L1-L2", 0.1), ("L2", 0.15), ("L2-L3", 0.07), ("L3", 0.17), ("L3-L4", 0.07), ("L4", 0.17),
           ("L4-L5", 0.07), ("L5", 0.2))


def _tum01(folder: Path):
    """The real TUM01 study, its manual labels and eight levels by height; None without the data."""
    try:
        studies.require_data()
    except Exception:  # the data is not on this machine
        return None
    study = studies.write_dixon_study(folder, contrasts=("water", "fat"))
    series = {role: read_series(info.files) for role, info in study.series.items()}
    water = series["water"]
    volumes = studies.load_volumes()
    first = water.geometry[water.stacks[0][0]].position[2]
    step = water.stack_offsets(0)[1] - water.stack_offsets(0)[0]
    labels = tuple(volumes.labels[:, :, int(round((g.position[2] - first) / step))].T.astype(np.uint8)
                   for g in water.geometry)
    label_map = LabelMap(water, labels, MEANING)
    heights = [g.centre[2] for g in water.geometry]
    top, bottom = max(heights) + 1.0, min(heights) - 1.0
    ranges, keys, upper = {}, {}, top
    for name, share in _SHARES:
        lower = upper - share * (top - bottom)
        ranges[name] = (lower + 1e-3, upper)
        if "-" in name:
            middle = (lower + upper) / 2
            keys[name] = min(range(len(heights)), key=lambda i: abs(heights[i] - middle))
        upper = lower
    metrics = measure(label_map, FatSource(water=water, fat=series["fat"]), level_of=levels_by_height(ranges),
                      key_frames=keys)
    patient = from_dataset({})
    return label_map, assess(metrics, patient), patient


def _time(label_map, assessments, patient, rounds: int):
    times, pages = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        pages = render_pages(label_map, assessments, patient, model_name="bench", model_version="0",
                             software_version="bench")
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, pages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--save", type=Path, default=None)
    args = parser.parse_args(argv)
    synthetic = _levelled_study(EIGHT_LEVELS, EIGHT_KEYS)
    cases = {"synthetic": (synthetic.label_map, synthetic.assessments, synthetic.patient)}
    with tempfile.TemporaryDirectory() as folder:
        real = _tum01(Path(folder))
        if real is not None:
            cases["TUM01"] = real
        # The first drawing loads fonts and matplotlib's modules: not counted.
        render_pages(*cases["synthetic"][:2], cases["synthetic"][2], model_name="bench", model_version="0",
                     software_version="bench")
        for name, (label_map, assessments, patient) in cases.items():
            median, times, pages = _time(label_map, assessments, patient, args.rounds)
            levels = sorted({a.metrics.level for a in assessments} - {"all"})
            print(f"{name:10s} {len(levels)} levels, {len(pages)} pages: median {median:.2f} s "
                  f"({', '.join(f'{t:.2f}' for t in times)})")
            if args.save is not None:
                from PIL import Image

                args.save.mkdir(parents=True, exist_ok=True)
                for number, page in enumerate(pages, start=1):
                    Image.fromarray(page.pixels).save(args.save / f"{name}_page{number}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
