"""ONNX Runtime on the canonical graph with its passes: every quantized conv is one integer
QLinearConv fed its step's parameters, 4-bit weights are INT4 behind a Cast, and the graph
gives the fake-quant model's error vs FP32 at every step."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from tfmq.calibration.api import calibrate
from tfmq.calibration.recipe import ActivationQuant, Recipe, RecipeError, Reconstruction, get_recipe
from tfmq.calibration.requirements import satisfy, unmet
from tfmq.exporter.deploy import build
from tfmq.exporter.qlinear import QLinearConvLayer
from tfmq.targets.onnxruntime import TARGET, session_runner
from tfmq.targets.onnxruntime.passes import int4_behind_cast

pytestmark = pytest.mark.onnxruntime


def test_presets_get_the_conv_output_variant_and_custom_recipes_are_checked():
    r = satisfy(get_recipe("w8a8"), TARGET.needs)
    assert r.name == "w8a8+sym-weights+sym-attn+conv-out"
    assert r.weights.symmetric and r.activations.conv_outputs and r.activations.attention_symmetric
    assert not unmet(r, TARGET.needs) and satisfy(r, TARGET.needs) is r
    assert satisfy(get_recipe("w4a16"), TARGET.needs).name == "w4a16"  # no activations: no integer kernels
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(RecipeError, match="need quantized activations"):
        Recipe("x", activations=ActivationQuant(bits=None, conv_outputs=True))
    TARGET.check(get_recipe("w8a8"), TARGET.options())  # preferred, not required: its convs then run in float
    with pytest.raises(RecipeError, match="weights.symmetric: true"):
        TARGET.check(replace(r, weights=replace(r.weights, symmetric=False)), TARGET.options())


# the conditional model (cross-attention) in the full suite only: its fixture alone takes ~20 s here
@pytest.fixture(scope="module", params=["ddpm", pytest.param("cond", marks=pytest.mark.slow)])
def lowered(request, tmp_path_factory):
    from tfmq.calibration.calibset import record
    from tfmq.exporter.qdq_onnx import lower

    model = request.getfixturevalue(request.param)
    cs = record(model, seeds=3, steps=5)
    recipe = satisfy(replace(get_recipe("w4a8"), reconstruction=Reconstruction(iters=0)), TARGET.needs)
    r = calibrate(model, recipe, cs, progress=False)
    dep = build(model, r.state, conv_outputs=True)
    path = tmp_path_factory.mktemp("ql") / "model.onnx"
    cross = tuple(cs.cond.shape[1:]) if model.conditional else None
    report = lower(dep, path, cross, [int4_behind_cast])  # as the target lowers it (s8 weights)
    return model, cs, r, dep, path, report


def test_every_quantized_conv_is_one_qlinearconv_in_onnxruntime(lowered, tmp_path):
    import onnx

    from tfmq.targets.base import Lowered

    model, cs, r, dep, path, report = lowered
    convs = {n for n, v in r.state.meta["layers"].items() if v["kind"] == "Conv2d"}
    assert {n for n, layer in dep.layers.items() if isinstance(layer, QLinearConvLayer)} == convs
    m = onnx.load(str(path))
    nodes = {n.name: n for n in m.graph.node}
    inits = {i.name: i.data_type for i in m.graph.initializer}
    for name in convs:
        node = nodes[report.kernels[name]]
        assert node.op_type == "QLinearConv" and report.weights[name] | {"shape": 0} == {
            "bits": 4, "dtype": "INT4", "cast_to": "INT8", "shape": 0}
    for name in report.weights:  # 4-bit storage in the file, behind a Cast to the 8 bits the kernels take
        assert inits[f"{name}.w_int"] == onnx.TensorProto.INT4, name
    assert report.ops["QLinearConv"] == len(convs) and report.ops["Cast"] >= len(report.weights)
    compiled = TARGET.compile(Lowered(dep, None, path, report), tmp_path, TARGET.options())
    assert compiled["integer_kernels"]["QLinearConv"] == len(convs)  # the optimizer kept every one
    linears = [n for n, v in r.state.meta["layers"].items() if v["kind"] == "Linear" and n in report.weights]
    assert compiled["integer_kernels"]["MatMulIntegerToFloat"] >= len(linears)  # the Casts folded at load
    assert "Cast" not in compiled["ops"] or compiled["ops"]["Cast"] < report.ops["Cast"]
    # a state without conv output quantizers lowers as before: every conv folded, in float
    plain = build(model, r.state, conv_outputs=False)
    assert not any(isinstance(layer, QLinearConvLayer) for layer in plain.layers.values())


def test_onnxruntime_gives_the_fake_quant_error_at_every_step(lowered):
    model, cs, r, dep, path, report = lowered
    fq = r.state.apply(model, conv_outputs=True)
    run = session_runner(path)
    idx = torch.arange(3)
    for s in range(cs.steps):
        x, t, c = cs.inputs(torch.full_like(idx, s), idx)
        with torch.no_grad():
            kw = {} if c is None else {"encoder_hidden_states": c}
            f = model.unet(x, t, **kw).sample
            q = fq(x, t, **kw).sample
            d = dep(x, t[:1], c)
        o = torch.from_numpy(run(x.numpy(), t[:1].numpy(), None if c is None else c.numpy()))

        def err(y, f=f):
            return float((y - f).norm() / f.norm())

        assert float((o - d).norm() / d.norm()) < 0.05, s  # the graph is the deploy module
        assert abs(err(o) - err(q)) <= 0.1 * err(q) + 1e-3, (s, err(o), err(q))
        assert np.isfinite(o.numpy()).all()


def test_int4_behind_a_cast_runs_as_int8_containers_do(lowered, tmp_path):
    """The Cast folds at load: the same kernels on the same integers as a file holding the 4-bit
    values in int8 (identical outputs), in a smaller file."""
    from tfmq.exporter.qdq_onnx import lower
    from tfmq.targets.openvino.passes import eight_bit_containers  # the 4-bit values in INT8 initializers

    model, cs, r, dep, path, report = lowered
    cross = tuple(cs.cond.shape[1:]) if model.conditional else None
    lower(dep, tmp_path / "i8.onnx", cross, [eight_bit_containers])
    a, b = session_runner(path), session_runner(tmp_path / "i8.onnx")
    idx = torch.arange(2)
    for s in (0, cs.steps - 1):
        x, t, c = cs.inputs(torch.full_like(idx, s), idx)
        args = (x.numpy(), t[:1].numpy(), None if c is None else c.numpy())
        assert np.array_equal(a(*args), b(*args)), s
    assert path.stat().st_size < (tmp_path / "i8.onnx").stat().st_size
