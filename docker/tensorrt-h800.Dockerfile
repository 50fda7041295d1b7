# tfmq for the NVIDIA H800 (sm_90): NGC's TensorRT image (TensorRT, its Python bindings and
# trtexec), plus tfmq-dm and Polygraphy. Its default command builds the engine of a mounted artifact
# (exported with --target tensorrt --device h800), proves INT8 per quantized layer and re-runs
# the parity gates against the artifact's golden data.
#   docker build -f docker/tensorrt-h800.Dockerfile -t tfmq-trt-h800 .
#   docker run --rm --gpus all -v "$PWD/artifacts/mnist-ddpm-h800:/artifact" tfmq-trt-h800
# Linted with hadolint in the test suite; not built on the development machines (no Docker
# engine, no GPU, and NVIDIA's registry is out of reach there).
FROM nvcr.io/nvidia/tensorrt:25.10-py3

# torch only computes the parity references on the host side: the CPU build keeps the image lean
ARG TORCH_VERSION=2.13.0
ARG POLYGRAPHY_VERSION=0.53.6
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    OMP_WAIT_POLICY=PASSIVE

WORKDIR /opt/tfmq
COPY pyproject.toml setup.py README.md LICENSE ./
COPY tfmq ./tfmq
COPY calibration ./calibration
COPY exporter ./exporter
COPY targets ./targets
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && pip install . "polygraphy==${POLYGRAPHY_VERSION}" \
    && python3 -c "import tensorrt; print('TensorRT', tensorrt.__version__)"

WORKDIR /artifact
CMD ["sh", "-c", "tfmq-build-engine /artifact && tfmq-parity /artifact"]
