"""Calibration sets: FP sampler trajectories, recorded once and reused.

One DDIM pass per seed records the UNet's input x_t at every step of the deployment schedule
(not one sampler run per step, which made the official generator O(T^2)), together with
t and, for conditional models, the encoder states of both classifier-free-guidance branches
(labels or prompts and their null label or empty prompt), at the guidance the sampler used. Saved as ``calib.safetensors`` + ``calib.json``; loading
checks that the set was recorded for this model and this schedule.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tfmq.artifacts import load_tensors_and_meta, save_tensors_and_meta
from tfmq.compute import Compute
from tfmq.errors import TfmqError
from tfmq.models import DiffusionModel, fingerprint
from tfmq.sampling import ddim_sample, guide, initial_noise, unet_denoiser

CALIBSET_VERSION = 1
TENSORS, META = "calib.safetensors", "calib.json"


class CalibrationDataError(TfmqError):
    """A calibration set that is broken, non-finite, or recorded for another model or schedule."""


@dataclass
class CalibrationSet:
    x: torch.Tensor  # [S, N, C, H, W]: the UNet input at each step, in sampling order
    timesteps: torch.Tensor  # [S] int64
    cond: torch.Tensor | None  # [N, L, D] encoder states of what each sample asks for
    uncond: torch.Tensor | None  # [N, L, D] encoder states of the unconditional branch
    meta: dict

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def samples(self) -> int:
        return self.x.shape[1]

    def inputs(self, steps: torch.Tensor, idx: torch.Tensor):
        """(sample, timestep, encoder_hidden_states) for the (step, sample) pairs given, with
        both CFG branches stacked [uncond, cond] as the sampler runs them."""
        x, t = self.x[steps, idx], self.timesteps[steps].long()
        if self.cond is None:
            return x, t, None
        return torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.uncond[idx], self.cond[idx]])

    @property
    def guidance(self) -> float | None:
        """The classifier-free guidance the set was recorded at (None: unconditional)."""
        return None if self.cond is None else float(self.meta["guidance"])

    def guide(self, out: torch.Tensor) -> torch.Tensor:
        """The sampler's noise prediction from a model output on :meth:`inputs` (both branches
        stacked [uncond, cond]): eps_u + g (eps_c - eps_u). Applied to an error it gives the
        error of what the sampler integrates; at g = 1 the unconditional branch's part cancels."""
        return out if self.cond is None else guide(out, self.guidance)

    def uncond_share(self) -> float:
        """The unconditional branch's weight in the guided prediction, |1 - g| / (|1 - g| + |g|):
        the share of reconstruction inputs taken from that branch (0 at g = 1, where it cancels)."""
        g = self.guidance
        return 0.0 if g is None else abs(1 - g) / (abs(1 - g) + abs(g))

    def step_inputs(self, i: int):
        """All samples of step i, as :meth:`inputs` gives them."""
        return self.inputs(torch.full((self.samples,), i), torch.arange(self.samples))

    def check_for(self, model: DiffusionModel, timesteps: torch.Tensor) -> None:
        fp = fingerprint(model.unet)
        if self.meta["model_fingerprint"] != fp:
            raise CalibrationDataError(f"calibration set was recorded for model {self.meta['model']!r} "
                                       f"(fingerprint {self.meta['model_fingerprint']}), not {model.name!r} ({fp})")
        if not torch.equal(self.timesteps, timesteps.long()):
            raise CalibrationDataError(f"calibration set was recorded for a {self.steps}-step schedule "
                                       f"{self.timesteps[:3].tolist()}..., not the {len(timesteps)}-step "
                                       f"{timesteps[:3].tolist()}... asked for")

    def save(self, folder: Path) -> None:
        tensors = {"x": self.x, "timesteps": self.timesteps}
        if self.cond is not None:
            tensors |= {"cond": self.cond, "uncond": self.uncond}
        save_tensors_and_meta(folder, tensors, self.meta, TENSORS, META)


def record(model: DiffusionModel, seeds: int, steps: int, seed0: int = 10_000,
           guidance: float | None = None, progress: bool = False, compute: Compute | None = None) -> CalibrationSet:
    """Run the FP sampler once per seed and keep every step's UNet input.

    Seeds start at 10,000 so calibration never sees the evaluation seeds (0...). ``guidance``
    None: the model's default (7.5 for prompts). ``compute``: the device and dtype the UNet
    runs in (default CPU float32); the sampler and the set stay float32 on the CPU."""
    compute = compute or Compute()
    noise = initial_noise(range(seed0, seed0 + seeds), model.sample_shape)
    guidance = model.default_guidance if guidance is None else guidance
    den = unet_denoiser(model.unet) if compute.is_default else compute.call(compute.module(model.unet))
    with compute.deterministic():
        traj = ddim_sample(model, den, noise, steps=steps, guidance=guidance, record=True, progress=progress)
    x = traj.latents[:-1]  # inputs of the S steps; the last latent is the output
    if not torch.isfinite(x).all():
        raise CalibrationDataError(f"the {compute.dtype} sampler of {model.name} on {compute.device} produced "
                                   "non-finite latents")
    cond = uncond = labels = None
    if model.conditional:
        cond, uncond = model.conditioning.states(seeds)
        labels = model.conditioning.labels(seeds)
    meta = {"version": CALIBSET_VERSION, "model": model.name, "model_fingerprint": fingerprint(model.unet),
            "sampler": "DDIM", "eta": 0.0, "steps": steps, "seeds": list(range(seed0, seed0 + seeds)),
            "guidance": guidance if model.conditional else None,
            "labels": labels.tolist() if labels is not None else None,
            "conditioning": model.conditioning.describe() if model.conditional else None,
            "compute": compute.describe()}
    return CalibrationSet(x=x, timesteps=traj.timesteps.long(), cond=cond, uncond=uncond, meta=meta)


def load(folder: Path) -> CalibrationSet:
    meta, t = load_tensors_and_meta(folder, TENSORS, META, CalibrationDataError, "calibration set", CALIBSET_VERSION)
    for k, v in t.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CalibrationDataError(f"{folder}: calibration tensor {k!r} holds NaN or inf")
    if "x" not in t or "timesteps" not in t or t["x"].shape[0] != len(t["timesteps"]):
        raise CalibrationDataError(f"{folder}: calibration tensors are inconsistent")
    return CalibrationSet(x=t["x"], timesteps=t["timesteps"].long(), cond=t.get("cond"), uncond=t.get("uncond"),
                          meta=meta)
