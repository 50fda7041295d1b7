"""Recipe specs: presets with modifiers, the names variants carry, files, and bad specs."""
import json

import pytest

from tfmq.calibration.recipe import ActivationSchedule, Recipe, RecipeError, TemporalStrategy, get_recipe
from tfmq.calibration.requirements import Requirements, satisfy
from tfmq.calibration.spec import load_recipe


def test_modifiers_change_what_they_say_and_name_the_variant():
    r = load_recipe("w4a8+tiar+nobc+g5+cg8+rs64")
    assert r.name == "w4a8+tiar+nobc+g5+cg8+rs64"
    assert r.temporal is TemporalStrategy.TIAR and not r.bias_correction
    assert r.activations.schedule is ActivationSchedule.GROUPED and r.activations.groups == 5
    assert r.activations.channel_groups == 8 and r.reconstruction.samples == 64
    assert load_recipe("w4a8:tiar") == load_recipe("w4a8+tiar")  # the older colon form
    assert load_recipe("w8a8") is get_recipe("w8a8")


def test_a_variant_name_is_a_spec_of_the_same_recipe():
    needs = Requirements(symmetric_weights=True, symmetric_attention=True, conv_outputs=True)
    variant = satisfy(get_recipe("w8a8"), needs)
    assert load_recipe(variant.name) == variant
    assert load_recipe("w8a8+conv-out+sym-weights").name == "w8a8+sym-weights+conv-out"


def test_files_and_bad_specs(tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps(get_recipe("w4a8").to_dict()))
    assert load_recipe(str(f)) == get_recipe("w4a8")
    f.write_text("[1, 2]")
    with pytest.raises(RecipeError, match="holds no JSON object"):
        load_recipe(str(f))
    with pytest.raises(RecipeError, match="unknown recipe 'w2a8'"):
        load_recipe("w2a8")
    with pytest.raises(RecipeError, match="unknown recipe modifier 'fast'"):
        load_recipe("w8a8+fast")
    with pytest.raises(RecipeError, match="channel groups must lie in"):
        load_recipe("w8a8+cg0")
    assert isinstance(load_recipe("qdiff-w4a8+nolearn"), Recipe)
