"""Tiny Stable Diffusion models built in code with the real diffusers and transformers classes
(random weights, fixed seed, ``save_pretrained``): what a user's SD 1.x/2.x folder looks like,
at a size the tests can calibrate in seconds."""
from __future__ import annotations

from pathlib import Path

TOKENS = 16  # the tokenizer's model_max_length (SD: 77)


def write_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer with one token per byte (no merges): any text, no download."""
    from tfmq.benchmarking import write_byte_tokenizer

    write_byte_tokenizer(folder, TOKENS)


def unet(cross_dim: int = 32, prediction_type: str = "epsilon", seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=32,
        use_linear_projection=prediction_type == "v_prediction")  # as SD 2.x


def pipeline(folder: Path, prediction_type: str = "epsilon", cross_dim: int = 32, seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder: CLIP tokenizer and text encoder, VAE, UNet, the SD
    schedule (PNDM config, scaled-linear betas)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=cross_dim, intermediate_size=2 * cross_dim,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TOKENS,
                                        bos_token_id=512, eos_token_id=513, pad_token_id=513,
                                        projection_dim=cross_dim))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), latent_channels=4,
                        norm_num_groups=32, sample_size=16)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                                   unet=unet(cross_dim, prediction_type, seed), scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def bare_unet(folder: Path, cross_dim: int = 32) -> Path:
    """A bare UNet2DConditionModel folder (config.json + safetensors, nothing beside it)."""
    unet(cross_dim).save_pretrained(folder)
    return folder


def encoder_states(path: Path, prompts: int = 3, cross_dim: int = 32, negative: bool = True, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    t = {"encoder_hidden_states": torch.randn(prompts, TOKENS, cross_dim, generator=g)}
    if negative:
        t["negative_encoder_hidden_states"] = torch.randn(1, TOKENS, cross_dim, generator=g)
    save_file(t, str(path))
    return path
