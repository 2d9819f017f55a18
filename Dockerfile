# syntax=docker/dockerfile:1
# musclenode container images. Two targets, no torch in either (nothing at run time imports it):
#   docker build -t musclenode .                          CPU (the default, the last stage)
#   docker build --target cuda -t musclenode:cuda .       NVIDIA GPU: onnxruntime-gpu with CUDA and
#                                                         cuDNN from their PyPI wheels
# BASE is any Debian-based image with Python 3.11 (python3, venv, pip). Without a registry of
# images, make one from the Debian archive and build on it (podman works the same as docker):
#   bash deploy/base-image.sh localhost/debian-python:bookworm
#   podman build --build-arg BASE=localhost/debian-python:bookworm -t musclenode .
# Run (the configuration file is optional; without it the node's embedded defaults apply):
#   docker run -d -p 11112:11112 -v musclenode-data:/var/lib/musclenode \
#     -v ./musclenode.toml:/etc/musclenode/musclenode.toml:ro \
#     -e MUSCLENODE_CONFIG=/etc/musclenode/musclenode.toml musclenode
# tests/test_containers.py builds both targets, runs the CPU image and the deployment files.

ARG BASE=python:3.11-slim-bookworm

# -- build: wheels for musclenode and every dependency ------------------------------------------
FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY node node
COPY inference inference
COPY reports reports
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip wheel --no-cache-dir --wheel-dir /wheels . \
    && ! ls /wheels | grep -i '^torch'

# -- runtime: musclenode in a virtual environment, a non-root user, a data volume ---------------
FROM ${BASE} AS runtime
RUN groupadd --system --gid 10001 musclenode \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/musclenode musclenode \
    && mkdir -p /var/lib/musclenode /etc/musclenode && chown musclenode:musclenode /var/lib/musclenode
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python3 -m venv /opt/musclenode \
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

# -- cuda: the runtime with onnxruntime-gpu; CUDA and cuDNN come as PyPI wheels beside it --------
# The newest onnxruntime-gpu on PyPI is built for CUDA 13 (NVIDIA driver 580 or newer); for an older
# driver pass a release built for CUDA 12: --build-arg ONNXRUNTIME_GPU="onnxruntime-gpu[cuda,cudnn]==..."
FROM runtime AS cuda
ARG ONNXRUNTIME_GPU="onnxruntime-gpu[cuda,cudnn]"
USER root
# The wheels put their libraries under site-packages/nvidia/*/lib: the dynamic loader is told
# where, so that ONNX Runtime's CUDA provider finds them without LD_LIBRARY_PATH.
RUN /opt/musclenode/bin/pip uninstall -y onnxruntime \
    && /opt/musclenode/bin/pip install --no-cache-dir "$ONNXRUNTIME_GPU" \
    && find /opt/musclenode/lib/python3.11/site-packages/nvidia -name '*.so*' -printf '%h\n' | sort -u \
        > /etc/ld.so.conf.d/musclenode-cuda.conf \
    && ldconfig \
    && ! /opt/musclenode/bin/pip list 2>/dev/null | grep -i '^torch '
ENV MUSCLENODE_DEVICE=auto
USER musclenode

# -- cpu (default) --------------------------------------------------------------------------------
FROM runtime AS cpu
