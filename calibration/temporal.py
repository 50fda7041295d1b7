"""Temporal feature maintenance at deploy time: every temporal feature g_i(t) becomes a table
[T, C_i], a row per training timestep (T), so the deployed graph gathers the row of the call's
timestep whatever schedule the sampler runs; off the calibrated schedule the other
quantization parameters are the nearest calibrated step's (``qmodel.step_map``).

- 'cache': the exact FP features. The deployed graph adds them in float (the add after each
  ResNet's first conv is a float op in every target), so this costs T x C_i floats per ResNet
  and no accuracy; it is what the presets use.
- 'select' (the TPAMI extension's disturbance-aware selection; no public code, our reading of
  the seed text): two candidates per feature, chosen by measured error.
    * reconstructed: the output of the TIAR-reconstructed temporal block as the quantized model
      computes it at step s (AdaRounded Linears, the step's FSC activation parameters);
    * cached: the FP feature quantized to the activation format with parameters optimized
      on that feature itself, one (scale, zero-point) per step (the seed: "precompute the
      features offline, optimize the quantization parameters directly on their FP values,
      cache the quantized version with its parameters"), for every t.
  Per feature i, the candidate with the smaller sum over the calibrated steps of
  ||g^_i(t) - g_i(t)||^2 wins, and gives the whole table.
  With float activations (W4A16) the cached candidate is exact and always wins.
"""
from __future__ import annotations

import torch

from tfmq.calibration.qmodel import QuantUNet, step_map
from tfmq.calibration.quantizers import activation_params, fake_quant
from tfmq.calibration.tib import TemporalBlock


@torch.no_grad()
def quantized_cache(features: dict[str, torch.Tensor], bits: int | None, symmetric: bool) -> dict[str, torch.Tensor]:
    """Each feature [T, C] quantize-dequantized row by row with MSE-searched parameters."""
    if bits is None:
        return {k: v.clone() for k, v in features.items()}
    out = {}
    for name, f in features.items():
        rows = []
        for row in f:
            s, z = activation_params(row, bits, symmetric)
            rows.append(fake_quant(row, s, z, bits, symmetric))
        out[name] = torch.stack(rows)
    return out


@torch.no_grad()
def reconstructed_features(qunet: QuantUNet, q_tib: TemporalBlock) -> dict[str, torch.Tensor]:
    """The quantized temporal block's features [T, C] at every training timestep, each with the
    parameters of its step (``step_map``: the nearest calibrated one)."""
    steps = step_map(qunet.timesteps, qunet.train_timesteps)
    out: dict[str, torch.Tensor] = {}
    for s in steps.unique().tolist():
        ts = (steps == s).nonzero().flatten()
        qunet.ctx.enter(s)
        for name, f in q_tib.features(ts).items():
            out.setdefault(name, torch.empty(len(steps), f.shape[1], dtype=f.dtype))[ts] = f
    return out


def select(fp: dict[str, torch.Tensor], reconstructed: dict[str, torch.Tensor],
           cached: dict[str, torch.Tensor], timesteps: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Per feature [T, C], the candidate closer to FP on the calibrated ``timesteps``:
    (tables, {feature: choice and both errors})."""
    tables, report = {}, {}
    rows = timesteps.long()
    for name, f in fp.items():
        err_r = float(((reconstructed[name][rows] - f[rows]) ** 2).sum())
        err_c = float(((cached[name][rows] - f[rows]) ** 2).sum())
        choice = "cached" if err_c <= err_r else "reconstructed"
        tables[name] = cached[name] if choice == "cached" else reconstructed[name]
        report[name] = {"chosen": choice, "error_reconstructed": err_r, "error_cached": err_c}
    return tables, report
