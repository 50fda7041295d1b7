"""The deploy module against the fake-quant model it comes from: the FSC folding, proven
layer by layer and then through the whole UNet at every step."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from tfmq.calibration.api import calibrate
from tfmq.calibration.qmodel import ActQuantizer, QuantLayer, ScheduleError, StepContext
from tfmq.calibration.quantizers import quantize
from tfmq.calibration.recipe import Reconstruction, get_recipe
from tfmq.exporter.deploy import DeployLayer, FoldedAct, StepIndex, build, deploy_of, folded_matmul


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _act(steps: int, symmetric: bool, gen) -> ActQuantizer:
    ctx = StepContext(sets_of_steps=list(range(steps)))
    aq = ActQuantizer(8, symmetric, ctx, steps, name="x")
    aq.scale.copy_(torch.rand(steps, generator=gen) * 0.05 + 0.005)
    aq.zero.copy_(torch.zeros(steps) if symmetric else torch.randint(0, 256, (steps,), generator=gen).float())
    aq.initialized.fill_(True)
    aq.mode = "quant"
    return aq


@pytest.mark.parametrize("symmetric,signed_zero,one_set", [(False, False, False), (True, False, False),
                                                            (False, True, False), (False, True, True)],
                         ids=["asymmetric", "symmetric", "signed-zero", "signed-zero-one-set"])
@pytest.mark.parametrize("layer", [nn.Linear(24, 16), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2,
                                                                                              padding=1)],
                         ids=["linear", "conv", "conv-stride2"])
def test_fold_is_the_per_step_fake_quant_layer(layer, symmetric, signed_zero, one_set):
    """signed_zero (``FoldedAct.rebase``, TensorRT's form): asymmetric parameters folded onto
    zero-point 128 = INT8 zero, also when every step shares one (s, z) (then only the
    zero-point is folded)."""
    gen = torch.Generator().manual_seed(0)
    steps = 5
    aq = _act(steps, symmetric, gen)
    if one_set:
        aq.scale.fill_(0.02), aq.zero.fill_(37)
    ql = QuantLayer("l", layer, 4, False, True, aq)
    step = StepIndex()
    act = FoldedAct(aq, list(range(steps)), step)
    if signed_zero:
        act.rebase(128)
    dl = DeployLayer(ql, act, step)
    assert dl.act.z == (128 if signed_zero else dl.act.z)
    x = torch.randn((3, 24) if isinstance(layer, nn.Linear) else (3, 8, 10, 10), generator=gen)
    dl.fix_shape(x)
    assert dl.act.per_step
    for s in range(steps):
        aq.ctx.enter(s)
        step.idx = torch.tensor(s)
        want = ql(x)
        got = dl(x)
        # the same integers: any difference is float rounding of r_t, c_t (a rare one-step flip)
        err = (got - want).abs().max() / want.abs().max()
        assert err < 1e-4, (s, float(err))


@pytest.mark.parametrize("kind", ["asymmetric", "unsigned-zero", "symmetric"])
def test_bilinear_fold_is_the_product_of_fake_quant_operands(kind):
    """With a zero-point that never moves (the softmax output's 0, or symmetric operands) the
    fold emits no shift terms; the attention scale rides on the fold's 1/(r_a r_b)."""
    gen = torch.Generator().manual_seed(1)
    qa, qb = _act(4, kind == "symmetric", gen), _act(4, kind == "symmetric", gen)
    if kind == "unsigned-zero":
        qa.zero.zero_()
    step = StepIndex()
    fa, fb = FoldedAct(qa, list(range(4)), step), FoldedAct(qb, list(range(4)), step)
    assert fa.shifts == (kind == "asymmetric")
    a, b = torch.randn(2, 6, 8, generator=gen), torch.randn(2, 7, 8, generator=gen)
    for s in range(4):
        qa.ctx.enter(s), qb.ctx.enter(s)
        step.idx = torch.tensor(s)
        want = torch.bmm(qa(a), qb(b).transpose(1, 2)) * 0.35
        got = folded_matmul(fa(a), fb(b).transpose(1, 2), fa, fb, 0.35)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


# the conditional model (cross-attention) in the full suite only: its fixture alone takes ~20 s here
@pytest.fixture(scope="module", params=["ddpm", pytest.param("cond", marks=pytest.mark.slow)])
def calibrated(request):
    from tfmq.calibration.calibset import record

    model = request.getfixturevalue(request.param)
    cs = record(model, seeds=4, steps=5)
    r = calibrate(model, replace(get_recipe("w8a8"), reconstruction=Reconstruction(iters=0)), cs, progress=False)
    return model, cs, r


def test_the_deploy_module_holds_float_weights_only_while_traced(calibrated):
    """Outside a lowering the deploy module keeps its layers' integers (1 byte each) and no float
    weights; under TraceOps every layer holds s * (q - z), the values of the fake-quant model."""
    from tfmq.exporter.deploy import TraceOps

    model, cs, r = calibrated
    fq = r.state.apply(model, conv_outputs=False)
    dep = deploy_of(fq, model)
    layers = [m for m in dep.modules() if isinstance(m, DeployLayer)]
    floats = sum(b.numel() * b.element_size() for dl in layers for b in dl.buffers() if b.is_floating_point())
    ints = sum(dl.w_int.numel() for dl in layers)
    assert all(dl.held_weight is None for dl in layers) and floats < ints / 2
    with dep.using(TraceOps()):
        assert all(dl.held_weight is not None for dl in layers)
        for dl in layers:
            assert torch.equal(dl.held_weight, fq.layers[dl.name].weight())
    assert all(dl.held_weight is None for dl in layers)


def test_every_folded_layer_matches_its_fake_quant_layer_at_every_step(calibrated):
    """Step by step, layer by layer, on the inputs the fake-quant model really feeds them."""
    model, cs, r = calibrated
    dep = build(model, r.state)
    worst, flipped = 0.0, 0
    for s in range(cs.steps):
        x, t, c = cs.step_inputs(s)
        caps = {}
        hooks = [ql.register_forward_pre_hook(lambda mod, a, n=n, caps=caps: caps.setdefault(n, a[0]))
                 for n, ql in r.model.layers.items()]
        with torch.no_grad():
            r.model(x, t, c) if c is not None else r.model(x, t)
        for h in hooks:
            h.remove()
        r.model.ctx.enter(s)
        dep.step.idx = torch.tensor(s)
        # the time MLP is gone from the deploy module (its features are tables)
        assert {n for n in caps if not n.startswith("time_embedding.")} == set(dep.layers)
        with torch.no_grad():
            for n in dep.layers:
                xin = caps[n]
                ql, dl = r.model.layers[n], dep.layers[n]
                # the same integer codes up to float rounding of r_t, c_t: a code may move by one
                # where x / s_t lies on a .5 tie, which inputs made of quantized products (the
                # attention output) hit far more often than random data
                if dl.act is not None:
                    aq, fa = ql.act, dl.act
                    i = aq.ctx.param_set
                    want_q = quantize(xin, aq.scale[i], aq.zero[i], aq.bits, aq.symmetric)
                    rr, cc = fa.factors()
                    got_q = quantize(xin * rr + cc, torch.tensor(fa.s), torch.tensor(float(fa.z)), fa.bits,
                                     fa.symmetric)
                    flips = (got_q != want_q).float()
                    assert (got_q - want_q).abs().max() <= 1 and flips.mean() < 5e-3, (s, n, float(flips.sum()))
                    flipped += int(flips.sum())
                want = ql(xin)
                err = float((dl(xin) - want).norm() / want.norm().clamp_min(1e-12))
                assert err < 1e-2, (s, n, err)  # a flip moves a small layer's output by ~1e-3
                worst = max(worst, err)
    assert worst > 0  # the fold really ran (exact equality would mean nothing was folded)
    assert flipped < 1000


@pytest.mark.parametrize("signed_zero", [False, True], ids=["", "signed-zero"])
def test_deploy_module_error_vs_fp32_is_the_fake_quant_error(calibrated, signed_zero):
    """End to end, the product's rule: the same error vs FP32 as fake-quant, not equality
    with it (rounding flips are amplified through the network). signed_zero: TensorRT's form,
    every asymmetric quantizer (cross-attention's k/v too, whose one set is shared by all
    steps) folded onto zero-point 0 of INT8."""
    model, cs, r = calibrated
    dep = build(model, r.state)
    if signed_zero:
        for act in dep.activations():
            if not act.symmetric:
                act.rebase(2 ** (act.bits - 1))
        dep.fix_shapes()
        assert all(dl.act.z == 128 for dl in dep.layers.values() if dl.act is not None)
    assert any(dl.act is not None and dl.act.per_step for dl in dep.layers.values())
    fp = model.unet.eval()
    with torch.no_grad():
        for s in range(cs.steps):
            x, t, c = cs.step_inputs(s)
            kw = {} if c is None else {"encoder_hidden_states": c}
            ref, want, got = fp(x, t, **kw).sample, r.model(x, t, **kw).sample, dep(x, t[:1], c)
            quant_err = float((want - ref).norm() / ref.norm())
            dep_err = float((got - ref).norm() / ref.norm())
            assert abs(dep_err - quant_err) < 0.1 * quant_err + 1e-4, (s, dep_err, quant_err)


def test_deploy_module_subtracts_the_bias_correction_of_the_step(calibrated):
    model, cs, r = calibrated
    dep = build(model, r.state)
    table = r.state.tensors["output_bias"]
    x, t, c = cs.step_inputs(3)
    with torch.no_grad():
        got = dep(x, t[:1], c)
        dep.output_bias = None
        raw = dep(x, t[:1], c)
    assert torch.allclose(raw - got, table[3].view(1, -1, 1, 1).expand_as(got), atol=1e-6)


def test_deploy_module_refuses_timesteps_outside_the_training_range(calibrated):
    model, cs, r = calibrated
    dep = build(model, r.state)
    assert dep.step_of(cs.timesteps[2]) == 2 and dep.step_of(int(cs.timesteps[0]) + 1) == 0
    with pytest.raises(ScheduleError, match=r"outside the model's training range \[0, 1000\)"):
        dep.step_of(1000)


def test_off_the_schedule_the_deploy_module_is_the_fake_quant_model_at_the_nearest_step(calibrated):
    """A timestep between two calibrated ones: the state's fake-quant model and the deploy
    module agree there (its temporal row, the nearest step's parameters and bias row), and
    the result differs from running the nearest calibrated timestep itself."""
    model, cs, r = calibrated
    dep, fq = build(model, r.state), r.state.apply(model, conv_outputs=False)
    x, t, c = cs.step_inputs(1)
    mid = (int(cs.timesteps[1]) + int(cs.timesteps[2])) // 2 + 1  # nearer step 1
    assert dep.step_of(mid) == 1
    tt = torch.full((len(x),), mid)
    kw = {} if c is None else {"encoder_hidden_states": c}
    with torch.no_grad():
        ref, want, got = model.unet.eval()(x, tt, **kw).sample, fq(x, tt, **kw).sample, dep(x, tt[:1], c)
        at_step = dep(x, t[:1], c)
    quant_err, dep_err = _rel(want, ref), _rel(got, ref)
    assert abs(dep_err - quant_err) < 0.1 * quant_err + 1e-4, (dep_err, quant_err)  # the product's rule
    assert _rel(got, want) < 0.1 * _rel(got, at_step)  # rounding flips only; another timestep moves it more


def test_tiar_recipes_deploy_their_reconstructed_block_as_tables(small_set):
    from tfmq.calibration.recipe import TemporalStrategy
    from tfmq.exporter.deploy import DeployTable

    model, cs = small_set
    recipe = replace(get_recipe("w4a8"), temporal=TemporalStrategy.TIAR, reconstruction=Reconstruction(iters=0))
    r = calibrate(model, recipe, cs, progress=False)
    assert not r.state.meta["temporal_tables"]  # the state keeps the quantized block itself
    dep = build(model, r.state)
    assert sum(isinstance(m, DeployTable) for m in dep.modules()) > 5
    with torch.no_grad():
        for s in (0, cs.steps - 1):
            x, t, _ = cs.step_inputs(s)
            ref, want, got = model.unet(x, t).sample, r.model(x, t).sample, dep(x, t[:1])
            q_err, d_err = float((want - ref).norm() / ref.norm()), float((got - ref).norm() / ref.norm())
            assert abs(d_err - q_err) < 0.1 * q_err + 1e-4, (s, d_err, q_err)


@pytest.mark.parametrize("stride,padding,size", [(1, 1, (7, 9)), (2, 1, (8, 8)), (2, 0, (9, 7)), (1, 2, (5, 6))])
def test_factored_border_map_equals_the_dense_one(stride, padding, size):
    """c * M from per-tap sums and tap-validity rows/columns equals c * conv(ones) (zero padding)."""
    from types import SimpleNamespace

    from tfmq.exporter.deploy import DeployLayer

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 4, 3, stride=stride, padding=padding)
    dl = DeployLayer.__new__(DeployLayer)
    torch.nn.Module.__init__(dl)
    dl.kind, dl.held_weight = "Conv2d", conv.weight.detach()  # the float weights, as held while tracing
    dl.conv = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": 1}
    dl.act = SimpleNamespace(per_step=True, symmetric=False, shifts=True)
    dl.m = None
    x = torch.zeros(1, 5, *size)
    dl.fix_shape(x)
    dense = torch.nn.functional.conv2d(torch.ones_like(x), dl.weight, None, **dl.conv)[0]
    c = torch.tensor(0.37)
    assert dl.m is None and dl.tap_sums.shape == (4, 3, 3)
    assert torch.allclose(dl.shift(c), c * dense, atol=1e-6)


def test_trajectory_gate_passes_the_deploy_module_and_fails_a_biased_one(calibrated):
    """Level 3 on the deploy module as the runtime: it passes; the same module with a constant
    0.01 added to its output (the size of the mean error bias correction removes) fails, by
    its margin and by both floors."""
    import numpy as np

    from tfmq.exporter.parity import trajectory_level
    from tfmq.targets.onnxruntime import OnnxRuntimeTarget

    model, cs, r = calibrated
    dep = build(model, r.state)

    def run(offset):
        def f(sample, timestep, ehs=None):
            with torch.no_grad():
                out = dep(torch.from_numpy(sample), torch.from_numpy(timestep),
                          None if ehs is None else torch.from_numpy(ehs))
            return out.numpy() + np.float32(offset)
        return f

    tol = OnnxRuntimeTarget.tolerance
    good = trajectory_level(model, r.model, run(0.0), cs.steps, 1.0, tol, seeds=4)
    bad = trajectory_level(model, r.model, run(0.01), cs.steps, 1.0, tol, seeds=4)
    assert good["passed"] and good["within_margin"]
    assert not bad["passed"] and bad["psnr_artifact_vs_fake_quant_db"] < tol.trajectory_floor_db
