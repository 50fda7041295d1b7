"""What the benchmark scripts share: side-by-side timing, models built in code, FP32 baselines."""
from __future__ import annotations

import json
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


def _byte_chars() -> list[str]:
    """The printable stand-in character of every byte, as byte-level BPE tokenizers map them."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [table[b] for b in range(256)]


BYTE_VOCAB = 514  # 256 bytes, 256 word-final bytes, start and end of text


def write_byte_tokenizer(folder: Path, max_length: int) -> None:
    """A CLIPTokenizer with one token per byte (no merges; ids below ``BYTE_VOCAB``, the start
    and end tokens 512 and 513): any text, no download."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                  model_max_length=max_length).save_pretrained(folder)


# The published configs of the Stable Diffusion pipelines' parts (UNet, CLIP text encoder, VAE)
SD_CONFIGS = {
    "sd15": {  # runwayml/stable-diffusion-v1-5: 860M-parameter UNet, CLIP ViT-L/14 text (768-d)
        "unet": dict(attention_head_dim=8, cross_attention_dim=768),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     hidden_act="quick_gelu", projection_dim=768),
        "prediction_type": "epsilon",
    },
    "sd21": {  # stabilityai/stable-diffusion-2-1: 865M-parameter UNet, OpenCLIP ViT-H text (1024-d), v-prediction
        "unet": dict(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True),
        "text": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                     hidden_act="gelu", projection_dim=512),
        "prediction_type": "v_prediction",
    },
}


def sd_pipeline(folder: Path, config: str, latent: int = 64, seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder at the real size of ``config`` (``SD_CONFIGS``), random
    weights (seeded): UNet (320/640/1280/1280, 2 layers per block), text encoder, VAE (128/256/
    512/512), the SD schedule, a byte-level tokenizer of 77 tokens (the real vocabulary's
    embedding size is kept). For memory and time, never for quality."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    c = SD_CONFIGS[config]
    write_byte_tokenizer(folder / "tokenizer", 77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), **c["unet"])
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=512,
                                        eos_token_id=513, pad_token_id=513, **c["text"]))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=4, sample_size=8 * latent)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          steps_offset=1, prediction_type=c["prediction_type"])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                                   unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder
