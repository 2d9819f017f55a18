"""Containers for tests: podman as these machines need it, and the project's images built on a
Debian base made from the Debian archive.

podman 4.3 from Debian runs containers here (no Docker daemon, no registry of images) with two
settings in a ``containers.conf`` that :func:`podman` writes and points ``CONTAINERS_CONF`` at:
the runc runtime (crun refuses this machine's hybrid cgroup layout) and no default ulimits
(podman's default raises the open-file and process limits, which is not permitted here).

Builds run with the host's network and CA bundle, and with the host's pip configuration
translated into a ``pip.conf`` mounted at ``/etc/pip.conf`` (:func:`pip_build_options`): pip
inside the build reaches the package registry the same way the host's pip does, and no host
name is written into the repository or the images.

Everything a test starts gets a name with :data:`RUN` in it, so that runs and leftovers never
collide; :class:`Cleanup` removes what was registered with it, last first, whatever happened.
"""

from __future__ import annotations

import ast
import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from tests.peers import REPO

#: In the names of everything a test run creates (images, containers, volumes, pods, projects).
RUN = secrets.token_hex(4)

#: pip settings carried into builds: where packages come from and how to reach it.
_PIP_KEYS = {"index-url", "extra-index-url", "find-links", "trusted-host", "cert", "client-cert", "proxy",
             "timeout", "default-timeout", "retries", "constraint", "no-index", "prefer-binary"}
#: Of those, the ones that may name files or folders on this machine (mounted into the build).
_PIP_PATHS = {"index-url", "extra-index-url", "find-links", "cert", "client-cert", "constraint"}
CA_CERTIFICATES = Path("/etc/ssl/certs")


def unique(name: str) -> str:
    """``name`` made unique to this test run."""
    return f"mn{RUN}-{name}"


@dataclass
class Podman:
    """The podman command with this machine's settings."""

    binary: str
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.binary, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def inspect(self, *args: str) -> Any:
        """``podman [KIND] inspect ...`` parsed: the first object (``pod inspect`` gives one, not a list)."""
        inspected = json.loads(self(*args).stdout)
        return inspected[0] if isinstance(inspected, list) else inspected

    def image_size(self, image: str) -> int:
        """Bytes of an image, all its layers."""
        return int(self("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


def podman(binary: str, folder: Path) -> Podman:
    """podman with a ``containers.conf`` in ``folder`` that these machines need."""
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n')
    return Podman(binary, {**os.environ, "CONTAINERS_CONF": str(conf)})


def pip_settings() -> dict[str, dict[str, str]]:
    """The host pip's effective settings by section, as ``pip config list`` shows them.

    Environment variables (``PIP_*``, shown in the section ``:env:``) count as ``[global]``;
    only settings about where packages come from and how to reach it are kept (``_PIP_KEYS``).
    """
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            timeout=60, check=True).stdout
    settings: dict[str, dict[str, str]] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if name in _PIP_KEYS and value:
            section = "global" if section in (":env:", "") else section
            settings.setdefault(section, {})[name] = ast.literal_eval(value)
    return settings


def _local_paths(name: str, value: str) -> list[Path]:
    """Files and folders of this machine that a pip setting names (``file://`` URLs and paths)."""
    paths = []
    for token in value.split():
        path = Path(urlparse(token).path) if token.startswith("file:") else Path(token)
        if not path.is_absolute() or not path.exists():
            continue
        # A PEP 503 index in FOLDER/simple links to files beside it, under FOLDER.
        if name.endswith("index-url") and path.name == "simple":
            path = path.parent
        paths.append(path)
    return paths


def pip_build_options(folder: Path) -> list[str]:
    """``podman build`` options that let pip in the build reach packages as the host's pip does.

    The host's network and CA bundle, the host's pip settings as ``/etc/pip.conf`` and every file
    or folder those settings name, all read-only.
    """
    folder.mkdir(parents=True, exist_ok=True)
    settings = pip_settings()
    lines, mounts = [], {CA_CERTIFICATES}
    for section, values in settings.items():
        lines.append(f"[{section}]")
        for name, value in values.items():
            lines.append(f"{name} = {value}")
            if name in _PIP_PATHS:
                mounts.update(p for p in _local_paths(name, value) if not p.is_relative_to(CA_CERTIFICATES))
    conf = folder / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    options = ["--network", "host", "--volume", f"{conf}:/etc/pip.conf:ro"]
    for path in sorted(mounts):
        options += ["--volume", f"{path}:{path}:ro"]
    return options


@dataclass
class Built:
    """An image built in this run and what it cost."""

    name: str
    seconds: float
    size: int

    def describe(self) -> str:
        return f"{self.name}: built in {self.seconds:.0f} s, {self.size / 1e6:.0f} MB"


def make_base(engine: Podman, name: str) -> Built:
    """Debian bookworm with Python 3.11 from the machine's Debian archive (deploy/base-image.sh)."""
    started = time.monotonic()
    result = subprocess.run(["bash", str(REPO / "deploy" / "base-image.sh"), name], env=engine.env,
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"deploy/base-image.sh failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return Built(name, time.monotonic() - started, engine.image_size(name))


def build(engine: Podman, name: str, context: Path, base: str, options: list[str], log: Path,
          target: str | None = None) -> Built:
    """``podman build`` in the Docker image format (OCI images carry no HEALTHCHECK); the output goes to ``log``."""
    command = ["build", "--format", "docker", "--build-arg", f"BASE={base}", *options, "--tag", name]
    if target:
        command += ["--target", target]
    started = time.monotonic()
    with open(log, "w") as output:
        result = subprocess.run([engine.binary, *command, str(context)], env=engine.env, stdout=output,
                                stderr=subprocess.STDOUT, timeout=3600)
    if result.returncode != 0:
        raise AssertionError(f"podman build {name} failed ({result.returncode}):\n{log.read_text()[-6000:]}")
    return Built(name, time.monotonic() - started, engine.image_size(name))


@dataclass
class Cleanup:
    """What a test started, removed last first by :meth:`run` (call it from a ``finally``)."""

    engine: Podman
    steps: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)

    def add(self, what: str, step: Callable[[], Any]) -> None:
        self.steps.append((what, step))

    def podman(self, *args: str) -> None:
        """Run ``podman ARGS`` at clean-up time."""
        self.add("podman " + " ".join(args), lambda: self.engine(*args, timeout=300, check=False))

    def run(self) -> None:
        failures = []
        while self.steps:
            what, step = self.steps.pop()
            try:
                step()
            except Exception as exc:  # keep cleaning up; report at the end
                failures.append(f"{what}: {exc}")
        if failures:
            raise AssertionError("clean-up failed:\n" + "\n".join(failures))


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Call ``check`` until it returns something true; return that, or fail after ``timeout`` s
    with the last exception or value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # the condition is not met yet
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")
