"""calibrate(model, recipe, calibration set) -> QuantState: the TFMQ pipeline in order.

1. Weights: per-channel scales (MSE search or min-max), then with activations in float:
   the temporal block by TIAR (or kept exact for caching), then BRECQ block by block.
2. Activations: FSC per step (or one shared set / groups of steps), weights quantized, the
   full-resolution conv inputs in channel groups when the recipe asks (``groups``); the
   Q-Diffusion-style baseline then learns its shared scales block by block (LSQ-style).
3. Temporal block: 'none' leaves it quantized like any layer (the baselines); 'tiar' keeps
   the reconstructed block; 'cache' replaces every temporal feature by its exact FP value
   per step (a table, as the deployed graph holds it); 'select' chooses per feature between
   the reconstructed block and an activation-quantized cache (see ``temporal``).
4. Bias correction (TFMQ presets): the fake-quant model's mean error per step and output
   channel on the calibration set, subtracted from its output (see ``correction``).
The caller owns the sampler: the calibration set comes from ``calibset.record`` or a file.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tfmq.calibration import correction, groups, mixed, temporal
from tfmq.calibration.calibset import CalibrationSet
from tfmq.calibration.fsc import calibrate_activations
from tfmq.calibration.qmodel import QuantUNet
from tfmq.calibration.recipe import Recipe, RecipeError, Rounding, TemporalStrategy
from tfmq.calibration.reconstruct import brecq, calibration_batches, learn_activations, tiar
from tfmq.calibration.state import QuantState
from tfmq.calibration.tib import find_tib
from tfmq.models import DiffusionModel


@dataclass
class Calibrated:
    state: QuantState  # what is saved and lowered
    model: QuantUNet  # the fake-quant model it describes
    report: dict  # per-unit losses and timings


def check(recipe: Recipe, model: DiffusionModel) -> None:
    """Refuse an impossible recipe/model combination before any sampling or calibration."""
    if recipe.temporal is not TemporalStrategy.NONE:
        find_tib(model.unet)


def calibrate(model: DiffusionModel, recipe: Recipe, calib: CalibrationSet, progress: bool = True,
              seed: int = 0, weights_from: QuantState | None = None) -> Calibrated:
    """``weights_from``: a state calibrated with the same weight settings (its recipe differs
    only in the activations, e.g. by conv output quantizers): its
    integers are taken as they are and only the activations are calibrated (reconstruction
    runs with activations in float, so it would give the same integers again)."""
    check(recipe, model)
    calib.check_for(model, calib.timesteps)
    torch.manual_seed(seed)
    t_start, cpu_start = time.time(), time.process_time()
    fp_tib = find_tib(model.unet) if recipe.temporal is not TemporalStrategy.NONE else None
    report = {"recipe": recipe.name, "units": []}
    if weights_from is not None:
        recipe = _weights_of(recipe, weights_from)
        report["weights_from"] = weights_from.meta["recipe"]["name"]
    elif recipe.weights.bit_budget is not None:
        recipe, report["mixed_precision"] = mixed.resolve(model, recipe, calib, seed)
    recipe, grouped = groups.resolve(model, recipe)
    if grouped:
        report["channel_groups"] = {"groups": recipe.activations.channel_groups, "layers": grouped}
    # weights taken from a state need no scale search (at SD-1.5 size it is most of the time)
    qunet = QuantUNet(model.unet, recipe, calib.timesteps, train_timesteps=model.train_timesteps,
                      search=weights_from is None)
    qunet.set_act_mode("off")
    skip: set[str] = set()
    if fp_tib is not None:
        q_tib = fp_tib.on(qunet.unet)
        tib_layers = [n for n in q_tib.layer_names() if n in qunet.layers]
        skip = set(tib_layers)
        if weights_from is not None:
            pass
        elif recipe.temporal in (TemporalStrategy.TIAR, TemporalStrategy.SELECT) \
                and recipe.weights.rounding is Rounding.ADAROUND:
            report["units"].append(tiar(qunet, fp_tib, q_tib, recipe.reconstruction, progress))
        elif recipe.temporal is TemporalStrategy.CACHE:
            for n in tib_layers:  # exact during reconstruction; replaced by tables below
                qunet.layers[n].use_wq = False
    batches = None
    if weights_from is not None:
        # the temporal features a cache replaces are not in the state (nor needed: tables below)
        cached = set(tib_layers) & {n for n in qunet.layers if n.endswith("time_emb_proj")} \
            if recipe.temporal is TemporalStrategy.CACHE else set()
        weights_from.load_weights(_Without(qunet, cached))
    elif recipe.weights.rounding is Rounding.ADAROUND and recipe.reconstruction.iters:
        batches = calibration_batches(calib, recipe.reconstruction.samples, recipe.reconstruction.batch, seed)
        report["units"] += brecq(qunet, model.unet, batches, recipe.reconstruction, skip, progress)
    if recipe.temporal is TemporalStrategy.CACHE:
        with torch.no_grad():
            qunet.cache_temporal(fp_tib.features(torch.arange(model.train_timesteps)))
        for n in tib_layers:  # what is left of the block (unused once tables feed every ResNet) is as saved
            if n in qunet.layers:
                qunet.layers[n].use_wq = True
    t_act = time.time()
    if recipe.quantizes_activations:
        calibrate_activations(qunet, calib, init_samples=recipe.activations.init_samples, seed=seed,
                              progress=progress)
        if recipe.activations.learn_steps:
            batches = batches or calibration_batches(calib, recipe.reconstruction.samples, recipe.reconstruction.batch, seed)
            report["units"] += learn_activations(qunet, model.unet, batches, recipe.reconstruction, progress)
    if recipe.temporal is TemporalStrategy.SELECT:
        with torch.no_grad():
            fp = fp_tib.features(torch.arange(model.train_timesteps))
        a = recipe.activations
        tables, report["temporal_selection"] = temporal.select(
            fp, temporal.reconstructed_features(qunet, q_tib), temporal.quantized_cache(fp, a.bits, a.symmetric),
            calib.timesteps)
        qunet.cache_temporal(tables)
    if recipe.bias_correction:
        table = correction.output_bias(qunet, model.unet, calib)
        qunet.set_output_bias(table)
        report["bias_correction"] = {"mean": round(float(table.mean()), 6), "max_abs": round(float(table.abs().max()), 6)}
    report["activation_seconds"] = round(time.time() - t_act, 1)
    report["seconds"] = round(time.time() - t_start, 1)
    report["cpu_seconds"] = round(time.process_time() - cpu_start, 1)  # robust to other jobs on the machine
    extra = {"calibration": {"seconds": report["seconds"],
                             "calibration_set": {k: calib.meta.get(k) for k in ("steps", "seeds", "guidance", "compute")}}}
    for key in ("temporal_selection", "mixed_precision", "channel_groups", "bias_correction"):
        if key in report:
            extra[key] = report[key]
    state = QuantState.from_model(qunet, model, extra=extra)
    return Calibrated(state, qunet, report)


class _Without:
    """A QuantUNet seen without some layers (``QuantState.load_weights`` fills the others)."""

    def __init__(self, qunet: QuantUNet, names: set[str]):
        self.layers = {n: ql for n, ql in qunet.layers.items() if n not in names}


def same_weights(recipe: Recipe, other: Recipe) -> bool:
    """True when ``recipe`` quantizes weights exactly as ``other`` (a state's recipe) did, so
    that state's integers can be taken (``calibrate(weights_from=...)``): the recipes differ at
    most in their activations, and the temporal strategy is not 'select' (which chooses with
    the reconstructed block, which a state does not keep). Bias correction is measured
    anew for the recipe either way."""
    from dataclasses import replace

    if recipe.temporal is TemporalStrategy.SELECT:
        return False
    mine = replace(recipe, overrides=other.overrides)  # mixed precision: the state's resolved bits
    return replace(other, name=mine.name, activations=mine.activations, data=mine.data,
                   bias_correction=mine.bias_correction) == mine


def _weights_of(recipe: Recipe, state: QuantState) -> Recipe:
    """``recipe`` with the weight decisions of ``state``, refused when they differ."""
    from dataclasses import replace

    if not same_weights(recipe, state.recipe):
        raise RecipeError(f"recipe {recipe.name!r} cannot take the weights of {state.recipe.name!r}: they "
                          "quantize weights differently (or the temporal strategy is 'select')")
    return replace(recipe, overrides=state.recipe.overrides)
