"""The images built and run: the CPU and CUDA images, the compose stack with Orthanc, and the
Kubernetes manifest, all with podman on images built in this run from a base made by debootstrap.

Each image is built once per run (session fixtures), from one Debian bookworm base that
``deploy/base-image.sh`` makes from the machine's Debian archive; the CUDA target reuses the CPU
target's build stage (its wheels) and runtime layers. What was built and how long it took is
printed at the end of the run and written to ``artifacts/containers.json``.

- The CPU image, started as a hospital would (``podman run`` with a port, a volume and a
  configuration file): its HEALTHCHECK passes, it answers C-ECHO from the host (DCMTK echoscu),
  it serves as the non-root user, its log lines on standard output are JSON, an instance stored
  before the container is removed is still indexed by a new container on the same volume, and
  it holds no torch.
- The CUDA image: no torch, onnxruntime-gpu offers the CUDA provider, and every library the
  provider links against is found in the image except the NVIDIA driver's ``libcuda.so.1``,
  which the NVIDIA container toolkit mounts on a GPU host (no GPU here: it is not run on one).
- ``deploy/docker-compose.yml`` with podman-compose: Orthanc (Debian's orthanc and
  orthanc-dicomweb) routes a lumbar Dixon study to the node with ``deploy/orthanc/route.lua`` and
  the SEG, SR and summary arrive back in Orthanc's study.
- ``deploy/kubernetes/musclenode.yaml`` with ``podman kube play``: the pod's readiness and
  liveness probes pass when performed as the kubelet performs them (an HTTP GET to the pod's
  address on the probe's port), it answers C-ECHO from the peer the ConfigMap names, and it is
  torn down. See :func:`kube_variant` for what differs from the manifest and why.

Everything started is removed at the end of its test, also when the test fails; names carry
this run's id (:data:`tests.containers.RUN`).
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests import studies
from tests.containers import (Built, Cleanup, Podman, build, make_base, pip_build_options, podman, unique,
                              wait_until)
from tests.peers import REPO, Orthanc, free_port, require_tool, run_dcmtk
from tests.validators import find_tool

# Building an image takes minutes (the CUDA one downloads about 1.6 GB of wheels).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

DEPLOY = REPO / "deploy"
RESULT_MODALITIES = {"SEG", "SR", "OT"}
NODE_USER = ("musclenode", 10001)


# -- images, built once per run ---------------------------------------------------------------


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    binary = require_tool("podman", "Debian packages podman runc catatonit uidmap fuse-overlayfs slirp4netns "
                                    "(see deploy/test.sh)")
    return podman(binary, tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="session")
def built(request: pytest.FixtureRequest, engine: Podman) -> Iterator[dict[str, Built]]:
    """The images of this run by role; at the end they are printed, written to
    artifacts/containers.json and removed, with every intermediate image the builds left."""
    before = set(engine("images", "--all", "--quiet", "--no-trunc").stdout.split())
    images: dict[str, Built] = {}
    yield images
    lines = [f"{role}: {image.describe()}" for role, image in images.items()]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and lines:
        with capture.global_and_fixture_disabled():  # past pytest's capture, to the terminal
            reporter.write_line("")
            for line in lines:
                reporter.write_line(f"containers: {line}")
    artifacts = Path(os.environ.get("MUSCLENODE_ARTIFACTS", REPO / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "containers.json").write_text(json.dumps(
        {role: {"image": b.name, "seconds": round(b.seconds, 1), "bytes": b.size} for role, b in images.items()},
        indent=1))
    for image in reversed(list(images.values())):
        engine("rmi", image.name, timeout=300, check=False)
    left = set(engine("images", "--all", "--quiet", "--no-trunc").stdout.split()) - before
    if left:
        engine("rmi", *left, timeout=300, check=False)


@pytest.fixture(scope="session")
def build_options(engine: Podman, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return pip_build_options(tmp_path_factory.mktemp("pip"))


@pytest.fixture(scope="session")
def base_image(engine: Podman, built: dict[str, Built]) -> str:
    require_tool("debootstrap", "Debian package debootstrap (see deploy/test.sh)")
    built["base"] = make_base(engine, f"localhost/{unique('base')}:bookworm")
    return built["base"].name


def _build(role: str, context: Path, engine: Podman, built: dict[str, Built], base: str, options: list[str],
           logs: Path, target: str | None = None) -> Built:
    built[role] = build(engine, f"localhost/{unique(role)}:test", context, base, options,
                        logs / f"build-{role}.log", target)
    return built[role]


@pytest.fixture(scope="session")
def cpu_image(engine, built, base_image, build_options, tmp_path_factory) -> Built:
    return _build("cpu", REPO, engine, built, base_image, build_options, tmp_path_factory.mktemp("logs"), "cpu")


@pytest.fixture(scope="session")
def cuda_image(engine, built, base_image, build_options, cpu_image, tmp_path_factory) -> Built:
    # After the CPU image: the build stage and the runtime layers come from its cache.
    return _build("cuda", REPO, engine, built, base_image, build_options, tmp_path_factory.mktemp("logs"), "cuda")


@pytest.fixture(scope="session")
def orthanc_image(engine, built, base_image, build_options, tmp_path_factory) -> Built:
    return _build("orthanc", DEPLOY / "orthanc", engine, built, base_image, build_options,
                  tmp_path_factory.mktemp("logs"))


@pytest.fixture
def cleanup(engine: Podman) -> Iterator[Cleanup]:
    """Removes, at the end of the test, whatever the test registered."""
    steps = Cleanup(engine)
    yield steps
    steps.run()


def _python(engine: Podman, image: str, code: str) -> str:
    return engine("run", "--rm", "--network", "none", image, "python", "-c", code).stdout


NO_TORCH = ("import importlib.util, sys; sys.exit('torch is installed' if importlib.util.find_spec('torch') else 0)")


# -- the CPU image, run -----------------------------------------------------------------------


def _node_config(folder: Path) -> Path:
    """A node configuration as a site writes it: the callers by AE title, from any address (the
    published port shows them with the container network's gateway as their address)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "musclenode.toml"
    path.write_text('[[peers]]\nae_title = "ECHOSCU"\nhost = "*"\n\n[[peers]]\nae_title = "STORESCU"\nhost = "*"\n')
    path.chmod(0o644)
    return path


def _run_node(engine: Podman, cleanup: Cleanup, image: str, name: str, volume: str, config: Path, port: int) -> str:
    """``podman run`` as in the Dockerfile's comment; returns when the node answers C-ECHO."""
    cleanup.podman("rm", "--force", "--time", "20", name)
    engine("run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:11112",
           "--volume", f"{volume}:/var/lib/musclenode",
           "--volume", f"{config}:/etc/musclenode/musclenode.toml:ro",
           "--env", "MUSCLENODE_CONFIG=/etc/musclenode/musclenode.toml", image)
    wait_until(lambda: _echo(port).returncode == 0 or _exited(engine, name), 90, f"{name} to answer C-ECHO")
    if _exited(engine, name):
        raise AssertionError(f"{name} exited:\n{_logs(engine, name)}")
    return name


def _echo(port: int, host: str = "127.0.0.1", calling: str = "ECHOSCU"):
    return run_dcmtk("echoscu", "-aet", calling, "-aec", "MUSCLENODE", host, str(port), timeout=30)


def _exited(engine: Podman, name: str) -> bool:
    return engine.inspect("container", "inspect", name)["State"]["Status"] == "exited"


def _logs(engine: Podman, name: str) -> str:
    result = engine("logs", name, check=False)
    return f"stdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-6000:]}"


def _status(engine: Podman, container: str) -> dict[str, Any]:
    return json.loads(engine("exec", container, "musclenode", "status", "--json").stdout)


def test_cpu_image_runs_healthy_as_its_user_with_json_logs(engine, cpu_image, cleanup, tmp_path) -> None:
    name, volume, port = unique("node"), unique("node-data"), free_port()
    cleanup.podman("volume", "rm", "--force", volume)
    _run_node(engine, cleanup, cpu_image.name, name, volume, _node_config(tmp_path), port)

    # The image's HEALTHCHECK, run by podman as a container engine runs it.
    healthcheck = engine.inspect("container", "inspect", name)["Config"]["Healthcheck"]["Test"]
    assert "http://127.0.0.1:8089/health" in " ".join(healthcheck)
    wait_until(lambda: engine("healthcheck", "run", name, check=False).returncode == 0, 60, "a passing healthcheck")

    # C-ECHO from the host through the published port (DCMTK, Nagle off).
    echo = _echo(port)
    assert echo.returncode == 0, echo.stdout + echo.stderr

    # The node serves as the image's non-root user: the process itself, not just exec sessions.
    uid = engine("exec", name, "sh", "-c", "awk '$1 == \"Uid:\" { print $2 }' /proc/1/status").stdout.split()
    assert uid == [str(NODE_USER[1])]
    assert engine.inspect("container", "inspect", name)["Config"]["User"] == NODE_USER[0]

    # Log lines go to standard output, one JSON object each, and say what the node did.
    logs = engine("logs", name)
    entries = [json.loads(line) for line in logs.stdout.splitlines() if line.strip()]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    messages = " | ".join(e["message"] for e in entries)
    assert "listening as MUSCLENODE" in messages and "accepted from ECHOSCU" in messages, messages
    assert not [line for line in logs.stderr.splitlines() if line.startswith('{"time"')], logs.stderr

    # Nothing at run time imports torch, and the image does not carry it.
    _python(engine, cpu_image.name, NO_TORCH)


def test_data_volume_survives_a_new_container(engine, cpu_image, cleanup, tmp_path) -> None:
    """An instance stored by one container is still indexed by a new container on the same volume."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    volume, port, config = unique("restart-data"), free_port(), _node_config(tmp_path)
    cleanup.podman("volume", "rm", "--force", volume)
    first = _run_node(engine, cleanup, cpu_image.name, unique("first"), volume, config, port)
    source = get_testdata_file("MR_small.dcm")
    stored = run_dcmtk("storescu", "-aet", "STORESCU", "-aec", "MUSCLENODE", "127.0.0.1", str(port), source)
    assert stored.returncode == 0, stored.stdout + stored.stderr
    before = wait_until(lambda: (s := _status(engine, first))["counts"]["instances"] == 1 and s, 30, "the instance indexed")
    engine("stop", "--time", "20", first, timeout=60)
    engine("rm", first)

    second = _run_node(engine, cleanup, cpu_image.name, unique("second"), volume, config, port)
    after = _status(engine, second)
    assert after["counts"]["instances"] == 1, after
    study = str(dcmread(source, stop_before_pixels=True).StudyInstanceUID)
    assert [s["study_uid"] for s in after["series"]] == [study] == [s["study_uid"] for s in before["series"]]


def test_cuda_image_has_cuda_and_cudnn_from_wheels(engine, cuda_image) -> None:
    _python(engine, cuda_image.name, NO_TORCH)
    providers = _python(engine, cuda_image.name, "import onnxruntime; print(onnxruntime.get_available_providers())")
    assert "CUDAExecutionProvider" in providers, providers
    # What the CUDA provider links against resolves inside the image (CUDA runtime, cuBLAS, cuRAND,
    # cuFFT from the wheels), except the driver library that a GPU host's container toolkit mounts.
    linked = engine("run", "--rm", "--network", "none", cuda_image.name, "sh", "-c",
                    "ldd $(python -c 'import onnxruntime, pathlib; print(pathlib.Path(onnxruntime.__file__)"
                    ".parent / \"capi\" / \"libonnxruntime_providers_cuda.so\")')").stdout
    missing = sorted({line.split()[0] for line in linked.splitlines() if "not found" in line})
    assert missing == ["libcuda.so.1"], linked
    assert "libcublasLt.so" in linked and "libcudart.so" in linked, linked
    # cuDNN, which the provider opens at run time, is known to the dynamic loader.
    cache = engine("run", "--rm", "--network", "none", cuda_image.name, "ldconfig", "-p").stdout
    for library in ("libcudnn.so.9", "libcudnn_ops.so.9", "libcudnn_cnn.so.9", "libcufft.so"):
        assert library in cache, f"{library} is not known to the dynamic loader"
    config = engine.inspect("image", "inspect", cuda_image.name)["Config"]
    assert config["User"] == NODE_USER[0]


# -- the compose stack ------------------------------------------------------------------------


def _results_in(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict]]:
    found = orthanc.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
    by_modality: dict[str, list[dict]] = {}
    for item in orthanc.get(f"/studies/{found[0]}/series") if found else []:
        by_modality.setdefault(item["MainDicomTags"].get("Modality"), []).append(item)
    return by_modality


def test_compose_stack_routes_a_dixon_study_and_returns_results(engine, cpu_image, orthanc_image, base_image,
                                                                cleanup, tmp_path) -> None:
    studies.require_data()
    compose = find_tool("podman-compose", "pip install podman-compose (the test extra)")
    project = unique("stack")
    # Orthanc's REST client from the tests, pointed at the stack's Orthanc on two free host ports.
    orthanc = Orthanc(tmp_path / "orthanc")
    env = {**engine.env, "BASE": base_image, "MUSCLENODE_IMAGE": cpu_image.name, "ORTHANC_IMAGE": orthanc_image.name,
           "DICOM_PORT": str(free_port()), "ORTHANC_HTTP_PORT": str(orthanc.http_port),
           "ORTHANC_DICOM_PORT": str(orthanc.dicom_port)}
    command = [compose, "--project-name", project, "--file", str(DEPLOY / "docker-compose.yml")]

    def run(*args: str, check: bool = True):
        import subprocess

        result = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=600)
        if check and result.returncode != 0:
            raise AssertionError(f"podman-compose {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    cleanup.add("podman-compose down", lambda: run("down", "--volumes", check=False))
    run("up", "--detach")
    node, pacs = f"{project}_musclenode_1", f"{project}_orthanc_1"

    def logs() -> str:
        return f"musclenode {_logs(engine, node)}\northanc {_logs(engine, pacs)}"

    try:
        wait_until(lambda: orthanc.get("/system"), 60, "Orthanc's REST API")
        # Orthanc reaches the node over the compose network (the node knows it by AE title and address).
        wait_until(lambda: orthanc.post("/modalities/musclenode/echo", {}) == {}, 60, "Orthanc's C-ECHO to the node")

        dixon = studies.write_dixon_study(tmp_path / "dixon", contrasts=("water", "fat"))
        orthanc.upload(dixon.files)
        # route.lua sends the study when it is stable (StableAge), the node waits for quiet series,
        # segments, measures and sends its results back to Orthanc.
        results = wait_until(lambda: (r := _results_in(orthanc, dixon.study_uid)) and RESULT_MODALITIES <= set(r) and r,
                             600, "SEG, SR and summary in Orthanc", interval=2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs()}") from None
    assert {m: len(results[m]) for m in RESULT_MODALITIES} == {"SEG": 1, "SR": 1, "OT": 1}
    status = _status(engine, node)
    assert status["job_counts"]["done"] == 1 and status["export_counts"]["pending"] == 0, status
    # Orthanc's DICOMweb plugin (orthanc-dicomweb) serves the results too.
    series = orthanc.get(f"/dicom-web/studies/{dixon.study_uid}/series")
    assert {"SEG", "SR", "OT"} <= {s["00080060"]["Value"][0] for s in series}


# -- the Kubernetes manifest ------------------------------------------------------------------


def kube_variant(manifest: str, image: str, ports: dict[str, int]) -> list[dict[str, Any]]:
    """The manifest as ``podman kube play`` can run it here, changed only where it must be.

    - Names get this run's id (objects and the references between them).
    - The image is the CUDA image built in this run (the manifest's ``musclenode:cuda``).
    - No GPU: the ``nvidia.com/gpu`` limit goes (podman ignores it anyway) and
      ``MUSCLENODE_DEVICE=cpu`` overrides the ConfigMap's ``device = "cuda"``.
    - Each container port gets a free ``hostPort`` on 127.0.0.1: podman 4.3 publishes every
      container port on the host at the same number otherwise, which a second node would clash with.
    """
    import yaml

    documents = [d for d in yaml.safe_load_all(manifest) if d]
    names = {d["metadata"]["name"]: unique(d["metadata"]["name"]) for d in documents}
    for document in documents:
        document["metadata"]["name"] = names[document["metadata"]["name"]]
        if document["kind"] != "Deployment":
            continue
        pod = document["spec"]["template"]["spec"]
        for volume in pod["volumes"]:
            if "persistentVolumeClaim" in volume:
                volume["persistentVolumeClaim"]["claimName"] = names[volume["persistentVolumeClaim"]["claimName"]]
            if "configMap" in volume:
                volume["configMap"]["name"] = names[volume["configMap"]["name"]]
        for container in pod["containers"]:
            container["image"] = image
            container["resources"]["limits"].pop("nvidia.com/gpu")
            container["env"].append({"name": "MUSCLENODE_DEVICE", "value": "cpu"})
            for port in container["ports"]:
                port.update(hostPort=ports[port["name"]], hostIP="127.0.0.1")
    return documents


def _kubelet_probe(probe: dict[str, Any], address: str, ports: dict[str, int]) -> bool:
    """An httpGet probe as the kubelet performs it: GET the pod's address, success is 200-399."""
    get = probe["httpGet"]
    port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
    with urllib.request.urlopen(f"http://{address}:{port}{get['path']}", timeout=probe.get("timeoutSeconds", 1)) as r:
        return 200 <= r.status < 400


def test_kubernetes_manifest_with_podman_kube_play(engine, cuda_image, cleanup, tmp_path) -> None:
    import yaml

    documents = kube_variant((DEPLOY / "kubernetes" / "musclenode.yaml").read_text(), cuda_image.name,
                             {"dicom": free_port(), "http": free_port()})
    manifest = tmp_path / "musclenode.yaml"
    manifest.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    kinds = {d["kind"]: d for d in documents}
    spec = kinds["Deployment"]["spec"]["template"]["spec"]
    [container] = spec["containers"]
    kube_network = engine("network", "exists", "podman-default-kube-network", check=False).returncode == 0
    if not kube_network:  # kube play makes it on first use
        cleanup.podman("network", "rm", "podman-default-kube-network")
    for volume in (kinds["PersistentVolumeClaim"]["metadata"]["name"], kinds["ConfigMap"]["metadata"]["name"]):
        cleanup.podman("volume", "rm", "--force", volume)
    cleanup.podman("kube", "down", str(manifest))

    played = engine("kube", "play", str(manifest), timeout=300).stdout
    pod = engine.inspect("pod", "inspect", played.split("Pod:")[1].split()[0])
    infra = engine.inspect("container", "inspect", pod["InfraContainerID"])
    [address] = [n["IPAddress"] for n in infra["NetworkSettings"]["Networks"].values()]
    [name] = [c["Name"] for c in pod["Containers"] if c["Id"] != pod["InfraContainerID"]]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    try:
        for probe in ("readinessProbe", "livenessProbe"):
            wait_until(lambda: _kubelet_probe(container[probe], address, ports), 120, f"the {probe}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_logs(engine, name)}") from None
    # The PACS the ConfigMap names may call, from any address; others may not.
    echo = _echo(ports["dicom"], host=address, calling="ORTHANC")
    assert echo.returncode == 0, echo.stdout + echo.stderr
    assert _echo(ports["dicom"], host=address, calling="STRANGER").returncode != 0
    # The pod's security context: the node runs as user 10001, with no capabilities.
    inspected = engine.inspect("container", "inspect", name)
    assert inspected["Config"]["User"] == "10001:10001"
    assert not inspected["EffectiveCaps"], inspected["EffectiveCaps"]
