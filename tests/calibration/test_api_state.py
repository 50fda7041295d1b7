from dataclasses import replace

import pytest
import torch

from tfmq.calibration.api import calibrate
from tfmq.calibration.recipe import Reconstruction, TemporalStrategy, get_recipe
from tfmq.calibration.state import QuantState, QuantStateError

FAST = Reconstruction(iters=30, batch=8)


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
    assert w.dtype == torch.int8 and w.min() >= 0 and w.max() <= 15
    q = loaded.apply(model)
    x, t, _ = cs.step_inputs(2)
    assert torch.equal(q(x, t).sample, tiar_w4.model(x, t).sample)


def test_same_seed_same_state(small_set, tiar_w4):
    model, cs = small_set
    recipe = replace(get_recipe("w4a8"), temporal=TemporalStrategy.TIAR, reconstruction=FAST)
    again = calibrate(model, recipe, cs, progress=False).state
    assert set(again.tensors) == set(tiar_w4.state.tensors)
    assert all(torch.equal(again.tensors[k], v) for k, v in tiar_w4.state.tensors.items())


def test_cache_strategy_stores_tables(small_set):
    model, cs = small_set
    r = calibrate(model, replace(get_recipe("w8a8"), temporal=TemporalStrategy.CACHE,
                                 reconstruction=Reconstruction(iters=0)), cs, progress=False)
    tables = r.state.meta["temporal_tables"]
    assert len(tables) > 5 and r.state.tensors[f"{tables[0]}.table"].shape[0] == cs.steps


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
    q = QuantUNet(model.unet, get_recipe("w8a8"), cs.timesteps)
    q.set_act_mode("off")
    units = [u for u, _ in _blocks(q.unet, set(q.layers), set(), execution_order(q.unet, calibration_batches(cs, 2, 2)[0]))]
    mid = units.index("mid_block.resnets.0")
    assert units.index("down_blocks.2.resnets.0") < mid < units.index("up_blocks.0.resnets.0")
    assert units.index("mid_block.attentions.0") < units.index("mid_block.resnets.1")
