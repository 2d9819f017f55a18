"""Deployment files checked without running them: the Orthanc routing script, the Kubernetes
manifest's cross-references, the systemd unit, and the image's HEALTHCHECK command.

tests/test_containers.py builds and runs the images, the compose stack and the Kubernetes
manifest; what is left here is what those runs do not show: that route.lua keeps non-lumbar
studies off the node, that the manifest's parts agree with each other and with its GPU request
(which podman cannot honour), that the systemd unit verifies and is hardened, and that the
HEALTHCHECK command fails when the node is down.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.config import load_config
from tests.peers import REPO, Orthanc, require_tool

DEPLOY = REPO / "deploy"
yaml = pytest.importorskip("yaml", reason="PyYAML is needed to check the Kubernetes manifest")


def _tool(name: str, package: str) -> str:
    return require_tool(name, f"Debian package {package}")


# -- Orthanc routing -----------------------------------------------------------------------------


def test_route_lua_parses() -> None:
    script = DEPLOY / "orthanc" / "route.lua"
    text = script.read_text()
    assert "function OnStableStudy(" in text
    for tag in ("Modality", "BodyPartExamined", "StudyDescription"):
        assert f'"{tag}"' in text
    luac = shutil.which("luac5.4") or shutil.which("luac5.3") or _tool("luac", "lua5.4")
    result = subprocess.run([luac, "-p", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_example_configuration_is_accepted() -> None:
    config = load_config(DEPLOY / "musclenode.example.toml", environ={})
    assert config.tls.port == 2762 and not config.tls.enabled


def routing_orthanc(folder: Path, modalities: dict) -> Orthanc:
    """The test Orthanc with deploy/orthanc/route.lua and the settings it needs from orthanc.json."""
    deployed = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    return Orthanc(folder, modalities=modalities, extra_config={
        "LuaScripts": [str(DEPLOY / "orthanc" / "route.lua")],
        "UserMetadata": deployed["UserMetadata"], "StableAge": 1,
    })


def _mr(path: Path, study: str, body_part: str, description: str) -> Path:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    dataset = dcmread(get_testdata_file("MR_small.dcm"))
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, generate_uid()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.BodyPartExamined, dataset.StudyDescription = body_part, description
    dataset.save_as(path)
    return path


def test_route_lua_in_a_real_orthanc(node, tmp_path: Path) -> None:
    """Orthanc with route.lua sends a stable lumbar MR study to the node, once, and keeps a head
    study and a thoracic one to itself."""
    from pydicom.uid import generate_uid

    orthanc = routing_orthanc(tmp_path / "orthanc", {"musclenode": ["MUSCLENODE", "127.0.0.1", node.port]})
    # Marks each stable study once route.lua has decided about it (Orthanc runs the scripts in one
    # Lua context, so this wraps route.lua's callback): then every decision can be waited for.
    marker = tmp_path / "decided.lua"
    marker.write_text('local route = OnStableStudy\n'
                      'function OnStableStudy(studyId, tags, metadata)\n'
                      '  route(studyId, tags, metadata)\n'
                      '  RestApiPut("/studies/" .. studyId .. "/metadata/TestDecided", "yes")\n'
                      'end\n')
    orthanc.extra_config["LuaScripts"].append(str(marker))
    orthanc.extra_config["UserMetadata"] = {**orthanc.extra_config["UserMetadata"], "TestDecided": 1025}
    orthanc.start()
    try:
        lumbar, head, ambiguous, thoracic = (generate_uid() for _ in range(4))
        files = [_mr(tmp_path / "lumbar.dcm", lumbar, "LSPINE", "MRT LWS"),
                 _mr(tmp_path / "head.dcm", head, "HEAD", "MR brain"),
                 _mr(tmp_path / "ambiguous.dcm", ambiguous, "SPINE", "Lumbar spine"),
                 _mr(tmp_path / "thoracic.dcm", thoracic, "SPINE", "Thoracic spine")]
        orthanc.upload(files)

        def settled() -> bool:
            """Every study decided on, and every C-STORE that a decision started has finished."""
            studies = orthanc.get("/studies")
            decided = all("TestDecided" in orthanc.get(f"/studies/{s}/metadata") for s in studies)
            jobs = orthanc.get("/jobs?expand")
            return len(studies) == 4 and decided and all(j["State"] in ("Success", "Failure") for j in jobs)

        deadline = time.monotonic() + 60
        while not settled():
            assert time.monotonic() < deadline, f"Orthanc did not decide on every study:\n{orthanc.get('/jobs?expand')}"
            time.sleep(0.2)
        status = node.status()
        studies = {s["study_uid"] for s in status["series"]}
        assert studies == {lumbar, ambiguous}, status["series"]
        assert status["counts"]["instances"] == 2
    finally:
        orthanc.stop()


# -- Kubernetes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubernetes() -> dict[str, dict]:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "musclenode.yaml").read_text()))
    return {d["kind"]: d for d in documents if d}


def test_kubernetes_manifest(kubernetes: dict[str, dict], tmp_path: Path) -> None:
    assert set(kubernetes) == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"}
    deployment = kubernetes["Deployment"]["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"]["type"] == "Recreate"
    pod = deployment["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True

    # The TOML in the ConfigMap is a configuration the node accepts, and the probes ask its HTTP port.
    toml = tmp_path / "musclenode.toml"
    toml.write_text(kubernetes["ConfigMap"]["data"]["musclenode.toml"])
    config = load_config(toml, environ={})
    assert config.http_host == "0.0.0.0" and config.device == "cuda"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"dicom": config.port, "http": config.http_port}
    # Ready when the node can store (/health); alive while its DICOM port listens (/live).
    assert {probe: container[probe]["httpGet"]["path"] for probe in ("readinessProbe", "livenessProbe")} == {
        "readinessProbe": "/health", "livenessProbe": "/live"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == config.http_port
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["MUSCLENODE_CONFIG"] == f"{mounts['config']}/musclenode.toml"
    assert mounts["data"] == str(config.data)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == kubernetes["PersistentVolumeClaim"]["metadata"]["name"]
    assert volumes["config"]["configMap"]["name"] == kubernetes["ConfigMap"]["metadata"]["name"]

    service = kubernetes["Service"]["spec"]
    assert service["selector"] == deployment["selector"]["matchLabels"]
    assert [(p["port"], p["targetPort"]) for p in service["ports"]] == [(11112, "dicom")]


# -- systemd -------------------------------------------------------------------------------------


def _unit() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / "musclenode.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_unit_is_hardened() -> None:
    unit = _unit()
    for key, value in {"ProtectSystem": "strict", "ReadWritePaths": "/var/lib/musclenode", "PrivateTmp": "yes",
                       "NoNewPrivileges": "yes", "ProtectHome": "yes", "CapabilityBoundingSet": "",
                       "DynamicUser": "yes", "StateDirectory": "musclenode", "RestartPreventExitStatus": "2"}.items():
        assert unit.get(key) == [value], f"{key}={unit.get(key)}"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze", "systemd")
    # The unit runs /opt/musclenode/bin/musclenode, which verify requires to exist: check a copy
    # that runs this checkout's interpreter instead, everything else unchanged.
    text = (DEPLOY / "musclenode.service").read_text()
    assert "ExecStart=/opt/musclenode/bin/musclenode serve" in text
    unit = tmp_path / "musclenode.service"
    unit.write_text(text.replace("/opt/musclenode/bin/musclenode serve", f"{sys.executable} -m node serve"))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "musclenode.service" not in result.stderr, result.stderr


# -- Dockerfile ----------------------------------------------------------------------------------


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_dockerfile_healthcheck_against_a_running_node(node) -> None:
    """The HEALTHCHECK command, run as written but on the test node's HTTP port."""
    command = re.search(r"CMD (python -c .*)$", _dockerfile(), re.M).group(1)
    command = command.replace("127.0.0.1:8089", f"127.0.0.1:{node.http_port}")
    argv = shlex.split(command)
    argv[0] = sys.executable
    assert subprocess.run(argv, timeout=30).returncode == 0
    node.stop()
    assert subprocess.run(argv, timeout=30, capture_output=True).returncode != 0
