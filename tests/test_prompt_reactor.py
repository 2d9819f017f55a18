"""The SCP's associations wait for their socket and queues instead of polling them: whole
transfers from DCMTK arrive byte for byte, timers still fire, the stock path stays available."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import MRImageStorage, Verification
from pynetdicom.transport import AssociationSocket

from node.network import prompt_reactor, server
from node.network.prompt_reactor import BulkSocket, PromptDIMSE, PromptDUL
from tests.dicomfiles import dataset_bytes, sample
from tests.peers import run_dcmtk

UNCOMPRESSED = ("implicit VR little endian",)  # the explicit VR sample has the same SOP Instance UID


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class _Receiver:
    """A storage SCP on the node's server class that keeps what arrives and how it was served."""

    def __init__(self, prompt: bool, idle_seconds: float = 30) -> None:
        self.received: dict[str, bytes] = {}
        self.kinds: list[tuple[type, type, type]] = []
        self.aborted = threading.Event()
        ae = AE(ae_title="RECEIVER")
        ae.add_supported_context(Verification)
        ae.add_supported_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.network_timeout = idle_seconds
        ae.maximum_pdu_size = 1 << 20  # as the node: DCMTK then sends PDUs of up to 128 KiB
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_C_ECHO, self._echo),
                    (evt.EVT_ABORTED, lambda event: self.aborted.set())]
        self.server = server.start(ae, ("127.0.0.1", 0), handlers, request_seconds=10, idle_seconds=idle_seconds,
                                   max_pending=16, prompt=prompt)
        self.port = self.server.server_address[1]

    def _note(self, event: evt.Event) -> None:
        assoc = event.assoc
        self.kinds.append((type(assoc.dul), type(assoc.dimse), type(assoc.dul.socket)))

    def _store(self, event: evt.Event) -> int:
        self._note(event)
        self.received[event.request.AffectedSOPInstanceUID] = bytes(event.request.DataSet.getvalue())
        return 0x0000

    def _echo(self, event: evt.Event) -> int:
        self._note(event)
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


def _instances(folder: Path) -> list[Path]:
    """The small uncompressed samples, and larger ones (512 x 512, several PDUs each)."""
    paths = [sample(name) for name in UNCOMPRESSED]
    rng = np.random.default_rng(7)
    for number in range(3):
        ds = dcmread(sample("explicit VR little endian"))
        ds.Rows = ds.Columns = 512
        del ds.DataSetTrailingPadding  # storescu leaves it out
        ds.PixelData = rng.integers(0, 4096, (512, 512), dtype=np.uint16).tobytes()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(folder / f"large{number}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


@pytest.mark.parametrize("prompt", [True, False], ids=["waiting", "stock polling"])
def test_dcmtk_transfers_arrive_whole(prompt: bool, tmp_path: Path) -> None:
    receiver = _Receiver(prompt)
    files = _instances(tmp_path)
    try:
        result = run_dcmtk("storescu", "-aec", "RECEIVER", "127.0.0.1", str(receiver.port), *map(str, files))
        assert result.returncode == 0 and "Failed" not in result.stderr, result.stderr
        assert len(receiver.received) == len(files)
        for path in files:
            uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert dataset_bytes(path) == receiver.received[uid], path.name
        expected = (PromptDUL, PromptDIMSE, BulkSocket) if prompt else (DULServiceProvider, DIMSEServiceProvider,
                                                                         AssociationSocket)
        assert set(receiver.kinds) == {expected}
    finally:
        receiver.close()


def test_a_silent_association_is_still_aborted_by_the_network_timeout() -> None:
    """The DUL's idle timer is checked although the loop no longer wakes every millisecond."""
    receiver = _Receiver(prompt=True, idle_seconds=0.5)
    try:
        scu = AE(ae_title="SILENT")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", receiver.port, ae_title="RECEIVER")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        _wait(lambda: receiver.aborted.is_set(), 10, "the node to abort the silent association")
        _wait(lambda: not assoc.is_established, 10, "the peer to see the abort")
    finally:
        receiver.close()


def test_a_released_association_ends_both_loops() -> None:
    receiver = _Receiver(prompt=True)
    try:
        before = {t for t in threading.enumerate()}
        scu = AE(ae_title="ECHO")
        scu.add_requested_context(Verification)
        for _ in range(5):
            assoc = scu.associate("127.0.0.1", receiver.port, ae_title="RECEIVER")
            assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
            assoc.release()
            assert assoc.is_released
        # Each association's DUL and reactor threads end with it (no waits left behind).
        _wait(lambda: not [t for t in threading.enumerate() if t not in before and t.is_alive()
                           and ("AcceptorThread" in t.name or "run_reactor" in t.name)], 10, "association threads to end")
    finally:
        receiver.close()


def test_an_unknown_pynetdicom_release_keeps_stock_polling(monkeypatch, caplog) -> None:
    import pynetdicom

    monkeypatch.setattr(pynetdicom, "__version__", "9.9.0")
    monkeypatch.setattr(prompt_reactor, "_warned", threading.Event())
    untouched = object()
    with caplog.at_level(logging.WARNING, logger="node.network.prompt_reactor"):
        assert prompt_reactor.make_prompt(untouched) is False  # type: ignore[arg-type]
        assert prompt_reactor.make_prompt(untouched) is False  # type: ignore[arg-type]
    assert caplog.text.count("pynetdicom 9.9.0 is not one of 3.0.x") == 1


def test_bulk_socket_reads_what_is_asked_for_and_stops_at_the_end() -> None:
    near, far = socket.socketpair()
    try:
        payload = bytes(range(256)) * 2000  # 512 000 bytes, more than one kernel buffer

        def send() -> None:
            for start in range(0, len(payload), 70_000):
                far.sendall(payload[start:start + 70_000])
            far.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        bulk = BulkSocket.__new__(BulkSocket)  # only recv is exercised: no association needed
        bulk.socket = near
        assert bulk.recv(300_000) == payload[:300_000]
        rest = bulk.recv(300_000)  # the sender ends 88 000 bytes short of this
        assert rest == payload[300_000:] and isinstance(rest, bytearray)
        assert bulk.recv(10) == bytearray()
        sender.join()
    finally:
        near.close()
        far.close()


def test_the_setting_is_read_from_the_environment() -> None:
    from node.config import load_config

    assert load_config(None, environ={}).pynetdicom_polling is False
    assert load_config(None, environ={"MUSCLENODE_PYNETDICOM_POLLING": "true"}).pynetdicom_polling is True
