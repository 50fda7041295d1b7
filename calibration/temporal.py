"""Temporal feature maintenance at deploy time: every temporal feature g_i(t) of the finite
schedule becomes a table [S, C_i] (S steps), so the deployed graph gathers a row per step.

- 'cache': the exact FP features. The deployed graph adds them in float (the add after each
  ResNet's first conv is a float op in every target), so this costs S x C_i floats per ResNet
  and no accuracy; it is what the presets use.
- 'select' (the TPAMI extension's disturbance-aware selection; no public code, our reading of
  the seed text): two candidates per feature, chosen by measured error.
    * reconstructed: the output of the TIAR-reconstructed temporal block as the quantized model
      computes it at step s (AdaRounded Linears, the step's FSC activation parameters);
    * cached: the FP feature quantized to the activation format with parameters optimized
      on that feature itself, one (scale, zero-point) per step (the seed: "precompute the
      features offline, optimize the quantization parameters directly on their FP values,
      cache the quantized version with its parameters").
  Per feature i, the candidate with the smaller sum over steps of ||g^_i(t) - g_i(t)||^2 wins.
  With float activations (W4A16) the cached candidate is exact and always wins.
"""
from __future__ import annotations

import torch

from tfmq.calibration.qmodel import QuantUNet
from tfmq.calibration.quantizers import activation_params, fake_quant
from tfmq.calibration.tib import TemporalBlock


@torch.no_grad()
def quantized_cache(features: dict[str, torch.Tensor], bits: int | None, symmetric: bool) -> dict[str, torch.Tensor]:
    """Each feature [S, C] quantize-dequantized row by row with MSE-searched parameters."""
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
    """The quantized temporal block's features, step by step with each step's parameters."""
    rows: dict[str, list[torch.Tensor]] = {}
    t = qunet.timesteps
    for s in range(len(t)):
        qunet.ctx.enter(s)
        for name, f in q_tib.features(t[s:s + 1]).items():
            rows.setdefault(name, []).append(f[0])
    return {k: torch.stack(v) for k, v in rows.items()}


def select(fp: dict[str, torch.Tensor], reconstructed: dict[str, torch.Tensor],
           cached: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Per feature, the candidate closer to FP: (tables, {feature: choice and both errors})."""
    tables, report = {}, {}
    for name, f in fp.items():
        err_r = float(((reconstructed[name] - f) ** 2).sum())
        err_c = float(((cached[name] - f) ** 2).sum())
        choice = "cached" if err_c <= err_r else "reconstructed"
        tables[name] = cached[name] if choice == "cached" else reconstructed[name]
        report[name] = {"chosen": choice, "error_reconstructed": err_r, "error_cached": err_c}
    return tables, report
