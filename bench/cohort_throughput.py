"""Cohort throughput: studies per hour of ``musclenode process`` with one and with two Dask worker
processes (the scaling ratio), CPU seconds per study and peak memory per worker, side by side.

A cohort of real Dixon studies (water and fat from the MyoSegmenTUM volumes, ``--slices`` central
slices each, one fictional patient per study) is processed once per scenario, each on a fresh
local Dask cluster of the scenario's worker processes (one task and ``threads`` ONNX Runtime
threads each) into its own output folder, so nothing is resumed. Throughput is measured over the
processing itself: studies divided by the time from the first study's start to the last one's
end, as the study records give them (cluster start-up and the file scan are left out).
CPU seconds per study are the worker process's CPU time while it ran the study; the peak memory
is each worker process's peak resident set.

Every scenario processes the same cohort, and the results of each are checked to be the same
(SEG UIDs and cohort rows), so a faster configuration cannot be faster by doing less. To compare
another runtime (say, an optimised inference), add a :class:`Scenario` with its own
``model`` (a model name in ``model.dirs`` or a card folder): its column appears beside the others.

The machine is shared: the load average is printed at the start and the end, and the cores the
workers kept busy (their CPU seconds over the wall time) show how much of the machine each
scenario was given; two workers can only scale when a second core is free for them.

    python -m bench.cohort_throughput [--studies 8] [--slices 29] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import studies  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    """One column of the result: how the cohort is processed."""

    label: str
    workers: int
    threads: int = 1
    model: str | None = None  # default: the configured model


SCENARIOS = (
    Scenario("1 worker", workers=1),
    Scenario("2 workers", workers=2),
)


@dataclass
class Measurement:
    studies: int
    makespan_s: float
    cpu_s_per_study: float
    peak_rss_mib: list[float]
    rows: str
    seg_uids: tuple[str, ...]

    @property
    def studies_per_hour(self) -> float:
        return 3600 * self.studies / self.makespan_s

    @property
    def cores_busy(self) -> float:
        """Cores the workers kept busy on average: on a shared machine, what they were given."""
        return self.studies * self.cpu_s_per_study / self.makespan_s


def write_cohort(folder: Path, count: int, slices: int) -> None:
    for i in range(count):
        age = 30 + 5 * i
        patient = studies.Patient(f"BENCH-{i}", f"BENCH^P{i}", f"{2024 - age}0101", f"{age:03d}Y", "MF"[i % 2],
                                  1.70, 70.0)
        studies.write_cohort_study(folder / f"study{i}", patient, seed=f"bench-cohort/{i}", n_slices=slices)


def measure(scenario: Scenario, cohort: Path, out: Path) -> Measurement:
    from inference.registry import load_model
    from node.config import load_config
    from node.orchestration.cluster import DaskExecutor
    from node.orchestration.offline import process
    from node.orchestration.study_task import ModelSpec

    config = load_config()
    card = load_model(scenario.model or config.model_name, config.model_dirs)
    model = ModelSpec(card.name, tuple(str(d) for d in config.model_dirs), "cpu", scenario.threads)
    with DaskExecutor(model, workers=scenario.workers) as executor:
        summary = process([cohort], out, config, model, f"{card.name} {card.version}", executor,
                          stream=open(os.devnull, "w"))
        memory = executor.worker_memory()
    records = summary.records
    if summary.exit_code != 0 or any(r["status"] != "done" for r in records):
        raise SystemExit(f"{scenario.label}: the cohort did not process cleanly (exit {summary.exit_code})")
    makespan = max(r["finished"] for r in records) - min(r["started"] for r in records)
    return Measurement(
        studies=len(records), makespan_s=makespan,
        cpu_s_per_study=statistics.mean(r["cpu_seconds"] for r in records),
        peak_rss_mib=[value / 2**20 for value in memory.values()],
        rows=(out / "cohort.csv").read_text(),
        seg_uids=tuple(sorted(name for r in records for name in r["results"] if name.startswith("seg-"))),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=8, help="studies in the cohort (default 8)")
    parser.add_argument("--slices", type=int, default=29, help="axial slices per series (default 29, all)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every scenario, alternating (medians)")
    args = parser.parse_args()
    studies.require_data()
    print(f"cohort: {args.studies} Dixon studies (water, fat) of {args.slices} slices; "
          f"{len(os.sched_getaffinity(0))} cores; load average {os.getloadavg()[0]:.1f} at the start")
    results: dict[str, list[Measurement]] = {s.label: [] for s in SCENARIOS}
    with tempfile.TemporaryDirectory(prefix="musclenode-bench-") as tmp:
        cohort = Path(tmp) / "cohort"
        write_cohort(cohort, args.studies, args.slices)
        for round_number in range(args.rounds):
            for number, scenario in enumerate(SCENARIOS):
                out = Path(tmp) / f"out-{round_number}-{number}"
                measured = measure(scenario, cohort, out)
                results[scenario.label].append(measured)
                print(f"  round {round_number + 1}, {scenario.label}: {measured.studies_per_hour:.0f} studies/h")
    first = results[SCENARIOS[0].label][0]
    for label, runs in results.items():
        for run in runs:
            if run.rows != first.rows or run.seg_uids != first.seg_uids:
                raise SystemExit(f"{label}: results differ from {SCENARIOS[0].label}'s")

    def median(label: str, attribute: str) -> float:
        return statistics.median(getattr(run, attribute) for run in results[label])

    table = {
        "studies per hour": lambda s: f"{median(s.label, 'studies_per_hour'):.0f}",
        "seconds for the cohort": lambda s: f"{median(s.label, 'makespan_s'):.1f}",
        "CPU seconds per study": lambda s: f"{median(s.label, 'cpu_s_per_study'):.1f}",
        "cores busy (CPU s / wall s)": lambda s: f"{median(s.label, 'cores_busy'):.2f}",
        "peak memory per worker (MiB)": lambda s: "/".join(
            f"{v:.0f}" for v in sorted(results[s.label][-1].peak_rss_mib)),
    }
    width = max(len(k) for k in table) + 2
    print()
    print(" " * width + "".join(f"{s.label:>16}" for s in SCENARIOS))
    for name, cell in table.items():
        print(f"{name:<{width}}" + "".join(f"{cell(s):>16}" for s in SCENARIOS))
    one = median(SCENARIOS[0].label, "studies_per_hour")
    two = median(SCENARIOS[1].label, "studies_per_hour")
    print(f"\nscaling from {SCENARIOS[0].label} to {SCENARIOS[1].label}: {two / one:.2f}x (target 1.8x);"
          f" same SEG UIDs and cohort rows in every run; load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
