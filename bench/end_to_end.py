"""End-to-end latency and throughput of the node beside a real Orthanc, on this machine's CPU.

Latency: from the moment Orthanc's C-STORE of the real Dixon study (water and fat, 58 instances)
to the node has returned (every instance acknowledged) to the moment Orthanc holds the node's
SEG, SR and every summary page, minus the node's quiet time. Throughput: four such studies sent
at once, studies per hour until the last result set arrived (quiet time subtracted once). The
node's own split of each job (read, inference, measure, results) is printed beside it.

    .venv/bin/python -m bench.end_to_end [--quiet 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import studies  # noqa: E402
from tests.peers import NodeProcess, Orthanc, free_port  # noqa: E402

RESULTS = {"SEG", "SR", "OT"}


def _complete(orthanc: Orthanc, study_uid: str, pages: int) -> bool:
    found = orthanc.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
    if not found:
        return False
    series = {s["MainDicomTags"].get("Modality"): s for s in orthanc.get(f"/studies/{found[0]}/series")}
    return RESULTS <= set(series) and len(series["OT"]["Instances"]) >= pages


def _send(orthanc: Orthanc, study: studies.Study) -> float:
    ids = orthanc.upload(study.files)
    orthanc_study = orthanc.get(f"/instances/{ids[0]}/study")["ID"]
    orthanc.send("musclenode", [orthanc_study])
    return time.perf_counter()


def _wait(orthanc: Orthanc, study_uids: list[str], pages: int, timeout: float = 900) -> float:
    deadline = time.monotonic() + timeout
    pending = set(study_uids)
    while pending and time.monotonic() < deadline:
        pending = {uid for uid in pending if not _complete(orthanc, uid, pages)}
        if pending:
            time.sleep(0.1)
    if pending:
        raise SystemExit(f"{len(pending)} studies got no results within {timeout} s")
    return time.perf_counter()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", type=float, default=2.0, help="the node's quiet time in seconds")
    parser.add_argument("--rounds", type=int, default=2, help="single-study latency measurements")
    parser.add_argument("--pages", type=int, default=3, help="summary pages to wait for")
    args = parser.parse_args()
    studies.require_data()
    with tempfile.TemporaryDirectory(prefix="musclenode-e2e-") as tmp:
        folder = Path(tmp)
        node_port = free_port()
        orthanc = Orthanc(folder / "orthanc", modalities={"musclenode": ["MUSCLENODE", "127.0.0.1", node_port]})
        orthanc.start()
        node = NodeProcess(folder=folder / "node", port=node_port, settings={
            "peers": [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}],
            "assembly": {"quiet_seconds": args.quiet},
            "jobs": {"workers": 1},
        })
        node.folder.mkdir(parents=True)
        node.start()
        try:
            latencies = []
            for number in range(args.rounds):
                study = studies.write_dixon_study(folder / f"single-{number}", contrasts=("water", "fat"))
                acknowledged = _send(orthanc, study)
                arrived = _wait(orthanc, [study.study_uid], args.pages)
                latencies.append(arrived - acknowledged - args.quiet)
                print(f"  study {number + 1}: {latencies[-1]:.1f} s after the quiet time")
            batch = [studies.write_dixon_study(folder / f"batch-{n}", contrasts=("water", "fat")) for n in range(4)]
            threads = [threading.Thread(target=_send, args=(orthanc, s)) for s in batch]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            finished = _wait(orthanc, [s.study_uid for s in batch], args.pages)
            per_hour = 4 / (finished - started - args.quiet) * 3600
            steps = [job["result"]["steps"] for job in node.status()["jobs"] if job.get("result")]
        finally:
            node.stop()
            orthanc.stop()
    latency = statistics.median(latencies)
    print(f"latency, last instance acknowledged to results acknowledged by Orthanc, minus quiet time:"
          f" median {latency:.1f} s over {len(latencies)} studies (target <= 10 s on 2 cores)")
    print(f"throughput with four studies in flight: {per_hour:.0f} studies/hour")
    for step in ("read", "inference", "measure", "results"):
        values = [s[step] for s in steps if step in s]
        if values:
            print(f"  job step {step}: median {statistics.median(values):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
