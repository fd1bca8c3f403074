# syntax=docker/dockerfile:1
# lstm-serve: the stateful gRPC server on ONNX Runtime, with the bundled Time Machine model.
#
#   docker build -t lstm-serve .
#   docker run --rm -p 50051:50051 -p 8000:8000 -p 9090:9090 lstm-serve            # CPU
#   docker run --rm --gpus all -p 50051:50051 -p 8000:8000 -p 9090:9090 lstm-serve # CUDA if it works
#   curl -s 127.0.0.1:8000/v2/health/ready -w '%{http_code}\n'   # KServe v2 over HTTP/REST
#
# Behind a TLS-intercepting proxy, lend the build the host's CA bundle (it is mounted for the pip
# steps only, never copied into a layer):
#   docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt -t lstm-serve .
#
# BASE_IMAGE must match the onnxruntime-gpu pinned in pyproject.toml. onnxruntime-gpu 1.31.1 is a
# CUDA 13 / cuDNN 9 build: its onnxruntime/capi/build_and_package_info.py says cuda_version '13.0',
# libonnxruntime_providers_cuda.so needs libcudart.so.13 and libcublas.so.13, and its `cudnn` extra
# asks for nvidia-cudnn-cu13 ~= 9.0. CUDA 13.x runtimes are minor-version compatible with a 13.0
# build. Any base with python3 >= 3.11 (or apt to install it) works: the container test passes a
# local Debian bookworm image here because no registry is reachable where it runs.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS python-base
# The CUDA images carry no Python; install it only where the base lacks it, so a base that has it
# needs no package mirror. Versions are whatever the base's release ships (no pin is portable
# across Debian and Ubuntu bases).
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# --- builder: a wheel of lstm-serve (pure Python; the bundled model rides along as package data).
# Only the layers the server stands on go in: contract/ and protos/ below server/ (import-linter
# keeps server/ from importing training/ or export/, which need torch and onnx).
FROM python-base AS builder
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY contract ./contract
COPY protos ./protos
COPY server ./server
RUN --mount=type=secret,id=ca_bundle \
    if [ -f /run/secrets/ca_bundle ]; then \
        export PIP_CERT=/run/secrets/ca_bundle REQUESTS_CA_BUNDLE=/run/secrets/ca_bundle; \
    fi \
    && python3 -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir --disable-pip-version-check -c constraints.txt \
        "setuptools>=69" wheel \
    && /opt/build/bin/pip wheel --no-cache-dir --disable-pip-version-check --no-deps \
        --no-build-isolation --wheel-dir /wheels .

# --- runtime: the wheel and only the server's runtime dependencies (no torch, no onnx, no
# compilers) in a virtual environment; pip and setuptools leave once they have installed it.
FROM python-base AS runtime
RUN --mount=type=secret,id=ca_bundle \
    --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    if [ -f /run/secrets/ca_bundle ]; then \
        export PIP_CERT=/run/secrets/ca_bundle REQUESTS_CA_BUNDLE=/run/secrets/ca_bundle; \
    fi \
    && python3 -m venv /opt/lstm-serve \
    && /opt/lstm-serve/bin/pip install --no-cache-dir --disable-pip-version-check \
        -c /tmp/constraints.txt /wheels/lstm_serve-*.whl \
    && /opt/lstm-serve/bin/python -m pip uninstall -y -q --disable-pip-version-check pip setuptools \
    && /opt/lstm-serve/bin/python -c 'import server.cli, server.client'

# The model repository the server serves: a copy of the bundled one, at a fixed path that a
# volume can replace (deploy/compose.yaml, deploy/k8s; server/README.md, "Model repository").
COPY server/model_repo /models

ENV PATH=/opt/lstm-serve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    LSTM_SERVE_HOST=0.0.0.0 \
    LSTM_SERVE_PORT=50051 \
    LSTM_SERVE_HTTP_PORT=8000 \
    LSTM_SERVE_METRICS_PORT=9090 \
    LSTM_SERVE_PROVIDER=auto \
    LSTM_SERVE_MODEL_REPOSITORY=/models \
    LSTM_SERVE_DRAIN_GRACE_S=8

# gRPC (ours and KServe v2), KServe v2 over HTTP/REST (probes can use /v2/health/ready),
# Prometheus metrics.
EXPOSE 50051 8000 9090

# A numeric user, so orchestrators can verify runAsNonRoot without a passwd lookup.
USER 10001:10001

# The gRPC health service says SERVING only after the model is loaded and NOT_SERVING while
# draining. Through sh so the port follows LSTM_SERVE_PORT; any failure maps to 1 because Docker
# reserves exit code 2.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/bin/sh", "-c", "lstm-client health --timeout 4 --target \"127.0.0.1:${LSTM_SERVE_PORT}\" || exit 1"]

# The server drains on SIGTERM: health turns NOT_SERVING, new work is refused, in-flight requests
# get LSTM_SERVE_DRAIN_GRACE_S to finish, then it exits 0. The 8 s default fits inside Docker's
# 10 s stop timeout; raise both together (docker stop -t, compose stop_grace_period, Kubernetes
# terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM

ENTRYPOINT ["lstm-serve"]
