#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian machine with Python 3.11, then run them all.
#   bash deploy/test.sh [pytest arguments]
# Debian packages: the real peers the tests talk to (DCMTK, Orthanc) and podman for the container
# tests. Python: a virtual environment in .venv with musclenode and its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v storescu >/dev/null || need+=(dcmtk)
command -v Orthanc >/dev/null || need+=(orthanc)
# PixelMed's DicomSRValidator checks the TID 1500 content of the SR (brings a Java runtime).
[ -f /usr/share/java/pixelmed.jar ] || need+=(pixelmed-apps)
# Deployment checks: the Orthanc routing script (luac), the systemd unit, TLS certificates.
command -v luac >/dev/null || need+=(lua5.4)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v openssl >/dev/null || need+=(openssl)
# The viewer test: OHIF in headless Chromium, fed by Orthanc's DICOMweb plugin.
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v chromium >/dev/null || need+=(chromium)
command -v npm >/dev/null || need+=(nodejs npm)
# Containers (tests/test_containers.py): podman with runc (crun refuses hybrid cgroup layouts),
# catatonit for kube play's pause image, debootstrap for the base image built from the Debian archive.
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v catatonit >/dev/null || need+=(catatonit)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v newuidmap >/dev/null || need+=(uidmap)
command -v fuse-overlayfs >/dev/null || need+=(fuse-overlayfs)
command -v slirp4netns >/dev/null || need+=(slirp4netns)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# playwright-core (pinned in tests/viewer/package-lock.json) and OHIF's built viewer; @ohif/app is
# fetched as its package tarball because installing it resolves a dependency tree that npm refuses.
if [ ! -d tests/viewer/node_modules/playwright-core ]; then
    (cd tests/viewer && npm ci --no-audit --no-fund --loglevel=error)
fi
if [ ! -d tests/viewer/ohif/package/dist ]; then
    (cd tests/viewer && mkdir -p ohif && npm pack @ohif/app@3.13.2 --pack-destination ohif --loglevel=error >/dev/null \
        && tar xzf ohif/ohif-app-3.13.2.tgz -C ohif)
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
# The train extra too: the MuscleMap equivalence and training tests need torch and MONAI.
.venv/bin/python -m pip install -q -e '.[test,train]'

exec .venv/bin/python -m pytest -ra "$@"
