"""Channel groups for activations: which conv inputs get them (``activations.channel_groups``).

At a UNet's full sample resolution the conv inputs' channels differ most in range (measured on
the bundled conditional model: one per-tensor scale there was the whole W4A8 FID gap), so the
recipe's ``channel_groups`` G applies to the input of every quantized Conv2d that sees the
sample's full height and width, found by one forward pass of the FP model. The decision is
written into the recipe as ``act_groups`` overrides (as mixed precision writes its bits), so a
QuantState's recipe rebuilds exactly these quantizers.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from tfmq.calibration.recipe import LayerOverride, Recipe
from tfmq.models import DiffusionModel


@torch.no_grad()
def full_resolution_convs(model: DiffusionModel) -> list[str]:
    """The Conv2d layers whose input has the sample's height and width, in call order."""
    unet, shape = model.unet, tuple(model.sample_shape)
    names = {m: n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d)}
    seen: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(names[m]) if a[0].shape[-2:] == shape[-2:] else None)
             for m in names]
    try:
        kwargs = {}
        if model.conditional:
            kwargs["encoder_hidden_states"] = torch.zeros(1, 1, unet.config.cross_attention_dim)
        unet(torch.zeros(1, *shape), torch.tensor([0]), **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(seen))


def resolve(model: DiffusionModel, recipe: Recipe) -> tuple[Recipe, list[str]]:
    """The recipe with an ``act_groups`` override for each quantized full-resolution conv that
    has none yet, and those layers' names."""
    g = recipe.activations.channel_groups
    if g is None or not recipe.quantizes_activations:
        return recipe, []
    chosen = [n for n in full_resolution_convs(model) if not recipe.keeps_fp(n) and recipe.act_groups(n) is None
              and model.unet.get_submodule(n).in_channels >= g]
    return replace(recipe, overrides=recipe.overrides + tuple(LayerOverride(n, act_groups=g) for n in chosen)), chosen
