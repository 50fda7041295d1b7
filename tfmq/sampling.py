"""The DDIM sampling loop, driven by the caller.

Everything that generates images goes through :func:`ddim_sample`: the FP32 reference,
quantized candidates, runtime backends (anything that maps ``(sample, timestep,
encoder_hidden_states) -> noise prediction``), and later the calibration-set recorder.
Noise is drawn per image from its own seed, so image ``i`` is the same whatever the batch
size, subset or candidate: paired metrics compare like with like.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tfmq.models import DiffusionModel

# (sample [B, C, H, W], timestep [B] int64, encoder_hidden_states [B, L, D] or None) -> eps
Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

DEFAULT_STEPS = 50


def unet_denoiser(unet: torch.nn.Module) -> Denoiser:
    """Wrap a diffusers UNet (or anything with its call signature) as a Denoiser."""

    def denoise(sample, timestep, encoder_hidden_states=None):
        if encoder_hidden_states is None:
            return unet(sample, timestep).sample
        return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample

    return denoise


def guide(out: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance, eps_u + g (eps_c - eps_u), from an output on both branches
    stacked [uncond, cond] (as the sampler batches them)."""
    eps_u, eps_c = out.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One standard-normal latent per seed, independent of batching."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@dataclass
class Trajectory:
    images: torch.Tensor  # final samples [N, C, H, W]
    timesteps: torch.Tensor  # [steps] the schedule's timesteps, in sampling order
    latents: torch.Tensor | None = None  # [steps + 1, N, C, H, W]: x_T, then after each step


@torch.no_grad()
def ddim_sample(model: DiffusionModel, denoiser: Denoiser, noise: torch.Tensor, steps: int = DEFAULT_STEPS,
                guidance: float | None = None, record: bool = False,
                batch_size: int | None = None, progress: bool = False, desc: str | None = None) -> Trajectory:
    """Run deterministic DDIM (eta = 0) from ``noise`` with the model's training schedule.

    Sample i of a conditional model is asked for entry i of its conditioning; the two
    classifier-free-guidance branches run as one batch [unconditional, conditional] at
    ``guidance`` (None: the model's default, 7.5 for prompts). ``batch_size``: seeds per batch
    (None: ``model.sampler_batch``, which keeps an SD-sized attention map within memory).
    """
    batch_size = batch_size or model.sampler_batch
    cond = None
    if model.conditional:
        if model.conditioning is None:
            raise ValueError(f"{model.name} is conditional but was loaded with nothing to condition on")
        guidance = model.default_guidance if guidance is None else guidance
        model.conditioning.check_guidance(guidance)
        cond, uncond = model.conditioning.states(len(noise))
    sched = model.ddim_scheduler()
    sched.set_timesteps(steps)
    timesteps = sched.timesteps.clone()
    finals, trajs = [], []
    starts = range(0, len(noise), batch_size)
    bar = None
    if progress:  # moves on every denoising step, not only per batch
        from tqdm import tqdm

        bar = tqdm(total=len(starts) * len(timesteps), desc=desc or f"sampling {model.name}", unit="step",
                   leave=False)
    for s in starts:
        x = noise[s:s + batch_size].clone()
        hist = [x] if record else None
        for t in timesteps:
            tt = torch.full((len(x),), int(t), dtype=torch.long)
            if cond is None:
                eps = denoiser(x, tt, None)
            else:
                c = torch.cat([uncond[s:s + batch_size], cond[s:s + batch_size]])
                eps = guide(denoiser(torch.cat([x, x]), torch.cat([tt, tt]), c), guidance)
            x = sched.step(eps, t, x, eta=0.0).prev_sample
            if record:
                hist.append(x)
            if bar is not None:
                bar.update(1)
        finals.append(x)
        if record:
            trajs.append(torch.stack(hist))
    if bar is not None:
        bar.close()
    return Trajectory(images=torch.cat(finals), timesteps=timesteps,
                      latents=torch.cat(trajs, dim=1) if record else None)
