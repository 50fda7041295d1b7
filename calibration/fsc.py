"""Activation calibration: finite set calibration (FSC) and its shared-parameter baseline.

Per parameter set (one per sampling step with FSC), as the official code does: an MSE
search on ``init_samples`` inputs of that step, then an EMA of the min/max (momentum 0.95)
over the rest of the step's calibration inputs, with weights already quantized and the
activations quantized as they are calibrated (later layers see quantized inputs). The
shared baseline calibrates one set on inputs drawn from all steps. Channel-grouped quantizers
first form their groups from each channel's mean range over ``init_samples`` inputs of every
step (activations in float; the runs of channels sorted by range that minimise the conv's
output noise, ``GroupedActQuantizer.assign``), then calibrate per group like the others.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from tfmq.calibration.calibset import CalibrationSet
from tfmq.calibration.qmodel import GroupedActQuantizer, QuantUNet
from tfmq.sampling import unet_denoiser


@torch.no_grad()
def calibrate_activations(qunet: QuantUNet, cs: CalibrationSet, init_samples: int = 16, batch: int = 16,
                          seed: int = 0, progress: bool = True) -> None:
    if not qunet.act_quantizers:
        return
    denoise = unet_denoiser(qunet)
    gen = torch.Generator().manual_seed(seed)
    n, steps = cs.samples, cs.steps
    grouped = [q for q in qunet.act_quantizers.values() if isinstance(q, GroupedActQuantizer)]
    if grouped:
        qunet.set_act_mode("off")
        for q in grouped:
            q.mode = "channels"
        for s in tqdm(range(steps), desc="channel ranges", disable=not progress, leave=False):
            idx = torch.randperm(n, generator=gen)[:init_samples]
            denoise(*cs.inputs(torch.full_like(idx, s), idx))
        for q in grouped:  # weighted by how much of each input channel's noise the conv passes on
            q.assign(qunet.layers[q.name].layer.weight.detach().pow(2).sum((0, 2, 3)))
    qunet.set_act_mode("observe")
    try:
        if qunet.n_sets == steps:  # FSC: every step on its own
            it = tqdm(range(steps), desc="FSC per-step activations", disable=not progress, leave=False)
            for s in it:
                order = torch.randperm(n, generator=gen)
                for idx in [order[:init_samples]] + list(order[init_samples:].split(batch)):
                    if len(idx):
                        denoise(*cs.inputs(torch.full_like(idx, s), idx))
        else:  # shared or grouped: batches mixing the steps of one set
            pairs = torch.stack(torch.meshgrid(torch.arange(steps), torch.arange(n), indexing="ij"), -1).reshape(-1, 2)
            pairs = pairs[torch.randperm(len(pairs), generator=gen)]
            for g in range(qunet.n_sets):
                mine = pairs[[qunet.ctx.sets_of_steps[int(s)] == g for s in pairs[:, 0]]]
                chunks = [mine[:init_samples]] + list(mine[init_samples:].split(batch))
                for chunk in tqdm(chunks, desc=f"activations, set {g}", disable=not progress, leave=False):
                    # temporal tables hold one step's row per call: then a chunk runs step by step
                    parts = [chunk[chunk[:, 0] == s] for s in chunk[:, 0].unique()] if qunet.has_tables() else [chunk]
                    for part in parts:
                        if len(part):
                            denoise(*cs.inputs(part[:, 0], part[:, 1]))
    finally:
        qunet.set_act_mode("quant")

