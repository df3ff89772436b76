# syntax=docker/dockerfile:1
# SOWA inspection service: `sowa serve` on a CUDA runtime image. PyTorch's CUDA 13 wheels bring their own CUDA
# user-space libraries; the host provides the driver through the NVIDIA container toolkit.

ARG CUDA_BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# --- build: a virtual environment with the project and its pinned dependencies --------------------------------
FROM ${CUDA_BASE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# dependencies first, so a code change does not reinstall torch
COPY pyproject.toml README.md ./
COPY constraints ./constraints
RUN mkdir model service training sowa \
    && touch model/__init__.py service/__init__.py training/__init__.py sowa/__init__.py \
    && pip install -c constraints/ci.txt . && pip uninstall -y sowa-inspect
COPY model ./model
COPY service ./service
COPY training ./training
COPY sowa ./sowa
RUN pip install --no-deps .

# --- runtime: the environment, a non-root user, no compilers ------------------------------------------------
FROM ${CUDA_BASE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sowa \
    && useradd --system --uid 10001 --gid sowa --home-dir /data --shell /usr/sbin/nologin sowa \
    && mkdir -p /bundles /data && chown sowa:sowa /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SOWA_BUNDLE=/bundles/current \
    SOWA_DATA_DIR=/data \
    SOWA_HOST=0.0.0.0 \
    SOWA_PORT=8000 \
    SOWA_DEVICE=auto
VOLUME ["/bundles", "/data"]
EXPOSE 8000
USER 10001:10001
WORKDIR /data
# ready = model loaded, warmed up, classes restored; a large bundle takes a while to load
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('SOWA_PORT', '8000')}/readyz\", timeout=4).status == 200 else 1)"]
ENTRYPOINT ["sowa", "serve"]
