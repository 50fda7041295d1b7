"""The OpenVINO target (Intel Xeon CPU): the QDQ ONNX compiled to OpenVINO IR, INT8 proven per layer.

``compile`` converts the portable QDQ graph with ``ov.convert_model`` (Q/DQ pairs become
FakeQuantize; the weights' DequantizeLinear stay integer constants + Convert/Subtract/
Multiply), saves ``model.xml``/``model.bin`` with ``compress_to_fp16=False`` (save_model's
default would re-compress float constants to FP16; the IR is checked for FP16 constants and
for the quantized weights still being integers), then compiles it for the CPU and reads the
runtime model back: every kernel the recipe quantized (each quantized layer's Conv /
MatMul, and the attention matmuls with Q/DQ on both inputs; the lowering report names their
nodes) must run in u8/i8. One that runs in f32/bf16 fails the export with its name: a spike
found that asymmetric weights (a weight zero-point) silently kept every conv in FP32, and a
zero-point on either operand of an activation x activation MatMul does the same; the
target requires recipes that avoid both (``requires``: symmetric weights and attention
operands; the presets get that variant, tagged ``+sym-weights+sym-attn``). Its rewrite of the
canonical graph (``passes.py``) puts 4-bit weights in 8-bit containers.

Options (``openvino.json`` in the artifact; the deployment settings, not the parity ones):
device (only "CPU"), precision (inference precision hint for the layers left in float: f32,
bf16 or f16; None = OpenVINO's default, bf16 on CPUs with AVX-512 BF16/AMX), threads,
streams, batch (None: dynamic; an int fixes the batch in the IR), cache_dir (compiled-blob
cache). Parity runs always use the f32 hint: on this CPU the bf16 default alone moves
outputs by ~2% and would hide what the quantization does.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tfmq.calibration.requirements import Requirements
from tfmq.errors import ExportError, TfmqError, first_line
from tfmq.runner import FLOOR_REASON, MARGIN_REASON, TRAJECTORY_FLOOR, Runner, Tolerance, in_chunks
from tfmq.targets.base import Lowered, Target, TargetOptions
from tfmq.targets.openvino.passes import eight_bit_containers

DEVICES = ("CPU",)
PRECISIONS = ("f32", "bf16", "f16")
INT8 = ("u8", "i8")
KERNELS = ("Convolution", "FullyConnected", "MatMul", "GroupConvolution")
CONFIG = "openvino.json"
FLOAT_PARTS_REL_L2 = 1e-4  # a float IR at f32 precision vs torch: only the summation order differs
XML, BIN = "model.xml", "model.bin"


@dataclass(frozen=True)
class OpenVinoOptions(TargetOptions):
    label = "OpenVINO"
    device: str = field(default="CPU", metadata={"help": "openvino: the device (CPU)", "choices": DEVICES})
    precision: str | None = field(default=None, metadata={
        "help": "openvino: the inference precision of the layers left in float (default: OpenVINO's for the "
                "CPU, bf16 where it has BF16; parity runs f32)", "choices": PRECISIONS})
    threads: int | None = field(default=None, metadata={"help": "openvino: inference threads"})
    streams: int | None = field(default=None, metadata={"help": "openvino: inference streams"})
    batch: int | None = field(default=None, metadata={"help": "openvino: fix the batch in the IR (default dynamic)"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "openvino: compiled-model cache directory on the deployment machine"})

    def __post_init__(self):
        if self.device.upper() not in DEVICES:
            raise TfmqError(f"OpenVINO device {self.device!r} is not supported by this target (one of: "
                            f"{', '.join(DEVICES)}; the Xeon deployment runs on the CPU plugin)")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise TfmqError(f"OpenVINO precision {self.precision!r}: one of {', '.join(PRECISIONS)}")
        for k in ("threads", "streams", "batch"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise TfmqError(f"OpenVINO {k} {v}: must be >= 1")

    def config(self, precision: str | None) -> dict:
        """The compile_model properties (``precision`` overrides the deployment hint)."""
        cfg: dict = {"PERFORMANCE_HINT": "LATENCY"}
        p = precision or self.precision
        if p:
            cfg["INFERENCE_PRECISION_HINT"] = p
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = self.threads
        if self.streams:
            cfg["NUM_STREAMS"] = self.streams
        if self.cache_dir:
            cfg["CACHE_DIR"] = self.cache_dir
        return cfg


class OpenVinoTarget(Target):
    name = "openvino"
    consumes = "qdq-onnx"
    description = "OpenVINO IR for the Xeon CPU, INT8 proven per layer"
    package = "openvino"
    install_hint = "pip install 'tfmq-dm[openvino]'"
    Options = OpenVinoOptions
    cpu_int8 = True
    requires = Requirements(symmetric_weights=True, symmetric_attention=True,
                            why="OpenVINO's CPU INT8 kernels take no weight zero-point, and an activation x "
                                "activation MatMul runs in INT8 only without zero-points")
    tolerance = Tolerance(
        error_margin=0.10, error_floor=1e-3, golden_rel_l2=0.05, trajectory_db=1.5,
        reasons={
            "error_margin": MARGIN_REASON,
            "error_floor": FLOOR_REASON,
            "golden_rel_l2": "another CPU (ISA, thread count) changes the kernels' summation order",
            "trajectory_db": "measured: OpenVINO's low-precision arithmetic flips more integers than ONNX Runtime "
                             "on the same graph, up to 1.5 dB below fake-quant on the bundled models",
            "trajectory_floor_db": TRAJECTORY_FLOOR,
        })

    def graph_passes(self, options: OpenVinoOptions) -> list:
        return [eight_bit_containers]

    def verify(self, lowered: Lowered, out_dir: Path, options: TargetOptions) -> dict:
        """model.onnx as the base, and the IR's integer weights and their scales against it."""
        import openvino as ov

        self.require()
        result = super().verify(lowered, out_dir, options)
        try:
            check_ir(_read_ir(ov.Core(), out_dir), out_dir, lowered.onnx, lowered.report.weights)
        except ExportError as e:
            result = {"passed": False, "checked": result["checked"] + " and the IR", "differs": [str(e)]}
        else:
            result["checked"] += " and the IR's integer weights and scales"
        return result

    def compile(self, lowered: Lowered, out_dir: Path, options: OpenVinoOptions) -> dict:
        import openvino as ov

        self.require()
        opts = options
        report = lowered.report.to_dict()
        model = ov.convert_model(str(lowered.onnx))
        _graph_names_only(model)
        if opts.batch:
            model.reshape({p: [opts.batch, *list(p.get_partial_shape())[1:]]
                           for p in model.inputs if p.get_names() & {"sample", "encoder_hidden_states"}})
        ov.save_model(model, str(out_dir / XML), compress_to_fp16=False)
        core = ov.Core()
        saved = core.read_model(str(out_dir / XML))  # what a deployment loads, checked and compiled
        ir = check_ir(saved, out_dir, lowered.onnx, report["weights"])
        compiled = core.compile_model(saved, opts.device, opts.config(None))
        census = precision_census(compiled, report["kernels"])
        (out_dir / CONFIG).write_text(json.dumps(asdict(opts), indent=2) + "\n")
        result = {"runtime": f"openvino {ov.get_version()}", "files": [XML, BIN, CONFIG], "options": asdict(opts),
                  "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string(), "ir": ir, **census}
        floating = census["floating"]
        if floating:
            raise ExportError(f"OpenVINO runs {len(floating)} of {len(census['layers'])} quantized kernels in "
                              f"floating point, not INT8: {', '.join(f'{k} ({v})' for k, v in list(floating.items())[:6])}"
                              + (" ..." if len(floating) > 6 else ""))
        return result

    def client_folder(self, model, out_dir: Path) -> dict:
        """optimum-intel's OVStableDiffusionPipeline folder: the IR as verified as
        ``unet/openvino_model.xml``, the float text encoder and VAE decoder converted to IR
        (f32 weights) and checked in OpenVINO (f32 precision) against torch."""
        import openvino as ov

        from tfmq.exporter import client_folder as cf

        folder = out_dir / cf.FOLDER
        files = cf.write(model, folder, {"openvino_model.xml": out_dir / XML, "openvino_model.bin": out_dir / BIN})
        core, compiled = ov.Core(), {}
        for part, onnx_file in files.items():
            xml = onnx_file.with_name("openvino_model.xml")
            ov.save_model(ov.convert_model(str(onnx_file)), str(xml), compress_to_fp16=False)
            onnx_file.unlink()  # the client reads the IR
            compiled[part] = core.compile_model(core.read_model(str(xml)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

        def run(part, feed):
            return list(compiled[part](feed).values())

        errors = cf.float_check(model, run)
        return {"dir": cf.FOLDER, "client": "optimum.intel.OVStableDiffusionPipeline",
                "float_parts_rel_l2": errors, "bound": FLOAT_PARTS_REL_L2,
                "passed": all(e <= FLOAT_PARTS_REL_L2 for e in errors.values())}

    def runner(self, out_dir: Path, options: dict | None = None) -> Runner:
        """The compiled IR; the f32 precision hint unless ``options['precision']`` says otherwise
        ("deploy": the artifact's own setting)."""
        return self._run(self._compile(out_dir, options))

    def deployment_runner(self, out_dir: Path) -> tuple[str, Runner] | None:
        compiled = self._compile(out_dir, {"precision": "deploy"})
        hint = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        if hint == "f32":
            return None
        return f"inference precision {hint} for the layers left in float (the deployment setting)", self._run(compiled)

    def _compile(self, out_dir: Path, options: dict | None):
        import openvino as ov

        self.require()
        saved = OpenVinoOptions.of(json.loads((out_dir / CONFIG).read_text())) if (out_dir / CONFIG).exists() \
            else OpenVinoOptions()
        opts = dict(options or {})
        precision = opts.pop("precision", "f32")
        if opts:
            saved = OpenVinoOptions.of({**asdict(saved), **opts})
        core = ov.Core()
        return core.compile_model(_read_ir(core, out_dir), saved.device, saved.config(None if precision == "deploy" else precision))

    @staticmethod
    def _run(compiled) -> Runner:
        names = {p.get_any_name() for p in compiled.inputs}
        static = compiled.input("sample").get_partial_shape()[0]
        fixed = static.get_length() if static.is_static else None
        request = compiled.create_infer_request()

        def once(sample, timestep, ehs):
            feed = {"sample": sample, "timestep": timestep}
            if "encoder_hidden_states" in names:
                feed["encoder_hidden_states"] = ehs
            return request.infer(feed)[compiled.output("out_sample")].copy()

        return in_chunks(once, fixed)  # a static-batch IR runs any batch in chunks of its own


def check_ir(model, out_dir: Path, lowered: Path, weights: dict) -> dict:
    """The saved IR (``model``, read back from ``out_dir``) holds no FP16 constant, and every
    quantized layer's integer weights and scales are the lowered graph's (hence the
    QuantState's), bit for bit, still as integers."""
    import onnx
    from onnx import numpy_helper

    consts, types = {}, {}
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant":
            t = str(op.get_output_element_type(0).get_type_name())
            types[t] = types.get(t, 0) + 1
            consts[op.get_friendly_name()] = op
    if types.get("f16"):
        raise ExportError(f"{out_dir / XML}: {types['f16']} constants were compressed to FP16")
    inits = {i.name: i for i in onnx.load(str(lowered)).graph.initializer}
    for layer in weights:
        name = f"{layer}.w_int"
        op = consts.get(name)
        if op is None:
            raise ExportError(f"{out_dir / XML}: {name} is not a constant of the IR")
        if str(op.get_output_element_type(0).get_type_name()) not in ("i8", "u8", "i4", "u4"):
            raise ExportError(f"{out_dir / XML}: {name} is stored as {op.get_output_element_type(0)}, not integers")
        if not np.array_equal(op.get_data().astype(np.int32), numpy_helper.to_array(inits[name]).astype(np.int32)):
            raise ExportError(f"{out_dir / XML}: {name} differs from the lowered graph's integers")
        scale = _dequantize_scale(op)
        if scale is None or not np.array_equal(scale.reshape(-1), numpy_helper.to_array(inits[f"{layer}.w_scale"])):
            raise ExportError(f"{out_dir / XML}: the scales of {name} differ from the lowered graph's")
    return {"xml_bytes": (out_dir / XML).stat().st_size, "bin_bytes": (out_dir / BIN).stat().st_size,
            "constants": dict(sorted(types.items())), "weights_checked": len(weights)}


def _dequantize_scale(const) -> np.ndarray | None:
    """The constant of the Multiply that dequantizes ``const`` (Convert [-> Subtract] -> Multiply)."""
    node = const
    for _ in range(3):
        users = [t.get_node() for t in node.output(0).get_target_inputs()]
        if len(users) != 1:
            return None
        node = users[0]
        if node.get_type_name() == "Multiply":
            other = [i.get_source_output().get_node() for i in node.inputs()]
            scales = [o for o in other if o.get_type_name() == "Constant"]
            return scales[0].get_data() if scales else None
    return None


def precision_census(compiled, kernels: dict[str, str]) -> dict:
    """Per quantized kernel (lowering report: layer -> ONNX node), the precision it runs in."""
    owner: dict[str, tuple[str, str]] = {}
    fused: list[tuple[list[str], str]] = []  # snippets subgraphs (e.g. a fused attention): names, precision
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind, precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        names = info["originalLayersNames"].astype(str).split(",")
        for name in names:
            owner.setdefault(name, (kind, precision))
            # the low-precision passes may leave only their own names, "<node>/DequantizationMultiply"
            if kind in KERNELS and "/Dequantization" in name:
                owner.setdefault(name.rpartition("/")[0], (kind, precision))
        if kind == "Subgraph":
            fused.append((names, precision))
    layers, floating, by_type = {}, {}, {}
    for layer, node in kernels.items():
        kind, precision = owner.get(node, ("missing", "not found in the compiled model"))
        if kind == "missing":  # a fused attention keeps only some of its nodes' names: its other MatMul's
            scope = node.rpartition("/")[0] + "/MatMul"
            hit = [p for names, p in fused if any(n.startswith(scope) for n in names)]
            if hit:
                kind, precision = "Subgraph (fused attention)", hit[0]
        layers[layer] = {"node": node, "kernel": kind, "precision": precision}
        by_type.setdefault(kind, {}).setdefault(precision, 0)
        by_type[kind][precision] += 1
        if precision not in INT8:
            floating[layer] = precision
    return {"layers": layers, "by_kernel": by_type, "floating": floating}


TARGET = OpenVinoTarget()


def _graph_names_only(model) -> None:
    """Each input and output named only as in the ONNX graph: the converter folds no-op
    Reshape/Cast nodes into an input and gives it their tensor names too, and clients that
    take ``get_any_name()`` (optimum-intel's reshape of the UNet) then miss ``timestep``."""
    for port in (*model.inputs, *model.outputs):
        names = port.get_names() & {"sample", "timestep", "encoder_hidden_states", "out_sample"}
        if len(names) == 1:
            port.get_tensor().set_names(names)


def _read_ir(core, out_dir: Path):
    """The IR of ``out_dir``, or one line saying which file is missing or unreadable."""
    for f in (XML, BIN):
        if not (out_dir / f).is_file():
            raise TfmqError(f"{out_dir}: the OpenVINO IR is incomplete ({f} is missing)")
    try:
        return core.read_model(str(out_dir / XML))
    except RuntimeError as e:
        raise TfmqError(f"{out_dir / XML}: OpenVINO cannot read this IR ({first_line(e)})") from e
