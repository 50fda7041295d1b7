"""Image-quality metrics. Images are [N, 1, H, W] tensors in [-1, 1] (the models' range).

Paired metrics (PSNR, SSIM, label agreement) compare image i of a candidate with image i of
the FP32 model drawn from the same seed: far less noisy than FID on a few hundred images.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (the range PSNR and SSIM are defined on here)."""
    return ((images.float().clamp(-1, 1) + 1) / 2)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on the [0, 1] range; inf where the images are identical."""
    mse = (to_unit(a) - to_unit(b)).pow(2).flatten(1).mean(1).double()
    return torch.where(mse == 0, torch.full_like(mse, math.inf), 10 * torch.log10(1.0 / mse))


def mean_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of the mean squared error over the set (the robust 'image PSNR vs FP32' figure):
    one identical pair does not make it infinite, one bad pair shows."""
    mse = (to_unit(a) - to_unit(b)).pow(2).mean().double().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).float()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03;
    images smaller than 11 px take the largest odd window that fits)."""
    x, y = to_unit(a), to_unit(b)
    c = x.shape[1]
    size = min(11, *x.shape[-2:])
    w = _gaussian_window(size - (size + 1) % 2).to(x.dtype).repeat(c, 1, 1, 1)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mx ** 2
    syy = F.conv2d(y * y, w, groups=c) - my ** 2
    sxy = F.conv2d(x * y, w, groups=c) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def label_agreement(probs_a: torch.Tensor, probs_b: torch.Tensor) -> float:
    """Fraction of pairs the classifier puts in the same class."""
    return (probs_a.argmax(1) == probs_b.argmax(1)).float().mean().item()


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return (probs.argmax(1) == labels).float().mean().item()


def feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), as in Heusel et al. (FID)."""
    from scipy import linalg

    diff = mu1 - mu2
    with warnings.catch_warnings():  # fewer samples than features: singular, handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as pytorch-fid does
        eps = np.eye(len(mu1)) * 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_ratio_interval(reference: torch.Tensor, candidate: torch.Tensor, mu: np.ndarray, sigma: np.ndarray,
                       resamples: int = 300, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """FID(candidate) / FID(reference) against the statistics (mu, sigma), with a paired bootstrap
    interval: features [N, D] of images drawn from the same seeds, row i of each from seed i;
    each resample draws N row indices with replacement and uses them for both sets, so the
    interval is that of the ratio, not of two independent FIDs. A resample repeats images, which
    raises both FIDs and pulls its ratio towards 1, so the interval is the basic (reverse
    percentile) one, 2 r - q, which undoes that shift (the plain percentile interval leans
    towards 1). Returns (ratio, low, high)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"paired features must have one shape: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    a, b = reference.double().numpy(), candidate.double().numpy()
    # Tr (S sigma)^1/2 = Tr (R S R)^1/2 with R = sigma^1/2 (symmetric): R once, then one symmetric
    # eigenvalue problem per FID instead of a general matrix square root (16x faster at 128-d)
    w, v = np.linalg.eigh(sigma)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_sigma = np.trace(sigma)

    def fid(f):
        s = np.cov(f, rowvar=False)
        diff = f.mean(0) - mu
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s @ root), 0, None)).sum()
        return float(diff @ diff + np.trace(s) + tr_sigma - 2 * tr_covmean)

    ratio = fid(b) / fid(a)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        idx = rng.integers(0, len(a), len(a))
        draws.append(fid(b[idx]) / fid(a[idx]))
    q_lo, q_hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(ratio), float(2 * ratio - q_hi), float(2 * ratio - q_lo)


def inception_score(probs: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) with the digit classifier: 1 (all one class, or all
    ambiguous) up to 10 (confident and balanced over the ten digits)."""
    p = probs.double().clamp_min(1e-12)
    py = p.mean(0, keepdim=True)
    return float(torch.exp((p * (p.log() - py.log())).sum(1).mean()))
