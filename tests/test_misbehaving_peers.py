"""Peers that misbehave must not lock the node: raw sockets and DCMTK tools on 127.0.0.1.

Each test holds the bad connections open while a legitimate peer (DCMTK's echoscu or storescu)
goes through, and checks afterwards that they were still open then, so that "while they stand"
is a fact, not a hope; then it waits, with a generous deadline, for the node to close them.
The plain-port and TLS-port cases of an idle connection are in test_tls.py for the TLS one.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.network.server import pending_limit
from tests import studies
from tests.peers import ASSOCIATE_RQ_START, is_open, raw_connections, run_dcmtk, wait_closed

#: Generous deadline for "the node closed it": the configured timeout is a few seconds.
CLOSED_WITHIN = 90


def _echo(node, calling: str = "ECHOSCU") -> None:
    result = run_dcmtk("echoscu", "-aet", calling, "-aec", node.ae_title, "127.0.0.1", str(node.port))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def real_series(tmp_path_factory) -> list[Path]:
    """One real 29-slice MR series (MyoSegmenTUM water/fat/in/opposed phase, 400 x 400)."""
    studies.require_data()
    (study,) = studies.write_copies(tmp_path_factory.mktemp("real"), n_series=1)
    return list(study.files)


def test_connections_stuck_inside_the_request_do_not_stop_others(node_factory, real_series) -> None:
    # A long request timeout, so that they surely stand while the legitimate peer goes through.
    node = node_factory(limits={"request_seconds": 600})
    stuck = raw_connections(node.port, 35, ASSOCIATE_RQ_START)
    try:
        _echo(node)
        store = node.storescu(real_series[:3])
        assert store.returncode == 0 and "Store Failed" not in store.stderr, store.stderr
        assert all(is_open(sock) for sock in stuck)
    finally:
        for sock in stuck:
            sock.close()


def test_idle_connections_take_no_association_slots(node_factory) -> None:
    # More idle connections than associations allowed, and more than may wait at once (the oldest
    # waiting one is closed for a newer one): none of that may shut out a peer.
    node = node_factory(limits={"request_seconds": 600, "associations": 4, "associations_per_peer": 2})
    idle = raw_connections(node.port, 40)
    try:
        _echo(node)
        # The newest of them stand meanwhile (the echo's connection closed one more of the oldest).
        assert sum(is_open(sock) for sock in idle) == pending_limit(4) - 1
        _echo(node)
    finally:
        for sock in idle:
            sock.close()


def test_connections_without_a_whole_request_are_closed_after_the_request_timeout(node_factory) -> None:
    node = node_factory(limits={"request_seconds": 2})
    stuck = raw_connections(node.port, 10, ASSOCIATE_RQ_START) + raw_connections(node.port, 10)
    try:
        assert wait_closed(stuck, CLOSED_WITHIN) == []
    finally:
        for sock in stuck:
            sock.close()
    _echo(node)


def test_one_peer_gets_its_share_of_the_associations_not_all(node_factory) -> None:
    """200 associations from one allowed peer: the excess is rejected-transient (local limit
    exceeded), and another peer still gets through."""
    node = node_factory(limits={"associations": 32, "associations_per_peer": 8})
    flood = AE(ae_title="FLOOD")
    flood.add_requested_context(Verification)
    held, rejected = [], []
    try:
        for _ in range(200):
            assoc = flood.associate("127.0.0.1", node.port, ae_title=node.ae_title)
            (held if assoc.is_established else rejected).append(assoc)
        assert len(held) == 8
        assert len(rejected) == 192
        for assoc in rejected:
            assert assoc.is_rejected
            answer = assoc.acceptor.primitive
            # Rejected-transient, by the service provider (presentation), local limit exceeded.
            assert (answer.result, answer.result_source, answer.diagnostic) == (0x02, 0x03, 0x02)
        _echo(node, calling="OTHERPEER")
        assert all(assoc.is_established for assoc in held)
    finally:
        for assoc in held:
            assoc.release()
    status = node.wait_for(lambda s: all(a["outcome"] == "released" for a in s["associations"])
                           and len(s["associations"]) == 9, what="the held associations released")
    assert sum(a["calling_ae"] == "FLOOD" for a in status["associations"]) == 8


# -- large instances -------------------------------------------------------------------------


def _tiled_instance(source: Path, target: Path, tiles: tuple[int, int]) -> Path:
    """A real MR slice tiled ``tiles`` times (rows, columns) into one large instance."""
    ds = dcmread(source)
    pixels = np.tile(ds.pixel_array, tiles)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    del pixels
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(target, enforce_file_format=True)
    return target


def _dataset_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        head = handle.read(144)
        (meta_length,) = struct.unpack_from("<I", head, 140)
        handle.seek(144 + meta_length)
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _peak_rss(pid: int) -> int:
    """The process's peak resident set size (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


def test_a_300_mib_instance_is_streamed_to_disk_with_bounded_memory(node_factory, real_series, tmp_path: Path) -> None:
    source = real_series[0]
    large = _tiled_instance(source, tmp_path / "large.dcm", (31, 32))  # 12400 x 12800 x 16 bit
    size = large.stat().st_size
    assert size > 300 * 2**20
    node = node_factory(limits={"instance_mb": 512})
    _echo(node)
    before = _peak_rss(node.process.pid)
    store = node.storescu([large])
    assert store.returncode == 0 and "Store Failed" not in store.stderr, store.stderr
    peak = _peak_rss(node.process.pid)
    stored = list(node.data.glob("studies/*/*/*.dcm"))
    assert len(stored) == 1
    assert _dataset_digest(stored[0]) == _dataset_digest(large)
    # Before the fix the node grew by about four times the data; now the dataset goes through a
    # temporary file and never passes through the node's memory whole.
    assert peak - before < size / 2, f"peak RSS grew by {(peak - before) / 2**20:.0f} MiB for {size / 2**20:.0f} MiB"


def test_an_instance_over_the_limit_is_refused_with_out_of_resources(node_factory, real_series, tmp_path: Path) -> None:
    source = real_series[0]
    large = _tiled_instance(source, tmp_path / "three-mib.dcm", (2, 5))  # 800 x 2000 x 16 bit, 3.1 MiB
    node = node_factory(limits={"instance_mb": 1})
    refused = node.storescu([large], "-d")
    assert "0xa700" in (refused.stdout + refused.stderr).lower(), refused.stdout + refused.stderr
    assert not list(node.data.glob("studies/*/*/*.dcm"))
    assert "over limits.instance_mb" in node.log()
    # The node goes on: an instance under the limit is stored.
    small = node.storescu([source])
    assert small.returncode == 0 and "Store Failed" not in small.stderr, small.stderr
    assert len(list(node.data.glob("studies/*/*/*.dcm"))) == 1


# -- the server on a pynetdicom release it does not know ---------------------------------------


def test_an_unknown_pynetdicom_release_gets_the_stock_server_and_a_warning(monkeypatch, caplog) -> None:
    """On a release outside KNOWN_VERSIONS the node listens with pynetdicom's own server (and
    says what it lacks) instead of subclassing classes that may have changed."""
    import pynetdicom
    from pynetdicom.transport import ThreadedAssociationServer

    from node.network import server

    ae = AE(ae_title="GUARDED")
    ae.add_supported_context(Verification)
    started = server.start(ae, ("127.0.0.1", 0), [], request_seconds=5, idle_seconds=5, max_pending=16)
    try:
        assert isinstance(started, server.GuardedServer)
    finally:
        started.shutdown()
    monkeypatch.setattr(pynetdicom, "__version__", "9.9.0")
    with caplog.at_level("WARNING", logger="node.network.server"):
        stock = server.start(ae, ("127.0.0.1", 0), [], request_seconds=5, idle_seconds=5, max_pending=16)
    try:
        assert type(stock) is ThreadedAssociationServer
        assert "pynetdicom 9.9.0 is not a release this node knows" in caplog.text
        echo = AE(ae_title="ECHO")
        echo.add_requested_context(Verification)
        assoc = echo.associate("127.0.0.1", stock.server_address[1], ae_title="GUARDED")
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        stock.shutdown()


# -- the settings ------------------------------------------------------------------------------


def test_limits_settings_are_checked_and_named(tmp_path: Path) -> None:
    from node.config import ConfigError, load_config
    from tests.peers import write_toml

    def load(limits: dict) -> object:
        return load_config(write_toml(tmp_path / "limits.toml", {"limits": limits}), environ={}).limits

    assert load({}).associations == 32
    assert load({"request_seconds": 2.5, "associations": 4, "associations_per_peer": 4}).request_seconds == 2.5
    with pytest.raises(ConfigError, match=r"^limits\.request_seconds: must be more than 0 seconds, got 0 "):
        load({"request_seconds": 0})
    with pytest.raises(ConfigError, match=r"^limits\.associations_per_peer: 9 is more than limits\.associations"):
        load({"associations": 8, "associations_per_peer": 9})
    with pytest.raises(ConfigError, match=r"^limits\.instance_mb: must be between 1 and"):
        load({"instance_mb": 0})
    with pytest.raises(ConfigError, match=r"^limits\.burst: unknown setting"):
        load({"burst": 1})
