"""The portable QDQ ONNX graph (opset 21, standard ai.onnx ops only) of a deploy module.

One path, in two steps:
1. the TorchScript exporter (deprecated in torch 2.9+, still in 2.13; it turns
   fake_quantize_* into Q/DQ, where the dynamo exporter needs torch.ao's quantized op set for a
   dynamic batch) traces the deploy module under TraceOps: every activation
   quantizer becomes QuantizeLinear -> DequantizeLinear with constant parameters, every
   quantized weight Q -> DQ per output channel of its float value in an 8-bit container,
   the temporal features Gather rows of constant tables, FSC's fold a Gather of r_t / c_t;
2. a rewrite with onnx-ir into the canonical graph: each weight's Q is dropped and its DQ
   reads the QuantState's integers directly, at their real width (INT4/UINT4 initializers
   for 4-bit layers, opset 21, else INT8/UINT8), checked equal to what Q of the float weight
   gives; every Q and DQ gets its own scale and zero-point initializers (shared constants
   made OpenVINO fall back to FP32 in a spike). A consumer's own rewrites (8-bit containers,
   unsigned storage, ...) are passes in its folder that ``lower`` runs on this graph before it
   is saved. Models over 2 GB are saved with external data.
The graph keeps the diffusers calling convention: inputs ``sample`` [B, C, H, W] (batch
dynamic), ``timestep`` [1] int64 (one value of the schedule; the host wrapper checks it), and
``encoder_hidden_states`` [B, L, D] for conditional models; output ``out_sample``.
"""
from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tfmq.errors import ExportError, first_line
from tfmq.exporter.deploy import DeployUNet, TraceOps
from tfmq.exporter.qlinear import QLinearConvLayer

if TYPE_CHECKING:
    import onnx_ir

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
    # the zero-point initializers of the activation Q/DQ pairs (not QLinearConv's, which are
    # gathered per step): for consumers' passes; not written
    zero_points: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"opset": self.opset, "weights": self.weights, "activations": self.activations,
                "kernels": self.kernels, "ops": self.ops}


class _Export(torch.nn.Module):
    def __init__(self, d: DeployUNet):
        super().__init__()
        self.d = d

    def forward(self, sample, timestep, *encoder_hidden_states):
        return self.d(sample, timestep, *encoder_hidden_states)


def trace(dep: DeployUNet, path: Path, cross: tuple[int, int] | None = None) -> Path:
    """The TorchScript exporter's graph of the deploy module under ``TraceOps``, written to
    ``path`` (a file, not bytes: over 2 GB the exporter writes its tensors beside it);
    ``cross``: the (tokens, width) of ``encoder_hidden_states`` for a conditional model."""
    names = ["sample", "timestep"] + (["encoder_hidden_states"] if cross else [])
    args = (torch.zeros(2, *dep.sample_shape), dep.schedule[:1].clone())
    if cross:
        args += (torch.zeros(2, *cross),)
    dynamic = {n: {0: "batch"} for n in names if n != "timestep"} | {"out_sample": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings(), dep.using(TraceOps()):
        # diffusers' shape asserts and batch-size branches: traced as constants, which holds
        # for the fixed sample size the tables and folds were built for
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter: see the module note
        torch.onnx.export(_Export(dep).eval(), args, str(path), dynamo=False, opset_version=TRACE_OPSET,
                          input_names=names, output_names=["out_sample"], dynamic_axes=dynamic,
                          do_constant_folding=True)
    return path


def _scope(node) -> str:
    """'/d/unet/down_blocks.0/resnets.0/conv1/QuantizeLinear' -> 'down_blocks.0.resnets.0.conv1'."""
    name = node.name or ""
    if not name.startswith(SCOPE):
        return ""
    return name[len(SCOPE):].rpartition("/")[0].replace("/", ".")


def _int_type(bits: int, symmetric: bool):
    import onnx_ir as ir

    if bits == 4:
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


def unsigned(values: np.ndarray) -> np.ndarray:
    """Signed 8-bit integers as UINT8 + 128: the same values against a zero-point moved by 128."""
    return (values.astype(np.int16) + 128).astype(np.uint8)


def set_initializer(graph, name: str, values: np.ndarray, dtype) -> None:
    """Give the initializer ``name`` new values of ``dtype`` in place (its uses and its place
    in the file stay)."""
    import onnx_ir as ir

    value = graph.initializers[name]
    tensor = ir.tensor(values, dtype=dtype, name=name)
    value.const_value, value.type, value.shape = tensor, ir.TensorType(tensor.dtype), ir.Shape(tensor.shape)


def add_initializer_after(graph, after: str, name: str, values: np.ndarray, dtype=None):
    """A new initializer listed right after ``after`` in the file; returns its value."""
    value = _initializer(graph, name, values, dtype)
    data = graph.initializers.data  # the ordered dict behind it: put the new entry in its place
    order = list(data)
    order.remove(name)
    order.insert(order.index(after) + 1, name)
    items = {k: data[k] for k in order}
    data.clear()
    data.update(items)
    return value


def cast_before(graph, consumer, value, cast_to, shape, scope: str):
    """``value`` behind a Cast to ``cast_to`` (named ``<scope>.w_int/to_8bit``, its output
    ``<scope>.w_int8``), inserted before ``consumer``; returns the Cast's output."""
    import onnx_ir as ir

    node = ir.node("Cast", [value], {"to": cast_to}, name=f"{scope}.w_int/to_8bit")
    out = node.outputs[0]
    out.name, out.type, out.shape = f"{scope}.w_int8", ir.TensorType(cast_to), ir.Shape(shape)
    graph.insert_before(consumer, node)
    return out


def _own_constant(graph, node, index: int, name: str) -> None:
    """Give ``node`` input ``index`` its own initializer (a copy of the constant it reads)."""
    value = node.inputs[index]
    tensor = value.const_value
    if tensor is None and value.producer() is not None and value.producer().op_type == "Constant":
        tensor = value.producer().attributes["value"].as_tensor()
    if tensor is None:
        raise ExportError(f"{node.name}: input {index} is not a constant (Q/DQ parameters must be build-time constants)")
    node.replace_input_with(index, _initializer(graph, name, tensor.numpy().copy(), tensor.dtype))


def rewrite(traced: Path, dep: DeployUNet):
    """(onnx-ir model, LoweringReport) of the canonical graph: every weight's DequantizeLinear
    reads the QuantState's integers at their real width (INT4/UINT4 initializers for 4-bit
    layers, else INT8/UINT8; a QLinearConv's weight is INT8, the only type it takes), checked
    equal to what Q of the traced float weight gives, and every Q and DQ owns its scale and
    zero-point initializers. A consumer's own rewrites run on it afterwards (``lower``'s
    ``passes``)."""
    import onnx_ir as ir

    model = ir.load(traced)  # external data, if any, memory-mapped from beside it: save before it goes
    graph = model.graph
    report = LoweringReport()
    seen_weights = set()
    qlinear_io = set()  # the Q before and DQ after each QLinearConv: per-step parameters, gathered
    for node in list(graph):
        if node.op_type == "QLinearConv":
            scope = _scope(node)
            _qlinear_conv(graph, node, scope, dep.layers.get(scope), report)
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
            stored = _int_type(dl.bits, dl.symmetric)
            zero = dl.w_zero.numpy().astype(np.int8 if dl.symmetric else np.uint8)
            x = _initializer(graph, f"{scope}.w_int", ints.numpy().copy(), stored)
            z = _initializer(graph, f"{scope}.w_zero", zero, stored)
            w_scale = _initializer(graph, f"{scope}.w_scale", dl.w_scale.numpy().copy())
            for i, v in enumerate((x, w_scale, z)):
                dq.replace_input_with(i, v)
            graph.remove(node, safe=True)
            seen_weights.add(scope)
            report.weights[scope] = {"bits": dl.bits, "dtype": stored.name, "shape": list(ints.shape)}
            report.kernels[scope] = _single_use(dq, scope).name
        else:  # an activation Q and the DQ after it: own constants each
            report.activations.append(scope)
            n = len(report.activations)
            _own_constant(graph, node, 1, f"{scope}.q_scale.{n}")
            _own_constant(graph, node, 2, f"{scope}.q_zero.{n}")
            report.zero_points.append(f"{scope}.q_zero.{n}")
            for k, use in enumerate(node.outputs[0].uses()):
                if use.node.op_type == "DequantizeLinear":
                    _own_constant(graph, use.node, 1, f"{scope}.dq_scale.{n}.{k}")
                    _own_constant(graph, use.node, 2, f"{scope}.dq_zero.{n}.{k}")
                    report.zero_points.append(f"{scope}.dq_zero.{n}.{k}")
    missing = set(dep.layers) - seen_weights
    if missing:
        raise ExportError(f"{len(missing)} quantized layers have no weight Q/DQ in the graph: {sorted(missing)[:3]}")
    for node in graph:  # attention matmuls: both inputs straight from an *activation* DequantizeLinear
        if node.op_type == "MatMul" and all(v.producer() is not None and v.producer().op_type == "DequantizeLinear"
                                            and v.producer().inputs[0].const_value is None for v in node.inputs):
            scope = _scope(node)
            report.kernels[f"{scope}.matmul_{sum(k.startswith(scope + '.matmul_') for k in report.kernels)}"] = node.name
    model.opset_imports[""] = OPSET
    return model, report


def _qlinear_conv(graph, node, scope: str, layer, report: LoweringReport) -> None:
    """Check a traced QLinearConv against its layer (the QuantState's integers as its weight
    initializer ``<layer>.w_int``, per-step parameters gathered) and report it."""
    import onnx_ir as ir

    if not isinstance(layer, QLinearConvLayer):
        raise ExportError(f"QLinearConv {node.name!r} belongs to no QLinearConv layer of the deploy module")
    w = node.inputs[3].const_value
    if w is None or not np.array_equal(w.numpy(), layer.w_int.numpy()):
        raise ExportError(f"{scope}: the QLinearConv weight is not the QuantState's integers")
    q = node.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear":
        raise ExportError(f"{scope}: the QLinearConv input is not quantized in the graph")
    # the traced name is the deploy module's; every path names the integers ``<layer>.w_int``
    node.replace_input_with(3, _initializer(graph, f"{scope}.w_int", layer.w_int.numpy().copy(), ir.DataType.INT8))
    report.weights[scope] = {"bits": layer.bits, "dtype": "INT8", "shape": list(layer.w_int.shape)}
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
    to ``<name>.data`` beside it. A stale ``.data`` from an earlier write is removed first.
    Under the limit every tensor is written into the file, also those still read from another
    file's external data (a model over 2 GB that torch traced keeps each tensor in a file of
    its own, which the written file must not point to)."""
    import onnx_ir as ir
    from onnx_ir.external_data import load_to_model

    limit = EXTERNAL_DATA_BYTES if limit is None else limit
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    data = Path(str(path) + ".data")
    data.unlink(missing_ok=True)
    if size > limit:
        ir.save(model, path, external_data=data.name)
    else:
        ir.save(load_to_model(model), path)


def save(model, path: Path, limit: int | None = None) -> None:
    """Write (see ``write``), then check the file."""
    import onnx

    write(model, path, limit)
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name} is not valid ONNX: {first_line(e)}") from e


def finish(model, report: LoweringReport) -> None:
    """After the rewrites: drop what no node reads any more, count the ops."""
    _drop_unused_initializers(model.graph)
    report.ops = _census(model.graph)


# a consumer's rewrite of the canonical graph, in place: (onnx-ir model, its LoweringReport) -> None
GraphPass = Callable[["onnx_ir.Model", LoweringReport], None]


def lower(dep: DeployUNet, path: Path, cross: tuple[int, int] | None = None,
          passes: Sequence[GraphPass] = ()) -> LoweringReport:
    """Trace ``dep`` (``cross``: the (tokens, width) of a conditional model's
    ``encoder_hidden_states``), rewrite it into the canonical QDQ graph, run a consumer's
    ``passes`` on it in order, and save it at ``path``."""
    with tempfile.TemporaryDirectory(prefix="tfmq-trace-") as tmp:
        model, report = rewrite(trace(dep, Path(tmp) / "traced.onnx", cross), dep)
        for p in passes:
            p(model, report)
        finish(model, report)
        save(model, path)
    return report


def _initializers(path: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """name -> (type, shape, sha256 of the bytes) of every initializer of an ONNX file."""
    import hashlib

    import onnx
    from google.protobuf.message import DecodeError
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except (OSError, DecodeError) as e:
        raise ExportError(f"{Path(path).name} cannot be read: {first_line(e, 'not ONNX')}") from e
    out = {}
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        out[t.name] = (str(a.dtype), tuple(a.shape), hashlib.sha256(a.tobytes()).hexdigest())
    return out


def initializer_differences(artifact: Path, fresh: Path) -> list[str]:
    """The initializers of ``artifact`` whose type, shape and values no initializer of ``fresh``
    has (compared by value, not name: tracer-made names change between torch releases), and a
    note for each value of ``fresh`` the artifact lacks. Empty: the same integers and scales."""
    from collections import Counter

    a, b = _initializers(artifact), _initializers(fresh)
    left = Counter(b.values())
    odd = []
    for name, v in a.items():
        if left[v] > 0:
            left[v] -= 1
        else:
            odd.append(name)
    missing = sum(left.values())
    return odd + ([f"{missing} initializers of the fresh lowering are not in it"] if missing else [])
