"""Receive rate: musclenode beside Orthanc and DCMTK's storescp, measured in the same run.

580 real 400 x 400 MR instances (20 series of the MyoSegmenTUM Dixon volume) go in one
association from ``storescu`` to each receiver in turn, several rounds, the order shuffled each
round; the median rate of each receiver and its ratio to Orthanc's are printed. Every DCMTK
program (storescu, storescp and Orthanc, which is built on DCMTK) runs with ``TCP_NODELAY=1``,
or DCMTK leaves Nagle's algorithm on and crawls.

- storescp writes each file without fsync: the network ceiling, not a durable receiver.
- Orthanc (``SyncStorageArea`` true, its default) fsyncs each file and commits its SQLite index:
  the durable receiver musclenode is compared with (target: at least 0.8 of its rate).
- musclenode fsyncs the new file once (its folder too on file systems other than ext4, XFS and
  btrfs) and indexes it before it answers; "musclenode polling" is the same node with pynetdicom's
  own 1-ms polling loops instead of waiting for the socket (``pynetdicom_polling = true``).
- "write+fsync alone" writes and fsyncs the same files through the store with nothing else going on: what
  any receiver that acknowledges only durable instances pays on this disk.

    python -m bench.receive_rate [--rounds 3] [--series 20] [--receivers storescp,orthanc,musclenode]

The node's log line for each association splits the handler's time into read (completeness check
and header), write (file and its fsync) and index (SQLite); the rest is the network
path of pynetdicom.

The machine is shared: compare ratios from one run, not rates from different runs.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import studies  # noqa: E402
from tests.peers import NodeProcess, Orthanc, dcmtk_env, free_port, require_tool, wait_port  # noqa: E402

#: musclenode variants: name -> extra environment of the node process.
NODE_VARIANTS: dict[str, dict[str, str]] = {
    "musclenode": {},
    # pynetdicom's own 1-ms polling loops (node.network.prompt_reactor explains the difference).
    "musclenode polling": {"MUSCLENODE_PYNETDICOM_POLLING": "true"},
}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _send(port: int, called: str, files: list[Path], pid: int | None = None) -> tuple[float, float | None]:
    """Seconds storescu took to send ``files``, and the CPU seconds the receiver ``pid`` spent."""
    cpu = cpu_seconds(pid) if pid else None
    started = time.perf_counter()
    result = subprocess.run(
        [require_tool("storescu"), "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        env=dcmtk_env(), capture_output=True, text=True,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or "Failed" in result.stderr:
        raise SystemExit(f"storescu failed against {called}:\n{result.stderr[-2000:]}")
    return elapsed, (cpu_seconds(pid) - cpu if pid else None)


Round = tuple[float, "float | None", str]  # seconds, receiver CPU seconds, note


def storescp_round(folder: Path, files: list[Path]) -> Round:
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
        elapsed, cpu = _send(port, "STORESCP", files, scp.pid)
    finally:
        scp.terminate()
        scp.wait()
    received = len(list(out.iterdir()))
    if received != len(files):
        raise SystemExit(f"storescp stored {received} of {len(files)}")
    return elapsed, cpu, ""


def orthanc_round(folder: Path, files: list[Path]) -> Round:
    where = folder / "orthanc"
    shutil.rmtree(where, ignore_errors=True)
    orthanc = Orthanc(where, extra_config={"SyncStorageArea": True, "StorageCompression": False})
    orthanc.start()
    try:
        elapsed, cpu = _send(orthanc.dicom_port, orthanc.ae_title, files, orthanc.process.pid)
        stored = orthanc.get("/statistics")["CountInstances"]
    finally:
        orthanc.stop()
    if stored != len(files):
        raise SystemExit(f"Orthanc stored {stored} of {len(files)}")
    return elapsed, cpu, ""


def durability_floor(folder: Path, files: list[Path]) -> Round:
    """Seconds to write, fsync, rename and folder-fsync every file with nothing else going on."""
    from node.storage.store import InstanceStore

    store = InstanceStore(folder / "floor")
    contents = [f.read_bytes() for f in files]
    cpu = time.process_time()
    started = time.perf_counter()
    for number, data in enumerate(contents):
        store.write(store.studies / "1" / f"{number}.dcm", [data])
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    shutil.rmtree(folder / "floor")
    return elapsed, cpu, ""


def node_round(folder: Path, files: list[Path], name: str) -> Round:
    node_folder = folder / name
    shutil.rmtree(node_folder, ignore_errors=True)
    node_folder.mkdir(parents=True)
    node = NodeProcess(folder=node_folder, port=free_port(), environment=NODE_VARIANTS[name],
                       settings={"assembly": {"quiet_seconds": 600}, "jobs": {"workers": 0}})
    node.start()
    try:
        elapsed, cpu = _send(node.port, node.ae_title, files, node.process.pid)
        # The association's closing line follows the release by a moment.
        deadline = time.monotonic() + 30
        while "handler seconds" not in node.log() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        node.stop()
    stored = len(list((node.data / "studies").glob("*/*/*.dcm")))
    if stored != len(files):
        raise SystemExit(f"{name} stored {stored} of {len(files)}:\n{node.log()[-3000:]}")
    timing = re.findall(r"handler seconds: (.*?)[\"\n]", node.log())
    return elapsed, cpu, f"handler seconds: {timing[-1]}" if timing else ""


def _receivers(names: list[str]) -> dict[str, Callable[[Path, list[Path]], Round]]:
    known: dict[str, Callable[[Path, list[Path]], Round]] = {
        "storescp": storescp_round,
        "orthanc": orthanc_round,
        "write+fsync alone": durability_floor,
    }
    for variant in NODE_VARIANTS:
        known[variant] = lambda folder, files, variant=variant: node_round(folder, files, variant)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown receivers {unknown}; known: {', '.join(known)}")
    return {n: known[n] for n in names}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--series", type=int, default=20, help="series of 29 instances (20 = 580)")
    parser.add_argument("--receivers", default=",".join(["storescp", "orthanc", *NODE_VARIANTS]),
                        help="comma-separated; 'write+fsync alone' is always added")
    args = parser.parse_args()
    studies.require_data()
    names = [n.strip() for n in args.receivers.split(",") if n.strip()]
    if "write+fsync alone" not in names:
        names.append("write+fsync alone")
    receivers = _receivers(names)

    times: dict[str, list[float]] = {name: [] for name in receivers}
    cpus: dict[str, list[float]] = {name: [] for name in receivers}
    with tempfile.TemporaryDirectory(prefix="musclenode-bench-") as tmp:
        folder = Path(tmp)
        copies = studies.write_copies(folder / "files", n_series=args.series)
        files = [f for study in copies for f in study.files]
        size = sum(f.stat().st_size for f in files) / 2**20
        print(f"{len(files)} instances, {size:.0f} MiB, one association per receiver, {args.rounds} rounds")
        for number in range(args.rounds):
            # A new order each round (the same in every run), so that none always follows another:
            # a receiver pays for the disk work that the previous one left behind.
            order = list(receivers)
            random.Random(number).shuffle(order)
            print(f"  round {number + 1}:")
            for name in order:
                elapsed, cpu, note = receivers[name](folder, files)
                times[name].append(elapsed)
                if cpu is not None:
                    cpus[name].append(cpu)
                    note = f"{1000 * cpu / len(files):5.2f} ms CPU/instance  {note}"
                print(f"    {name:<18} {len(files) / elapsed:7.0f}/s  {note}", flush=True)

    rates = {name: len(files) / statistics.median(t) for name, t in times.items()}
    reference = "orthanc" if "orthanc" in rates else next(iter(rates))
    print(f"\nmedian of {args.rounds} rounds, ratio to {reference}:")
    print(f"  {'receiver':<18} {'instances/s':>11}  {'ratio':>5}  {'CPU ms/instance':>15}")
    for name, rate in rates.items():
        cpu = f"{1000 * statistics.median(cpus[name]) / len(files):15.2f}" if cpus[name] else ""
        print(f"  {name:<18} {rate:11.0f}  {rate / rates[reference]:5.2f}  {cpu}")
    print("(storescp does not fsync; Orthanc and musclenode fsync before they answer; target >= 0.8 of Orthanc)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
