# tfmq on a plain x86-64 CPU: runs the FP32 reference stage and re-checks artifacts.
#   docker build -f docker/cpu.Dockerfile -t tfmq-cpu .
#   docker run --rm -v "$PWD/artifacts:/artifacts" tfmq-cpu                 # tfmq-parity /artifacts/mnist-ddpm
#   docker run --rm -v "$PWD/artifacts:/artifacts" tfmq-cpu tfmq-export --out /artifacts/mnist-ddpm --overwrite
# Linted with hadolint in the test suite; not built on the development machines (no Docker engine there).
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    OMP_WAIT_POLICY=PASSIVE

RUN useradd --create-home --uid 1000 tfmq
WORKDIR /opt/tfmq
COPY pyproject.toml setup.py README.md LICENSE ./
COPY tfmq ./tfmq
COPY calibration ./calibration
COPY exporter ./exporter
COPY targets ./targets
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && pip install .

USER 1000:1000
WORKDIR /artifacts
CMD ["tfmq-parity", "/artifacts/mnist-ddpm"]
