"""kill -9 in the middle of a transfer: nothing acknowledged is lost, timers resume after restart."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
from pathlib import Path

from pydicom import dcmread

from tests import studies
from tests.peers import dcmtk_env, require_tool


def _acknowledged(storescu_output: str) -> list[str]:
    """Files for which storescu received a Success response, in order."""
    acknowledged, current = [], None
    for line in storescu_output.splitlines():
        sending = re.match(r"I: Sending file: (.+)$", line)
        if sending:
            current = sending.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acknowledged.append(current)
            current = None
    return acknowledged


#: The node is killed once storescu has logged this many acknowledgements.
KILL_AFTER = 30


def test_kill_9_during_transfer_loses_nothing_acknowledged(node_factory, tmp_path: Path) -> None:
    """The kill comes at a point set by storescu's own log, not by how fast this machine is: the
    log goes through a pipe of one page that this test stops reading after KILL_AFTER
    acknowledgements, so storescu blocks on its log a few files later and cannot finish."""
    studies.require_data()
    copies = studies.write_copies(tmp_path / "send", n_series=8)
    files = [f for study in copies for f in study.files]
    node = node_factory(assembly={"quiet_seconds": 1})

    log_read, log_write = os.pipe()
    fcntl.fcntl(log_write, fcntl.F_SETPIPE_SZ, 4096)
    # -v logs to stderr, unbuffered: a line per step, about 300 bytes a file.
    sender = subprocess.Popen(
        [require_tool("storescu"), "-v", "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, files)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=log_write,
    )
    os.close(log_write)
    with open(log_read, "rb", buffering=0) as log:  # unbuffered: read no further than needed
        lines: list[bytes] = []
        while len(_acknowledged(b"".join(lines).decode())) < KILL_AFTER:
            line = log.readline()
            assert line, f"storescu ended before {KILL_AFTER} acknowledgements:\n{b''.join(lines).decode()}"
            lines.append(line)
        node.kill9()
        lines.append(log.read())  # storescu goes on, finds the association gone and ends
    sender.wait(timeout=60)
    acknowledged = _acknowledged(b"".join(lines).decode())
    # At most the one-page pipe's worth of log (a dozen files) passed between the count and the kill.
    assert KILL_AFTER <= len(acknowledged) < len(files), f"{len(acknowledged)} of {len(files)} acknowledged"
    stored = node.data / "studies"

    node.restarts += 1
    node.start()
    status = node.wait_for(
        lambda s: s["series"] and all(x["state"] == "ready" for x in s["series"]), timeout=60,
        what="all series ready after restart",
    )
    assert status["associations"][-1]["outcome"] == "interrupted"
    indexed = status["counts"]["instances"]
    assert indexed >= len(acknowledged)
    for path in acknowledged:
        original = dcmread(path)
        on_disk = list(stored.glob(f"*/*/{original.SOPInstanceUID}.dcm"))
        assert len(on_disk) == 1, f"acknowledged instance {path} is missing"
        copy = dcmread(on_disk[0])
        assert copy.PixelData == original.PixelData and copy.SeriesInstanceUID == original.SeriesInstanceUID
    assert not list((node.data / "incoming").iterdir()), "partial files must not survive a restart"
    # Every file on disk is indexed, and nothing indexed lacks its file.
    assert len(list(stored.glob("*/*/*.dcm"))) == indexed
    # The sender can finish the job: what is re-sent is idempotent, the rest arrives.
    node.storescu(files)
    node.wait_for(lambda s: s["counts"]["instances"] == len(files), what="every instance after the re-send")


def test_files_the_index_lost_are_indexed_again_at_start(node, tmp_path: Path) -> None:
    """A power cut can lose the last index commits (WAL, synchronous=NORMAL) but not an fsynced
    file: after an unclean stop the node indexes such files again and drops partial ones."""
    import sqlite3

    from tests.dicomfiles import sample

    path = sample("explicit VR little endian")
    node.storescu([path])
    node.wait_for(lambda s: s["counts"]["instances"] == 1, what="instance indexed")
    node.kill9()
    with sqlite3.connect(node.data / "index.sqlite") as db:
        db.execute("DELETE FROM instances")
        db.execute("DELETE FROM series")
    (node.data / "incoming" / "1.2.3.dcm.99.abc.part").write_bytes(b"half a file")
    # A new instance is written in place (one fsync): a crash while it was written leaves the
    # file cut short under its own name, in the dataset or in the file meta.
    stored = next((node.data / "studies").glob("*/*/*.dcm"))
    whole = stored.read_bytes()
    cut_in_dataset = stored.parent / "1.2.826.0.1.3680043.99.1.dcm"
    cut_in_dataset.write_bytes(whole[: len(whole) - 1000])
    cut_in_meta = stored.parent / "1.2.826.0.1.3680043.99.2.dcm"
    cut_in_meta.write_bytes(whole[:150])
    node.restarts += 1
    node.start()
    status = node.wait_for(lambda s: s["counts"]["instances"] == 1, what="lost instance indexed again")
    assert status["series"][0]["instances"] == 1
    assert "indexed 1 stored files that the index had lost" in node.log()
    assert not list((node.data / "incoming").iterdir())
    assert not cut_in_dataset.exists() and not cut_in_meta.exists(), "files cut short must go"
    assert "removed 3 unacknowledged partial files" in node.log()
    node.wait_for(lambda s: s["series"][0]["decision"] is not None, what="the series judged after recovery")
