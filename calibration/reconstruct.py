"""Weight reconstruction: TIAR on the temporal block, then BRECQ block by block.

Both run with activations in float, as the official code does (activations are calibrated
afterwards, per step). Only AdaRound's rounding variables are learned (Adam, lr 1e-3);
the loss is the block's output MSE plus the rounding regulariser (weight 0.01, temperature
annealed 20 -> 2 after a 20% warm-up).

- TIAR: the temporal block's Linears, reconstructed on the temporal features themselves,
  sum_i ||g_i(h(t)) - g^_i(h^(t))||^2 over the finite set of schedule timesteps. They are
  then frozen: block reconstructions never touch them.
- BRECQ: every ResNet block, transformer / attention block and remaining quantized layer in
  network order; inputs from the already-quantized prefix, targets from the FP model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from tfmq.calibration.calibset import CalibrationSet
from tfmq.calibration.qmodel import QuantLayer, QuantUNet
from tfmq.calibration.quantizers import TemperatureSchedule
from tfmq.calibration.recipe import Reconstruction
from tfmq.calibration.tib import TemporalBlock
from tfmq.sampling import unet_denoiser

BLOCK_TYPES = ("ResnetBlock2D", "Transformer2DModel", "Attention", "Upsample2D", "Downsample2D")


@dataclass
class ReconReport:
    units: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _optimize(params: list, loss_fn, cfg: Reconstruction, sample_batch, desc: str, progress: bool,
              lr: float, reg=None) -> None:
    """Adam on ``params`` against ``loss_fn(batch)``, plus ``cfg.reg_weight * reg(beta)`` once
    AdaRound's temperature schedule starts (``reg`` None: no regulariser)."""
    opt = torch.optim.Adam(params, lr=lr)
    temp = TemperatureSchedule(cfg.iters, cfg.warmup, cfg.b_start, cfg.b_end)
    with torch.enable_grad():
        for it in tqdm(range(cfg.iters), desc=desc, disable=not progress, leave=False):
            rec = loss_fn(sample_batch())
            beta = temp(it)
            loss = rec + cfg.reg_weight * reg(beta) if reg is not None and beta is not None else rec
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _adaround(layers: list[QuantLayer], loss_fn, cfg: Reconstruction, sample_batch, desc: str,
              progress: bool) -> None:
    """AdaRound the given layers' weights, then freeze the rounding into their integers."""
    adas = [ql.start_adaround() for ql in layers]
    _optimize([a.alpha for a in adas], loss_fn, cfg, sample_batch, desc, progress, cfg.lr,
              reg=lambda beta: sum(a.regulariser(beta) for a in adas))
    for ql in layers:  # no undo: the rounding decisions stay, as BRECQ keeps them
        ql.finish_adaround()


def _learn_scales(quantizers: list, loss_fn, cfg: Reconstruction, sample_batch, desc: str, progress: bool):
    """LSQ-style: learn the activation scales (zero-points fixed), write them back, and return
    how to undo it (a unit whose block loss got worse keeps its initial scales)."""
    # Adam's step is about lr whatever the gradient, so each scale gets a step relative to its
    # own size: one absolute lr would move a 0.002 scale 100x more (relatively) than a 0.2 one.
    params = [{"params": [p], "lr": cfg.act_lr * float(p.detach().mean())}
              for p in (q.start_learning() for q in quantizers)]
    initial = [q.scale.clone() for q in quantizers]
    _optimize(params, loss_fn, cfg, sample_batch, desc, progress, cfg.act_lr)
    for q in quantizers:
        q.finish_learning()

    def undo():
        for q, s in zip(quantizers, initial, strict=True):
            q.scale.copy_(s)
    return undo


def tiar(qunet: QuantUNet, fp_tib: TemporalBlock, q_tib: TemporalBlock, cfg: Reconstruction,
         progress: bool = True) -> dict:
    """Reconstruct the temporal block's quantized Linears on the temporal features."""
    t = qunet.timesteps
    with torch.no_grad():
        target = fp_tib.features(t)
    layers = [qunet.layers[n] for n in q_tib.layer_names() if n in qunet.layers]

    def loss_fn(_):
        out = q_tib.features(t)
        return sum(((out[k] - target[k]) ** 2).sum(1).mean() for k in target)

    t0 = time.time()
    with torch.no_grad():
        before = float(loss_fn(None))
    if layers and cfg.iters:
        _adaround(layers, loss_fn, cfg, lambda: None, "TIAR", progress)
    with torch.no_grad():
        after = float(loss_fn(None))  # with the final (hard) rounding
    return {"unit": "temporal block", "layers": len(layers), "loss_before": before, "loss_after": after,
            "seconds": round(time.time() - t0, 1)}


def _blocks(unet: nn.Module, quant_names: set[str], skip: set[str], order: dict[str, int]) -> list[tuple[str, list[str]]]:
    """(unit name, its quantized layer names) in execution order: the outermost blocks of
    BLOCK_TYPES, then every quantized layer outside them as a unit of its own. Modules that
    never ran in the traced forward (``order``) are left out."""
    units, covered = [], set()
    for name, mod in unet.named_modules():
        if any(name.startswith(c + ".") for c in covered):
            continue
        if type(mod).__name__ in BLOCK_TYPES:
            inner = sorted(n for n in quant_names if (n == name or n.startswith(name + ".")) and n not in skip)
            covered.add(name)
            if inner:
                units.append((name, inner))
        elif name in quant_names and name not in skip:
            units.append((name, [name]))
    return sorted((u for u in units if u[0] in order), key=lambda u: order[u[0]])


def units(qunet: QuantUNet, batch, skip: set[str] = frozenset()) -> list[tuple[str, list[str]]]:
    """(unit name, its quantized layer names) of ``qunet`` in the order one forward pass on
    ``batch`` (sample, timestep, encoder_hidden_states) runs them: the blocks BRECQ
    reconstructs, then every quantized layer outside them."""
    return _blocks(qunet.unet, set(qunet.layers), set(skip), execution_order(qunet.unet, batch))


def execution_order(unet: nn.Module, batch) -> dict[str, int]:
    """{module name: position of its first call} in one forward pass. named_modules() follows
    registration order, which is not the forward order (diffusers registers up_blocks before
    mid_block); BRECQ needs the forward order."""
    order: dict[str, int] = {}

    def first_call(name):
        def hook(mod, args):  # returns None: a pre-hook's return value would replace the inputs
            order.setdefault(name, len(order))
        return hook

    hooks = [m.register_forward_pre_hook(first_call(name)) for name, m in unet.named_modules()]
    try:
        with torch.no_grad():
            unet_denoiser(unet)(*batch)
    finally:
        for h in hooks:
            h.remove()
    return order


class _Capture:
    """Forward hook recording a module's inputs (args and kwargs) or output, batch by batch."""

    def __init__(self, module: nn.Module, what: str):
        self.what, self.items = what, []
        self.h = module.register_forward_hook(self, with_kwargs=True)

    def __call__(self, mod, args, kwargs, out):
        if self.what == "inputs":
            self.items.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                               {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()}))
        else:
            self.items.append(_main(out).detach())

    def close(self):
        self.h.remove()


def _main(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.sample


def _cat_inputs(items):
    args = tuple(torch.cat([it[0][j] for it in items]) if torch.is_tensor(items[0][0][j]) else items[0][0][j]
                 for j in range(len(items[0][0])))
    kwargs = {k: torch.cat([it[1][k] for it in items]) if torch.is_tensor(v) else v for k, v in items[0][1].items()}
    return args, kwargs


def _index(args, kwargs, idx):
    return (tuple(a[idx] if torch.is_tensor(a) else a for a in args),
            {k: v[idx] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in kwargs.items()})


def calibration_batches(cs: CalibrationSet, samples: int, batch: int, seed: int = 0):
    """``samples`` (step, seed) pairs drawn uniformly over the trajectory, as model-input batches.
    Conditional models: each pair takes one CFG branch, the unconditional one with its share of
    the guided prediction (``CalibrationSet.uncond_share``): none at g = 1, where the sampler's
    eps_u + g (eps_c - eps_u) is the conditional branch alone and a fit to the null label is
    capacity spent on an output that cancels."""
    gen = torch.Generator().manual_seed(seed)
    total = cs.steps * cs.samples
    pick = torch.randperm(total, generator=gen)[:samples]
    s, i = pick // cs.samples, pick % cs.samples
    out = []
    for b in range(0, len(pick), batch):
        sb, ib = s[b:b + batch], i[b:b + batch]
        x, t = cs.x[sb, ib], cs.timesteps[sb].long()
        c = None
        if cs.cond is not None:  # one CFG branch per pair, the null label by its weight in the guided eps
            use_uncond = torch.rand(len(ib), generator=gen) < cs.uncond_share()
            c = torch.where(use_uncond[:, None, None], cs.uncond[ib], cs.cond[ib])
        out.append((x, t, c))
    return out


def brecq(qunet: QuantUNet, fp_unet: nn.Module, batches, cfg: Reconstruction, skip: set[str],
          progress: bool = True) -> list[dict]:
    """Reconstruct every block's weights in forward order (activations must be off)."""
    units = _blocks(qunet.unet, set(qunet.layers), skip, execution_order(qunet.unet, batches[0]))
    gen = torch.Generator().manual_seed(0)
    out = []
    for unit, names in tqdm(units, desc="block reconstruction", disable=not progress):
        layers = [qunet.layers[nm] for nm in names]
        out.append({**_reconstruct_unit(qunet, fp_unet, batches, unit, cfg, gen, progress,
                                        lambda *a, layers=layers: _adaround(layers, *a)), "layers": len(layers)})
    return out


def learn_activations(qunet: QuantUNet, fp_unet: nn.Module, batches, cfg: Reconstruction,
                      progress: bool = True) -> list[dict]:
    """Q-Diffusion's second pass: with weights and activations quantized, learn each block's
    activation scales on the same block-output loss, block by block in forward order."""
    if qunet.n_sets != 1:
        raise ValueError("activation scale learning runs on mixed-step batches: it needs one shared parameter set")
    units = _blocks(qunet.unet, set(qunet.layers), set(), execution_order(qunet.unet, batches[0]))
    gen = torch.Generator().manual_seed(1)
    out = []
    for unit, _ in tqdm(units, desc="activation reconstruction", disable=not progress):
        qs = [q for n, q in qunet.act_quantizers.items() if n == unit or n.startswith(unit + ".")]
        if qs:
            out.append({**_reconstruct_unit(qunet, fp_unet, batches, unit, cfg, gen, progress,
                                            lambda *a, qs=qs: _learn_scales(qs, *a)), "quantizers": len(qs)})
    return out


def _reconstruct_unit(qunet: QuantUNet, fp_unet: nn.Module, batches, unit: str, cfg: Reconstruction,
                      gen: torch.Generator, progress: bool, fit) -> dict:
    """One unit: its inputs from the quantized prefix, its target from FP32, then
    ``fit(loss_fn, cfg, sample_batch, desc, progress)``. The captured tensors live only as
    long as this call."""
    t0 = time.time()
    q_mod, fp_mod = qunet.unet.get_submodule(unit), fp_unet.get_submodule(unit)
    cap_in, cap_out = _Capture(q_mod, "inputs"), _Capture(fp_mod, "output")
    try:
        with torch.no_grad():
            for batch in batches:
                unet_denoiser(qunet.unet)(*batch)  # batches mix steps: parameter set 0 (shared) is used
                unet_denoiser(fp_unet)(*batch)
    finally:
        cap_in.close(), cap_out.close()
    args, kwargs = _cat_inputs(cap_in.items)
    target = torch.cat(cap_out.items)
    n = len(target)

    def loss_fn(idx):
        a, k = _index(args, kwargs, idx)
        return ((_main(q_mod(*a, **k)) - target[idx]) ** 2).flatten(1).sum(1).mean()

    def sample_batch():
        return torch.randint(0, n, (min(cfg.batch, n),), generator=gen)

    probe = torch.arange(min(n, 256))
    with torch.no_grad():
        before = float(loss_fn(probe))
    undo = fit(loss_fn, cfg, sample_batch, unit, progress) if cfg.iters else None
    with torch.no_grad():
        after = float(loss_fn(probe))
    kept = True
    if undo is not None and after > before:  # a fit that made the unit worse is rolled back
        undo()
        kept, after = False, before
    return {"unit": unit, "loss_before": before, "loss_after": after, "kept": kept,
            "seconds": round(time.time() - t0, 1)}
