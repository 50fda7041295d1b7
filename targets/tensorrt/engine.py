"""The TensorRT engine builder and its per-layer precision proof (runs where ``import
tensorrt`` works: the NGC image for the H800, the L4T image on the Jetson).

``build_engine`` parses the artifact's legal ONNX into a strongly typed network (TensorRT 10
deprecates weak typing and 11 keeps only strong typing: INT8 where the Q/DQ say so, FP32
elsewhere FP16 or FP32 as the profile's precision chose the ONNX file: the very file the CPU
pre-gate ran), sets the device profile's optimization
profile (batch dynamic, sample size fixed), builder optimization level, workspace limit and
a timing cache (kept beside the engine, so a rebuild on the same GPU is fast), and saves the
engine. It then reads the engine inspector's per-layer JSON (detailed profiling verbosity)
and fails when a kernel the recipe quantized with a quantized input runs on a non-INT8 input
(Jetson's known silent fallback), naming the layers.

``tfmq-build-engine ARTIFACT_DIR`` (tfmq/cli/build_engine.py) is the entry point in the
device images (and in the artifact's build_engine.sh); it then runs the parity gates against
the golden data.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from tfmq.artifacts import inside
from tfmq.errors import ExportError, TfmqError

INT8_FORMATS = ("int8",)  # inspector "Format/Datatype" strings name the type, e.g. "Row major linear Int8 format"


def gpu_compute_capability() -> str | None:
    """The first GPU's compute capability ("9.0") from nvidia-smi, or None without one. (On a
    Jetson nvidia-smi may report none: ``TFMQ_GPU_SM`` then says it, e.g. "8.7".)"""
    import os

    if os.environ.get("TFMQ_GPU_SM"):
        return os.environ["TFMQ_GPU_SM"]
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    out = subprocess.run([exe, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True)
    caps = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    return caps[0] if out.returncode == 0 and caps else None


def build_engine(folder: Path) -> dict:
    """Build ``folder``'s engine from its legal ONNX and settings; returns engine.json's content."""
    import tensorrt as trt

    from tfmq.targets.tensorrt import CONFIG, ENGINE_INFO, PROFILES

    settings = json.loads((folder / CONFIG).read_text())
    profile = PROFILES[settings["device"]]
    cap = gpu_compute_capability()
    if cap != profile.compute_capability:
        raise ExportError(f"this GPU is compute capability {cap}, the {profile.name} profile builds for "
                          f"{profile.sm}: TensorRT engines only run on the architecture they were built on; "
                          f"build on {profile.build_on}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    onnx_file = inside(folder, settings["onnx"], "the ONNX file named in tensorrt.json")
    if not parser.parse_from_file(str(onnx_file)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT's ONNX parser refused {onnx_file}: {'; '.join(errors[:3])}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings["workspace_mb"] << 20)
    config.builder_optimization_level = settings["opt_level"]
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    opt = builder.create_optimization_profile()
    for name, s in settings["inputs"].items():
        opt.set_shape(name, s["min"], s["opt"], s["max"])
    config.add_optimization_profile(opt)
    cache_file = inside(folder, settings["timing_cache"], "the timing cache named in tensorrt.json")
    engine_file = inside(folder, settings["engine"], "the engine named in tensorrt.json")
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.time()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_file} (see the log above)")
    seconds = time.time() - t0
    engine_file.write_bytes(bytes(plan))
    cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    # with dynamic shapes the inspector reports "N/A due to dynamic shapes" for every tensor
    # format unless it is given an execution context whose input shapes are set
    context = engine.create_execution_context()
    for name, s in settings["inputs"].items():
        context.set_input_shape(name, s["opt"])
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    layers = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    (folder / f"{profile.name}.layers.json").write_text(json.dumps(layers, indent=1) + "\n")
    census = precision_census(layers, settings["int8_kernels"])
    info = {"engine": settings["engine"], "tensorrt": trt.__version__, "compute_capability": cap,
            "build_seconds": round(seconds, 1), "engine_bytes": engine_file.stat().st_size, **census}
    (folder / ENGINE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    if census["floating"]:
        bad = census["floating"]
        raise ExportError(f"TensorRT runs {len(bad)} of {len(settings['int8_kernels'])} quantized kernels on "
                          f"non-INT8 inputs: {', '.join(f'{k} ({v})' for k, v in list(bad.items())[:6])}"
                          + (" ..." if len(bad) > 6 else ""))
    return info


def precision_census(info: dict, kernels: dict[str, str]) -> dict:
    """Per quantized kernel (layer -> ONNX node), the input type of the engine layer holding it.

    ``info`` is the engine inspector's JSON with detailed verbosity: ``{"Layers": [{"Name",
    "LayerType", "Inputs": [{"Name", "Format/Datatype", ...}], "Metadata", ...}]}``, read with
    an execution context whose shapes are set (else formats read "N/A due to dynamic
    shapes", which counts as not INT8 here: a proof, not a guess). A layer
    holds an ONNX node when its name or metadata names it (fused layers name every node:
    "a + b", "[ONNX Layer: a]\\x1e[ONNX Layer: b]"). Myelin ``ForeignNode[first...last]`` layers
    name only their first and last nodes: a kernel inside one shows as ``unproven`` (listed,
    not passed silently)."""
    layers = info.get("Layers", [])
    if layers and isinstance(layers[0], str):
        raise TfmqError("the engine was built without detailed profiling verbosity: the inspector names the "
                        "layers only, not their types")
    result: dict[str, dict] = {}
    floating, unproven = {}, []
    for layer, node in kernels.items():
        hits = [ly for ly in layers if _names(ly, node)]
        if not hits:
            foreign = [ly for ly in layers if "ForeignNode" in str(ly.get("Name", ""))]
            result[layer] = {"node": node, "engine_layer": None,
                             "precision": "unproven (inside a fused Myelin region)" if foreign else "not found"}
            unproven.append(layer)
            continue
        ly = hits[0]
        types = [str(i.get("Format/Datatype", "")) for i in ly.get("Inputs", [])]
        int8 = any(f in t.lower() for t in types for f in INT8_FORMATS)
        result[layer] = {"node": node, "engine_layer": ly.get("Name"), "kind": ly.get("LayerType"),
                         "inputs": types, "precision": "int8" if int8 else (types[0] if types else "unknown")}
        if not int8:
            floating[layer] = result[layer]["precision"]
    return {"layers": result, "floating": floating, "unproven": unproven,
            "int8": sum(v["precision"] == "int8" for v in result.values())}


def _names(layer: dict, node: str) -> bool:
    """The engine layer holds ONNX node ``node``: its name is the node's or a fusion of it
    ("a + b", or "[CONVOLUTION]-[...]-[a] + ..."), or its metadata says "[ONNX Layer: a]"."""
    name = str(layer.get("Name", ""))
    meta = str(layer.get("Metadata", ""))
    return (node in (p.strip() for p in name.split(" + ")) or f"[{node}]" in name
            or f"[ONNX Layer: {node}]" in meta)
