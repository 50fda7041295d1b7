"""Ablations of a saved state: activation quantizers left in float, everywhere or at some steps."""
from dataclasses import replace

import pytest
import torch

from tfmq.calibration.ablation import AblationError, float_activations, state_candidate
from tfmq.calibration.api import calibrate
from tfmq.calibration.recipe import Reconstruction, get_recipe


@pytest.fixture(scope="module")
def saved(small_set, tmp_path_factory):
    model, cs = small_set
    r = calibrate(model, replace(get_recipe("w8a8"), reconstruction=Reconstruction(iters=0)), cs, progress=False)
    folder = tmp_path_factory.mktemp("ab") / "qs"
    r.state.save(folder)
    return model, cs, folder


def test_named_activations_go_float_everywhere_or_at_some_steps(saved):
    model, cs, folder = saved
    full = state_candidate(f"state:{folder}", model)
    part = state_candidate(f"state:{folder}@float=conv1$", model)
    off = [n for n, q in part.module.act_quantizers.items() if q.mode == "off"]
    assert off and all(n.endswith("conv1") for n in off) and part.name == "qs@float=conv1$"
    assert all(q.mode == "quant" for n, q in part.module.act_quantizers.items() if n not in off)
    x, t, _ = cs.step_inputs(3)
    assert not torch.equal(part.module(x, t).sample, full.module(x, t).sample)
    everything = state_candidate(f"state:{folder}@float=.", model).module
    full.module.set_act_mode("off")
    assert torch.equal(everything(x, t).sample, full.module(x, t).sample)
    late = state_candidate(f"state:{folder}@float=.@steps=4-5", model)
    assert late.name == "qs@float=.@steps=4-5"
    for step, floating in ((3, False), (5, True)):
        x, t, _ = cs.step_inputs(step)
        full.module.set_act_mode("off" if floating else "quant")
        assert torch.equal(late.denoiser(x, t), full.module(x, t).sample), step


@pytest.mark.parametrize("options, says", [("@float=nomatch", "matches none"), ("@float=(", "bad float= regex"),
                                           ("@bits=4", "unknown options"), ("@steps=1-2", "unknown options"),
                                           ("@float=.@steps=3-1", "not A-B"), ("@float=.@steps=5-6", "has 6 steps")])
def test_bad_ablations_are_one_clear_error(saved, options, says):
    model, _, folder = saved
    with pytest.raises(AblationError, match=says):
        state_candidate(f"state:{folder}{options}", model)


def test_float_activations_returns_what_it_switched(saved):
    model, _, folder = saved
    from tfmq.calibration.state import QuantState

    q = QuantState.load(folder).apply(model)
    names, _ = float_activations(q, "mid_block")
    assert names and all("mid_block" in n for n in names)
