"""Metrics on inputs whose answers are known."""
import math

import numpy as np
import pytest
import torch

from tfmq.quality import metrics as M


def imgs(n=6, seed=0):
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_psnr_identical_is_inf_and_known_value():
    a = imgs()
    assert torch.isinf(M.psnr(a, a)).all() and math.isinf(M.mean_psnr(a, a))
    b = (a + 0.2).clamp(-1, 1)  # 0.1 in [0, 1] units where not clamped
    a2 = a.clamp(-1, 0.8)
    assert M.psnr(a2, a2 + 0.2).allclose(torch.full((6,), 20.0, dtype=torch.float64), atol=1e-4)
    assert M.mean_psnr(a, b) < 25


def test_ssim_identical_is_one_and_drops_with_noise():
    a = imgs()
    assert torch.allclose(M.ssim(a, a), torch.ones(6), atol=1e-5)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(a.shape, generator=g)
    light, heavy = (M.ssim(a, (a + k * noise).clamp(-1, 1)) for k in (0.1, 0.6))
    assert (heavy < light).all() and (light < 1).all() and (heavy < 0.8).all()


def test_frechet_distance_self_is_zero_and_mean_shift_is_squared():
    rng = np.random.default_rng(0)
    f = torch.from_numpy(rng.normal(size=(2000, 8)))
    mu, sigma = M.feature_stats(f)
    assert abs(M.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    shift = np.full(8, 0.5)
    assert M.frechet_distance(mu + shift, sigma, mu, sigma) == pytest.approx(8 * 0.25, rel=1e-6)


def test_fid_ratio_interval_is_paired():
    rng = np.random.default_rng(0)
    mu, sigma = np.zeros(8), np.eye(8)  # the "real" statistics
    a = torch.from_numpy(rng.normal(0.3, 1.0, size=(1000, 8)))  # a model a little off
    ratio, lo, hi = M.fid_ratio_interval(a, a, mu, sigma, resamples=100)
    assert ratio == pytest.approx(1.0) and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    # the same images, each moved further off: the ratio is above 1 and the interval says so
    moved = a + 0.1
    ratio, lo, hi = M.fid_ratio_interval(a, moved, mu, sigma, resamples=100)
    assert 1 < lo < ratio < hi
    fid = [M.frechet_distance(*M.feature_stats(f), mu, sigma) for f in (a, moved)]
    assert ratio == pytest.approx(fid[1] / fid[0], rel=1e-9)  # the same FID as frechet_distance
    # an independent draw of the same model: not distinguishable, and a far wider interval
    b = torch.from_numpy(rng.normal(0.3, 1.0, size=(1000, 8)))
    _, lo_b, hi_b = M.fid_ratio_interval(a, b, mu, sigma, resamples=100)
    assert lo_b < 1 < hi_b and hi_b - lo_b > 3 * (hi - lo)
    with pytest.raises(ValueError, match="one shape"):
        M.fid_ratio_interval(a, a[:10], mu, sigma)


def test_inception_score_bounds():
    confident = torch.eye(10).repeat(5, 1)
    assert M.inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    assert M.inception_score(torch.full((50, 10), 0.1)) == pytest.approx(1.0, rel=1e-6)
    one_class = torch.zeros(50, 10)
    one_class[:, 3] = 1
    assert M.inception_score(one_class) == pytest.approx(1.0, rel=1e-6)


def test_label_agreement_and_accuracy():
    p = torch.eye(10)
    q = p.clone()
    q[:3] = q[:3].roll(1, dims=1)
    assert M.label_agreement(p, p) == 1.0 and M.label_agreement(p, q) == pytest.approx(0.7)
    assert M.accuracy(p, torch.arange(10)) == 1.0


def test_classifier_heldout_accuracy():
    from tfmq.data import split
    from tfmq.quality.classifier import classify, load_classifier

    d = split()
    _, probs = classify(load_classifier(), torch.from_numpy(d.heldout_images))
    assert M.accuracy(probs, torch.from_numpy(d.heldout_labels)) >= 0.98


def test_fid_of_real_digits_with_themselves_is_near_zero():
    from tfmq.data import load_digits
    from tfmq.quality.classifier import load_classifier
    from tfmq.quality.harness import fid_reference, sample_metrics

    x, _ = load_digits()
    m, _, _ = sample_metrics(load_classifier(), torch.from_numpy(x), None)
    assert abs(m["fid_mnist"]) < 1e-3  # the reference statistics are these 5,000 digits'
    mu, sigma = fid_reference()
    assert mu.shape == (128,) and sigma.shape == (128, 128)
