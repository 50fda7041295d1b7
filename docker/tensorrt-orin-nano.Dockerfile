# tfmq on the Jetson Orin Nano (sm_87, JetPack 6 = L4T r36, TensorRT 10.3, aarch64). Engines are
# tied to the GPU and the TensorRT version, so the engine is built here, on the Jetson, from a
# mounted artifact exported elsewhere with --target tensorrt --device orin-nano; then INT8 is
# proven per layer and the parity gates re-run against the artifact's golden data.
#   docker build -f docker/tensorrt-orin-nano.Dockerfile -t tfmq-trt-orin .      # on the Jetson
#   docker run --rm --runtime nvidia -v "$PWD/artifacts/mnist-ddpm-orin:/artifact" tfmq-trt-orin
# Linted with hadolint in the test suite; not built on the development machines (no Docker
# engine, no Jetson).
FROM nvcr.io/nvidia/l4t-jetpack:r36.4.0

# aarch64 CPU torch from PyPI computes the parity references; TensorRT comes with JetPack
ARG TORCH_VERSION=2.13.0
ARG POLYGRAPHY_VERSION=0.53.6

# nvidia-smi on a Jetson does not report a compute capability: the engine builder reads it here
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    OMP_WAIT_POLICY=PASSIVE \
    TFMQ_GPU_SM=8.7

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-pip \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tfmq
COPY pyproject.toml setup.py README.md LICENSE ./
COPY tfmq ./tfmq
COPY calibration ./calibration
COPY exporter ./exporter
COPY targets ./targets
RUN python3 -m pip install "torch==${TORCH_VERSION}" \
    && python3 -m pip install . "polygraphy==${POLYGRAPHY_VERSION}" \
    && python3 -c "import tensorrt; print('TensorRT', tensorrt.__version__)"

WORKDIR /artifact
CMD ["sh", "-c", "tfmq-build-engine /artifact && tfmq-parity /artifact"]
