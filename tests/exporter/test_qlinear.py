"""Convs as QLinearConv with per-step parameters (the ONNX Runtime target): the layer is the
fake-quant layer with its output quantizer, ONNX Runtime runs it in integers, and the whole
graph gives the fake-quant model's error vs FP32."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from tfmq.calibration.api import calibrate
from tfmq.calibration.qmodel import ActQuantizer, QuantLayer, StepContext
from tfmq.calibration.recipe import ActivationQuant, Recipe, RecipeError, Reconstruction, get_recipe
from tfmq.errors import ExportError
from tfmq.exporter.deploy import StepIndex, build
from tfmq.exporter.qlinear import QLinearConvLayer


def _act(steps: int, symmetric: bool, gen, scale: float) -> ActQuantizer:
    ctx = StepContext(sets_of_steps=list(range(steps)))
    aq = ActQuantizer(8, symmetric, ctx, steps, name="x")
    aq.scale.copy_(torch.rand(steps, generator=gen) * scale + scale / 10)
    aq.zero.copy_(torch.zeros(steps) if symmetric else torch.randint(60, 200, (steps,), generator=gen).float())
    aq.initialized.fill_(True)
    aq.mode = "quant"
    return aq


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
@pytest.mark.parametrize("layer", [nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                   nn.Conv2d(8, 16, 1)], ids=["conv3x3", "conv-stride2", "conv1x1"])
def test_qlinear_layer_is_the_fake_quant_layer_with_its_output_quantizer(layer, symmetric):
    gen = torch.Generator().manual_seed(0)
    steps = 5
    aq, oq = _act(steps, symmetric, gen, 0.05), _act(steps, symmetric, gen, 0.1)
    oq.ctx = aq.ctx
    ql = QuantLayer("l", layer, 4, True, True, aq, oq)
    step = StepIndex()
    qc = QLinearConvLayer(ql, list(range(steps)), step)
    x = torch.randn(3, 8, 10, 10, generator=gen)
    for s in range(steps):
        aq.ctx.enter(s)
        step.idx = torch.tensor(s)
        want, got = ql(x), qc(x)
        codes = ((got - want) / oq.scale[s]).round()
        # the same output integers but for ties moved by the int32 bias's rounding
        assert codes.abs().max() <= 1 and (codes != 0).float().mean() < 0.01, s


def test_qlinear_needs_symmetric_weights_and_quantized_io():
    gen = torch.Generator().manual_seed(0)
    aq, oq = _act(2, False, gen, 0.05), _act(2, False, gen, 0.1)
    with pytest.raises(ExportError, match="zero-point 0"):
        QLinearConvLayer(QuantLayer("c", nn.Conv2d(4, 4, 3), 8, False, True, aq, oq), [0, 1], StepIndex())
    with pytest.raises(ExportError, match="quantized input and output"):
        QLinearConvLayer(QuantLayer("c", nn.Conv2d(4, 4, 3), 8, True, True, aq, None), [0, 1], StepIndex())


def test_recipe_variant_for_onnxruntime():
    r = get_recipe("w8a8").for_onnxruntime()
    assert r.name == "w8a8-ort" and r.weights.symmetric and r.activations.conv_outputs and r.onnxruntime_ready()
    assert r.openvino_ready() and r.tensorrt_ready()  # one state serves every target
    assert r.for_onnxruntime() is r
    assert get_recipe("w4a16").for_onnxruntime().name == "w4a16"  # nothing to quantize at conv outputs
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(RecipeError, match="need quantized activations"):
        Recipe("x", activations=ActivationQuant(bits=None, conv_outputs=True))
    from tfmq.targets.base import get_target

    with pytest.raises(RecipeError, match="weights.symmetric: true"):
        get_target("onnx").check(replace(r, weights=replace(r.weights, symmetric=False)))


@pytest.fixture(scope="module", params=["ddpm", "cond"])
def lowered(request, tmp_path_factory):
    from tfmq.calibration.calibset import record
    from tfmq.exporter.qdq_onnx import lower

    model = request.getfixturevalue(request.param)
    cs = record(model, seeds=3, steps=5)
    recipe = replace(get_recipe("w4a8"), reconstruction=Reconstruction(iters=0)).for_onnxruntime()
    r = calibrate(model, recipe, cs, progress=False)
    dep = build(model, r.state, conv_outputs=True)
    path = tmp_path_factory.mktemp("ql") / "model.onnx"
    cross = tuple(cs.cond.shape[1:]) if model.conditional else None
    report = lower(dep, path, tuple(model.sample_shape), cross, cast_int4=True)  # as the target lowers it
    return model, cs, r, dep, path, report


def test_every_quantized_conv_is_one_qlinearconv_in_onnxruntime(lowered, tmp_path):
    import onnx

    from tfmq.targets.onnxruntime import OnnxRuntimeTarget

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
    compiled = OnnxRuntimeTarget().compile(path, tmp_path)
    assert compiled["integer_kernels"]["QLinearConv"] == len(convs)  # the optimizer kept every one
    linears = [n for n, v in r.state.meta["layers"].items() if v["kind"] == "Linear" and n in report.weights]
    assert compiled["integer_kernels"]["MatMulIntegerToFloat"] >= len(linears)  # the Casts folded at load
    assert "Cast" not in compiled["ops"] or compiled["ops"]["Cast"] < report.ops["Cast"]
    # a state without conv output quantizers lowers as before: every conv folded, in float
    plain = build(model, r.state, conv_outputs=False)
    assert not any(isinstance(layer, QLinearConvLayer) for layer in plain.layers.values())


def test_onnxruntime_gives_the_fake_quant_error_at_every_step(lowered):
    from tfmq.targets.onnxruntime import session_runner

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
    from tfmq.targets.onnxruntime import session_runner

    model, cs, r, dep, path, report = lowered
    cross = tuple(cs.cond.shape[1:]) if model.conditional else None
    lower(dep, tmp_path / "i8.onnx", tuple(model.sample_shape), cross, int4=False)
    a, b = session_runner(path), session_runner(tmp_path / "i8.onnx")
    idx = torch.arange(2)
    for s in (0, cs.steps - 1):
        x, t, c = cs.inputs(torch.full_like(idx, s), idx)
        args = (x.numpy(), t[:1].numpy(), None if c is None else c.numpy())
        assert np.array_equal(a(*args), b(*args)), s
    assert path.stat().st_size < (tmp_path / "i8.onnx").stat().st_size
