#!/bin/sh
# Build the TensorRT engine for NVIDIA H800 (Hopper) (sm_90, TensorRT 10.x or 11.x).
# Run it on any sm_90 machine with the deployment's TensorRT version, from the artifact's tensorrt/ folder.
# tfmq-build-engine builds with TensorRT's Python API, proves INT8 per quantized layer and
# re-runs the parity gates; the trtexec line below builds the same engine without tfmq.
set -eu
cd "$(dirname "$0")"
if command -v tfmq-build-engine >/dev/null 2>&1; then
    exec tfmq-build-engine ..
fi
exec trtexec --onnx=model.fp16.onnx --stronglyTyped --minShapes=sample:1x1x32x32,timestep:1 --optShapes=sample:8x1x32x32,timestep:1 --maxShapes=sample:32x1x32x32,timestep:1 --memPoolSize=workspace:8192M --builderOptimizationLevel=5 --timingCacheFile=timing.h800.cache --saveEngine=model.h800.engine --profilingVerbosity=detailed --exportLayerInfo=h800.layers.json
