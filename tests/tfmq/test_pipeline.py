"""The export pipeline's decisions, before any work: which targets, which recipes, which options."""
from dataclasses import replace

import pytest

from tfmq.calibration.recipe import Reconstruction, get_recipe
from tfmq.calibration.requirements import Requirements, plan, satisfy, tagged, unmet
from tfmq.errors import TfmqError
from tfmq.pipeline import ExportOptions, is_preset, recipes_for, resolve_targets


def test_coreml_alone_and_inside_all_are_the_documented_different_recipes():
    """Alone, Core ML takes the preset as it is (it needs nothing of a recipe); inside --target
    all it shares the one calibration of the targets that add no quantizers, which meets
    OpenVINO's and TensorRT's needs; ONNX Runtime takes that plus its conv outputs, the same
    recipe as when it is asked alone. docs/targets/index.md says so."""
    w8a8 = get_recipe("w8a8")
    alone = {t: recipes_for(w8a8, [t], adapt=True)[t].name for t in ("coreml", "onnx", "openvino", "tensorrt")}
    assert alone == {"coreml": "w8a8", "onnx": "w8a8+sym-weights+sym-attn+conv-out",
                     "openvino": "w8a8+sym-weights+sym-attn", "tensorrt": "w8a8+sym-weights"}
    together = recipes_for(w8a8, ["coreml", "onnx", "openvino", "tensorrt"], adapt=True)
    assert {t: r.name for t, r in together.items()} == {
        "coreml": "w8a8+sym-weights+sym-attn", "onnx": "w8a8+sym-weights+sym-attn+conv-out",
        "openvino": "w8a8+sym-weights+sym-attn", "tensorrt": "w8a8+sym-weights+sym-attn"}
    assert together["onnx"] == recipes_for(w8a8, ["onnx"], adapt=True)["onnx"]
    # a custom recipe (or a loaded state) is never adapted: each target's check refuses what it cannot run
    assert set(recipes_for(w8a8, ["openvino", "onnx"], adapt=False).values()) == {w8a8}


def test_requirements_are_met_once_and_named_by_what_changed():
    needs = Requirements(symmetric_weights=True, symmetric_attention=True)
    r = satisfy(get_recipe("w4a8"), needs)
    assert r.name == "w4a8+sym-weights+sym-attn" and not unmet(r, needs) and satisfy(r, needs) is r
    assert unmet(get_recipe("w4a8"), needs) == {"symmetric_weights": "weights.symmetric: true",
                                                "symmetric_attention": "activations.attention_symmetric: true"}
    assert tagged("w4a8+tiar+sym-attn", ["sym-weights"]) == "w4a8+tiar+sym-weights+sym-attn"
    # needs of integer kernels that only exist with quantized activations
    only = Requirements(symmetric_weights=True, with_activations_only=True)
    assert satisfy(get_recipe("w4a16"), only).name == "w4a16"
    assert satisfy(get_recipe("w4a16"), Requirements(symmetric_weights=True)).name == "w4a16+sym-weights"
    shared = plan(get_recipe("w8a8"), {"a": Requirements(symmetric_weights=True), "b": Requirements(conv_outputs=True)})
    assert shared["a"].name == "w8a8+sym-weights" and shared["b"].name == "w8a8+sym-weights+conv-out"


def test_presets_are_recognised_whatever_their_iterations():
    assert is_preset(get_recipe("w4a8").with_iters(0)) and is_preset(get_recipe("qdiff-w8a8"))
    assert not is_preset(replace(get_recipe("w8a8"), reconstruction=Reconstruction(iters=3, batch=4)))
    assert not is_preset(replace(get_recipe("w8a8"), name="mine"))


def test_targets_and_options_are_resolved_before_work():
    assert resolve_targets("fp32") == ([], {})
    build, skipped = resolve_targets("all")
    assert set(build) | set(skipped) == {"coreml", "onnx", "openvino", "tensorrt"}
    with pytest.raises(TfmqError, match="unknown target"):
        resolve_targets("xpu")
    for bad, says in (({"n": 1}, "--n 1"), ({"steps": 0}, "--steps 0"), ({"iters": -1}, "--iters -1")):
        with pytest.raises(TfmqError, match=says):
            ExportOptions(**bad)
