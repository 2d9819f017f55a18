"""DICOM TLS against DCMTK: echoscu and storescu over TLS, a plain caller on the TLS port, a peer
that must present a certificate, export over TLS to storescp, and bad TLS settings refused.

The certificates are made for each test run with the ``openssl`` command: a CA, the node's
certificate (server and client), a modality's client certificate and a PACS's server certificate,
all for 127.0.0.1.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from node.config import ConfigError, Destination, load_config
from node.network.export import Exporter
from node.storage.deliveries import ExportQueue
from node.network.tls import client_context, server_context
from tests.peers import NodeProcess, dcmtk_env, free_port, require_tool, run_dcmtk, write_toml

MR = get_testdata_file("MR_small.dcm")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _leaf(folder: Path, name: str, usage: str) -> None:
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=folder)
    (folder / f"{name}.ext").write_text(
        "basicConstraints = CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        f"extendedKeyUsage = {usage}\n"
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
        "authorityKeyIdentifier = keyid\n"
    )
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """CA, node (server and client), modality (client), pacs (server) and a stranger's self-signed
    certificate, as PEM files."""
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=musclenode test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    _leaf(folder, "node", "serverAuth, clientAuth")
    _leaf(folder, "modality", "clientAuth")
    _leaf(folder, "pacs", "serverAuth")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "stranger.key", "-out",
             "stranger.crt", "-days", "2", "-subj", "/CN=stranger", "-addext", "subjectAltName=IP:127.0.0.1",
             cwd=folder)
    return folder


class TLSNode(NodeProcess):
    """A node process with a [tls] section in its configuration."""

    tls: dict = {}

    def write_config(self) -> None:
        super().write_config()
        lines = ["", "[tls]"] + [f"{k} = {_value(v)}" for k, v in self.tls.items()]
        with open(self.config_path, "a") as handle:
            handle.write("\n".join(lines) + "\n")

    def wait_listening(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"node exited with {self.process.returncode}:\n{self.log()}")
            if "listening as MUSCLENODE with TLS" in self.log():
                return
            time.sleep(0.1)
        raise AssertionError(f"node did not listen with TLS within {timeout} s:\n{self.log()}")


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return f'"{value}"'


@pytest.fixture
def tls_node_factory(tmp_path: Path, pki: Path):
    started: list[TLSNode] = []

    def start(name: str = "node", tls: dict | None = None, **settings) -> TLSNode:
        node = TLSNode(folder=tmp_path / name, port=free_port(), settings=settings)
        node.tls = {"enabled": True, "port": free_port(), "certificate": str(pki / "node.crt"),
                    "key": str(pki / "node.key"), "ca": str(pki / "ca.crt"), **(tls or {})}
        node.folder.mkdir(parents=True, exist_ok=True)
        started.append(node)
        return node.start()

    yield start
    for node in started:
        node.stop()


def _client_tls(pki: Path, name: str = "modality") -> tuple[str, ...]:
    return ("+tls", str(pki / f"{name}.key"), str(pki / f"{name}.crt"), "+cf", str(pki / "ca.crt"))


def _anonymous_tls(pki: Path) -> tuple[str, ...]:
    return ("+tla", "+cf", str(pki / "ca.crt"))


def test_echoscu_and_storescu_over_tls(tls_node_factory, pki: Path) -> None:
    node = tls_node_factory()
    port = str(node.tls["port"])
    echo = run_dcmtk("echoscu", *_client_tls(pki), "-aec", "MUSCLENODE", "127.0.0.1", port)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    anonymous = run_dcmtk("echoscu", *_anonymous_tls(pki), "-aec", "MUSCLENODE", "127.0.0.1", port)
    assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr
    store = run_dcmtk("storescu", *_client_tls(pki), "-aec", "MUSCLENODE", "127.0.0.1", port, MR)
    assert store.returncode == 0 and "Store Failed" not in store.stdout + store.stderr, store.stderr
    uid = dcmread(MR, stop_before_pixels=True).SOPInstanceUID
    assert len(list(node.data.glob(f"studies/*/*/{uid}.dcm"))) == 1
    # The plain port is still there (tls.plain defaults to true).
    assert run_dcmtk("echoscu", "-aec", "MUSCLENODE", "127.0.0.1", str(node.port)).returncode == 0


def test_untrusted_server_certificate_is_refused_by_dcmtk(tls_node_factory, pki: Path) -> None:
    """The client side of the check: DCMTK verifying against another CA refuses the node."""
    node = tls_node_factory()
    echo = run_dcmtk("echoscu", "+tla", "+cf", str(pki / "stranger.crt"), "-aec", "MUSCLENODE",
                     "127.0.0.1", str(node.tls["port"]))
    assert echo.returncode != 0


def test_plain_connection_to_tls_port_fails(tls_node_factory, pki: Path) -> None:
    node = tls_node_factory(tls={"plain": False})
    echo = run_dcmtk("echoscu", "-to", "10", "-ta", "10", "-aec", "MUSCLENODE", "127.0.0.1",
                     str(node.tls["port"]), timeout=60)
    assert echo.returncode != 0
    # With tls.plain = false nothing listens on node.port.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", node.port), timeout=2).close()


def test_client_certificate_from_another_ca_is_refused(tls_node_factory, pki: Path) -> None:
    node = tls_node_factory()
    echo = run_dcmtk("echoscu", *_client_tls(pki, "stranger"), "-aec", "MUSCLENODE", "127.0.0.1",
                     str(node.tls["port"]))
    assert echo.returncode != 0


def test_require_client_certificate_for_everyone(tls_node_factory, pki: Path) -> None:
    node = tls_node_factory(tls={"require_client_certificate": True})
    port = str(node.tls["port"])
    assert run_dcmtk("echoscu", *_anonymous_tls(pki), "-aec", "MUSCLENODE", "127.0.0.1", port).returncode != 0
    echo = run_dcmtk("echoscu", *_client_tls(pki), "-aec", "MUSCLENODE", "127.0.0.1", port)
    assert echo.returncode == 0, echo.stdout + echo.stderr


def test_peer_that_must_present_a_certificate(tls_node_factory, pki: Path) -> None:
    node = tls_node_factory(peers=[
        {"ae_title": "MODALITY", "host": "127.0.0.1", "require_certificate": True},
        {"ae_title": "*", "host": "127.0.0.1"},
    ])
    port = str(node.tls["port"])
    without = run_dcmtk("echoscu", *_anonymous_tls(pki), "-aet", "MODALITY", "-aec", "MUSCLENODE",
                        "127.0.0.1", port)
    assert without.returncode != 0
    assert "Rejected" in without.stdout + without.stderr
    plain = run_dcmtk("echoscu", "-aet", "MODALITY", "-aec", "MUSCLENODE", "127.0.0.1", str(node.port))
    assert plain.returncode != 0
    assert "must call over TLS with a certificate" in node.log()
    with_certificate = run_dcmtk("echoscu", *_client_tls(pki), "-aet", "MODALITY", "-aec", "MUSCLENODE",
                                 "127.0.0.1", port)
    assert with_certificate.returncode == 0, with_certificate.stdout + with_certificate.stderr
    # Another peer may still call without a certificate.
    other = run_dcmtk("echoscu", *_anonymous_tls(pki), "-aet", "OTHER", "-aec", "MUSCLENODE", "127.0.0.1", port)
    assert other.returncode == 0, other.stdout + other.stderr


def _storescp(folder: Path, pki: Path, port: int) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    scp = subprocess.Popen(
        [require_tool("storescp"), "+tls", str(pki / "pacs.key"), str(pki / "pacs.crt"), "+cf",
         str(pki / "ca.crt"), "-od", str(folder), "-aet", "PACS", str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return scp
        except OSError:
            time.sleep(0.05)
    scp.kill()
    raise AssertionError("storescp did not listen")


def _export_config(tmp_path: Path, pki: Path, port: int):
    path = write_toml(tmp_path / "musclenode.toml", {
        "node": {"data": str(tmp_path / "data")},
        "tls": {"certificate": str(pki / "node.crt"), "key": str(pki / "node.key"), "ca": str(pki / "ca.crt")},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port, "tls": True}],
    })
    return load_config(path, environ={})


def test_export_over_tls_to_storescp(tmp_path: Path, pki: Path) -> None:
    port = free_port()
    config = _export_config(tmp_path, pki, port)
    assert config.destinations[0].tls and not config.tls.enabled
    root = tmp_path / "data"
    (root / "results").mkdir(parents=True)
    shutil.copy(MR, root / "results" / "mr.dcm")
    dataset = dcmread(MR, stop_before_pixels=True)
    queue = ExportQueue(tmp_path / "index.sqlite", root)
    queue.add(1, [(dataset.SOPInstanceUID, dataset.SOPClassUID, "results/mr.dcm", "test")], config.destinations)
    exporter = Exporter(queue, "MUSCLENODE", tls={"pacs": client_context(config)})
    received = tmp_path / "pacs"
    scp = _storescp(received, pki, port)
    try:
        exporter.send_due()
    finally:
        scp.terminate()
        scp.wait()
    deliveries = queue.for_job(1)
    assert [d.state for d in deliveries] == ["sent"], deliveries
    files = [p for p in received.iterdir() if p.is_file()]
    assert len(files) == 1 and dcmread(files[0]).SOPInstanceUID == dataset.SOPInstanceUID
    queue.close()


def test_export_to_a_plain_storescp_fails_and_stays_pending(tmp_path: Path, pki: Path) -> None:
    port = free_port()
    config = _export_config(tmp_path, pki, port)
    root = tmp_path / "data"
    (root / "results").mkdir(parents=True)
    shutil.copy(MR, root / "results" / "mr.dcm")
    dataset = dcmread(MR, stop_before_pixels=True)
    queue = ExportQueue(tmp_path / "index.sqlite", root)
    queue.add(1, [(dataset.SOPInstanceUID, dataset.SOPClassUID, "results/mr.dcm", "test")], config.destinations)
    exporter = Exporter(queue, "MUSCLENODE", tls={"pacs": client_context(config)})
    received = tmp_path / "pacs"
    received.mkdir()
    scp = subprocess.Popen([require_tool("storescp"), "-od", str(received), "-aet", "PACS", str(port)],
                           env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        exporter.send_due()
    finally:
        scp.terminate()
        scp.wait()
    assert [d.state for d in queue.for_job(1)] == ["pending"]
    assert not list(received.iterdir())
    queue.close()


# -- bad settings -------------------------------------------------------------------------------


def _config(tmp_path: Path, tls: dict, **extra):
    return load_config(write_toml(tmp_path / "bad.toml", {"tls": tls, **extra}), environ={})


def test_enabled_without_certificate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^tls\.certificate: required"):
        _config(tmp_path, {"enabled": True})


def test_missing_certificate_file_is_refused(tmp_path: Path, pki: Path) -> None:
    config = _config(tmp_path, {"enabled": True, "certificate": str(tmp_path / "nope.crt"),
                                "key": str(pki / "node.key")})
    with pytest.raises(ConfigError, match=r"^tls\.certificate: no such file"):
        server_context(config)


def test_unreadable_key_is_refused(tmp_path: Path, pki: Path) -> None:
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    config = _config(tmp_path, {"enabled": True, "certificate": str(pki / "node.crt"), "key": str(garbage)})
    with pytest.raises(ConfigError, match=r"^tls\.key: cannot load"):
        server_context(config)


def test_key_of_another_certificate_is_refused(tmp_path: Path, pki: Path) -> None:
    config = _config(tmp_path, {"enabled": True, "certificate": str(pki / "node.crt"),
                                "key": str(pki / "modality.key")})
    with pytest.raises(ConfigError, match=r"^tls\.key: "):
        server_context(config)


def test_missing_ca_is_refused(tmp_path: Path, pki: Path) -> None:
    with pytest.raises(ConfigError, match=r"^tls\.ca: required"):
        _config(tmp_path, {"enabled": True, "certificate": str(pki / "node.crt"), "key": str(pki / "node.key"),
                           "require_client_certificate": True})
    config = _config(tmp_path, {"enabled": True, "certificate": str(pki / "node.crt"),
                                "key": str(pki / "node.key"), "ca": str(tmp_path / "none.crt")})
    with pytest.raises(ConfigError, match=r"^tls\.ca: no such file"):
        server_context(config)


def test_peer_requiring_certificate_without_tls_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^peers: 'MODALITY' has require_certificate"):
        _config(tmp_path, {}, peers=[{"ae_title": "MODALITY", "require_certificate": True}])


def test_serve_refuses_a_missing_key_and_names_it(tmp_path: Path, pki: Path) -> None:
    node = TLSNode(folder=tmp_path, port=free_port())
    node.tls = {"enabled": True, "port": free_port(), "certificate": str(pki / "node.crt"),
                "key": str(tmp_path / "missing.key")}
    node.start(wait=False)
    assert node.process is not None
    assert node.process.wait(timeout=60) == 2
    assert "tls.key: no such file" in node.log()


def test_serve_refuses_a_tls_destination_with_a_missing_ca(tmp_path: Path, pki: Path) -> None:
    """The export side is checked at start too: a destination with tls = true needs a loadable CA."""
    node = TLSNode(folder=tmp_path, port=free_port(), settings={"destinations": [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port(), "tls": True}]})
    node.tls = {"certificate": str(pki / "node.crt"), "key": str(pki / "node.key"), "ca": str(tmp_path / "no-ca.crt")}
    node.start(wait=False)
    assert node.process is not None
    assert node.process.wait(timeout=60) == 2
    assert "tls.ca: no such file" in node.log()


def test_node_builds_tls_contexts_for_tls_destinations_only(tmp_path: Path, pki: Path) -> None:
    import ssl

    from node.service import Node

    path = write_toml(tmp_path / "musclenode.toml", {
        "node": {"data": str(tmp_path / "data"), "min_free_mb": 1},
        "tls": {"certificate": str(pki / "node.crt"), "key": str(pki / "node.key"), "ca": str(pki / "ca.crt")},
        "destinations": [
            {"name": "secure", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242, "tls": True},
            {"name": "plain", "ae_title": "OTHER", "host": "127.0.0.1", "port": 4243},
        ],
    })
    node = Node(load_config(path, environ={}))
    assert set(node.exporter.tls) == {"secure"}
    context = node.exporter.tls["secure"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    node.exports.close()
