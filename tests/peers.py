"""Real peers for tests on 127.0.0.1: the node as a process, Orthanc as the PACS, DCMTK tools.

Nothing here is mocked: the node runs as ``python -m node serve`` with its own configuration file,
Orthanc as the Debian package's binary with a configuration in a temporary folder, and DCMTK's
command-line tools with ``TCP_NODELAY=1`` (DCMTK leaves Nagle's algorithm on otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[1]


def require_tool(name: str, install: str = "Debian packages dcmtk and orthanc; see deploy/test.sh") -> str:
    """Path of an external tool; fails in CI (which must install it) and skips elsewhere."""
    from tests.validators import missing

    # pynetdicom installs its own storescu, echoscu and storescp into the virtual environment:
    # the system's (DCMTK's) are the peers meant here, so the environment's folder is left out.
    ours = str(Path(sys.executable).parent)
    search = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != ours)
    path = shutil.which(name, path=search)
    if path is None:
        missing(name, install)
    return path


def wait_port(port: int, timeout: float = 20) -> bool:
    """Whether something listens on the loopback port within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def run_dcmtk(tool: str, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    """Run a DCMTK tool with Nagle off; output is captured as text."""
    result = subprocess.run(
        [require_tool(tool), *args], env=dcmtk_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{tool} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def write_toml(path: Path, sections: dict[str, Any]) -> Path:
    """Write a configuration: dict values become tables, lists of dicts arrays of tables."""
    lines = []
    for name, body in sections.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{name}]]")
                lines.extend(f"{k} = {_toml(v)}" for k, v in item.items())
        else:
            lines.append(f"[{name}]")
            tables = {k: v for k, v in body.items() if isinstance(v, list) and v and all(isinstance(i, dict) for i in v)}
            lines.extend(f"{k} = {_toml(v)}" for k, v in body.items() if k not in tables)
            for key, items in tables.items():
                for item in items:
                    lines += ["", f"[[{name}.{key}]]"]
                    lines.extend(f"{k} = {_toml(v)}" for k, v in item.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@dataclass
class NodeProcess:
    """musclenode running as its own process, so that it can be killed like a real one."""

    folder: Path
    port: int
    ae_title: str = "MUSCLENODE"
    settings: dict[str, Any] = field(default_factory=dict)
    http_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    restarts: int = 0

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def config_path(self) -> Path:
        return self.folder / "musclenode.toml"

    @property
    def log_path(self) -> Path:
        return self.folder / f"node-{self.restarts}.log"

    def write_config(self) -> None:
        node = {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port, "data": str(self.data),
                "min_free_mb": 1}
        sections: dict[str, Any] = {"node": {**node, **self.settings.get("node", {})}}
        sections["assembly"] = {"quiet_seconds": 1, **self.settings.get("assembly", {})}
        sections["http"] = {"port": self.http_port, **self.settings.get("http", {})}
        # Receive-only unless a test asks for processing: most tests check the DICOM side.
        sections["jobs"] = {"workers": 0, **self.settings.get("jobs", {})}
        # The dashboard only where a test asks for it (its users), on a free port.
        if "dashboard" in self.settings:
            sections["dashboard"] = {"port": self.dashboard_port, **self.settings["dashboard"]}
        for key in ("peers", "destinations", "rules", "model", "metrics"):
            if key in self.settings:
                sections[key] = self.settings[key]
        write_toml(self.config_path, sections)

    def start(self, wait: bool = True) -> "NodeProcess":
        self.write_config()
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "node", "--config", str(self.config_path), "serve"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"node exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"node did not listen within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.folder.glob("node-*.log")))

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def restart(self) -> "NodeProcess":
        self.stop()
        self.restarts += 1
        return self.start()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "node", "--config", str(self.config_path), *args],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"musclenode {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json", "--associations", "1000", "--jobs", "1000").stdout)

    def wait_for(self, predicate, timeout: float = 60, what: str = "condition") -> dict[str, Any]:
        """Poll ``status`` until ``predicate(status)`` holds; return that status."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}; last status:\n{json.dumps(status, indent=1)[:4000]}")

    def storescu(self, files: Iterable[Path | str], *options: str, calling: str = "STORESCU") -> subprocess.CompletedProcess:
        return run_dcmtk("storescu", "-aet", calling, "-aec", self.ae_title, *options,
                         "127.0.0.1", str(self.port), *map(str, files))


class Orthanc:
    """A real Orthanc (Debian package) in a temporary folder, on free ports of 127.0.0.1."""

    def __init__(self, folder: Path, ae_title: str = "ORTHANC", modalities: dict[str, list[Any]] | None = None,
                 extra_config: dict[str, Any] | None = None, ready_path: str = "/system") -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.modalities = modalities or {}
        # Plugins, Lua scripts and their settings; ready_path is what must answer before start returns.
        self.extra_config = extra_config or {}
        self.ready_path = ready_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> "Orthanc":
        binary = require_tool("Orthanc")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "musclenode-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": self.modalities,
            "StableAge": 2,
            "Plugins": [],
            "DicomScpTimeout": 30,
            "HttpTimeout": 60,
            **self.extra_config,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        log = open(self.folder / "orthanc.log", "w")
        self.process = subprocess.Popen([binary, str(path)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"Orthanc exited:\n{(self.folder / 'orthanc.log').read_text()}")
            try:
                self.get(self.ready_path)
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        raise AssertionError(f"Orthanc did not answer {self.ready_path} within 30 s:\n"
                             f"{(self.folder / 'orthanc.log').read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _request(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        data = None
        headers = {}
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = "application/dicom" if isinstance(body, bytes) else "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=120) as response:
            payload = response.read()
        return payload if raw else json.loads(payload or b"null")

    def get(self, path: str, raw: bool = False) -> Any:
        return self._request("GET", path, raw=raw)

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", path, body)

    def upload(self, files: Iterable[Path]) -> list[str]:
        """Put files into Orthanc over REST; return their Orthanc instance ids."""
        return [self.post("/instances", Path(f).read_bytes())["ID"] for f in files]

    def send(self, modality: str, resources: list[str]) -> Any:
        """Make Orthanc C-STORE resources to a configured modality, waiting until done."""
        return self.post(f"/modalities/{modality}/store", {"Resources": resources, "Synchronous": True})


def bit_preserving_reference(folder: Path, files: Iterable[Path], *storescu_options: str) -> dict[str, bytes]:
    """What storescu actually puts on the wire, as DCMTK's bit-preserving storescp records it.

    DCMTK re-encodes some datasets while sending (sequence lengths, for example), so "byte for byte"
    is judged against this reference: the dataset bytes received by ``storescp +B``, by SOP
    Instance UID.
    """
    from pydicom import dcmread

    from tests.dicomfiles import dataset_bytes

    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    scp = subprocess.Popen(
        [require_tool("storescp"), "+B", "+xa", "-od", str(folder), "-aet", "REFERENCE", str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, timeout=10)
        run_dcmtk("storescu", "-aec", "REFERENCE", *storescu_options, "127.0.0.1", str(port), *map(str, files), check=True)
    finally:
        scp.terminate()
        scp.wait()
    return {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(p)
        for p in folder.iterdir() if p.is_file()
    }
