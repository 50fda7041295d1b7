"""TensorRT's explicit-quantization rules for the shared QDQ ONNX: the legalization pass and
the static legality checker (both run on CPU, without TensorRT).

What TensorRT's ONNX parser and builder accept (onnx-tensorrt operators.md; TensorRT's
"Working with Quantized Types"), as rules the checker names when a graph breaks them:

- ``zero-point``: every QuantizeLinear/DequantizeLinear zero-point is 0 (symmetric);
- ``unsigned``: quantized tensors are signed (UINT8 is only a network input/output type);
- ``dynamic-scale``: scales (and zero-points) are build-time constants;
- ``scale``: scales are positive and finite;
- ``activation-granularity``: activations are quantized per tensor;
- ``weight-axis``: a per-channel weight is quantized on its output axis (Conv: 0, MatMul
  [K, N]: 1);
- ``int4-placement``: INT4 appears only as weight-only, blocked quantization of a 2-D
  MatMul/Gemm weight (blocks along K); a 4-bit conv, or a 4-bit MatMul whose input is
  quantized, keeps its 4-bit values in INT8;
- ``placement``: a QuantizeLinear feeds only DequantizeLinear nodes, and an activation
  DequantizeLinear reads a QuantizeLinear (TensorRT fuses Q/DQ pairs into its kernels; a
  lone Q or a DQ of a computed integer tensor has no meaning to it);
- ``kernel``: every kernel the lowering report names (each quantized Conv/MatMul, the
  attention matmuls) is still in the graph with its weight DequantizeLinear (the engine's
  per-layer precision proof looks these up by name).

``legalize`` rewrites the lowered graph with onnx-ir where a change keeps every value
exactly (activation Q/DQ in UINT8 with zero-point 128, which the deploy module's
``signed_zero`` fold produces for asymmetric activations, as INT8 with zero-point 0; 4-bit
weights into INT8 containers; per-channel INT4 of a weight-only MatMul as one block along
K; the opset) and reports each change; what cannot be made legal without
changing numbers (a zero-point, an unsigned type) is left for the checker to refuse, and
``check()`` of the target refuses such recipes before calibration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tfmq.errors import ExportError, first_line

QDQ = ("QuantizeLinear", "DequantizeLinear")
KERNELS = ("Conv", "MatMul", "Gemm")
# opset 20 is the newest every TensorRT 10.x parser reads (10.0: opsets 9-20); INT4 and
# blocked Q/DQ need opset 21 (TensorRT 10.0+ parses INT4 DequantizeLinear)
OPSET_INT8, OPSET_INT4 = 20, 21


@dataclass
class Violation:
    rule: str
    node: str
    detail: str

    def __str__(self) -> str:
        return f"{self.node}: {self.rule}: {self.detail}"


@dataclass
class LegalizationReport:
    opset: int = OPSET_INT8
    # one entry per layer the pass changed: {"layer", "node", "change", "why", "values"}
    changes: list[dict] = field(default_factory=list)
    # quantized tensors by kind after the pass: {"int8 weights": n, "int8 activations": n, ...}
    census: dict[str, int] = field(default_factory=dict)
    violations: list[dict] = field(default_factory=list)
    # the kernels that must run INT8 in the engine (their input is quantized): layer -> node;
    # the others the recipe quantized are weight-only (4-bit values, float kernel or INT4 WoQ)
    int8_kernels: dict[str, str] = field(default_factory=dict)
    weight_only: dict[str, str] = field(default_factory=dict)
    fp16: dict | None = None  # the FP16 variant's scale rounding (``to_fp16``), when one was written

    def to_dict(self) -> dict:
        return asdict(self)


def _const(value) -> np.ndarray | None:
    """The constant behind an ONNX value (initializer or Constant node), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    p = value.producer()
    if p is not None and p.op_type == "Constant" and "value" in p.attributes:
        return p.attributes["value"].as_tensor().numpy()
    return None


def _dtype(value):
    import onnx_ir as ir

    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.dtype
    p = value.producer()
    if p is not None and p.op_type == "Constant" and "value" in p.attributes:
        return p.attributes["value"].as_tensor().dtype
    return value.dtype if value.dtype is not None else ir.DataType.UNDEFINED


def _attr(node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _consumers(node) -> list:
    return [u.node for u in node.outputs[0].uses()]


def _reads_quantized(node) -> bool:
    """A kernel's data input (input 0) comes from an activation DequantizeLinear."""
    return bool(node.inputs) and _is_activation_dq(node.inputs[0])


def _is_activation_dq(value) -> bool:
    p = value.producer() if value is not None else None
    return p is not None and p.op_type == "DequantizeLinear" and _const(p.inputs[0]) is None


def legalize(src: Path, dst: Path, kernels: dict[str, str]) -> LegalizationReport:
    """Rewrite the lowered QDQ ONNX at ``src`` into TensorRT's legal form at ``dst``;
    ``kernels`` is the lowering report's layer -> node map."""
    import onnx_ir as ir

    from tfmq.exporter.qdq_onnx import write

    model = ir.load(src)
    graph = model.graph
    report = LegalizationReport()
    layer_of = {node: layer for layer, node in kernels.items()}
    for node in list(graph):
        if node.op_type != "DequantizeLinear" or _const(node.inputs[0]) is None:
            continue
        dtype = _dtype(node.inputs[0])
        if dtype not in (ir.DataType.INT4, ir.DataType.UINT4):
            continue
        (kernel,) = _consumers(node) or [None]
        layer = layer_of.get(kernel.name if kernel is not None else "", node.name)
        ints = _const(node.inputs[0])
        weight_only_matmul = kernel is not None and kernel.op_type in ("MatMul", "Gemm") and \
            not _reads_quantized(kernel) and ints.ndim == 2 and dtype == ir.DataType.INT4
        if weight_only_matmul:
            _to_blocked(graph, node, ints)
            report.changes.append({
                "layer": layer, "node": kernel.name, "change": "INT4 per output channel -> INT4 blocked along K "
                f"(one block of {ints.shape[0]})", "values": "unchanged",
                "why": "TensorRT takes INT4 only as blocked weight-only quantization of MatMul/Gemm weights"})
        else:
            _to_int8_container(graph, node, ints, signed=dtype == ir.DataType.INT4)
            conv = kernel is not None and kernel.op_type == "Conv"
            if kernel is not None and _reads_quantized(kernel):
                why = (f"{'conv' if conv else 'MatMul'} with a quantized input: TensorRT INT4 is weight-only "
                       "(blocked MatMul/Gemm), so this layer runs an INT8 kernel on its 4-bit values")
            else:
                why = ("weight-only conv: TensorRT has no INT4 (or weight-only) conv kernel; it folds the "
                       "dequantized 4-bit values into float weights at build time")
            report.changes.append({
                "layer": layer, "node": kernel.name if kernel is not None else node.name,
                "change": f"INT4 -> INT8 container holding the 4-bit values [{int(ints.min())}, {int(ints.max())}]",
                "values": "unchanged", "why": why})
    signed = _signed_activations(graph)
    if signed:
        report.changes.append({
            "layer": "activations", "node": f"{signed} QuantizeLinear", "values": "unchanged",
            "change": f"{signed} activation quantizers: UINT8 with zero-point 128 -> INT8 with zero-point 0",
            "why": "TensorRT quantizes to signed INT8 with zero-point 0; the asymmetric parameters were folded "
                   "onto zero-point 128 by the deploy module (signed_zero), so q - 128 are the same codes"})
    has_int4 = any(_dtype(n.inputs[0]) in (ir.DataType.INT4, ir.DataType.UINT4)
                   for n in graph if n.op_type == "DequantizeLinear")
    report.opset = OPSET_INT4 if has_int4 else OPSET_INT8
    model.opset_imports[""] = report.opset
    nodes = {n.name: n for n in graph}
    for layer, node in kernels.items():
        k = nodes.get(node)
        if k is not None and any(_is_activation_dq(v) for v in k.inputs[:2]):
            report.int8_kernels[layer] = node
        else:
            report.weight_only[layer] = node
    violations = check_graph(model, kernels)
    report.violations = [asdict(v) for v in violations]
    report.census = census(model)
    write(model, dst)
    return report


def _signed_activations(graph) -> int:
    """Activation Q/DQ pairs in UINT8 with zero-point 128 rewritten as INT8 with zero-point 0
    (q_int8 = q_uint8 - 128: the same values). Returns how many quantizers changed."""
    import onnx_ir as ir

    def mid_uint8(v) -> bool:
        z = _const(v)
        return z is not None and _dtype(v) == ir.DataType.UINT8 and bool(np.all(z == 128))

    changed = 0
    for q in list(graph):
        if q.op_type != "QuantizeLinear" or _const(q.inputs[0]) is not None or len(q.inputs) < 3:
            continue
        dqs = _consumers(q)
        if not mid_uint8(q.inputs[2]) or not all(d.op_type == "DequantizeLinear" and len(d.inputs) > 2
                                                 and mid_uint8(d.inputs[2]) for d in dqs):
            continue
        for node in (q, *dqs):
            zero = np.zeros(_const(node.inputs[2]).shape, np.int8)
            _replace_const(graph, node, 2, zero, ir.DataType.INT8, f"{node.inputs[2].name}.int8")
        q.outputs[0].type = ir.TensorType(ir.DataType.INT8)
        changed += 1
    return changed


def _to_int8_container(graph, dq, ints: np.ndarray, signed: bool) -> None:
    import onnx_ir as ir

    dtype = ir.DataType.INT8 if signed else ir.DataType.UINT8
    np_type = np.int8 if signed else np.uint8
    for i, suffix in ((0, "int8"), (2, "int8_zero")):
        v = dq.inputs[i]
        if v is None:
            continue
        arr = _const(v).astype(np_type)
        _replace_const(graph, dq, i, arr, dtype, f"{v.name}.{suffix}")


def _to_blocked(graph, dq, ints: np.ndarray) -> None:
    """Per-channel INT4 of W^T [K, N] (axis 1) as blocked INT4 along K: scale [1, N], block K."""
    import onnx_ir as ir

    k, n = ints.shape
    scale = _const(dq.inputs[1]).reshape(1, n)
    _replace_const(graph, dq, 1, scale.astype(np.float32), ir.DataType.FLOAT, f"{dq.inputs[1].name}.blocked")
    _replace_const(graph, dq, 2, np.zeros((1, n), np.int8), ir.DataType.INT4, f"{dq.inputs[0].name}.blocked_zero")
    dq.attributes["axis"] = ir.AttrInt64("axis", 0)
    dq.attributes["block_size"] = ir.AttrInt64("block_size", k)


def _replace_const(graph, node, index: int, arr: np.ndarray, dtype, name: str) -> None:
    import onnx_ir as ir

    old = node.inputs[index]
    v = ir.Value(name=name, const_value=ir.tensor(arr, dtype=dtype, name=name))
    v.shape, v.type = ir.Shape(arr.shape), ir.TensorType(dtype)
    graph.register_initializer(v)
    node.replace_input_with(index, v)
    if old is not None and old.is_initializer() and not old.uses():
        del graph.initializers[old.name]


def check_graph(model, kernels: dict[str, str] | None = None) -> list[Violation]:
    """Every place an onnx-ir model breaks TensorRT's explicit-quantization rules (module note)."""
    import onnx_ir as ir

    out: list[Violation] = []
    nodes = {n.name: n for n in model.graph}
    signed = (ir.DataType.INT8, ir.DataType.INT4)
    for node in model.graph:
        if node.op_type not in QDQ:
            continue
        name = node.name or node.op_type
        scale, zero = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
        s = _const(scale)
        if s is None:
            out.append(Violation("dynamic-scale", name, "the scale is computed at run time, not a build-time constant"))
        elif not (np.all(np.isfinite(s)) and np.all(s > 0)):
            out.append(Violation("scale", name, f"scales must be positive and finite (min {float(np.min(s)):g})"))
        if zero is not None:
            z = _const(zero)
            if z is None:
                out.append(Violation("dynamic-scale", name, "the zero-point is computed at run time"))
            elif np.any(z != 0):
                out.append(Violation("zero-point", name, f"zero-point {int(np.max(np.abs(z)))} != 0: TensorRT "
                                     "quantization is symmetric (calibrate the recipe's symmetric variant)"))
        qtype = _dtype(zero) if zero is not None else (
            _dtype(node.inputs[0]) if node.op_type == "DequantizeLinear" else ir.DataType.UINT8)
        if node.op_type == "QuantizeLinear" and "output_dtype" in node.attributes:
            qtype = ir.DataType(_attr(node, "output_dtype"))
        if qtype not in signed:
            out.append(Violation("unsigned", name, f"quantized type {qtype.name}: TensorRT quantizes to signed INT8 "
                                 "(or INT4 weights); UINT8 is only a network input/output type"))
        weight = node.op_type == "DequantizeLinear" and _const(node.inputs[0]) is not None
        if node.op_type == "QuantizeLinear":
            if _const(node.inputs[0]) is None:
                if s is not None and s.size != 1:
                    out.append(Violation("activation-granularity", name, f"{s.size} scales: TensorRT quantizes "
                                         "activations per tensor"))
            bad = [c.op_type for c in _consumers(node) if c.op_type != "DequantizeLinear"]
            if bad:
                out.append(Violation("placement", name, f"QuantizeLinear feeds {', '.join(sorted(set(bad)))}, not "
                                     "a DequantizeLinear"))
        elif weight:
            out += _check_weight(node, name, s, qtype)
        else:
            p = node.inputs[0].producer()
            if p is None or p.op_type != "QuantizeLinear":
                out.append(Violation("placement", name, "an activation DequantizeLinear must read a QuantizeLinear "
                                     f"(reads {'a graph input' if p is None else p.op_type})"))
            if s is not None and s.size != 1:
                out.append(Violation("activation-granularity", name, f"{s.size} scales: TensorRT quantizes "
                                     "activations per tensor"))
    for layer, node_name in (kernels or {}).items():
        k = nodes.get(node_name)
        if k is None or k.op_type not in KERNELS:
            out.append(Violation("kernel", layer, f"quantized kernel {node_name} is not in the graph"))
    return out


def _check_weight(dq, name: str, s, qtype) -> list[Violation]:
    import onnx_ir as ir

    out = []
    users = _consumers(dq)
    kernel = users[0] if len(users) == 1 else None
    ints = _const(dq.inputs[0])
    block = _attr(dq, "block_size", 0)
    axis = _attr(dq, "axis", 1)
    axis = axis + ints.ndim if axis < 0 else axis
    if kernel is None or kernel.op_type not in KERNELS:
        return out  # a weight DQ outside a kernel (e.g. a table): no kernel rule applies
    if qtype == ir.DataType.INT4:
        if kernel.op_type not in ("MatMul", "Gemm"):
            out.append(Violation("int4-placement", name, f"INT4 weights of a {kernel.op_type}: TensorRT INT4 is "
                                 "MatMul/Gemm only (store 4-bit conv values in INT8)"))
        elif _reads_quantized(kernel):
            out.append(Violation("int4-placement", name, "INT4 weights under a quantized input: TensorRT INT4 is "
                                 "weight-only (store the 4-bit values in INT8 for an INT8 kernel)"))
        elif not block or ints.ndim != 2 or axis != 0:
            out.append(Violation("int4-placement", name, "INT4 must be blocked along K of a 2-D [K, N] weight "
                                 f"(block_size {block}, axis {axis}, rank {ints.ndim})"))
        return out
    if block:
        out.append(Violation("weight-axis", name, "blocked quantization is for INT4 weights only"))
    elif s is not None and s.size > 1:
        want = 0 if kernel.op_type == "Conv" else (0 if _attr(kernel, "transB", 0) else 1)
        if axis != want or s.size != ints.shape[want]:
            out.append(Violation("weight-axis", name, f"per-channel scales on axis {axis} of a {kernel.op_type} "
                                 f"weight {list(ints.shape)}: TensorRT wants the output axis {want}"))
    return out


def census(model) -> dict[str, int]:
    """Quantized tensors of a legal graph by kind."""
    import onnx_ir as ir

    out: dict[str, int] = {}
    for node in model.graph:
        if node.op_type != "DequantizeLinear":
            continue
        ints = _const(node.inputs[0])
        if ints is None:
            key = "activation Q/DQ (INT8, per tensor)"
        else:
            t = _dtype(node.inputs[0])
            width = "INT4 blocked" if _attr(node, "block_size", 0) else f"{t.name} per channel"
            four = " holding 4-bit values" if t == ir.DataType.INT8 and ints.min() >= -8 and ints.max() <= 7 else ""
            key = f"weights {width}{four}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def check_file(path: Path, kernels: dict[str, str] | None = None) -> list[Violation]:
    """The checker on an ONNX file (the final artifact, as TensorRT will read it)."""
    import onnx_ir as ir

    try:
        model = ir.load(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one user error
        raise ExportError(f"{path}: not a readable ONNX model ({first_line(e)})") from e
    return check_graph(model, kernels)


def to_fp16(src: Path, dst: Path) -> dict:
    """The legal graph with its float parts in FP16, for a strongly typed engine whose
    non-quantized layers run FP16 (types come from the ONNX there). Every FLOAT tensor becomes
    FLOAT16, the Q/DQ scales included (QuantizeLinear takes its scale in the type of its input,
    and a DequantizeLinear outputs its scale's type); Resize scales stay FLOAT (the operator
    takes no other type); the graph's inputs and output stay FLOAT behind Casts, so callers
    feed what they fed before. Returns how far the scales moved in the FP16 rounding."""
    import onnx_ir as ir

    from tfmq.exporter.qdq_onnx import write

    f32, f16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
    model = ir.load(src)
    graph = model.graph
    keep = {id(n.inputs[2]) for n in graph if n.op_type == "Resize" and len(n.inputs) > 2 and n.inputs[2] is not None}
    moved, smallest = 0.0, np.inf
    for name, v in list(graph.initializers.items()):
        if v.const_value is None or v.const_value.dtype != f32 or id(v) in keep:
            continue
        arr = v.const_value.numpy()
        half = arr.astype(np.float16)
        if any(u.node.op_type in QDQ and u.idx == 1 for u in v.uses()):  # a scale
            moved = max(moved, float(np.max(np.abs(half.astype(np.float64) - arr) / np.abs(arr))))
            smallest = min(smallest, float(np.min(np.abs(arr))))
        v.const_value = ir.tensor(half, name=name)
        v.type = ir.TensorType(f16)
    for n in graph:
        if n.op_type == "Constant" and "value" in n.attributes and id(n.outputs[0]) not in keep:
            t = n.attributes["value"].as_tensor()
            if t.dtype == f32:
                n.attributes["value"] = ir.AttrTensor("value", ir.tensor(t.numpy().astype(np.float16)))
        elif n.op_type == "Cast" and _attr(n, "to") == f32:
            n.attributes["to"] = ir.AttrInt64("to", f16)
        elif n.op_type == "ConstantOfShape" and "value" in n.attributes:
            t = n.attributes["value"].as_tensor()
            if t.dtype == f32:
                n.attributes["value"] = ir.AttrTensor("value", ir.tensor(t.numpy().astype(np.float16)))
        for out in n.outputs:
            if out.dtype == f32 and not out.is_graph_output() and id(out) not in keep:
                out.type = ir.TensorType(f16)
    for inp in list(graph.inputs):
        if inp.dtype != f32:
            continue
        uses = list(inp.uses())
        cast = ir.node("Cast", [inp], {"to": f16}, name=f"{inp.name}/to_fp16")
        cast.outputs[0].name, cast.outputs[0].type, cast.outputs[0].shape = f"{inp.name}_fp16", ir.TensorType(f16), inp.shape
        graph.insert_before(next(iter(graph)), cast)
        for u in uses:
            u.node.replace_input_with(u.idx, cast.outputs[0])
    for i, out in enumerate(list(graph.outputs)):
        if out.dtype != f32:
            continue
        name, shape = out.name, out.shape
        out.name, out.type = f"{name}_fp16", ir.TensorType(f16)
        back = ir.Value(name=name, type=ir.TensorType(f32), shape=shape)
        cast = ir.node("Cast", [out], {"to": f32}, outputs=[back], name=f"{name}/to_fp32")
        graph.append(cast)
        graph.outputs[i] = back
    write(model, dst)
    return {"scales_max_relative_change": moved, "smallest_scale": smallest,
            "scales_below_fp16_normal": bool(smallest < float(np.finfo(np.float16).tiny))}
