"""Bias correction: the quantized model's mean noise-prediction error, removed per step.

After calibration, each step's calibration inputs (every seed, both CFG branches) run through
the FP model and the fake-quant one; the error of the guided prediction the sampler uses,
eps_u + g (eps_c - eps_u) (the branches' errors weighted 1 - g and g; at the bundled g = 1
only the conditional branch's), averaged over samples and pixels gives one value per step
and output channel, a table [S, C] the quantized model subtracts
from its output at that step (PTQD's correction of the quantization noise's mean, without its
variance term). Per step the mean is a small part of the error, but it has the same sign at
every step, so the sampler integrates it (docs/results.md, "Calibration", has the case that
made it part of the presets). Deployed as one more
per-step table gathered by the step index, after the UNet's last layer.
"""
from __future__ import annotations

import torch

from tfmq.calibration.calibset import CalibrationSet
from tfmq.calibration.qmodel import QuantUNet
from tfmq.sampling import unet_denoiser


@torch.no_grad()
def output_bias(qunet: QuantUNet, fp_unet: torch.nn.Module, cs: CalibrationSet, batch: int = 64) -> torch.Tensor:
    """[S, C]: the mean error of ``qunet``'s guided prediction (without any correction) against
    ``fp_unet``'s, per step of the calibration set and output channel."""
    saved, qunet.output_bias = qunet.output_bias, None
    fp, q = unet_denoiser(fp_unet), unet_denoiser(qunet)
    rows = []
    try:
        for s in range(cs.steps):
            total, count = 0.0, 0
            for i in range(0, cs.samples, batch):
                idx = torch.arange(i, min(i + batch, cs.samples))
                x, t, c = cs.inputs(torch.full_like(idx, s), idx)
                d = cs.guide((q(x, t, c) - fp(x, t, c)).double())
                total = total + d.sum(dim=(0, 2, 3))
                count += d.shape[0] * d.shape[2] * d.shape[3]
            rows.append(total / count)
    finally:
        qunet.output_bias = saved
    table = torch.stack(rows).float()
    if not torch.isfinite(table).all():
        raise ValueError("bias correction: the quantized model's error is not finite on the calibration set")
    return table
