"""Channel groups through the targets: every group conv is a kernel of the lowering report,
OpenVINO runs each in INT8, the TensorRT legalizer passes them, and ONNX Runtime runs the
graph like the deploy module."""
import pytest
import torch

from helpers import FULL_RES_DDPM

pytestmark = [pytest.mark.openvino, pytest.mark.slow]


def test_lowered_groups_are_integer_kernels_in_openvino_and_legal_for_tensorrt(g4, tmp_path):
    """Every group conv is a kernel of the lowering report; OpenVINO runs each in INT8; the
    TensorRT legalizer passes them; ONNX Runtime runs the graph like the deploy module."""
    pytest.importorskip("openvino")
    import numpy as np
    import onnxruntime as ort

    from tfmq.exporter.deploy import build
    from tfmq.exporter.qdq_onnx import lower
    from tfmq.targets.base import Lowered
    from tfmq.targets.registry import get_target
    from tfmq.targets.tensorrt.legal import legalize

    model, cs, r = g4
    ov, trt_target = get_target("openvino"), get_target("tensorrt")
    dep = build(model, r.state)
    rep = lower(dep, tmp_path / "model.onnx", passes=ov.graph_passes(ov.options()))
    group_kernels = {k for k in rep.kernels if ".groups." in k}
    assert len(group_kernels) == 4 * len(FULL_RES_DDPM)
    compiled = ov.compile(Lowered(dep, None, tmp_path / "model.onnx", rep), tmp_path, ov.options())
    assert compiled["floating"] == {} and group_kernels <= set(compiled["layers"])
    trt = tmp_path / "trt"  # TensorRT's form: asymmetric activations folded onto zero-point 0
    trt.mkdir()
    trt_dep = build(model, r.state)
    trt_target.prepare(trt_dep, trt_target.options())
    trt_rep = lower(trt_dep, trt / "lowered.onnx")
    legal = legalize(trt / "lowered.onnx", trt / "model.onnx", trt_rep.kernels)
    assert not legal.violations and group_kernels <= set(legal.int8_kernels)
    x, t, _ = cs.step_inputs(2)
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"sample": x.numpy(), "timestep": t[:1].numpy()})[0]
    with torch.no_grad():
        want = dep(x, t[:1]).numpy()
    # the same codes up to rounding ties (ONNX Runtime orders the float ops of the fold its own way)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 5e-3
