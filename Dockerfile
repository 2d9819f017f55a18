# syntax=docker/dockerfile:1
# musclenode container images. Two targets, no torch in either (nothing at run time imports it):
#   docker build -t musclenode .                              CPU (the default, the last stage)
#   docker build --target cuda -t musclenode:cuda .           NVIDIA GPU: onnxruntime-gpu on CUDA 12 + cuDNN 9
# Run: docker run -p 11112:11112 -v musclenode-data:/var/lib/musclenode \
#        -v ./musclenode.toml:/etc/musclenode/musclenode.toml:ro musclenode
# tests/test_deploy.py checks what can be checked without a Docker daemon (the COPY sources exist,
# the install steps work in a fresh virtual environment without torch).

ARG PYTHON_VERSION=3.11

# -- build: wheels for musclenode and every dependency ------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY node node
COPY inference inference
COPY reports reports
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
    && ! ls /wheels | grep -i '^torch'

# -- cuda: NVIDIA CUDA runtime with Python 3.11 from deadsnakes, onnxruntime-gpu ----------------
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS cuda
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && apt-get purge -y software-properties-common gpg-agent && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --create-home --home-dir /home/musclenode musclenode \
    && mkdir -p /var/lib/musclenode /etc/musclenode && chown musclenode /var/lib/musclenode
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python3.11 -m venv /opt/musclenode \
    && /opt/musclenode/bin/pip install --no-cache-dir --no-index --find-links /wheels musclenode \
    && /opt/musclenode/bin/pip uninstall -y onnxruntime \
    && /opt/musclenode/bin/pip install --no-cache-dir "onnxruntime-gpu>=1.19"
ENV PATH=/opt/musclenode/bin:$PATH \
    MUSCLENODE_DATA=/var/lib/musclenode MUSCLENODE_PORT=11112 MUSCLENODE_DEVICE=auto \
    MPLCONFIGDIR=/home/musclenode/.matplotlib PYTHONUNBUFFERED=1
USER musclenode
# Warm matplotlib's font cache, so the first summary page does not wait for it.
RUN python -c "import matplotlib; matplotlib.use('Agg'); import matplotlib.font_manager" \
    && musclenode --version
WORKDIR /var/lib/musclenode
VOLUME /var/lib/musclenode
EXPOSE 11112 2762
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8089/health', timeout=5).status != 200)"
CMD ["musclenode", "serve"]

# -- cpu (default): slim Python with onnxruntime ------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS cpu
RUN useradd --system --uid 10001 --create-home --home-dir /home/musclenode musclenode \
    && mkdir -p /var/lib/musclenode /etc/musclenode && chown musclenode /var/lib/musclenode
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/musclenode \
    && /opt/musclenode/bin/pip install --no-cache-dir --no-index --find-links /wheels musclenode
ENV PATH=/opt/musclenode/bin:$PATH \
    MUSCLENODE_DATA=/var/lib/musclenode MUSCLENODE_PORT=11112 MUSCLENODE_DEVICE=cpu \
    MPLCONFIGDIR=/home/musclenode/.matplotlib PYTHONUNBUFFERED=1
USER musclenode
# Warm matplotlib's font cache, so the first summary page does not wait for it.
RUN python -c "import matplotlib; matplotlib.use('Agg'); import matplotlib.font_manager" \
    && musclenode --version
WORKDIR /var/lib/musclenode
VOLUME /var/lib/musclenode
EXPOSE 11112 2762
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8089/health', timeout=5).status != 200)"
CMD ["musclenode", "serve"]
