"""The harness measures what it should: zero error for FP32 against itself, real error for a perturbed candidate."""
import copy
import json

import pytest
import torch

from tfmq.quality.harness import Candidate, EvalConfig, evaluate, temporal_features
from tfmq.sampling import unet_denoiser

CFG = EvalConfig(n=10, steps=5, batch_size=10)


def perturbed(unet, rel=0.05):
    """A copy of the UNet with every weight moved by about ``rel`` of its scale (a stand-in for quantization error)."""
    m = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * rel * p.std(correction=0))
    return m


def test_fp32_against_itself_has_no_error(ddpm, tmp_path):
    rep = evaluate(ddpm, [Candidate("same", unet_denoiser(ddpm.unet), ddpm.unet)], CFG, out_dir=tmp_path,
                   progress=False)
    c = rep["candidates"]["same"]
    assert c["psnr_db"] == "inf" and c["label_agreement"] == 1.0 and c["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert max(c["per_step_latent_rel_err"]) == 0.0 and max(c["temporal_rel_err"]) == 0.0
    assert c["fid_ratio"] == pytest.approx(1.0) and c["fid_ratio_ci95"] == pytest.approx([1.0, 1.0])
    json.dumps(rep)  # JSON-ready
    for png in ("grid_fp32.png", "pairs_same.png", "per_step_latent_error.png", "temporal_feature_error.png"):
        assert (tmp_path / png).stat().st_size > 1000, png


def test_perturbed_candidate_shows_error(cond):
    noisy = perturbed(cond.unet)
    rep = evaluate(cond, [Candidate("noisy", unet_denoiser(noisy), noisy)], CFG, progress=False)
    c = rep["candidates"]["noisy"]
    assert 5 < c["psnr_db"] < 60
    assert c["per_step_latent_rel_err"][0] == 0.0 and c["per_step_latent_rel_err"][-1] > 1e-3
    assert len(c["temporal_rel_err"]) == CFG.steps and min(c["temporal_rel_err"]) > 1e-3
    assert "cond_accuracy" in rep["fp32"] and "cond_accuracy" in c


def test_temporal_features_cover_every_resnet(ddpm):
    feats = temporal_features(ddpm.unet, torch.tensor([999, 500, 1]), ddpm.sample_shape, None)
    n_resnets = sum(1 for n, _ in ddpm.unet.named_modules() if n.endswith("time_emb_proj"))
    assert len(feats) == n_resnets > 5
    for f in feats.values():
        assert f.shape[0] == 3 and not torch.allclose(f[0], f[2])  # they depend on t


def test_two_candidates_of_one_name_are_refused_before_sampling(ddpm):
    """The report is keyed by name: the second would silently replace the first's numbers."""
    same = Candidate("state", unet_denoiser(ddpm.unet), ddpm.unet)
    with pytest.raises(ValueError, match="share a name: \\['state'\\]"):
        evaluate(ddpm, [same, same], EvalConfig(n=10 ** 6), progress=False)  # would take hours if it sampled
