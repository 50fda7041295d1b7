"""The calibration API end to end on the bundled DDPM: reconstruction, states saved and loaded
bit for bit, every temporal strategy, the baselines, mixed precision, bias correction."""
from dataclasses import replace

import pytest
import torch

from tfmq.calibration.api import calibrate
from tfmq.calibration.recipe import Reconstruction, TemporalStrategy, get_recipe
from tfmq.calibration.state import QuantState, QuantStateError

FAST = Reconstruction(iters=30, batch=8)
pytestmark = pytest.mark.slow  # minutes of calibration; the units are in test_qmodel, test_quantizers, ...


@pytest.fixture(scope="module")
def tiar_w4(small_set):
    model, cs = small_set
    recipe = replace(get_recipe("w4a8"), temporal=TemporalStrategy.TIAR, reconstruction=FAST)
    return calibrate(model, recipe, cs, progress=False)


def test_tiar_and_brecq_reduce_their_losses(tiar_w4):
    units = tiar_w4.report["units"]
    assert units[0]["unit"] == "temporal block" and units[0]["loss_after"] < units[0]["loss_before"]
    blocks = units[1:]
    assert len(blocks) > 10
    assert not any("time_emb_proj" in u["unit"] for u in blocks)  # frozen after TIAR
    improved = sum(u["loss_after"] < u["loss_before"] for u in blocks)
    assert improved >= 0.8 * len(blocks), [(u["unit"], u["loss_before"], u["loss_after"]) for u in blocks]


def test_state_round_trip_is_bit_identical(tiar_w4, small_set, tmp_path):
    model, cs = small_set
    tiar_w4.state.save(tmp_path / "qs")
    loaded = QuantState.load(tmp_path / "qs")
    assert loaded.meta["recipe"] == tiar_w4.state.meta["recipe"]
    for k, v in tiar_w4.state.tensors.items():
        assert torch.equal(loaded.tensors[k], v), k
    w = loaded.tensors["down_blocks.0.resnets.0.conv1.w_int"]
    assert w.dtype == torch.uint8 and w.min() >= 0 and w.max() <= 15
    q = loaded.apply(model)
    x, t, _ = cs.step_inputs(2)
    assert torch.equal(q(x, t).sample, tiar_w4.model(x, t).sample)


def test_same_seed_same_state(small_set, tiar_w4):
    model, cs = small_set
    recipe = replace(get_recipe("w4a8"), temporal=TemporalStrategy.TIAR, reconstruction=FAST)
    again = calibrate(model, recipe, cs, progress=False).state
    assert set(again.tensors) == set(tiar_w4.state.tensors)
    assert all(torch.equal(again.tensors[k], v) for k, v in tiar_w4.state.tensors.items())


def test_cache_strategy_stores_tables_and_8_bit_state_reloads_exactly(small_set, tmp_path):
    model, cs = small_set
    r = calibrate(model, replace(get_recipe("w8a8"), temporal=TemporalStrategy.CACHE,
                                 reconstruction=Reconstruction(iters=0)), cs, progress=False)
    tables = r.state.meta["temporal_tables"]
    assert len(tables) > 5 and r.state.tensors[f"{tables[0]}.table"].shape[0] == model.train_timesteps
    w = r.state.tensors["down_blocks.0.resnets.0.conv1.w_int"]
    assert w.dtype == torch.uint8 and int(w.max()) > 127  # asymmetric 8-bit integers reach past int8
    r.state.save(tmp_path / "qs")
    q = QuantState.load(tmp_path / "qs").apply(model)
    for s in (0, cs.steps - 1):
        x, t, _ = cs.step_inputs(s)
        for tt in (t, t - 1 if int(t[0]) > 0 else t + 1):  # on the schedule and off it
            assert torch.equal(q(x, tt).sample, r.model(x, tt).sample)


def test_state_for_another_model_is_refused(tiar_w4, cond):
    with pytest.raises(QuantStateError, match="calibrated for model"):
        tiar_w4.state.apply(cond)


def test_broken_state_files(tmp_path):
    with pytest.raises(QuantStateError, match="not a QuantState"):
        QuantState.load(tmp_path)


def test_blocks_are_reconstructed_in_forward_order(small_set):
    from tfmq.calibration.qmodel import QuantUNet
    from tfmq.calibration.reconstruct import _blocks, calibration_batches, execution_order

    model, cs = small_set
    q = QuantUNet(model.unet, get_recipe("w8a8"), cs.timesteps, train_timesteps=model.train_timesteps)
    q.set_act_mode("off")
    units = [u for u, _ in _blocks(q.unet, set(q.layers), set(), execution_order(q.unet, calibration_batches(cs, 2, 2)[0]))]
    mid = units.index("mid_block.resnets.0")
    assert units.index("down_blocks.2.resnets.0") < mid < units.index("up_blocks.0.resnets.0")
    assert units.index("mid_block.attentions.0") < units.index("mid_block.resnets.1")


def test_select_picks_per_feature_the_smaller_measured_error(small_set):
    model, cs = small_set
    r = calibrate(model, replace(get_recipe("w4a8"), temporal=TemporalStrategy.SELECT, reconstruction=FAST), cs,
                  progress=False)
    sel = r.state.meta["temporal_selection"]
    tables = r.state.meta["temporal_tables"]
    assert sorted(sel) == tables and len(tables) > 5
    for s in sel.values():
        best = min(s["error_cached"], s["error_reconstructed"])
        assert s["chosen"] == ("cached" if s["error_cached"] == best else "reconstructed")
    # the chosen table is what the model uses: its error vs FP is the smaller one
    from tfmq.calibration.tib import find_tib

    fp = find_tib(model.unet).features(torch.arange(model.train_timesteps))
    rows = cs.timesteps
    for name in tables:  # chosen on the calibrated rows; the table covers every timestep
        assert r.state.tensors[f"{name}.table"].shape[0] == model.train_timesteps
        err = float(((r.state.tensors[f"{name}.table"][rows] - fp[name][rows]) ** 2).sum())
        assert err == pytest.approx(min(sel[name]["error_cached"], sel[name]["error_reconstructed"]), rel=1e-5)


def test_quantized_cache_is_exact_for_float_activations_and_close_at_8_bit():
    from tfmq.calibration.temporal import quantized_cache, select

    f = {"a.time_emb_proj": torch.randn(6, 32)}
    assert torch.equal(quantized_cache(f, None, False)["a.time_emb_proj"], f["a.time_emb_proj"])
    q8 = quantized_cache(f, 8, False)["a.time_emb_proj"]
    assert 0 < float((q8 - f["a.time_emb_proj"]).abs().max()) < 0.05
    far = {"a.time_emb_proj": f["a.time_emb_proj"] + 1}
    rows = torch.tensor([0, 2, 4])
    tables, rep = select(f, far, {"a.time_emb_proj": q8}, rows)
    assert rep["a.time_emb_proj"]["chosen"] == "cached" and torch.equal(tables["a.time_emb_proj"], q8)
    tables, rep = select(f, f, {"a.time_emb_proj": q8}, rows)
    assert rep["a.time_emb_proj"]["chosen"] == "reconstructed"


def test_qdiff_baseline_learns_its_shared_activation_scales(small_set):
    model, cs = small_set
    recipe = replace(get_recipe("qdiff-w8a8"), reconstruction=FAST)
    r = calibrate(model, recipe, cs, progress=False)
    act_units = [u for u in r.report["units"] if "quantizers" in u]
    assert len(act_units) > 10
    improved = sum(u["loss_after"] < u["loss_before"] for u in act_units)
    assert all(u["loss_after"] <= u["loss_before"] for u in act_units)  # a worse fit is rolled back
    assert improved >= 0.5 * len(act_units), [(u["unit"], u["loss_before"], u["loss_after"]) for u in act_units]
    frozen = calibrate(model, replace(recipe, activations=replace(recipe.activations, learn_steps=False)), cs,
                       progress=False)
    scales = [k for k in r.state.tensors if k.endswith(".a_scale")]
    changed = sum(not torch.equal(r.state.tensors[k], frozen.state.tensors[k]) for k in scales)
    assert changed >= improved


def test_mixed_precision_spends_the_budget_on_the_most_sensitive_layers(small_set, tmp_path):
    model, cs = small_set
    recipe = replace(get_recipe("w4a8-mp"), reconstruction=Reconstruction(iters=0))
    r = calibrate(model, recipe, cs, progress=False)
    mp = r.state.meta["mixed_precision"]
    layers = r.state.meta["layers"]
    numel = {n: model.unet.get_submodule(n).weight.numel() for n in layers}
    avg = sum(numel[n] * v["bits"] for n, v in layers.items()) / sum(numel.values())
    assert mp["promoted"] and avg <= recipe.weights.bit_budget and avg == pytest.approx(mp["average_bits"], abs=1e-3)
    assert {n for n, v in layers.items() if v["bits"] == 8} == set(mp["promoted"])
    # the most sensitive layer per weight is promoted first
    sens = mp["sensitivity"]
    assert max(sens, key=lambda n: sens[n] / numel[n]) == mp["promoted"][0]
    # the state rebuilds the same bits without re-running the search
    r.state.save(tmp_path / "qs")
    q = QuantState.load(tmp_path / "qs").apply(model)
    assert q.layers[mp["promoted"][0]].bits == 8


def test_weights_from_another_state_gives_the_full_calibration_bit_for_bit(small_set):
    """A variant with conv output quantizers of a state takes that state's integers:
    reconstruction runs with activations in float, so calibrating it in full gives the same
    state, bit for bit; a recipe with other weight settings is refused."""
    from tfmq.calibration.recipe import RecipeError

    model, cs = small_set
    from tfmq.calibration.requirements import Requirements, satisfy

    base = replace(satisfy(get_recipe("w8a8"), Requirements(symmetric_weights=True, symmetric_attention=True)),
                   reconstruction=FAST)
    ort = satisfy(base, Requirements(conv_outputs=True))
    first = calibrate(model, base, cs, progress=False)
    full = calibrate(model, ort, cs, progress=False)
    taken = calibrate(model, ort, cs, progress=False, weights_from=first.state)
    assert taken.report["weights_from"] == base.name and not taken.report["units"]  # no reconstruction ran
    assert set(full.state.tensors) == set(taken.state.tensors)
    assert any(k.endswith(".out.a_scale") for k in taken.state.tensors)
    for k, v in full.state.tensors.items():
        assert torch.equal(taken.state.tensors[k], v), k
    with pytest.raises(RecipeError, match="quantize weights differently"):
        calibrate(model, replace(get_recipe("w4a8"), reconstruction=FAST), cs, progress=False,
                  weights_from=first.state)


def test_bias_correction_removes_the_mean_error_of_every_step(tiar_w4, small_set):
    """The TFMQ presets subtract the quantized model's mean eps error per step and output
    channel; on the calibration set that mean is then zero at every step, the state carries
    the table, and a state whose recipe and table disagree is refused."""
    from tfmq.calibration.correction import output_bias
    from tfmq.calibration.state import OUTPUT_BIAS
    from tfmq.sampling import unet_denoiser

    model, cs = small_set
    table = tiar_w4.state.tensors[OUTPUT_BIAS]
    assert table.shape == (cs.steps, model.unet.config.out_channels)
    assert tiar_w4.report["bias_correction"]["max_abs"] > 0
    q = tiar_w4.model
    fp, den = unet_denoiser(model.unet), unet_denoiser(q)
    with torch.no_grad():
        for s in range(cs.steps):
            x, t, c = cs.step_inputs(s)
            after = (den(x, t, c) - fp(x, t, c)).mean(dim=(0, 2, 3))
            assert after.abs().max() < 1e-5 < table[s].abs().max(), (s, after, table[s])
    assert torch.allclose(output_bias(q, model.unet, cs), table, atol=1e-7)  # measured without itself
    no = replace(tiar_w4.state, tensors={k: v for k, v in tiar_w4.state.tensors.items() if k != OUTPUT_BIAS})
    with pytest.raises(QuantStateError, match="bias_correction=True"):
        no.apply(model)
    without = tiar_w4.state.without_bias_correction()  # what calibrating without it gives
    assert not without.recipe.bias_correction and OUTPUT_BIAS not in without.tensors
    x, t, c = cs.step_inputs(3)
    with torch.no_grad():
        diff = (unet_denoiser(without.apply(model))(x, t, c) - den(x, t, c)).mean(dim=(0, 2, 3))
    assert torch.allclose(diff, table[3], atol=1e-6)
    assert not get_recipe("minmax-w4a8").bias_correction and not get_recipe("qdiff-w4a8").bias_correction


def test_conditional_bias_correction_removes_the_guided_mean_error(cond):
    """On a conditional model the table is the mean error of what the sampler integrates,
    eps_u + g (eps_c - eps_u): after the correction that mean is zero at every step (here
    g = 2, where the branches' errors weigh -1 and 2, not 1/2 each)."""
    from tfmq.calibration.calibset import record
    from tfmq.calibration.state import OUTPUT_BIAS
    from tfmq.sampling import unet_denoiser

    cs = record(cond, seeds=4, steps=3, guidance=2.0)
    r = calibrate(cond, replace(get_recipe("w4a8"), reconstruction=Reconstruction(iters=0)), cs, progress=False)
    fp, den = unet_denoiser(cond.unet), unet_denoiser(r.model)
    with torch.no_grad():
        for s in range(cs.steps):
            x, t, c = cs.step_inputs(s)
            err = den(x, t, c) - fp(x, t, c)
            guided = cs.guide(err).mean(dim=(0, 2, 3))
            branches = err.mean(dim=(0, 2, 3))
            assert guided.abs().max() < 1e-5 < (branches - guided).abs().max(), (s, guided, branches)
    assert r.state.tensors[OUTPUT_BIAS].abs().max() > 0
