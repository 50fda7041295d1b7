"""The saturation of u8 x s8 dot products on CPUs without VNNI, measured on ONNX Runtime's own
kernels: the check that ``tfmq.hostcpu`` tells the truth about this machine, and that the
unsigned form the ONNX Runtime target lowers to there (``u8_only``) is exact everywhere."""
import numpy as np
import pytest
import torch

from tfmq.hostcpu import describe, int8_dot_saturates

ort = pytest.importorskip("onnxruntime")


def _qlinear_conv(weights: np.ndarray, unsigned: bool) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    cout, cin = weights.shape[:2]
    w, zw = ((weights + 128).astype(np.uint8), np.full(cout, 128, np.uint8)) if unsigned else \
        (weights.astype(np.int8), np.zeros(cout, np.int8))
    consts = {"w": w, "zw": zw, "sx": np.float32(1), "zx": np.uint8(0), "sw": np.ones(cout, np.float32),
              "sy": np.float32(SY), "zy": np.uint8(0)}
    node = helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy"], ["y"], pads=[1] * 4)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, cin, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, cout, 8, 8])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model.SerializeToString()


SY = 80000.0  # keeps the largest exact accumulator (64 * 9 * 255 * 127) inside the u8 output


def test_u8_weights_are_exact_and_s8_saturates_exactly_where_hostcpu_says():
    rng = np.random.default_rng(0)
    weights = rng.integers(100, 128, (16, 64, 3, 3)).astype(np.int16)  # large products: 2 x 255 x 127 > int16
    x = np.full((1, 64, 8, 8), 255, np.uint8)
    exact = torch.nn.functional.conv2d(torch.tensor(x, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64),
                                       padding=1).numpy()
    exact = np.clip(np.rint(exact / SY), 0, 255)
    err = {}
    for unsigned in (False, True):
        sess = ort.InferenceSession(_qlinear_conv(weights, unsigned), providers=["CPUExecutionProvider"])
        err[unsigned] = float(np.abs(sess.run(None, {"x": x})[0] - exact).max())
    assert err[True] == 0.0  # U8U8: exact on every CPU
    assert (err[False] > 0) == int8_dot_saturates(), (err, describe())
