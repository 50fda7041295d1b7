"""The QDQ ONNX graph: the QuantState's integers at their real width, own Q/DQ constants,
opset 21, and ONNX Runtime giving the deploy module's error vs FP32."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from tfmq.calibration.api import calibrate
from tfmq.calibration.recipe import Reconstruction, get_recipe
from tfmq.exporter.deploy import build
from tfmq.exporter.qdq_onnx import OPSET, lower

pytestmark = pytest.mark.onnxruntime


# the conditional model (cross-attention) in the full suite only: its fixture alone takes ~20 s here
@pytest.fixture(scope="module", params=["ddpm", pytest.param("cond", marks=pytest.mark.slow)])
def lowered(request, tmp_path_factory):
    from tfmq.calibration.calibset import record

    model = request.getfixturevalue(request.param)
    cs = record(model, seeds=3, steps=5)
    r = calibrate(model, replace(get_recipe("w4a8"), reconstruction=Reconstruction(iters=0)), cs, progress=False)
    dep = build(model, r.state)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    cross = tuple(cs.cond.shape[1:]) if model.conditional else None
    report = lower(dep, path, cross)
    return model, cs, r, dep, path, report


def test_weights_are_the_state_integers_at_their_width(lowered):
    import onnx
    from onnx import numpy_helper

    model, cs, r, dep, path, report = lowered
    m = onnx.load(str(path))
    assert {o.domain: o.version for o in m.opset_import}[""] == OPSET
    inits = {i.name: i for i in m.graph.initializer}
    # every quantized layer but the time MLP (its features are tables here)
    assert set(report.weights) == {n for n in r.state.meta["layers"] if not n.startswith("time_embedding.")}
    for layer in report.weights:
        t = inits[f"{layer}.w_int"]
        bits = r.state.meta["layers"][layer]["bits"]
        want = onnx.TensorProto.UINT4 if bits == 4 else onnx.TensorProto.UINT8  # asymmetric recipe
        assert t.data_type == want, layer
        ints = r.state.tensors[f"{layer}.w_int"].numpy()
        if dep.layers[layer].kind == "Linear":
            ints = ints.T
        assert np.array_equal(numpy_helper.to_array(t).astype(np.int32), ints.astype(np.int32)), layer
    assert not any(i.data_type == onnx.TensorProto.FLOAT and i.name.endswith(".weight") and
                   any(i.name.startswith(f"d.unet.{layer}.") for layer in report.weights) for i in m.graph.initializer)


def test_every_dequantize_has_its_own_constants(lowered):
    import onnx

    *_, path, _ = lowered
    m = onnx.load(str(path))
    users: dict[str, int] = {}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear":
            for name in n.input[1:]:
                users[name] = users.get(name, 0) + 1
    inits = {i.name for i in m.graph.initializer}
    assert users and all(v == 1 for v in users.values())
    assert all(name in inits for name in users)  # constants, not computed values


def test_onnxruntime_error_vs_fp32_is_the_deploy_module_error(lowered):
    import onnxruntime as ort

    model, cs, r, dep, path, _ = lowered
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fp = model.unet.eval()
    for s in range(cs.steps):
        x, t, c = cs.step_inputs(s)
        feed = {"sample": x.numpy(), "timestep": t[:1].numpy()}
        kw = {}
        if c is not None:
            feed["encoder_hidden_states"] = c.numpy()
            kw["encoder_hidden_states"] = c
        got = torch.from_numpy(sess.run(None, feed)[0])
        with torch.no_grad():
            ref, want = fp(x, t, **kw).sample, dep(x, t[:1], c)
        dep_err = float((want - ref).norm() / ref.norm())
        ort_err = float((got - ref).norm() / ref.norm())
        assert abs(ort_err - dep_err) < 0.1 * dep_err + 1e-3, (s, ort_err, dep_err)


def test_the_time_mlp_is_gone_from_the_graph(lowered):
    """With tables the graph holds no part of the temporal block: no time_embedding node,
    no time_emb_proj node (the tables expand to the sample's batch, not to the MLP's output)."""
    import onnx

    model, cs, r, dep, path, report = lowered
    nodes = onnx.load(str(path)).graph.node
    tables = [n for n in nodes if "time_emb_proj" in n.name]
    assert any(n.op_type == "Gather" for n in tables)  # the table row of the current step
    assert not [n.op_type for n in tables if n.op_type in ("MatMul", "Gemm", "DequantizeLinear")]
    assert not [n.name for n in nodes if "time_embedding" in n.name or "time_proj" in n.name]


def test_a_graph_read_from_per_tensor_files_is_written_whole(tmp_path):
    """torch traces a model over 2 GB into one file per tensor; a lowered graph under the limit
    that still reads some of them (float layers kept as traced) is written with every tensor
    inside it, so it stands alone once the trace is gone (found at SD-1.5 size, 512 px)."""
    import shutil

    import numpy as np
    import onnx
    import onnx_ir as ir
    from onnx import helper, numpy_helper

    from tfmq.exporter.qdq_onnx import save

    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(w, "w")])
    traced = tmp_path / "trace" / "traced.onnx"
    traced.parent.mkdir()
    onnx.save_model(helper.make_model(graph), str(traced), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert (traced.parent / "w").is_file()  # the tensor in a file of its own, as torch writes it
    out = tmp_path / "target" / "model.onnx"
    out.parent.mkdir()
    save(ir.load(traced), out)
    shutil.rmtree(traced.parent)
    assert not list(out.parent.glob("*.data")) and [p.name for p in out.parent.iterdir()] == ["model.onnx"]
    loaded = onnx.load(str(out))
    assert np.array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), w)
