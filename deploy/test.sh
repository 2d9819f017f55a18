#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian machine with Python 3.11, then run them all.
#   bash deploy/test.sh [pytest arguments]
# Debian packages: the real peers the tests talk to (DCMTK, Orthanc). Python: a virtual
# environment in .venv with musclenode and its test extra.
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
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
# The train extra too: the MuscleMap equivalence and training tests need torch and MONAI.
.venv/bin/python -m pip install -q -e '.[test,train]'

exec .venv/bin/python -m pytest -ra "$@"
