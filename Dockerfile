# syntax=docker/dockerfile:1
# bna-gateway image: the `bna` command line (offline job and gateway) on python:3.11-slim.
#
#   CPU (default):  docker build -t bna-gateway:cpu .
#   CUDA:           docker build -t bna-gateway:cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#                   (PyPI's Linux torch wheel is the CUDA build; a specific CUDA version comes from
#                   https://download.pytorch.org/whl/cuXXX)
#
# The container serves the bundle that /bundle/current names: `bna serve /bundle/current --host 0.0.0.0
# --port 8000`, the same command the end-to-end tests start; it watches that link and rolls a new bundle
# out without downtime. docker-compose.yml and deploy/k8s/ also run the offline job from this image:
# `bna-bundle-job demo|mitigate` (docker/bundle-job.sh) builds a bundle, installs it under
# /bundle/releases/ and re-points /bundle/current. /bundle, /work and /quarantine belong to the non-root
# user, so fresh named volumes mounted there do too. The image also runs with a read-only root file
# system (Kubernetes: readOnlyRootFilesystem) given a writable /tmp.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtual environment with torch and the project, copied whole into the runtime stage
FROM ${PYTHON_IMAGE} AS build
# Keep TORCH_VERSION equal to TORCH_SPEC in the Makefile (tests/test_deploy.py checks it).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the chosen index, so that `pip install .` finds its requirement satisfied.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bna_gateway ./bna_gateway
COPY models ./models
COPY mitigation ./mitigation
COPY service ./service
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install . \
    && python -c "import torch, bna_gateway.models, bna_gateway.mitigation, bna_gateway.service; print('torch', torch.__version__)"

# ---- runtime: the venv, a non-root user, nothing else
FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
RUN groupadd --system --gid "${UID}" bna \
    && useradd --system --uid "${UID}" --gid bna --home-dir /home/bna --create-home --shell /usr/sbin/nologin bna \
    && mkdir -p /bundle /work /quarantine \
    && chown bna:bna /bundle /work /quarantine
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 docker/bundle-job.sh /usr/local/bin/bna-bundle-job
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib
USER bna
WORKDIR /home/bna
EXPOSE 8000
# Ready means the bundle (f and every twin) is loaded and warmed; slim has no curl, so ask with urllib
# (a non-2xx answer raises, which exits non-zero).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
ENTRYPOINT ["bna", "serve"]
CMD ["/bundle/current", "--host", "0.0.0.0", "--port", "8000"]
