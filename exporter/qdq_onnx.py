"""The portable QDQ ONNX graph (opset 21, standard ai.onnx ops only) of a deploy module.

One path, in two steps:
1. the TorchScript exporter (deprecated in torch 2.9+, still in 2.13; it turns
   fake_quantize_* into Q/DQ, where the dynamo exporter needs quantized_decomposed ops for a
   dynamic batch) traces the deploy module in export mode: every activation
   quantizer becomes QuantizeLinear -> DequantizeLinear with constant parameters, every
   quantized weight Q -> DQ per output channel of its float value in an 8-bit container,
   the temporal features Gather rows of constant tables, FSC's fold a Gather of r_t / c_t;
2. a rewrite with onnx-ir: each weight's Q is dropped and its DQ reads the QuantState's
   integers directly, at their real width (INT4/UINT4 initializers for 4-bit layers, opset 21,
   else INT8/UINT8), checked equal to what Q of the float weight gives; every Q and DQ gets
   its own scale and zero-point initializers (shared constants made OpenVINO fall back to
   FP32 in a spike). Models over 2 GB are saved with external data.
The graph keeps the diffusers calling convention: inputs ``sample`` [B, C, H, W] (batch
dynamic), ``timestep`` [1] int64 (one value of the schedule; the host wrapper checks it), and
``encoder_hidden_states`` [B, L, D] for conditional models; output ``out_sample``.
"""
from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tfmq.errors import ExportError
from tfmq.exporter.deploy import DeployUNet

OPSET = 21
TRACE_OPSET = 20  # the TorchScript exporter's highest; 20 -> 21 only adds types (int4) and optional Q/DQ attributes
SCOPE = "/d/unet/"  # the tracer's scope prefix of every module inside the deploy UNet
EXTERNAL_DATA_BYTES = 2 * 1024 ** 3


@dataclass
class LoweringReport:
    weights: dict[str, dict] = field(default_factory=dict)  # layer -> {"dtype", "bits", "shape"}
    activations: list[str] = field(default_factory=list)  # quantizer scopes with Q/DQ
    # every quantized kernel -> its node in the graph: each quantized layer's Conv/MatMul/Gemm,
    # and the attention matmuls with a Q/DQ on both inputs ("<attention>.matmul_N"); a target
    # checks these are the ones that run in integers
    kernels: dict[str, str] = field(default_factory=dict)
    opset: int = OPSET
    ops: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"opset": self.opset, "weights": self.weights, "activations": self.activations,
                "kernels": self.kernels, "ops": self.ops}


class _Export(torch.nn.Module):
    def __init__(self, d: DeployUNet):
        super().__init__()
        self.d = d

    def forward(self, sample, timestep, *encoder_hidden_states):
        return self.d(sample, timestep, *encoder_hidden_states)


def trace(dep: DeployUNet, sample_shape: tuple[int, ...], cross: tuple[int, int] | None, path: Path) -> Path:
    """The TorchScript exporter's graph of the deploy module in export mode, written to ``path``
    (a file, not bytes: over 2 GB the exporter writes its tensors beside it as external data)."""
    names = ["sample", "timestep"] + (["encoder_hidden_states"] if cross else [])
    args = (torch.zeros(2, *sample_shape), dep.schedule[:1].clone())
    if cross:
        args += (torch.zeros(2, *cross),)
    dynamic = {n: {0: "batch"} for n in names if n != "timestep"} | {"out_sample": {0: "batch"}}
    dep.step.exporting = True
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # diffusers' shape asserts and batch-size branches: traced as constants, which holds
            # for the fixed sample size the tables and folds were built for
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter: see the module note
            torch.onnx.export(_Export(dep).eval(), args, str(path), dynamo=False, opset_version=TRACE_OPSET,
                              input_names=names, output_names=["out_sample"], dynamic_axes=dynamic,
                              do_constant_folding=True)
    finally:
        dep.step.exporting = False
    return path


def _scope(node) -> str:
    """'/d/unet/down_blocks.0/resnets.0/conv1/QuantizeLinear' -> 'down_blocks.0.resnets.0.conv1'."""
    name = node.name or ""
    if not name.startswith(SCOPE):
        return ""
    return name[len(SCOPE):].rpartition("/")[0].replace("/", ".")


def _int_type(bits: int, symmetric: bool, int4: bool):
    import onnx_ir as ir

    if bits == 4 and int4:
        return ir.DataType.INT4 if symmetric else ir.DataType.UINT4
    return ir.DataType.INT8 if symmetric else ir.DataType.UINT8


def _initializer(graph, name: str, values: np.ndarray, dtype=None):
    """Register ``values`` as the initializer ``name`` (of ``dtype``, else numpy's type) and
    return its value."""
    import onnx_ir as ir

    tensor = ir.tensor(values, dtype=dtype, name=name)
    value = ir.Value(name=name, const_value=tensor)
    value.shape, value.type = ir.Shape(tensor.shape), ir.TensorType(tensor.dtype)
    graph.register_initializer(value)
    return value


def _unsigned(values: np.ndarray) -> np.ndarray:
    """Signed 8-bit integers as UINT8 + 128: the same values against a zero-point moved by 128."""
    return (values.astype(np.int16) + 128).astype(np.uint8)


def _own_constant(graph, node, index: int, name: str, unsigned: bool = False) -> None:
    """Give ``node`` input ``index`` its own initializer (a copy of the constant it reads); with
    ``unsigned``, an INT8 zero-point becomes UINT8 + 128 (the quantized values shift with it)."""
    import onnx_ir as ir

    value = node.inputs[index]
    tensor = value.const_value
    if tensor is None and value.producer() is not None and value.producer().op_type == "Constant":
        tensor = value.producer().attributes["value"].as_tensor()
    if tensor is None:
        raise ExportError(f"{node.name}: input {index} is not a constant (Q/DQ parameters must be build-time constants)")
    values, dtype = tensor.numpy().copy(), tensor.dtype
    if unsigned and dtype == ir.DataType.INT8:
        values, dtype = _unsigned(values), ir.DataType.UINT8
    node.replace_input_with(index, _initializer(graph, name, values, dtype))


def rewrite(traced: Path, dep: DeployUNet, int4: bool = True, cast_int4: bool = False, u8_only: bool = False):
    """(onnx-ir model, LoweringReport): weights as the state's integers, own Q/DQ constants;
    4-bit values in INT4/UINT4 initializers, or in 8-bit ones when ``int4`` is False (for a
    runtime whose integer kernels take 8-bit weights only). ``cast_int4``: 4-bit weights stored
    as INT4/UINT4 behind a Cast to the 8-bit type, which a runtime folds at load into the 8-bit
    initializer its integer kernels need (ONNX Runtime: QLinearConv takes only 8-bit weights,
    and only 8-bit weights fuse into MatMulIntegerToFloat), so the file keeps 4-bit storage.
    ``u8_only``: every signed 8-bit tensor made unsigned with the same values (symmetric
    weights wider than 4 bits stored as UINT8 w + 128 with zero-point 128; INT8 activation Q/DQ
    pairs as UINT8 with zero-point + 128), so a runtime runs U8U8 kernels, which do not
    saturate on a CPU without VNNI (tfmq/hostcpu.py); 4-bit weights cannot saturate and stay."""
    import onnx_ir as ir

    model = ir.load(traced)  # external data, if any, memory-mapped from beside it: save before it goes
    graph = model.graph
    report = LoweringReport()
    seen_weights = set()
    qlinear_io = set()  # the Q before and DQ after each QLinearConv: per-step parameters, gathered
    for node in list(graph):
        if node.op_type == "QLinearConv":
            scope = _scope(node)
            _qlinear_conv(graph, node, scope, dep.layers.get(scope), report, cast_int4, u8_only)
            qlinear_io.add(id(node.inputs[0].producer()))
            seen_weights.add(scope)
    for node in list(graph):
        if node.op_type != "QuantizeLinear" or id(node) in qlinear_io:
            continue
        scope = _scope(node)
        w_in = node.inputs[0]
        if w_in.const_value is not None and scope in dep.layers:  # a weight Q: replace it by the integers
            dl = dep.layers[scope]
            (dq,) = [u.node for u in node.outputs[0].uses()]
            if dq.op_type != "DequantizeLinear":
                raise ExportError(f"{scope}: weight QuantizeLinear feeds {dq.op_type}, not DequantizeLinear")
            ints = dl.w_int.t() if dl.kind == "Linear" else dl.w_int  # MatMul reads W^T
            from_graph = _quantize_np(w_in.const_value.numpy(), node, dl)
            if not np.array_equal(from_graph, ints.numpy().astype(np.int32)):
                raise ExportError(f"{scope}: the traced weight does not give back the QuantState's integers")
            cast = cast_int4 and int4 and dl.bits == 4
            offset = u8_only and dl.symmetric and dl.bits > 4
            stored = ir.DataType.UINT8 if offset else _int_type(dl.bits, dl.symmetric, int4)
            dtype = _int_type(8, dl.symmetric, False) if cast else stored  # what the DequantizeLinear reads
            values, zero = ints.numpy(), dl.w_zero.numpy().astype(np.int8 if dl.symmetric else np.uint8)
            if offset:
                values, zero = _unsigned(values), _unsigned(zero)
            x = _int_weight(graph, dq, scope, values, stored, dtype if cast else None)
            z = _initializer(graph, f"{scope}.w_zero", zero, dtype)
            s = _initializer(graph, f"{scope}.w_scale", dl.w_scale.numpy().copy())
            dq.replace_input_with(0, x)
            dq.replace_input_with(1, s)
            dq.replace_input_with(2, z)
            graph.remove(node, safe=True)
            seen_weights.add(scope)
            report.weights[scope] = {"bits": dl.bits, "dtype": stored.name, "shape": list(ints.shape)} | (
                {"cast_to": dtype.name} if cast else {}) | ({"offset": 128} if offset else {})
            report.kernels[scope] = _single_use(dq, scope).name
        else:  # an activation Q and the DQ after it: own constants each
            report.activations.append(scope)
            _own_constant(graph, node, 1, f"{scope}.q_scale.{len(report.activations)}")
            _own_constant(graph, node, 2, f"{scope}.q_zero.{len(report.activations)}", u8_only)
            for k, use in enumerate(node.outputs[0].uses()):
                if use.node.op_type == "DequantizeLinear":
                    _own_constant(graph, use.node, 1, f"{scope}.dq_scale.{len(report.activations)}.{k}")
                    _own_constant(graph, use.node, 2, f"{scope}.dq_zero.{len(report.activations)}.{k}", u8_only)
    missing = set(dep.layers) - seen_weights
    if missing:
        raise ExportError(f"{len(missing)} quantized layers have no weight Q/DQ in the graph: {sorted(missing)[:3]}")
    for node in graph:  # attention matmuls: both inputs straight from an *activation* DequantizeLinear
        if node.op_type == "MatMul" and all(v.producer() is not None and v.producer().op_type == "DequantizeLinear"
                                            and v.producer().inputs[0].const_value is None for v in node.inputs):
            scope = _scope(node)
            report.kernels[f"{scope}.matmul_{sum(k.startswith(scope + '.matmul_') for k in report.kernels)}"] = node.name
    _drop_unused_initializers(graph)
    model.opset_imports[""] = OPSET
    report.ops = _census(graph)
    return model, report


def _int_weight(graph, consumer, scope: str, ints: np.ndarray, stored, cast_to=None):
    """The value a weight's consumer reads: the integers as an initializer ``<scope>.w_int`` of
    type ``stored``, behind a Cast to ``cast_to`` when given."""
    import onnx_ir as ir

    x = _initializer(graph, f"{scope}.w_int", ints.copy(), stored)
    if cast_to is None:
        return x
    node = ir.node("Cast", [x], {"to": cast_to}, name=f"{scope}.w_int/to_8bit")
    out = node.outputs[0]
    out.name, out.type, out.shape = f"{scope}.w_int8", ir.TensorType(cast_to), ir.Shape(ints.shape)
    graph.insert_before(consumer, node)
    return out


def _qlinear_conv(graph, node, scope: str, layer, report: LoweringReport, cast_int4: bool = False,
                  u8_only: bool = False) -> None:
    """Check a traced QLinearConv against its layer (the QuantState's integers as its weight
    initializer, per-step parameters gathered) and report it; 4-bit weights go behind a Cast
    when ``cast_int4``; wider ones become UINT8 + 128 with zero-point 128 when ``u8_only``."""
    from tfmq.exporter.qlinear import QLinearConvLayer

    if not isinstance(layer, QLinearConvLayer):
        raise ExportError(f"QLinearConv {node.name!r} belongs to no QLinearConv layer of the deploy module")
    w = node.inputs[3].const_value
    if w is None or not np.array_equal(w.numpy(), layer.w_int.numpy()):
        raise ExportError(f"{scope}: the QLinearConv weight is not the QuantState's integers")
    q = node.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear":
        raise ExportError(f"{scope}: the QLinearConv input is not quantized in the graph")
    import onnx_ir as ir

    cast = cast_int4 and layer.bits == 4
    offset = u8_only and layer.bits > 4
    if cast:
        node.replace_input_with(3, _int_weight(graph, node, scope, layer.w_int.numpy(), ir.DataType.INT4,
                                               ir.DataType.INT8))
    elif offset:
        node.replace_input_with(3, _int_weight(graph, node, scope, _unsigned(layer.w_int.numpy()), ir.DataType.UINT8))
        node.replace_input_with(5, _initializer(graph, f"{scope}.w_zero", np.full(len(layer.w_scale), 128, np.uint8)))
    else:  # the traced name is the deploy module's; every path names the integers ``<layer>.w_int``
        node.replace_input_with(3, _int_weight(graph, node, scope, layer.w_int.numpy(), ir.DataType.INT8))
    report.weights[scope] = {"bits": layer.bits, "dtype": "INT4" if cast else "UINT8" if offset else "INT8",
                             "shape": list(layer.w_int.shape)} | ({"cast_to": "INT8"} if cast else {}) | (
                                 {"offset": 128} if offset else {})
    report.kernels[scope] = node.name
    report.activations += [scope, f"{scope}.out"]


def _single_use(dq, scope: str):
    (use,) = [u.node for u in dq.outputs[0].uses()]
    if use.op_type not in ("Conv", "MatMul", "Gemm"):
        raise ExportError(f"{scope}: the weight DequantizeLinear feeds {use.op_type}, not a Conv/MatMul/Gemm")
    return use


def _quantize_np(w: np.ndarray, node, dl) -> np.ndarray:
    axis = 1 if dl.kind == "Linear" else 0
    shape = [1] * w.ndim
    shape[axis] = -1
    s = dl.w_scale.numpy().reshape(shape)
    z = dl.w_zero.numpy().astype(np.int32).reshape(shape)
    qmin, qmax = (-128, 127) if dl.symmetric else (0, 255)
    return np.clip(np.rint(w / s) + z, qmin, qmax).astype(np.int32)


def _drop_unused_initializers(graph) -> None:
    for node in [n for n in graph if n.op_type == "Constant" and not n.outputs[0].uses()]:
        graph.remove(node, safe=True)
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        del graph.initializers[name]


def _census(graph) -> dict[str, int]:
    ops: dict[str, int] = {}
    for n in graph:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return dict(sorted(ops.items(), key=lambda kv: -kv[1]))


def uses_external_data(path: Path) -> bool:
    """Whether the ONNX file at ``path`` keeps its tensors in a file beside it."""
    return Path(str(path) + ".data").exists()


def write(model, path: Path, limit: int | None = None) -> None:
    """Write an onnx-ir model; over ``limit`` (default 2 GB, protobuf's limit) its tensors go
    to ``<name>.data`` beside it. A stale ``.data`` from an earlier write is removed first."""
    import onnx_ir as ir

    limit = EXTERNAL_DATA_BYTES if limit is None else limit
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    data = Path(str(path) + ".data")
    data.unlink(missing_ok=True)
    if size > limit:
        ir.save(model, path, external_data=data.name)
    else:
        ir.save(model, path)


def save(model, path: Path, limit: int | None = None) -> None:
    """Write (see ``write``), then check the file."""
    import onnx

    write(model, path, limit)
    onnx.checker.check_model(str(path), full_check=False)


def lower(dep: DeployUNet, path: Path, sample_shape: tuple[int, ...], cross: tuple[int, int] | None,
          int4: bool = True, cast_int4: bool = False, u8_only: bool = False) -> LoweringReport:
    with tempfile.TemporaryDirectory(prefix="tfmq-trace-") as tmp:
        model, report = rewrite(trace(dep, sample_shape, cross, Path(tmp) / "traced.onnx"), dep, int4, cast_int4,
                                u8_only)
        save(model, path)
    return report
