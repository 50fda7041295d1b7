#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, as one short script for a lent GPU machine (its copy of
# the repository as working directory; a CUDA build of torch and, for the engine checks,
# TensorRT wanted). Writes what it saw under ${OUT:-gpu_check}.
set -uo pipefail
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python -c "import torch; print(torch.__version__, torch.cuda.is_available())"; } > "$OUT/host.txt" 2>&1
python -m pytest -q -p no:cacheprovider runtime_tests/test_cuda_recording.py -s > "$OUT/cuda_recording.txt" 2>&1
echo "cuda_recording rc=$?" >> "$OUT/summary.txt"
if python -c "import tensorrt" 2>/dev/null; then
  python -m pytest -q -p no:cacheprovider runtime_tests/test_tensorrt_engine.py > "$OUT/tensorrt.txt" 2>&1
  echo "tensorrt rc=$?" >> "$OUT/summary.txt"
else
  echo "tensorrt: not importable here" >> "$OUT/summary.txt"
fi
cat "$OUT/summary.txt"
