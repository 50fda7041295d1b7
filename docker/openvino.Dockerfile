# tfmq for the Intel Xeon deployment: OpenVINO runtime, re-checks an artifact's parity there
# (golden outputs, INT8 per layer is re-proven by re-compiling) and can build the artifact.
#   docker build -f docker/openvino.Dockerfile -t tfmq-openvino .
#   docker run --rm -v "$PWD/artifacts/mnist-ddpm-ov:/artifact" tfmq-openvino          # tfmq-parity /artifact
#   docker run --rm -v "$PWD/artifacts:/artifacts" tfmq-openvino \
#       tfmq-export --target openvino --recipe w8a8 --out /artifacts/mnist-ddpm-ov --overwrite
# Linted with hadolint in the test suite; not built on the development machines (no Docker engine there).
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# the OpenVINO release the project's measurements were taken with (docs/results.md)
ARG OPENVINO_VERSION=2026.4.1

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
    && pip install . "openvino==${OPENVINO_VERSION}"

USER 1000:1000
WORKDIR /artifact
CMD ["tfmq-parity", "/artifact"]
