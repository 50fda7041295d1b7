import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from tfmq.calibration.tib import TemporalBlockError, find_tib

KW = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
          norm_num_groups=4)


def test_finds_every_resnet_and_matches_the_unet(ddpm):
    tib = find_tib(ddpm.unet)
    assert len(tib.resnets) == sum(1 for n, _ in ddpm.unet.named_modules() if n.endswith("time_emb_proj"))
    from tfmq.quality.harness import temporal_features

    t = torch.tensor([999, 500, 1])
    with torch.no_grad():
        mine = tib.features(t)
    hooked = temporal_features(ddpm.unet, t, (1, 32, 32), None)
    assert set(mine) == set(hooked)
    for k in mine:
        assert torch.allclose(mine[k], hooked[k], atol=1e-6), k


def test_conditional_tib(cond):
    assert len(find_tib(cond.unet).resnets) > 5


def test_class_embedding_is_refused_with_the_reason():
    unet = UNet2DModel(**KW, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       num_class_embeds=10)
    with pytest.raises(TemporalBlockError, match="class_embedding"):
        find_tib(unet)


def test_lcm_cond_proj_is_refused():
    unet = UNet2DConditionModel(**KW, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                cross_attention_dim=8, time_cond_proj_dim=16)
    with pytest.raises(TemporalBlockError, match="cond_proj"):
        find_tib(unet)
