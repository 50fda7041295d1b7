"""Run an exported artifact inside the stock diffusers pipelines.

    from tfmq.drop_in import ArtifactUNet, ddim_pipeline
    pipe = ddim_pipeline("artifacts/mnist-ddpm")                # diffusers DDIMPipeline on its first target that runs here
    images = pipe(batch_size=4, num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images

``ArtifactUNet`` is called like a diffusers UNet (``sample``, ``timestep``[,
``encoder_hidden_states``], ``return_dict``) and returns its output class, so the DDIM
pipeline, or a classifier-free-guidance loop written against a UNet (the conditional model's
``tfmq.sampling.ddim_sample``), runs on the compiled artifact unchanged. The host check the
graph cannot make is here: a timestep that is not a whole number in the training range
[0, T) raises ScheduleError. Any step count runs: a timestep off the calibrated schedule takes
the nearest calibrated step's quantization parameters and its own temporal features. It runs the
artifact with its deployment settings (OpenVINO: the inference precision it was exported with,
bf16 for the float layers by default on CPUs with BF16; parity.json reports that trajectory
as `deployment`); ``options`` overrides them (``{"precision": "f32"}``: what the gates ran).
"""
from __future__ import annotations

from pathlib import Path

import torch

from tfmq.errors import TfmqError


class ArtifactUNet(torch.nn.Module):
    def __init__(self, artifact: str | Path, target: str | None = None, options: dict | None = None):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        from tfmq.artifacts import Manifest
        from tfmq.exporter.parity import runner_denoiser
        from tfmq.targets.registry import get_target

        artifact = Path(artifact)
        manifest = Manifest.read(artifact).data
        built = [t for t in manifest["targets"] if t != "fp32"]
        if not built:
            raise TfmqError(f"{artifact}: holds no compiled target (fp32 reference only)")
        runnable = [t for t in built if get_target(t).runs_here() is None]
        if target is None and not runnable:
            raise TfmqError(f"{artifact}: none of its targets runs here ({', '.join(built)})")
        self.target = target or runnable[0]
        if self.target not in built:
            raise TfmqError(f"{artifact}: no {self.target!r} target in it (built: {', '.join(built)})")
        folder = artifact / manifest["targets"][self.target].get("dir", self.target)
        self.schedule = torch.tensor(manifest["schedule"]["timesteps"])  # what it was calibrated on
        self.train_timesteps = int(manifest["model"]["scheduler_config"]["num_train_timesteps"])
        self.config = FrozenDict(manifest["model"]["unet_config"])
        self.manifest = manifest
        t = get_target(self.target)
        deployed = None if options else t.deployment_runner(folder)  # e.g. OpenVINO's bf16 float layers
        run = deployed[1] if deployed else t.runner(folder, options)
        self._denoise = runner_denoiser(run, self.train_timesteps)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict: bool = True, **kwargs):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        t = torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0])
        out = self._denoise(sample.float().cpu(), t, encoder_hidden_states)
        return UNet2DOutput(sample=out) if return_dict else (out,)


def ddim_pipeline(artifact: str | Path, target: str | None = None, options: dict | None = None):
    """diffusers' DDIMPipeline on the artifact (unconditional models), with the model's scheduler."""
    from diffusers import DDIMPipeline

    from tfmq.models import ddim_scheduler

    unet = ArtifactUNet(artifact, target, options)
    if unet.manifest["model"]["conditional"]:
        raise TfmqError("a conditional artifact: use ArtifactUNet with tfmq.sampling.ddim_sample (its CFG loop)")
    scheduler = ddim_scheduler(unet.manifest["model"]["scheduler_config"])
    return DDIMPipeline(unet=unet, scheduler=scheduler)
