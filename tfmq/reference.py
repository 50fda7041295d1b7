"""The FP32 reference stage of every artifact: what the unquantized model makes.

It writes a sample grid and FP32 metrics (FID-mnist, IS, conditional accuracy) and a few
golden (seed -> final image) pairs, so ``tfmq-parity`` can later re-run FP32 sampling on
another machine and check it reproduces: the ground every quantized target is compared on.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from tfmq.artifacts import ArtifactError
from tfmq.models import DiffusionModel
from tfmq.quality.harness import EvalConfig, evaluate
from tfmq.quality.metrics import mean_psnr
from tfmq.sampling import ddim_sample, initial_noise, unet_denoiser

GOLDEN_IMAGES = 8
# FP32 sampling on another CPU or thread count reorders float sums; far above that (132 dB
# measured, 1 vs 2 threads) and far below what bf16 weights alone do (33 dB): docs/results.md
REPRODUCE_MIN_PSNR_DB = 60.0


def write_reference(model: DiffusionModel, folder: Path, cfg: EvalConfig, progress: bool = True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    samples: list[torch.Tensor] = []
    report = evaluate(model, [], cfg, out_dir=folder, progress=progress, fp32_images=samples)
    seeds = np.arange(cfg.seed, cfg.seed + min(GOLDEN_IMAGES, cfg.n))
    images = samples[0][:len(seeds)].clone()  # image i is the same in any batch: the metrics' run
    np.savez(folder / "golden.npz", seeds=seeds, images=images.numpy(), steps=np.int64(cfg.steps),
             guidance=np.float64(cfg.guidance))
    return report


def _golden_images(model: DiffusionModel, seeds: np.ndarray, cfg: EvalConfig) -> torch.Tensor:
    noise = initial_noise(seeds.tolist(), model.sample_shape)
    return ddim_sample(model, unet_denoiser(model.unet), noise, steps=cfg.steps, guidance=cfg.guidance).images


def check_reference(model: DiffusionModel, folder: Path) -> dict:
    """Re-run the golden seeds in FP32 here and compare with the stored images."""
    path = folder / "golden.npz"
    try:
        with np.load(path, allow_pickle=False) as g:
            if set(g.files) != {"seeds", "images", "steps", "guidance"}:
                raise ArtifactError(f"{path} is damaged: it holds {sorted(g.files)}")
            seeds, stored = g["seeds"], torch.from_numpy(g["images"])
            cfg = EvalConfig(n=len(seeds), seed=int(seeds[0]), steps=int(g["steps"]), guidance=float(g["guidance"]))
    except FileNotFoundError as e:
        raise ArtifactError(f"{path} is missing: the artifact is incomplete") from e
    except (OSError, KeyError, ValueError, IndexError, TypeError, zipfile.BadZipFile, EOFError) as e:
        raise ArtifactError(f"{path} is damaged: {e}") from e
    if stored.shape[0] != len(seeds) or tuple(stored.shape[1:]) != tuple(model.sample_shape):
        raise ArtifactError(f"{path} is damaged: {len(seeds)} seeds for images of shape {tuple(stored.shape)}")
    now = _golden_images(model, seeds, cfg)
    psnr = mean_psnr(stored, now)
    return {"level": "fp32-reproduce", "images": int(len(seeds)), "psnr_db": psnr if np.isfinite(psnr) else "inf",
            "max_abs_diff": float((stored - now).abs().max()), "min_psnr_db": REPRODUCE_MIN_PSNR_DB,
            "passed": bool(psnr >= REPRODUCE_MIN_PSNR_DB)}
