"""The quality harness: the measuring stick for every quantized model and runtime backend.

:func:`evaluate` generates N images with the same seeds from the FP32 model and from each
candidate (any Denoiser: a fake-quant torch module, an ONNX Runtime session, ...) and
reports, for candidates, the paired metrics against FP32 that need no judge (image PSNR and
SSIM, decoded through the pipeline's VAE where the model is a latent one, and the latent error
at every denoising step), for torch-module candidates the temporal-feature error per timestep,
and, for the bundled digit models only, what the project's MNIST classifier judges: FID-mnist,
the Inception-score analogue, conditional accuracy and label agreement.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from tfmq.models import DiffusionModel
from tfmq.quality import metrics as M
from tfmq.quality.classifier import CLASSIFIER_DIR, classify, load_classifier
from tfmq.quality.plots import plot_curves, save_grid, save_pairs
from tfmq.sampling import DEFAULT_STEPS, Denoiser, ddim_sample, initial_noise, unet_denoiser


@dataclass(frozen=True)
class EvalConfig:
    n: int = 1000
    seed: int = 0  # image i is drawn from seed + i
    steps: int = DEFAULT_STEPS
    guidance: float | None = None  # conditional models only; None: the model's default (7.5 for prompts)
    batch_size: int | None = None  # seeds per sampler batch (None: the model's sampler_batch)


@dataclass
class Candidate:
    name: str
    denoiser: Denoiser
    module: torch.nn.Module | None = None  # a torch UNet-like module, for the temporal-feature view


def fid_reference():
    from safetensors.torch import load_file

    ref = load_file(str(CLASSIFIER_DIR / "fid_reference.safetensors"))
    return ref["mu"].numpy(), ref["sigma"].numpy()


def sample_metrics(classifier, images: torch.Tensor, labels: torch.Tensor | None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """FID-mnist, IS and (given labels) conditional accuracy of one image set; also its
    classifier features and probabilities."""
    feats, probs = classify(classifier, images)
    mu, sigma = M.feature_stats(feats)
    out = {"fid_mnist": M.frechet_distance(mu, sigma, *fid_reference()), "inception_score": M.inception_score(probs)}
    if labels is not None:
        out["cond_accuracy"] = M.accuracy(probs, labels)
    return out, feats, probs


def per_step_error(reference: torch.Tensor, candidate: torch.Tensor) -> list[float]:
    """Mean relative L2 error of the candidate's latent at each step ([steps + 1, N, ...] inputs)."""
    d = (candidate - reference).flatten(2).norm(dim=2)
    r = reference.flatten(2).norm(dim=2).clamp_min(1e-12)
    return (d / r).mean(1).tolist()


@torch.no_grad()
def temporal_features(module: torch.nn.Module, timesteps: torch.Tensor, sample_shape, cross_dim: int | None):
    """The temporal features g_i(t) of every ResNet block (output of its time_emb_proj) at each
    timestep, captured by forward hooks: {module name inside the UNet: [T, C_i]} (a wrapper that
    holds the UNet as ``.unet``, such as the fake-quant model, gives the same names)."""
    found, hooks = {}, []
    for name, mod in module.named_modules():
        if name.endswith("time_emb_proj"):
            key = name.removeprefix("unet.")
            hooks.append(mod.register_forward_hook(lambda m, i, o, key=key: found.__setitem__(key, o.detach())))
    if not hooks:
        raise ValueError("module has no time_emb_proj layers: not a diffusers UNet")
    per_t = {}
    try:  # one call per timestep: quantized candidates select their parameters by step
        for t in timesteps.long():
            x, tt = torch.zeros(1, *sample_shape), t.reshape(1)
            if cross_dim is None:
                module(x, tt)
            else:
                module(x, tt, encoder_hidden_states=torch.zeros(1, 1, cross_dim))
            for k, v in found.items():
                per_t.setdefault(k, []).append(v)
    finally:
        for h in hooks:
            h.remove()
    found = {k: torch.cat(v) for k, v in per_t.items()}
    return found


def temporal_error(reference: dict, candidate: dict) -> list[float]:
    """Relative L2 error of all temporal features together, per timestep."""
    num = sum((candidate[k] - reference[k]).pow(2).sum(1) for k in reference)
    den = sum(reference[k].pow(2).sum(1) for k in reference)
    return (num.sqrt() / den.sqrt().clamp_min(1e-12)).tolist()


def resolved(cfg: EvalConfig, model: DiffusionModel) -> EvalConfig:
    """``cfg`` with the guidance it samples at (the model's default where it says None)."""
    if not model.conditional:
        return replace(cfg, guidance=1.0 if cfg.guidance is None else cfg.guidance)
    return cfg if cfg.guidance is not None else replace(cfg, guidance=model.default_guidance)


@torch.no_grad()
def decoded(model: DiffusionModel, samples: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """What a sample looks like: the VAE's decoding of a latent model's samples (in [-1, 1]),
    else the samples themselves (``batch_size`` default: 16, fewer where the sampler batches
    fewer)."""
    if model.vae is None:
        return samples
    batch_size = batch_size or min(16, model.sampler_batch)
    scale = float(model.vae.config.get("scaling_factor", 1.0) or 1.0)
    return torch.cat([model.vae.decode(samples[s:s + batch_size] / scale).sample.clamp(-1, 1)
                      for s in range(0, len(samples), batch_size)])


def evaluate(model: DiffusionModel, candidates: list[Candidate] = (), cfg: EvalConfig = EvalConfig(),
             out_dir: Path | None = None, progress: bool = True, fp32_images: list | None = None) -> dict:
    """Run FP32 and every candidate on the same seeds; return a JSON-ready report and, with
    ``out_dir``, write grids and per-step plots there. ``fp32_images``: a list that gets the
    FP32 sampler's final samples [n, C, H, W] (before decoding) appended."""
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):  # the report is keyed by name: one would silently replace the other
        raise ValueError(f"two candidates share a name: {sorted({n for n in names if names.count(n) > 1})}")
    cfg = resolved(cfg, model)
    judge = load_classifier() if model.bundled else None  # the MNIST classifier judges digits only
    noise = initial_noise(range(cfg.seed, cfg.seed + cfg.n), model.sample_shape)
    labels = model.conditioning.labels(cfg.n) if model.conditioning is not None else None
    record = bool(candidates)

    def run(den):
        t0 = time.time()
        traj = ddim_sample(model, den, noise, steps=cfg.steps, guidance=cfg.guidance,
                           record=record, batch_size=cfg.batch_size, progress=progress)
        return traj, time.time() - t0, decoded(model, traj.images)

    ref, secs, ref_images = run(unet_denoiser(model.unet))
    if fp32_images is not None:
        fp32_images.append(ref.images)
    report = {"model": model.name, "source": model.source, "config": asdict(cfg),
              "metrics": _what_is_measured(model, judge), "fp32": {"sampling_seconds": round(secs, 1)},
              "candidates": {}}
    if judge is not None:
        ref_metrics, ref_feats, ref_probs = sample_metrics(judge, ref_images, labels)
        report["fp32"] |= ref_metrics
    cross = model.cross_attention_dim
    ref_temporal = temporal_features(model.unet, ref.timesteps, model.sample_shape, cross)
    step_curves, temporal_curves = {}, {}
    for cand in candidates:
        traj, secs, images = run(cand.denoiser)
        m = {}
        if judge is not None:
            m, feats, probs = sample_metrics(judge, images, labels)
            ratio, lo, hi = M.fid_ratio_interval(ref_feats, feats, *fid_reference())
            m.update(fid_ratio=ratio, fid_ratio_ci95=[lo, hi], label_agreement=M.label_agreement(ref_probs, probs))
        m.update(psnr_db=M.mean_psnr(ref_images, images),
                 psnr_db_median=float(M.psnr(ref_images, images).median()),
                 ssim=float(M.ssim(ref_images, images).mean()),
                 sampling_seconds=round(secs, 1))
        if model.vae is not None:
            m["latent_psnr_db"] = M.mean_psnr(ref.images, traj.images)
        step_curves[cand.name] = m["per_step_latent_rel_err"] = per_step_error(ref.latents, traj.latents)
        if cand.module is not None:
            feats = temporal_features(cand.module, ref.timesteps, model.sample_shape, cross)
            temporal_curves[cand.name] = m["temporal_rel_err"] = temporal_error(ref_temporal, feats)
        report["candidates"][cand.name] = m
        if out_dir is not None:
            save_pairs(ref_images, images, out_dir / f"pairs_{_file_safe(cand.name)}.png")
    if out_dir is not None:
        save_grid(ref_images[:100], out_dir / "grid_fp32.png")
        if step_curves:
            plot_curves(range(cfg.steps + 1), step_curves, out_dir / "per_step_latent_error.png", "DDIM step",
                        "relative L2 error of x_t vs FP32", f"{model.name}: latent error per step")
        if temporal_curves:
            plot_curves(ref.timesteps.tolist(), temporal_curves, out_dir / "temporal_feature_error.png", "timestep t",
                        "relative L2 error of temporal features", f"{model.name}: temporal-feature error")
    return _finite(report)


def _what_is_measured(model: DiffusionModel, judge) -> str:
    images = "images decoded by the pipeline's VAE" if model.vae is not None else "the samples"
    if judge is not None:
        return f"paired PSNR/SSIM of {images}, and the MNIST classifier's FID-mnist, IS and accuracy"
    return (f"paired PSNR/SSIM of {images} and the per-step latent error; no FID, IS or text-image "
            "agreement: no judge for this model's images is available offline")


def cell(v) -> str:
    """One report value as a table cell: floats to 4 places, an interval [lo, hi] as lo-hi."""
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return "-".join(f"{x:.3f}" for x in v)
    return "" if v is None else str(v)


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _finite(obj):
    """JSON has no inf: write it as the string 'inf'."""
    if isinstance(obj, float) and math.isinf(obj):
        return "inf"
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
