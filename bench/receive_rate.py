"""Receive rate: musclenode against DCMTK's storescp, measured in the same run.

580 real 400 x 400 MR instances (20 series of the MyoSegmenTUM Dixon volume) go in one
association from ``storescu`` to each receiver in turn, several rounds, alternating; the median
rates and their ratio are printed. Both DCMTK tools run with ``TCP_NODELAY=1``. storescp writes
each file without fsync; musclenode fsyncs the file and its folder and indexes it before it
answers, so the ratio includes the price of durability.

    .venv/bin/python -m bench.receive_rate [--rounds 3] [--series 20]

The node's log line for each association splits the handler's time into read (completeness check
and header), write (file, fsync, rename, folder fsync) and index (SQLite); the rest is the network
path of pynetdicom.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import studies  # noqa: E402
from tests.peers import NodeProcess, dcmtk_env, free_port, require_tool, wait_port  # noqa: E402


def _send(port: int, called: str, files: list[Path]) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        [require_tool("storescu"), "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        env=dcmtk_env(), capture_output=True, text=True,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or "Failed" in result.stderr:
        raise SystemExit(f"storescu failed against {called}:\n{result.stderr[-2000:]}")
    return elapsed


def storescp_round(folder: Path, files: list[Path]) -> float:
    out = folder / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = free_port()
    scp = subprocess.Popen(
        [require_tool("storescp"), "-od", str(out), "-aet", "STORESCP", str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        if not wait_port(port):
            raise SystemExit(f"storescp does not listen on {port}")
        elapsed = _send(port, "STORESCP", files)
    finally:
        scp.terminate()
        scp.wait()
    received = len(list(out.iterdir()))
    if received != len(files):
        raise SystemExit(f"storescp stored {received} of {len(files)}")
    return elapsed


def durability_floor(folder: Path, files: list[Path]) -> float:
    """Seconds to write, fsync, rename and folder-fsync every file with nothing else going on:
    what any receiver that acknowledges only durable instances pays on this disk."""
    from node.storage.store import InstanceStore

    store = InstanceStore(folder / "floor")
    contents = [f.read_bytes() for f in files]
    started = time.perf_counter()
    for number, data in enumerate(contents):
        store.write(store.studies / "1" / f"{number}.dcm", [data])
    elapsed = time.perf_counter() - started
    shutil.rmtree(folder / "floor")
    return elapsed


def node_round(folder: Path, files: list[Path], number: int) -> tuple[float, str]:
    node_folder = folder / f"node-{number}"
    shutil.rmtree(node_folder, ignore_errors=True)
    node_folder.mkdir(parents=True)
    node = NodeProcess(folder=node_folder, port=free_port(),
                       settings={"assembly": {"quiet_seconds": 600}, "jobs": {"workers": 0}})
    node.start()
    try:
        elapsed = _send(node.port, node.ae_title, files)
        time.sleep(0.5)  # let the association's closing log line be written
    finally:
        node.stop()
    stored = len(list((node.data / "studies").glob("*/*/*.dcm")))
    if stored != len(files):
        raise SystemExit(f"musclenode stored {stored} of {len(files)}:\n{node.log()[-3000:]}")
    timing = re.findall(r"handler seconds: (.*)", node.log())
    return elapsed, timing[-1] if timing else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--series", type=int, default=20, help="series of 29 instances (20 = 580)")
    args = parser.parse_args()
    studies.require_data()

    with tempfile.TemporaryDirectory(prefix="musclenode-bench-") as tmp:
        folder = Path(tmp)
        copies = studies.write_copies(folder / "files", n_series=args.series)
        files = [f for study in copies for f in study.files]
        size = sum(f.stat().st_size for f in files) / 2**20
        print(f"{len(files)} instances, {size:.0f} MiB, one association each, {args.rounds} rounds")
        scp_times, node_times, floor_times = [], [], []
        for number in range(args.rounds):
            scp_times.append(storescp_round(folder, files))
            elapsed, timing = node_round(folder, files, number)
            node_times.append(elapsed)
            floor_times.append(durability_floor(folder, files))
            print(f"  round {number + 1}: storescp {len(files) / scp_times[-1]:7.0f}/s,"
                  f" musclenode {len(files) / elapsed:7.0f}/s, fsync floor {len(files) / floor_times[-1]:7.0f}/s"
                  f"  (node handler seconds: {timing})")
    scp_rate = len(files) / statistics.median(scp_times)
    node_rate = len(files) / statistics.median(node_times)
    floor_rate = len(files) / statistics.median(floor_times)
    print(f"median: storescp {scp_rate:.0f} instances/s (no fsync), musclenode {node_rate:.0f} instances/s,"
          f" write+fsync alone {floor_rate:.0f} instances/s")
    print(f"ratio musclenode / storescp: {node_rate / scp_rate:.2f}  (target >= 0.8, with fsync)")
    print(f"ratio write+fsync alone / storescp: {floor_rate / scp_rate:.2f}  (the most any durable receiver reaches here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
