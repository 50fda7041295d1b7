"""Channel-group activation quantization (``activations.channel_groups``): the quantizer, its
calibration, the QuantState, the deploy module and the lowering that every target reads."""
import json
from dataclasses import replace

import pytest
import torch

from helpers import FULL_RES_DDPM
from tfmq.calibration.api import calibrate
from tfmq.calibration.qmodel import ActQuantizer, GroupedActQuantizer, StepContext
from tfmq.calibration.recipe import ActivationQuant, LayerOverride, Recipe, RecipeError, get_recipe
from tfmq.calibration.state import QuantState, QuantStateError


def grouped(x_scales, groups, n_sets=1):
    """A grouped quantizer on data whose channel c spans [-x_scales[c], x_scales[c]]."""
    ctx = StepContext(sets_of_steps=[0] * n_sets)
    q = GroupedActQuantizer(len(x_scales), groups, 8, False, ctx, n_sets, name="t")
    return q, ctx


@pytest.mark.parametrize("bad", [
    lambda: Recipe("x", activations=ActivationQuant(channel_groups=0)),
    lambda: Recipe("x", activations=ActivationQuant(channel_groups=65)),
    lambda: Recipe("x", activations=ActivationQuant(bits=None, channel_groups=8)),
    lambda: replace(get_recipe("qdiff-w8a8"), overrides=(LayerOverride("a", act_groups=4),)),
])
def test_bad_channel_group_recipes(bad):
    with pytest.raises(RecipeError):
        bad()


def test_recipe_round_trips_its_groups():
    r = replace(get_recipe("w4a8-mp-g16"), overrides=(LayerOverride("up.conv", act_groups=4),))
    back = Recipe.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r and back.act_groups("up.conv") == 4 and back.act_groups("other") is None
    assert back.activations.channel_groups == 16


def test_groups_are_runs_of_channels_sorted_by_range_and_one_group_is_per_tensor():
    torch.manual_seed(0)
    spans = torch.tensor([8.0, 0.5, 4.0, 0.25, 2.0, 1.0])
    x = torch.randn(4, 6, 5, 5).clamp(-2, 2) * spans.view(1, -1, 1, 1)
    q, _ = grouped(spans, 3)
    q.mode = "channels"
    assert torch.equal(q(x), x)  # identity while it records ranges
    q.assign()
    assert q.channel_group.tolist() == [2, 0, 2, 0, 1, 1]  # (0.25, 0.5) (1, 2) (4, 8)
    q.mode = "observe"
    y = q(x)
    for g in range(3):  # each group quantized per tensor with its own parameters
        members = q.members(g)
        assert len(members) == 2 and torch.allclose(q.scale[0, g], (x[:, members].amax() - x[:, members].amin()) / 255,
                                                     rtol=0.25)
    small = q.members(0)
    assert (y[:, small] - x[:, small]).abs().max() < 0.01  # a per-tensor scale would give these ~0.06
    one, ctx = grouped(spans, 1)
    ref = ActQuantizer(8, False, ctx, 1)
    one.mode = ref.mode = "observe"
    assert torch.equal(one(x), ref(x)) and torch.equal(one.scale[:, 0], ref.scale)


def test_min_noise_runs_is_the_best_partition():
    import itertools

    from tfmq.calibration.qmodel import min_noise_runs

    torch.manual_seed(0)
    ranges, weight = torch.rand(9).sort().values * 10, torch.rand(9)

    def noise(sizes):
        ends = torch.tensor(sizes).cumsum(0)
        return sum(float(ranges[e - 1] ** 2 * weight[e - s:e].sum()) for s, e in zip(sizes, ends.tolist(), strict=True))

    for groups in (1, 3, 4):
        best = min((c for c in itertools.product(range(1, 10), repeat=groups) if sum(c) == 9), key=noise)
        got = min_noise_runs(ranges, weight, groups)
        assert sum(got) == 9 and min(got) >= 1 and noise(got) == pytest.approx(noise(best))
    assert min_noise_runs(ranges, weight, 9) == [1] * 9
    # one channel far wider than the rest, weighted like them: it gets a run of its own
    assert min_noise_runs(torch.tensor([1.0, 1.1, 1.2, 1.3, 50.0]), torch.ones(5), 2) == [4, 1]


def test_calibration_groups_the_full_resolution_conv_inputs(g4):
    model, cs, r = g4
    assert r.report["channel_groups"] == {"groups": 4, "layers": FULL_RES_DDPM}
    grouped_q = {n for n, q in r.model.act_quantizers.items() if isinstance(q, GroupedActQuantizer)}
    assert grouped_q == set(FULL_RES_DDPM)
    t, meta = r.state.tensors, r.state.meta
    for n in FULL_RES_DDPM:
        c = model.unet.get_submodule(n).in_channels
        assert t[f"{n}.a_scale"].shape == (cs.steps, 4) and t[f"{n}.a_zero"].shape == (cs.steps, 4)
        sizes = torch.bincount(t[f"{n}.a_groups"].long(), minlength=4)
        assert t[f"{n}.a_groups"].shape == (c,) and len(sizes) == 4 and (sizes > 0).all()
        assert meta["activations"][n]["groups"] == 4
        # groups are runs of channels by range: the last (widest) group's scales exceed the first's
        assert t[f"{n}.a_scale"][:, -1].mean() > 1.2 * t[f"{n}.a_scale"][:, 0].mean(), n
    assert "mid_block.resnets.0.conv1.a_groups" not in t


def test_state_round_trip_and_broken_groups_are_refused(g4, tmp_path):
    model, cs, r = g4
    r.state.save(tmp_path / "s")
    back = QuantState.load(tmp_path / "s")
    x, t, _ = cs.step_inputs(3)
    with torch.no_grad():
        assert torch.equal(back.apply(model)(x, t).sample, r.model(x, t).sample)
    n = FULL_RES_DDPM[0]
    for key, value in ((f"{n}.a_groups", torch.zeros_like(r.state.tensors[f"{n}.a_groups"])),  # 3 groups empty
                       (f"{n}.a_scale", r.state.tensors[f"{n}.a_scale"][:, :2])):
        broken = QuantState(r.state.meta, {**r.state.tensors, key: value})
        with pytest.raises(QuantStateError, match=n):
            broken.apply(model)


def test_conv_output_variant_leaves_grouped_convs_without_output_quantizers(g4):
    from tfmq.calibration.requirements import Requirements, satisfy

    model, cs, r = g4
    ort = calibrate(model, satisfy(r.state.recipe, Requirements(conv_outputs=True)), cs, progress=False,
                    weights_from=r.state)
    assert not any(f"{n}.out" in ort.model.act_quantizers for n in FULL_RES_DDPM)
    assert "mid_block.resnets.0.conv1.out" in ort.model.act_quantizers


def test_deploy_module_runs_each_group_as_its_own_folded_conv(g4):
    from tfmq.exporter.deploy import GroupedDeployLayer, build

    model, cs, r = g4
    dep = build(model, r.state)
    for n in FULL_RES_DDPM:
        assert isinstance(dep.unet.get_submodule(n), GroupedDeployLayer)
        assert {f"{n}.groups.{g}" for g in range(4)} <= set(dep.layers) and n not in dep.layers
    worst = 0.0
    for s in range(cs.steps):
        x, t, _ = cs.step_inputs(s)
        caps = {}
        hooks = [r.model.layers[n].register_forward_pre_hook(lambda m, a, n=n, caps=caps: caps.setdefault(n, a[0]))
                 for n in FULL_RES_DDPM]
        with torch.no_grad():
            r.model(x, t)
        for h in hooks:
            h.remove()
        dep.step.idx = torch.tensor(s)
        with torch.no_grad():
            for n in FULL_RES_DDPM:
                want = r.model.layers[n](caps[n])
                got = dep.unet.get_submodule(n)(caps[n])
                err = float((got - want).norm() / want.norm())
                assert err < 1e-2, (s, n, err)  # the fold's rounding flips, as for any folded layer
                worst = max(worst, err)
    assert worst > 0
