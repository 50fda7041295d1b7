"""Recipe specs: a preset or a recipe JSON file, with modifiers, as ``--recipe`` takes them.

    w4a8                      the preset
    w4a8+tiar+nobc            the preset with modifiers (``w4a8:tiar+nobc`` says the same)
    w8a8+sym-weights+sym-attn what ``requirements.satisfy`` names a variant: a spec of it
    my_recipe.json            a file in ``Recipe.to_dict``'s format

Modifiers (applied left to right):
  tiar | cache | none | select   temporal strategy
  shared | perstep | gN          one activation set / one per step / N groups of consecutive steps
  mm        min-max scale search      near     nearest rounding (no AdaRound)
  nolearn   no activation scale learning (Q-Diffusion's second pass off)
  nobc | bc without / with the per-step output bias correction
  skipq     quantize the ResNet shortcut and downsample convs too (the official code keeps them float)
  cgN       the full-resolution conv inputs in N channel groups
  rsN       reconstruction fits N (step, seed) pairs of the calibration set
  sym-weights | sym-attn | conv-out   the needs of ``requirements`` (zero-point-0 weights,
            zero-point-0 attention operands, conv output quantizers)
The variant's name is the spec in this canonical form.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tfmq.artifacts import read_json_object
from tfmq.calibration.recipe import (
    ActivationSchedule,
    Recipe,
    RecipeError,
    Rounding,
    ScaleSearch,
    TemporalStrategy,
    get_recipe,
)
from tfmq.calibration.requirements import TAGS, Requirements, satisfy, tagged

MODIFIERS: dict[str, Callable[[Recipe], Recipe]] = {
    "tiar": lambda r: replace(r, temporal=TemporalStrategy.TIAR),
    "cache": lambda r: replace(r, temporal=TemporalStrategy.CACHE),
    "none": lambda r: replace(r, temporal=TemporalStrategy.NONE),
    "select": lambda r: replace(r, temporal=TemporalStrategy.SELECT),
    "nolearn": lambda r: replace(r, activations=replace(r.activations, learn_steps=False)),
    "shared": lambda r: replace(r, activations=replace(r.activations, schedule=ActivationSchedule.SHARED)),
    "perstep": lambda r: replace(r, activations=replace(r.activations, schedule=ActivationSchedule.PER_STEP)),
    "mm": lambda r: replace(r, weights=replace(r.weights, search=ScaleSearch.MINMAX),
                            activations=replace(r.activations, search=ScaleSearch.MINMAX)),
    "near": lambda r: replace(r, weights=replace(r.weights, rounding=Rounding.NEAREST)),
    "nobc": lambda r: replace(r, bias_correction=False),
    "bc": lambda r: replace(r, bias_correction=True),
    "skipq": lambda r: replace(r, overrides=tuple(o for o in r.overrides if not o.regex)),
}
COUNTED: dict[str, Callable[[Recipe, int], Recipe]] = {  # modifiers with a number: gN, cgN, rsN
    "g": lambda r, n: replace(r, activations=replace(r.activations, schedule=ActivationSchedule.GROUPED, groups=n)),
    "cg": lambda r, n: replace(r, activations=replace(r.activations, channel_groups=n)),
    "rs": lambda r, n: replace(r, reconstruction=replace(r.reconstruction, samples=n)),
}
NEEDS = {tag: field for field, (tag, _) in TAGS.items()}


def load_recipe(spec: str) -> Recipe:
    """The recipe ``spec`` names (see the module docstring); one RecipeError line otherwise."""
    if spec.endswith(".json") or Path(spec).is_file():
        return Recipe.from_dict(read_json_object(Path(spec), RecipeError, "recipe file"))
    base, *mods = re.split(r"[:+]", spec)
    recipe = get_recipe(base)
    applied: list[str] = []
    needs: list[str] = []  # the need tags that changed something
    for m in mods:
        counted = re.fullmatch(r"(cg|rs|g)(\d+)", m)
        if m in NEEDS:
            before, recipe = recipe, satisfy(recipe, Requirements(**{NEEDS[m]: True}))
            needs += [m] if recipe is not before else []
            continue
        if counted:
            recipe = COUNTED[counted[1]](recipe, int(counted[2]))
        elif m in MODIFIERS:
            recipe = MODIFIERS[m](recipe)
        else:
            raise RecipeError(f"unknown recipe modifier {m!r} in {spec!r}: one of "
                              f"{', '.join([*MODIFIERS, 'gN', 'cgN', 'rsN', *NEEDS])}")
        applied.append(m)
    name = tagged("+".join([base, *applied]), needs)
    return replace(recipe, name=name) if name != recipe.name else recipe
