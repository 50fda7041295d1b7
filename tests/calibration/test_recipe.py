import json

import pytest

from tfmq.calibration.recipe import PRESETS, ActivationQuant, Recipe, Reconstruction, WeightQuant, get_recipe
from tfmq.errors import RecipeError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    r = get_recipe(name)
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_preset_contents():
    assert get_recipe("w4a8").weights.bits == 4 and get_recipe("w4a8").activations.bits == 8
    assert not get_recipe("w4a16").quantizes_activations
    assert get_recipe("qdiff-w4a8").activations.schedule.value == "shared"
    assert get_recipe("qdiff-w4a8").activations.learn_steps and not get_recipe("w4a8").activations.learn_steps
    assert get_recipe("w4a8").activations.schedule.value == "per_step"
    assert get_recipe("minmax-w8a8").reconstruction.iters == 0


def test_default_fp_layers_and_overrides():
    r = get_recipe("w4a8")
    for kept in ("conv_in", "conv_out", "time_embedding.linear_1", "down_blocks.0.resnets.0.conv_shortcut",
                 "down_blocks.1.downsamplers.0.conv"):
        assert r.keeps_fp(kept), kept
    for quant in ("time_embedding.linear_2", "down_blocks.0.resnets.0.conv1", "mid_block.attentions.0.to_q"):
        assert not r.keeps_fp(quant), quant


def test_symmetric_variant():
    s = get_recipe("w8a8").symmetric()
    assert s.weights.symmetric and s.activations.symmetric and s.name == "w8a8-sym"


@pytest.mark.parametrize("bad", [lambda: Recipe("x", weights=WeightQuant(bits=3)),
                                 lambda: Recipe("x", activations=ActivationQuant(bits=16)),
                                 lambda: get_recipe("w2a8"),
                                 lambda: Recipe("x", activations=ActivationQuant(learn_steps=True)),  # per-step
                                 lambda: Recipe("x", activations=ActivationQuant(bits=None, learn_steps=True)),
                                 lambda: Recipe("x", reconstruction=Reconstruction(iters=10, samples=0)),
                                 lambda: Recipe.from_dict({"version": 99}),
                                 lambda: Recipe.from_dict({**get_recipe("w8a8").to_dict(), "temporal": "bogus"})])
def test_bad_recipes(bad):
    with pytest.raises(RecipeError):
        bad()
