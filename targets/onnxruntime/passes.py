"""ONNX Runtime's rewrites of the canonical QDQ graph (run by the lowering before it saves).

- ``int4_behind_cast``: ONNX Runtime's integer kernels (QLinearConv, MatMulIntegerToFloat)
  take 8-bit weights only, and a DequantizeLinear reading INT4 is never fused. Every 4-bit
  weight is stored as an INT4/UINT4 initializer behind a Cast to the 8-bit type, which ONNX
  Runtime folds at load into the 8-bit initializer its kernels take: a 4-bit file running
  8-bit kernels.
- ``unsigned_8bit``: on a CPU without VNNI, u8 x s8 dot products add pairs of products in
  int16 with saturation (``tfmq.hostcpu``); the same integers stored unsigned run U8U8
  kernels, which are exact there. Symmetric 8-bit weights become UINT8 w + 128 with
  zero-point 128, INT8 activation zero-points z + 128 in UINT8; 4-bit values cannot saturate
  and stay.
Every value is unchanged; the lowering report says what each weight became.
"""
from __future__ import annotations

import numpy as np

from tfmq.exporter.qdq_onnx import LoweringReport, add_initializer_after, cast_before, set_initializer, unsigned


def _consumer(graph, name: str):
    (use,) = [u.node for u in graph.initializers[name].uses()]
    return use


def int4_behind_cast(model, report: LoweringReport) -> None:
    import onnx_ir as ir

    graph = model.graph
    for scope, w in report.weights.items():
        if w["bits"] != 4:
            continue
        value = graph.initializers[f"{scope}.w_int"]
        node = _consumer(graph, value.name)
        ints = value.const_value.numpy().astype(np.int8 if w["dtype"] in ("INT4", "INT8") else np.uint8)
        if node.op_type == "QLinearConv":  # its canonical weight is INT8 holding the 4-bit values
            set_initializer(graph, value.name, ints, ir.DataType.INT4)
            node.replace_input_with(3, cast_before(graph, node, value, ir.DataType.INT8, ints.shape, scope))
            w["dtype"], w["cast_to"] = "INT4", "INT8"
            continue
        eight = ir.DataType.INT8 if w["dtype"] == "INT4" else ir.DataType.UINT8
        node.replace_input_with(0, cast_before(graph, node, value, eight, ints.shape, scope))
        zero = graph.initializers[f"{scope}.w_zero"]
        set_initializer(graph, zero.name, zero.const_value.numpy().astype(ints.dtype), eight)
        w["cast_to"] = eight.name


def unsigned_8bit(model, report: LoweringReport) -> None:
    import onnx_ir as ir

    graph = model.graph
    for scope, w in report.weights.items():
        if w["bits"] <= 4 or w["dtype"] != "INT8":
            continue
        value = graph.initializers[f"{scope}.w_int"]
        node = _consumer(graph, value.name)
        set_initializer(graph, value.name, unsigned(value.const_value.numpy()), ir.DataType.UINT8)
        if node.op_type == "QLinearConv":  # its weight zero-point is a traced constant: its own, 128
            node.replace_input_with(5, add_initializer_after(graph, value.name, f"{scope}.w_zero",
                                                             np.full(w["shape"][0], 128, np.uint8)))
        else:
            zero = graph.initializers[f"{scope}.w_zero"]
            set_initializer(graph, zero.name, unsigned(zero.const_value.numpy()), ir.DataType.UINT8)
        w["dtype"], w["offset"] = "UINT8", 128
    for name in report.zero_points:
        value = graph.initializers[name]
        if value.const_value.dtype == ir.DataType.INT8:
            set_initializer(graph, name, unsigned(value.const_value.numpy()), ir.DataType.UINT8)
