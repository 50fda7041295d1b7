"""The ONNX Runtime target (CPU).

It prefers recipes whose convs quantize their output (``activations.conv_outputs``, with
symmetric weights and attention operands: the presets get that variant here, tagged
``+conv-out``): the canonical graph then has each such conv as QuantizeLinear -> QLinearConv
-> DequantizeLinear with its per-step parameters gathered (exporter/qlinear.py), because ONNX Runtime has no faster integer conv and its QDQ fusion
cannot take FSC's folded per-step parameters (every conv then ran in float on dequantized
inputs: 0.67x of FP32). Linears and attention matmuls keep the fold (ORT fuses them into
MatMulIntegerToFloat). Its own rewrites of the graph are in ``passes.py``: 4-bit weights as
INT4 behind a Cast to INT8 that ORT folds at load (a 4-bit file running 8-bit kernels), and,
for a deployment CPU without VNNI (option ``vnni``, default: this CPU's), every 8-bit tensor
unsigned. A conv whose input is quantized in channel groups keeps one float conv
per group on its dequantized slice (reported as ``channel_group_convs_in_float``): QLinearConv
would round each partial sum to 8 bits. Standard ai.onnx ops only.

``compile`` lets ONNX Runtime optimize the graph at the portable level (ORT_ENABLE_EXTENDED:
QDQ fusions, no hardware-specific layouts), saves the optimized model beside the lowered one,
and reports which quantized layers became integer kernels (QLinearConv, QLinearMatMul,
MatMulIntegerToFloat, ...) and which still run in float on dequantized inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from tfmq.calibration.recipe import Recipe, RecipeError
from tfmq.calibration.requirements import Requirements
from tfmq.hostcpu import describe, int8_dot_saturates
from tfmq.runner import FLOOR_REASON, MARGIN_REASON, TRAJECTORY_FLOOR, Runner, Tolerance, onnx_session, ort_session
from tfmq.targets.base import Lowered, Target, TargetOptions
from tfmq.targets.onnxruntime.passes import int4_behind_cast, unsigned_8bit

INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
                   "QLinearAdd", "QLinearMul", "QGemm", "QAttention", "DynamicQuantizeMatMul")
OPTIMIZED = "model.optimized.onnx"


@dataclass(frozen=True)
class OnnxRuntimeOptions(TargetOptions):
    label = "ONNX Runtime"
    vnni: bool | None = field(default=None, metadata={
        "help": "onnx: the deployment CPU has VNNI (yes), or not (no: every 8-bit tensor stored unsigned, "
                "exact where u8 x s8 saturates); default: this CPU's"})

    @property
    def unsigned(self) -> bool:
        """Store every 8-bit tensor unsigned: the deployment CPU's u8 x s8 products saturate."""
        return int8_dot_saturates() if self.vnni is None else not self.vnni


class OnnxRuntimeTarget(Target):
    name = "onnx"
    consumes = "qdq-onnx"
    description = "ONNX Runtime on the CPU: every quantized conv an integer QLinearConv fed its step's parameters"
    package = "onnxruntime"
    install_hint = "pip install onnxruntime"
    Options = OnnxRuntimeOptions
    cpu_int8 = True
    prefers = Requirements(symmetric_weights=True, symmetric_attention=True, conv_outputs=True,
                           with_activations_only=True,
                           why="QLinearConv and MatMulIntegerToFloat take zero-point-0 weights; a conv runs "
                               "in integers only as QLinearConv, whose output is 8-bit")
    tolerance = Tolerance(
        error_margin=0.10, error_floor=1e-3, golden_rel_l2=0.05, trajectory_db=2.0,
        reasons={
            "error_margin": MARGIN_REASON,
            "error_floor": FLOOR_REASON,
            "golden_rel_l2": "another CPU or thread count changes ONNX Runtime's summation order",
            "trajectory_db": "measured: rounding flips compound over a run by the CPU's float order, up to 1.9 dB "
                             "below fake-quant on the bundled models; a kernel fault moves it 7 dB",
            "trajectory_floor_db": TRAJECTORY_FLOOR,
        })

    def check(self, recipe: Recipe, options: TargetOptions) -> None:
        super().check(recipe, options)
        if recipe.activations.conv_outputs and not recipe.weights.symmetric:
            raise RecipeError(f"recipe {recipe.name!r} quantizes conv outputs for QLinearConv, which takes int8 "
                              "weights with zero-point 0: set weights.symmetric: true")

    def resolved(self, options: OnnxRuntimeOptions) -> OnnxRuntimeOptions:
        return options if options.vnni is not None else replace(options, vnni=not options.unsigned)

    def graph_passes(self, options: OnnxRuntimeOptions) -> list:
        return [int4_behind_cast] + ([unsigned_8bit] if options.unsigned else [])

    def compile(self, lowered: Lowered, out_dir: Path, options: OnnxRuntimeOptions) -> dict:
        import onnx
        import onnxruntime as ort

        from tfmq.exporter.qdq_onnx import uses_external_data

        self.require()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(out_dir / OPTIMIZED)
        external = uses_external_data(lowered.onnx)
        if external:  # protobuf's 2 GB limit: the optimized model keeps its tensors beside it too
            (out_dir / (OPTIMIZED + ".data")).unlink(missing_ok=True)
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        OPTIMIZED + ".data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort_session(lowered.onnx, so)
        ops: dict[str, int] = {}
        group_convs = 0  # channel-group convs (GroupedDeployLayer): no QLinearConv form, see below
        for n in onnx.load(str(out_dir / OPTIMIZED), load_external_data=False).graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
            group_convs += n.op_type == "Conv" and "/groups." in n.name
        integer = {k: v for k, v in ops.items() if k in INTEGER_KERNELS}
        float_on_dq = {k: ops.get(k, 0) for k in ("Conv", "MatMul", "Gemm") if ops.get(k)}
        rep = {"runtime": f"onnxruntime {ort.__version__}", "optimized_model": OPTIMIZED, "host_cpu": describe(),
               "options": options.settings(),
               "weights": "u8 (w + 128, zero-point 128: U8U8 kernels, exact where U8S8 saturates)"
               if options.unsigned else "s8",
               "optimization_level": "ORT_ENABLE_EXTENDED", "integer_kernels": integer,
               "float_kernels": float_on_dq, "external_data": external, "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}
        if group_convs:
            rep["channel_group_convs_in_float"] = group_convs
            rep["channel_group_note"] = (
                "each channel group's partial conv runs in float on its dequantized input (same values as the "
                "integer conv): QLinearConv would round every partial sum to 8 bits, and ConvInteger measured "
                "6.5x slower than float")
        if not integer.get("QLinearConv") and float_on_dq.get("Conv"):
            rep["note"] = ("every conv runs in float (FP-kept layers, or a QuantState without conv output "
                           "quantizers: activations.conv_outputs, which the presets get here)")
        return rep

    def runner(self, out_dir: Path, options: dict | None = None) -> Runner:
        self.require()
        return session_runner(out_dir / "model.onnx", (options or {}).get("threads"))

    def client_folder(self, model, out_dir: Path) -> dict:
        """optimum's ORTStableDiffusionPipeline folder: the QDQ UNet as verified, the float text
        encoder and VAE decoder as ONNX, checked in ONNX Runtime against torch."""
        from tfmq.exporter import client_folder as cf

        unet = {"model.onnx": out_dir / "model.onnx"}
        if (out_dir / "model.onnx.data").is_file():
            unet["model.onnx.data"] = out_dir / "model.onnx.data"
        files = cf.write(model, out_dir / cf.FOLDER, unet)
        sessions = {part: ort_session(f) for part, f in files.items()}
        errors = cf.float_check(model, lambda part, feed: sessions[part].run(None, feed))
        return {"dir": cf.FOLDER, "client": "optimum.onnxruntime.ORTStableDiffusionPipeline",
                "float_parts_rel_l2": errors, "bound": FLOAT_PARTS_REL_L2,
                "passed": all(e <= FLOAT_PARTS_REL_L2 for e in errors.values())}


def session_runner(path: Path, threads: int | None = None) -> Runner:
    """An ONNX Runtime CPU session on this CPU: on one whose u8 x s8 products saturate, the
    NHWC QLinearConv of ORT_ENABLE_ALL measured 0.8 dB lower, so the level stops at EXTENDED."""
    return onnx_session(path, threads, extended_only=int8_dot_saturates())


FLOAT_PARTS_REL_L2 = 1e-4  # a float graph vs torch: only the summation order differs

TARGET = OnnxRuntimeTarget()
