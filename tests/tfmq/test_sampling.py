"""DDIM sampling: deterministic, batch-independent, and equal to the stored expected output."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tfmq.sampling import ddim_sample, initial_noise, unet_denoiser

EXPECTED = Path(__file__).parent / "data" / "expected_samples.safetensors"
# Stored on the development machine (2 threads). Another CPU or thread count changes float
# summation order (~1e-6 per op); over 5 DDIM steps that stays far below 1e-3.
ATOL = 1e-3
GUIDANCE = 2.0  # fixed here, so the stored output does not move with the default guidance


def run(model, n=4, steps=5, batch_size=250):
    noise = initial_noise(range(n), model.sample_shape)
    return ddim_sample(model, unet_denoiser(model.unet), noise, steps=steps, guidance=GUIDANCE,
                       batch_size=batch_size, record=True)


@pytest.mark.parametrize("name", ["ddpm", "cond"])
def test_matches_stored_expected_output(name, request):
    model = request.getfixturevalue(name)
    traj = run(model)
    expected = load_file(str(EXPECTED))
    assert torch.equal(traj.timesteps, expected[f"{name}.timesteps"])
    assert torch.allclose(traj.images, expected[f"{name}.images"], atol=ATOL), \
        (traj.images - expected[f"{name}.images"]).abs().max()


def test_same_image_whatever_the_batching(ddpm):
    # the noise is identical; the convolutions pick other kernels per batch size (other float
    # summation order), so the images agree to float precision, within the same ATOL
    a, b = run(ddpm, batch_size=4), run(ddpm, batch_size=1)
    assert torch.allclose(a.images, b.images, atol=ATOL)
    assert not torch.allclose(a.images, run(ddpm, n=5, batch_size=5).images[1:], atol=ATOL)
    assert a.latents.shape == (6, 4, 1, 32, 32)
    assert torch.equal(a.latents[0], initial_noise(range(4), (1, 32, 32)))


def test_guidance_changes_conditional_samples(cond):
    noise = initial_noise(range(2), cond.sample_shape)
    den = unet_denoiser(cond.unet)
    g1 = ddim_sample(cond, den, noise, steps=5, guidance=1.0).images
    g3 = ddim_sample(cond, den, noise, steps=5, guidance=3.0).images
    assert (g1 - g3).abs().max() > 1e-2
    # no guidance given: the model's default, 1.0 for the class-token model
    assert torch.equal(ddim_sample(cond, den, noise, steps=5).images, g1)


def test_conditional_needs_something_to_condition_on(cond):
    from dataclasses import replace

    bare = replace(cond, conditioning=None)
    with pytest.raises(ValueError, match="nothing to condition on"):
        ddim_sample(bare, unet_denoiser(cond.unet), initial_noise(range(2), cond.sample_shape), steps=2)


def write_expected():
    """Regenerate tests/data/expected_samples.safetensors (after retraining a bundled model)."""
    from safetensors.torch import save_file

    from tfmq.models import load_model

    out = {}
    for name, spec in (("ddpm", "mnist-ddpm"), ("cond", "mnist-cond")):
        traj = run(load_model(spec))
        out[f"{name}.images"], out[f"{name}.timesteps"] = traj.images.contiguous(), traj.timesteps.contiguous()
    save_file(out, str(EXPECTED))


if __name__ == "__main__":
    write_expected()


def test_the_sampler_batch_keeps_an_sd_sized_attention_map_within_memory():
    """SD-1.5's layout (cross-attention at the full 64x64 latent, guidance): 2 seeds a batch
    (one 8-head attention map is 1 GiB per seed there); the bundled models keep 250."""
    from diffusers import UNet2DConditionModel

    from tfmq.models import DEFAULT_SCHEDULE, DiffusionModel, load_model

    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2)
    sd_like = DiffusionModel(name="sd-like", source="test", unet=unet, scheduler_config=DEFAULT_SCHEDULE,
                             scheduler_source="default")
    assert sd_like.sampler_batch == 2
    assert load_model("mnist-ddpm").sampler_batch == load_model("mnist-cond").sampler_batch == 250
