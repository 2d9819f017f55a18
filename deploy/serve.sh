#!/usr/bin/env bash
# Set up musclenode in .venv and start it on its embedded defaults (AE MUSCLENODE, port 11112,
# data in ./musclenode-data, calls accepted from this machine only). Extra arguments go to serve's
# configuration: MUSCLENODE_* environment variables or MUSCLENODE_CONFIG=file.toml work too.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q .
exec .venv/bin/musclenode "$@" serve
