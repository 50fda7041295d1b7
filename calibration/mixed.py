"""Mixed precision under a bit budget (seed 003): the layers whose 4-bit weights hurt the
output most stay at 8 bit, as many as an average-bits budget allows.

Sensitivity of a layer = the mean squared error of the UNet's output (eps; conditional models:
the guided eps_u + g (eps_c - eps_u) the sampler uses) when that layer
alone has its weights quantized (nearest rounding, the recipe's scale search) and everything
else is float, on a fixed batch of calibration inputs drawn across the schedule. Layers are
promoted greedily by sensitivity per extra bit paid (4 x its weight count) while the average
weight bits over all quantized layers stays within the budget (temporal projections that
become tables ship no weights and are left out). The decision is written into
the recipe as per-layer overrides, so the QuantState's recipe rebuilds exactly these bits.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from tfmq.calibration.calibset import CalibrationSet
from tfmq.calibration.qmodel import QuantUNet
from tfmq.calibration.recipe import LayerOverride, Recipe, TemporalStrategy
from tfmq.models import DiffusionModel
from tfmq.sampling import unet_denoiser

SENSITIVITY_SAMPLES = 64


@torch.no_grad()
def layer_sensitivity(model: DiffusionModel, recipe: Recipe, calib: CalibrationSet, seed: int = 0) -> dict[str, float]:
    """{layer: output MSE with only that layer's weights at the recipe's bits}."""
    q = QuantUNet(model.unet, recipe, calib.timesteps, train_timesteps=model.train_timesteps)
    q.set_act_mode("off")
    q.set_weight_quant(False)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(calib.steps * calib.samples, generator=gen)[:SENSITIVITY_SAMPLES]
    batch = calib.inputs(pick // calib.samples, pick % calib.samples)
    net = unet_denoiser(q.unet)  # mixed steps in one batch: activations are off, so no step is needed

    def run(*inputs):  # the guided prediction the sampler integrates (conditional models)
        return calib.guide(net(*inputs))

    ref = run(*batch)
    out = {}
    for name, ql in q.layers.items():
        ql.use_wq = True
        out[name] = float(((run(*batch) - ref) ** 2).mean())
        ql.use_wq = False
    return out


def resolve(model: DiffusionModel, recipe: Recipe, calib: CalibrationSet, seed: int = 0) -> tuple[Recipe, dict]:
    """The recipe with the budget spent: 8-bit overrides for the chosen layers, and a report."""
    budget = recipe.weights.bit_budget
    low, high = recipe.weights.bits, 8
    sens = layer_sensitivity(model, recipe, calib, seed)
    if recipe.temporal in (TemporalStrategy.CACHE, TemporalStrategy.SELECT):  # these become tables: no weights
        sens = {n: v for n, v in sens.items() if not n.endswith("time_emb_proj")}
    numel = {n: model.unet.get_submodule(n).weight.numel() for n in sens}
    total = sum(numel.values())
    spent = sum(numel[n] * recipe.weight_bits(n) for n in sens)
    promoted = []
    for name in sorted(sens, key=lambda n: sens[n] / numel[n], reverse=True):
        if recipe.weight_bits(name) != low:
            continue
        cost = numel[name] * (high - low)
        if (spent + cost) / total <= budget:
            promoted.append(name)
            spent += cost
    resolved = replace(recipe, overrides=recipe.overrides + tuple(LayerOverride(n, weight_bits=high) for n in promoted))
    report = {"budget": budget, "average_bits": round(spent / total, 3), "promoted": promoted,
              "sensitivity": {n: sens[n] for n in sorted(sens, key=sens.get, reverse=True)}}
    return resolved, report
