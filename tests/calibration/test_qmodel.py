from dataclasses import replace

import pytest
import torch
from torch import nn

from tfmq.calibration.fsc import calibrate_activations
from tfmq.calibration.qmodel import QuantLayer, QuantUNet, ScheduleError, TemporalTable
from tfmq.calibration.recipe import ActivationSchedule, get_recipe
from tfmq.calibration.tib import find_tib


def rel(a, b):
    return float((a - b).norm() / b.norm())


def run(unet, cs, step, **kw):
    x, t, c = cs.step_inputs(step)
    return unet(x, t).sample


def test_w8_weight_only_is_close_and_fp_layers_stay_float(small_set):
    model, cs = small_set
    q = QuantUNet(model.unet, get_recipe("w8a8"), cs.timesteps, train_timesteps=model.train_timesteps)
    q.set_act_mode("off")
    assert isinstance(q.unet.conv_in, nn.Conv2d) and isinstance(q.unet.conv_out, nn.Conv2d)
    assert isinstance(q.unet.time_embedding.linear_1, nn.Linear)
    assert isinstance(q.unet.down_blocks[0].resnets[0].conv1, QuantLayer)
    for ql in q.layers.values():
        lo, hi = (0, 255)
        assert ql.w_int.min() >= lo and ql.w_int.max() <= hi and torch.equal(ql.w_int, ql.w_int.round())
    err = rel(run(q, cs, 3), run(model.unet, cs, 3))
    assert 0 < err < 0.02


def test_w4_integers_in_range(small_set):
    model, cs = small_set
    q = QuantUNet(model.unet, get_recipe("w4a8"), cs.timesteps, train_timesteps=model.train_timesteps)
    assert all(ql.w_int.max() <= 15 and ql.w_int.min() >= 0 for ql in q.layers.values())
    qs = QuantUNet(model.unet, get_recipe("w4a8").symmetric(), cs.timesteps, train_timesteps=model.train_timesteps)
    assert all(ql.w_int.max() <= 7 and ql.w_int.min() >= -8 and (ql.w_zero == 0).all() for ql in qs.layers.values())


def test_schedule_checks(small_set):
    model, cs = small_set
    q = QuantUNet(model.unet, get_recipe("w8a8"), cs.timesteps, train_timesteps=model.train_timesteps)
    q.set_act_mode("off")
    q(cs.x[0], torch.full((4,), 7))  # off the schedule: the nearest step's parameters
    assert q.ctx.step == len(cs.timesteps) - 1 and q.ctx.t == 7
    with pytest.raises(ScheduleError, match="outside the model's training range"):
        q(cs.x[0], torch.full((4,), 1000))
    t = cs.timesteps[[0, 0, 1, 1]]
    with pytest.raises(ScheduleError, match="one timestep"):
        q(cs.x[0], t)
    shared = QuantUNet(model.unet, get_recipe("qdiff-w8a8"), cs.timesteps, train_timesteps=model.train_timesteps)
    shared.set_act_mode("off")
    shared(cs.x[0], t)  # one parameter set for all steps: mixing steps is fine


def test_fsc_gives_each_step_its_own_parameters(small_set):
    model, cs = small_set
    per_step = QuantUNet(model.unet, get_recipe("w8a8"), cs.timesteps, train_timesteps=model.train_timesteps)
    calibrate_activations(per_step, cs, init_samples=2, batch=2, progress=False)
    shared = QuantUNet(model.unet, get_recipe("qdiff-w8a8"), cs.timesteps, train_timesteps=model.train_timesteps)
    calibrate_activations(shared, cs, init_samples=2, batch=2, progress=False)
    aq = per_step.act_quantizers["down_blocks.0.resnets.0.conv1"]
    assert aq.scale.shape == (6,) and aq.initialized.all() and len(set(aq.scale.tolist())) > 1
    assert shared.act_quantizers["down_blocks.0.resnets.0.conv1"].scale.shape == (1,)
    assert "mid_block.attentions.0.probs" in per_step.act_quantizers
    assert per_step.act_quantizers["mid_block.attentions.0.probs"].zero.abs().max() == 0  # unsigned softmax
    fp = run(model.unet, cs, 5)
    assert rel(run(per_step, cs, 5), fp) < rel(run(shared, cs, 5), fp)  # the point of FSC


def test_grouped_schedule_maps_steps_to_groups(small_set):
    model, cs = small_set
    a = replace(get_recipe("w8a8").activations, schedule=ActivationSchedule.GROUPED, groups=2)
    q = QuantUNet(model.unet, replace(get_recipe("w8a8"), activations=a), cs.timesteps, train_timesteps=model.train_timesteps)
    assert q.ctx.sets_of_steps == [0, 0, 0, 1, 1, 1] and q.n_sets == 2


def test_temporal_tables_are_exact(small_set):
    model, cs = small_set
    q = QuantUNet(model.unet, get_recipe("w8a8"), cs.timesteps, train_timesteps=model.train_timesteps)
    q.set_act_mode("off")
    tib = find_tib(model.unet)
    with torch.no_grad():
        feats = tib.features(torch.arange(model.train_timesteps))
        q.cache_temporal(feats)
    assert isinstance(q.unet.down_blocks[0].resnets[0].time_emb_proj, TemporalTable)
    assert not any(n.endswith("time_emb_proj") for n in q.layers)
    from tfmq.quality.harness import temporal_error, temporal_features

    for ts in (cs.timesteps, cs.timesteps + 1):  # on and off the calibrated schedule
        ref = temporal_features(model.unet, ts, (1, 32, 32), None)
        got = temporal_features(q, ts, (1, 32, 32), None)
        assert max(temporal_error(ref, got)) < 1e-6


def test_nan_in_calibration_activations_is_a_clear_error(small_set):
    from tfmq.calibration.calibset import CalibrationDataError

    model, cs = small_set
    q = QuantUNet(model.unet, get_recipe("w8a8"), cs.timesteps, train_timesteps=model.train_timesteps)
    conv = q.unet.get_submodule("down_blocks.1.resnets.0.conv1").layer
    bias = conv.bias.detach().clone()  # the fake-quant model shares its float tensors with the model
    bias[0] = float("nan")
    conv.bias = torch.nn.Parameter(bias, requires_grad=False)
    with pytest.raises(CalibrationDataError, match=r"NaN or inf .* at down_blocks\.1\.resnets\.0\.conv2"):
        calibrate_activations(q, cs, progress=False)


def test_the_fake_quant_model_shares_the_float_weights_and_holds_8_bit_integers(small_set):
    """No second copy of the model's weights (an SD-1.5 UNet is 3.4 GB): the fake-quant model's
    layers read the model's own tensors, its integers are 1 byte each, and the model's module
    tree is untouched."""
    model, cs = small_set
    before = [type(m).__name__ for m in model.unet.modules()]
    q = QuantUNet(model.unet, get_recipe("w8a8"), cs.timesteps, train_timesteps=model.train_timesteps)
    ql = q.layers["down_blocks.0.resnets.0.conv1"]
    assert ql.layer.weight is model.unet.get_submodule("down_blocks.0.resnets.0.conv1").weight
    assert {layer.w_int.dtype for layer in q.layers.values()} <= {torch.int8, torch.uint8}
    assert [type(m).__name__ for m in model.unet.modules()] == before
