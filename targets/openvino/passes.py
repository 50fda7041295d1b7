"""OpenVINO's rewrite of the canonical QDQ graph: 4-bit weights in 8-bit containers.

INT4 weights next to quantized activations ran every conv and FullyConnected in float
(measured on W4A8 mnist-ddpm: 32 of 34 kernels), while the same values in INT8/UINT8
initializers run INT8. The values, scales and zero-points are unchanged.
"""
from __future__ import annotations

import numpy as np

from tfmq.exporter.qdq_onnx import LoweringReport, set_initializer


def eight_bit_containers(model, report: LoweringReport) -> None:
    import onnx_ir as ir

    graph = model.graph
    for scope, w in report.weights.items():
        if w["dtype"] not in ("INT4", "UINT4"):
            continue
        signed = w["dtype"] == "INT4"
        dtype, np_type = (ir.DataType.INT8, np.int8) if signed else (ir.DataType.UINT8, np.uint8)
        for name in (f"{scope}.w_int", f"{scope}.w_zero"):
            set_initializer(graph, name, graph.initializers[name].const_value.numpy().astype(np_type), dtype)
        w["dtype"] = dtype.name
