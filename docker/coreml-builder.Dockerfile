# tfmq Core ML builder on Linux: calibrates, converts the deploy module to an .mlpackage that
# carries our integers, checks it bit for bit and runs the Linux pre-gate. Core ML predictions
# need macOS: run `tfmq-parity` on the artifact there.
#   docker build -f docker/coreml-builder.Dockerfile -t tfmq-coreml .
#   docker run --rm -v "$PWD/artifacts:/artifacts" tfmq-coreml \
#       tfmq-export --target coreml --recipe w8a8 --out /artifacts/mnist-ddpm-coreml --overwrite
# Linted with hadolint in the test suite; not built on the development machines (no Docker engine there).
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# the coremltools release the conversions were verified with (docs/results.md)
ARG COREMLTOOLS_VERSION=9.0

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
    && pip install . "coremltools==${COREMLTOOLS_VERSION}"

USER 1000:1000
WORKDIR /artifacts
CMD ["tfmq-export", "--target", "coreml", "--recipe", "w8a8", "--out", "/artifacts/mnist-ddpm-coreml"]
