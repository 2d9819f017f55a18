"""node.network.reactor: event-driven pynetdicom reactors, against real DCMTK and pynetdicom peers.

Every test runs with :func:`node.network.reactor.install` active in this process (the module
fixture removes it afterwards so other test modules see stock pynetdicom).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, UID, generate_uid

import pynetdicom
from pynetdicom import AE, AllStoragePresentationContexts, dimse_messages, dimse_primitives, evt
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta
from pynetdicom.sop_class import Verification

from node.network import reactor

HAVE_DCMTK = all(shutil.which(tool) for tool in ("storescu", "echoscu", "storescp"))
needs_dcmtk = pytest.mark.skipif(not HAVE_DCMTK, reason="DCMTK tools not installed")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dcmtk(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    # Without TCP_NODELAY DCMTK leaves Nagle on and every instance waits for a delayed ACK.
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def make_instance(rows: int = 256, cols: int = 256, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.InstanceNumber = "Reactor^Test", "RT1", "MR", seed + 1
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype="<u2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def dataset_part(path: Path) -> bytes:
    """Bytes of a Part 10 file after its File Meta Information group."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00"
    (group_length,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_length :]


class Receiver:
    """A pynetdicom Storage/Verification SCP on 127.0.0.1 that writes encoded_dataset()."""

    def __init__(self, folder: Path, **ae_settings) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.meta_mismatches: list[str] = []
        self.on_store_hook: Callable[[object], None] | None = None
        self.ae = AE(ae_title="PYSCP")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.ae.add_supported_context(Verification)
        for name, value in ae_settings.items():
            setattr(self.ae, name, value)
        self.server = None

    def _on_store(self, event) -> int:
        if self.on_store_hook is not None:
            self.on_store_hook(event)
        data = event.encoded_dataset()
        # The stock File Meta encoding must give the same bytes as fast_file_meta.
        stock = type(event).encoded_dataset.__wrapped__(event)
        if data != stock:
            self.meta_mismatches.append(str(event.request.AffectedSOPInstanceUID))
        (self.folder / f"{event.request.AffectedSOPInstanceUID}.dcm").write_bytes(data)
        return 0x0000

    def start(self, ssl_context: ssl.SSLContext | None = None) -> "Receiver":
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            ssl_context=ssl_context,
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def received(self) -> list[Path]:
        return sorted(self.folder.glob("*.dcm"))

    def idle(self) -> bool:
        return not self.server.active_associations


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def installed() -> Iterator[None]:
    was = reactor.installed_features()
    reactor.uninstall()
    assert reactor.install(strict=True)
    yield
    reactor.uninstall()
    if was:
        reactor.install(**{name: name in was for name in reactor.FEATURES})


@pytest.fixture
def receiver_factory(tmp_path: Path) -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(name: str = "scp", ssl_context: ssl.SSLContext | None = None, **settings) -> Receiver:
        r = Receiver(tmp_path / name, **settings).start(ssl_context)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


@pytest.fixture
def receiver(receiver_factory) -> Receiver:
    # A small maximum PDU so that each instance arrives as several P-DATA PDUs.
    return receiver_factory(maximum_pdu_size=16384)


@pytest.fixture(scope="module")
def instance_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("instances")
    paths = []
    for i in range(50):
        ds = make_instance(seed=i) if i % 5 else make_instance(400, 400, seed=i)
        path = folder / f"mr{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def requestor(contexts=(MRImageStorage, Verification), **settings) -> AE:
    ae = AE(ae_title="PYSCU")
    for uid in contexts:
        # Explicit VR only, so the bytes sent are those of the source files.
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    for name, value in settings.items():
        setattr(ae, name, value)
    return ae


# ---------------------------------------------------------------------------
# install / uninstall
# ---------------------------------------------------------------------------
def test_install_is_idempotent_and_reversible(monkeypatch) -> None:
    from pynetdicom import association, dul, transport

    assert reactor.install() and reactor.install(strict=True)
    assert reactor.installed_features() == frozenset(reactor.FEATURES)
    try:
        reactor.uninstall()
        assert not reactor.is_installed()
        assert dul.time is time and association.time is time
        assert "_kill" not in vars(association.Association)
        assert transport.AssociationSocket.recv.__name__ == "recv"

        monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
        with pytest.raises(RuntimeError, match="not supported"):
            reactor.install(strict=True)
        with pytest.warns(RuntimeWarning, match="stock"):
            assert reactor.install() is False
        assert not reactor.is_installed()
        monkeypatch.undo()

        with pytest.raises(ValueError):
            reactor.install(reactors=False)
        assert reactor.install(reactors=False, tcp_nodelay=False)
        assert reactor.installed_features() == {"fast_recv", "fast_command_set", "fast_file_meta"}
    finally:
        reactor.uninstall()
        assert reactor.install(strict=True)


# ---------------------------------------------------------------------------
# against DCMTK
# ---------------------------------------------------------------------------
@needs_dcmtk
def test_echoscu(receiver) -> None:
    result = dcmtk("echoscu", "-aec", "PYSCP", "127.0.0.1", str(receiver.port))
    assert result.returncode == 0, result.stderr
    assert wait_until(receiver.idle)


@needs_dcmtk
def test_storescu_50_instances_byte_identical(receiver, instance_files) -> None:
    t0 = time.monotonic()
    result = dcmtk(
        "storescu", "-aet", "STORESCU", "-aec", "PYSCP", "127.0.0.1", str(receiver.port),
        *map(str, instance_files),
    )
    elapsed = time.monotonic() - t0
    assert result.returncode == 0, result.stderr
    received = {p.stem: p for p in receiver.received()}
    assert len(received) == 50
    for source in instance_files:
        uid = dcmread(source, stop_before_pixels=True).SOPInstanceUID
        stored = received[uid]
        assert dataset_part(stored) == dataset_part(source)
        meta = dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.MediaStorageSOPInstanceUID == uid
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert receiver.meta_mismatches == []
    # Stock pynetdicom needs >= 2 ms per instance in sleeps alone; generous bound.
    assert elapsed < 5
    assert wait_until(receiver.idle)


@needs_dcmtk
def test_unknown_calling_ae_is_rejected(receiver_factory) -> None:
    receiver = receiver_factory(require_calling_aet=["KNOWNSCU"])
    rejected = dcmtk("echoscu", "-aet", "STRANGER", "-aec", "PYSCP", "127.0.0.1", str(receiver.port))
    assert rejected.returncode != 0
    assert "reject" in (rejected.stdout + rejected.stderr).lower()
    accepted = dcmtk("echoscu", "-aet", "KNOWNSCU", "-aec", "PYSCP", "127.0.0.1", str(receiver.port))
    assert accepted.returncode == 0, accepted.stderr
    assert wait_until(receiver.idle)


@needs_dcmtk
def test_peer_killed_mid_association_does_not_hang(receiver, instance_files) -> None:
    first = threading.Event()
    proceed = threading.Event()

    def hold_first(event) -> None:
        if not first.is_set():
            first.set()
            proceed.wait(5)

    receiver.on_store_hook = hold_first
    env = {**os.environ, "TCP_NODELAY": "1"}
    sender = subprocess.Popen(
        ["storescu", "-aec", "PYSCP", "127.0.0.1", str(receiver.port), *map(str, instance_files)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert first.wait(10)
        sender.send_signal(signal.SIGKILL)
        sender.wait(5)
    finally:
        proceed.set()
        if sender.poll() is None:
            sender.kill()
    # The C-STORE-RSP goes to a dead peer; the association must still wind down.
    assert wait_until(receiver.idle, 5)
    receiver.on_store_hook = None
    assert dcmtk("echoscu", "-aec", "PYSCP", "127.0.0.1", str(receiver.port)).returncode == 0


@needs_dcmtk
def test_requestor_send_c_store_to_storescp(tmp_path: Path, instance_files) -> None:
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    scp = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        ae = requestor()
        assoc = None
        for _ in range(100):  # until storescp listens
            assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP")
            if assoc.is_established:
                break
            time.sleep(0.05)
        assert assoc.is_established
        # The 400 x 400 ones: storescp's 16 KiB PDUs split each into 20 sends.
        datasets = [dcmread(p) for p in instance_files[::5]]
        t0 = time.monotonic()
        statuses = [assoc.send_c_store(ds).Status for ds in datasets]
        elapsed = time.monotonic() - t0
        assoc.release()
        assert assoc.is_released
        assert statuses == [0x0000] * len(datasets)
        # With Nagle on, each waits ~40 ms for storescp's delayed ACK.
        assert elapsed < len(datasets) * 0.025, f"{elapsed:.3f} s"
        assert len(list(out.iterdir())) == len(datasets)
    finally:
        scp.terminate()
        scp.wait(5)


# ---------------------------------------------------------------------------
# pynetdicom on both sides
# ---------------------------------------------------------------------------
def test_requestor_send_c_store_to_pynetdicom(receiver, instance_files) -> None:
    ae = requestor()
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PYSCP")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    for path in instance_files:
        assert assoc.send_c_store(dcmread(path)).Status == 0x0000
    assoc.release()
    assert assoc.is_released and not assoc.is_aborted
    assert len(receiver.received()) == len(instance_files)
    for path in instance_files:
        uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert dataset_part(receiver.folder / f"{uid}.dcm") == dataset_part(path)
    assert receiver.meta_mismatches == []
    assert wait_until(receiver.idle)
    assert wait_until(lambda: not assoc.is_alive() and not assoc.dul.is_alive())


def test_many_short_associations(receiver) -> None:
    ae = requestor(contexts=(Verification,))
    t0 = time.monotonic()
    for _ in range(20):
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PYSCP")
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert assoc.is_released
    # ~3-8 ms each with install() (stock: ~17 ms); a missed wake-up would cost MAX_IDLE_WAIT.
    assert time.monotonic() - t0 < 20 * min(0.1, reactor.MAX_IDLE_WAIT)
    assert wait_until(receiver.idle)


def test_requestor_abort_mid_association(receiver, instance_files) -> None:
    ae = requestor()
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PYSCP")
    assert assoc.send_c_store(dcmread(instance_files[0])).Status == 0x0000
    assoc.abort()
    assert assoc.is_aborted
    assert wait_until(receiver.idle, 3)
    assert wait_until(lambda: not assoc.is_alive() and not assoc.dul.is_alive(), 3)
    again = ae.associate("127.0.0.1", receiver.port, ae_title="PYSCP")
    assert again.send_c_echo().Status == 0x0000
    again.release()


def test_acceptor_aborts_after_network_timeout(receiver_factory) -> None:
    receiver = receiver_factory(network_timeout=0.3)
    aborted = threading.Event()
    ae = requestor(contexts=(Verification,))
    assoc = ae.associate(
        "127.0.0.1", receiver.port, ae_title="PYSCP",
        evt_handlers=[(evt.EVT_ABORTED, lambda event: aborted.set())],
    )
    assert assoc.is_established
    t0 = time.monotonic()
    assert wait_until(lambda: assoc.is_aborted or not assoc.is_established, 3)
    assert 0.25 < time.monotonic() - t0 < 1.5
    assert wait_until(receiver.idle)


def test_silent_connection_closed_by_artim(receiver_factory) -> None:
    receiver = receiver_factory(acse_timeout=0.3)
    with socket.create_connection(("127.0.0.1", receiver.port)) as sock:
        sock.settimeout(3)
        t0 = time.monotonic()
        assert sock.recv(1) == b""  # closed without ever receiving an A-ASSOCIATE-RQ
        assert time.monotonic() - t0 < 1.5
    assert wait_until(receiver.idle)


def test_idle_association_uses_little_cpu(receiver) -> None:
    ae = requestor(contexts=(Verification,))
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PYSCP")
    assert assoc.is_established
    time.sleep(0.1)
    cpu0, t0 = time.process_time(), time.monotonic()
    time.sleep(1.0)
    cpu = time.process_time() - cpu0
    wall = time.monotonic() - t0
    assoc.release()
    # Four reactor threads (two per side) polling every ms burn ~5-10 % of a core.
    assert cpu / wall < 0.02, f"{cpu:.3f} s CPU in {wall:.2f} s idle"


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True, timeout=30,
    )
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_tls_echo_and_store(receiver_factory, tmp_path: Path, instance_files) -> None:
    key, cert = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    client_ctx.check_hostname = False
    receiver = receiver_factory("tls", ssl_context=server_ctx, maximum_pdu_size=0)

    ae = requestor()
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PYSCP", tls_args=(client_ctx, None))
    assert assoc.is_established
    assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
    assert assoc.send_c_echo().Status == 0x0000
    # Whole datasets in one PDU: many TLS records, so data sits in the SSL buffer (pending()).
    for path in instance_files[:3]:
        assert assoc.send_c_store(dcmread(path)).Status == 0x0000
    assoc.release()
    assert assoc.is_released
    assert len(receiver.received()) == 3
    assert wait_until(receiver.idle)


# ---------------------------------------------------------------------------
# the fast paths give the same bytes as pydicom/pynetdicom
# ---------------------------------------------------------------------------
_UIDS = ["1.2.3", "1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.1234567890123456789012"]


def _messages() -> Iterator[dimse_messages.DIMSEMessage]:
    for name, keywords in dimse_messages._COMMAND_SET_KEYWORDS.items():
        msg = getattr(dimse_messages, name.replace("-", "_"))()
        for i, uid in enumerate(_UIDS):
            values = {
                "AffectedSOPClassUID": uid,
                "RequestedSOPClassUID": uid,
                "AffectedSOPInstanceUID": uid + ".7",
                "RequestedSOPInstanceUID": uid + ".77",
                "MessageID": 7 + i,
                "MessageIDBeingRespondedTo": 65535 - i,
                "Priority": i % 3,
                "Status": [0x0000, 0xB000, 0xC211][i],
                "MoveDestination": ["DEST", "ODDAE", ""][i],
                "MoveOriginatorApplicationEntityTitle": "MOVER",
                "MoveOriginatorMessageID": 3,
                "ErrorComment": ["", "odd comment", "an even comment"][i],
                "ErrorID": 12,
                "OffendingElement": [[0x00100010], [0x00100010, 0x7FE00010], []][i],
                "AttributeIdentifierList": [[0x00080018, 0x00100020], [], [0x7FE00010]][i],
                "NumberOfRemainingSuboperations": i,
                "NumberOfCompletedSuboperations": 2,
                "NumberOfFailedSuboperations": 0,
                "NumberOfWarningSuboperations": 1,
                "EventTypeID": 2,
                "ActionTypeID": 1,
                "CommandField": 0x0001,
                "CommandDataSetType": [0x0101, 0x0001, 0x0101][i],
                "CommandGroupLength": 0,
            }
            cs = msg.command_set.copy()
            for keyword in keywords:
                setattr(cs, keyword, values[keyword])
            yield cs


def test_fast_command_set_matches_pydicom() -> None:
    count = 0
    for cs in _messages():
        assert reactor._encode_command_set(cs) == encode(cs, True, True), cs
        count += 1
    assert count == 3 * len(dimse_messages._COMMAND_SET_KEYWORDS)
    # What the fast path does not cover goes to pydicom.
    cs = next(_messages())
    cs.ErrorComment = "Fehler: Größe"
    assert reactor._encode_command_set(cs) is None
    cs = Dataset()
    cs.PatientID = "x"
    assert reactor._encode_command_set(cs) is None


def test_fast_command_set_used_for_real_messages() -> None:
    primitive = dimse_primitives.C_STORE()
    primitive.MessageIDBeingRespondedTo = 3
    primitive.AffectedSOPClassUID = MRImageStorage
    primitive.AffectedSOPInstanceUID = "1.2.3.4.5"
    primitive.Status = 0xA700
    primitive.ErrorComment = "Out of resources"
    msg = dimse_messages.C_STORE_RSP()
    msg.primitive_to_message(primitive)
    (pdata,) = msg.encode_msg(1, 16384)
    sent = pdata.presentation_data_value_list[0][1]
    assert sent[:1] == b"\x03"
    assert sent[1:] == dimse_messages.encode.__wrapped__(msg.command_set, True, True)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45", " 1.2.3.4 "])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.4.50"])
def test_fast_file_meta_matches_pynetdicom(sop_instance: str, syntax: str) -> None:
    defaults = create_file_meta.__kwdefaults__
    fast = reactor._file_meta_bytes(
        MRImageStorage, UID(sop_instance), UID(syntax),
        defaults["implementation_uid"], defaults["implementation_version"],
    )
    stock = encode_file_meta(create_file_meta(
        sop_class_uid=MRImageStorage, sop_instance_uid=UID(sop_instance), transfer_syntax=UID(syntax),
    ))
    assert fast == stock
    assert reactor._file_meta_bytes(MRImageStorage, "", syntax, None, None) is None


def test_fast_recv_contract() -> None:
    from pynetdicom.transport import AssociationSocket

    class Holder:
        pass

    a, b = socket.socketpair()
    try:
        holder = Holder()
        holder.socket = b
        payload = os.urandom(300_000)
        sender = threading.Thread(target=a.sendall, args=(payload,))
        sender.start()
        got = AssociationSocket.recv(holder, len(payload))
        sender.join()
        assert isinstance(got, bytearray) and bytes(got) == payload
        a.sendall(b"abc")
        a.close()
        assert AssociationSocket.recv(holder, 10) == bytearray(b"abc")  # short only at EOF
    finally:
        a.close()
        b.close()
