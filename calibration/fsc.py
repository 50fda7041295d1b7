"""Activation calibration: finite set calibration (FSC) and its shared-parameter baseline.

Per parameter set (one per sampling step with FSC), as the official code does: an MSE
search on ``init_samples`` inputs of that step, then an EMA of the min/max (momentum 0.95)
over the rest of the step's calibration inputs, with weights already quantized and the
activations quantized as they are calibrated (later layers see quantized inputs). The
shared baseline calibrates one set on inputs drawn from all steps.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from tfmq.calibration.calibset import CalibrationSet
from tfmq.calibration.qmodel import QuantUNet


def _call(qunet: QuantUNet, x, t, c):
    return qunet(x, t) if c is None else qunet(x, t, encoder_hidden_states=c)


def _rows(cs: CalibrationSet, step: int, idx: torch.Tensor):
    """Calibration inputs of ``step`` for samples ``idx`` (both CFG branches for conditional models)."""
    x, t = cs.x[step, idx], torch.full((len(idx),), int(cs.timesteps[step]), dtype=torch.long)
    if cs.cond is None:
        return x, t, None
    return torch.cat([x, x]), torch.cat([t, t]), torch.cat([cs.uncond[idx], cs.cond[idx]])


@torch.no_grad()
def calibrate_activations(qunet: QuantUNet, cs: CalibrationSet, init_samples: int = 16, batch: int = 16,
                          seed: int = 0, progress: bool = True) -> None:
    if not qunet.act_quantizers:
        return
    gen = torch.Generator().manual_seed(seed)
    n, steps = cs.samples, cs.steps
    qunet.set_act_mode("observe")
    try:
        if qunet.n_sets == steps:  # FSC: every step on its own
            it = tqdm(range(steps), desc="FSC per-step activations", disable=not progress, leave=False)
            for s in it:
                order = torch.randperm(n, generator=gen)
                _call(qunet, *_rows(cs, s, order[:init_samples]))
                for b in range(init_samples, n, batch):
                    _call(qunet, *_rows(cs, s, order[b:b + batch]))
        else:  # shared or grouped: batches mixing the steps of one set
            pairs = torch.stack(torch.meshgrid(torch.arange(steps), torch.arange(n), indexing="ij"), -1).reshape(-1, 2)
            pairs = pairs[torch.randperm(len(pairs), generator=gen)]
            for g in range(qunet.n_sets):
                mine = pairs[[qunet.ctx.sets_of_steps[int(s)] == g for s in pairs[:, 0]]]
                chunks = [mine[:init_samples]] + list(mine[init_samples:].split(batch))
                for chunk in tqdm(chunks, desc=f"activations, set {g}", disable=not progress, leave=False):
                    if len(chunk):
                        _call(qunet, *_mixed_rows(cs, chunk))
    finally:
        qunet.set_act_mode("quant")


def _mixed_rows(cs: CalibrationSet, pairs: torch.Tensor):
    s, i = pairs[:, 0], pairs[:, 1]
    x, t = cs.x[s, i], cs.timesteps[s].long()
    if cs.cond is None:
        return x, t, None
    return torch.cat([x, x]), torch.cat([t, t]), torch.cat([cs.uncond[i], cs.cond[i]])
