"""What the benchmark scripts share: side-by-side timing, models built in code, FP32 baselines."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from tfmq.models import DiffusionModel


def alternating_ms(runs: dict, repeats: int) -> dict[str, float]:
    """Median latency (ms) of each zero-argument callable, one warm-up each, then ``repeats``
    rounds in which every callable runs once in turn (the machine is noisy; alternating keeps
    the ratios fair)."""
    for f in runs.values():
        f()
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def mid_model() -> DiffusionModel:
    """A mid-size UNet2DModel (128/256/256 channels, 64x64, attention at the lowest
    resolution) with random weights, seeded: for speed, never for quality."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=64, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(128, 256, 256),
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")).eval()
    return DiffusionModel(name="mid-128-256-256", source="built in code (random weights)", unet=unet,
                          scheduler_config=dict(DDPMScheduler().config), scheduler_source="diffusers default DDPM",
                          spec="mid")


def fp32_onnx(model: DiffusionModel, path: Path, batch: int = 1) -> None:
    """The FP32 UNet as ONNX with the calling convention of the artifacts (unconditional models)."""
    class Entry(torch.nn.Module):
        def __init__(self, u):
            super().__init__()
            self.u = u

        def forward(self, sample, timestep):
            return self.u(sample, timestep.expand(sample.shape[0])).sample

    with torch.no_grad():
        torch.onnx.export(Entry(model.unet), (torch.zeros(batch, *model.sample_shape), torch.tensor([500])), path,
                          dynamo=False, opset_version=20, input_names=["sample", "timestep"],
                          output_names=["out_sample"], dynamic_axes={"sample": {0: "b"}, "out_sample": {0: "b"}})
