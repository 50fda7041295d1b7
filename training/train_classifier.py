"""Train the quality harness's digit classifier (CPU, seeded) and its FID reference statistics.

    python training/train_classifier.py --out tfmq/assets/classifier

Trains on the 4,500-image split (random shifts and small rotations, so generated digits
that are not perfectly centred still classify), reports held-out accuracy on the other
500, and writes model.safetensors, fid_reference.safetensors (mean and covariance of the
penultimate features of all 5,000 real digits) and info.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tfmq.data import load_digits, split
from tfmq.quality.classifier import DigitClassifier, classify


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = len(x)
    angle = (torch.rand(n, generator=gen) - 0.5) * 0.5  # +-14 degrees
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.25  # +-2 pixels of 32
    scale = 1 + (torch.rand(n, generator=gen) - 0.5) * 0.2
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    d = split()
    x, y = torch.from_numpy(d.train_images), torch.from_numpy(d.train_labels)
    hx, hy = torch.from_numpy(d.heldout_images), torch.from_numpy(d.heldout_labels)
    model = DigitClassifier()
    steps = a.epochs * ((len(x) + a.batch - 1) // a.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    t0 = time.time()
    for epoch in range(a.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), a.batch):
            idx = perm[s:s + a.batch]
            loss = F.cross_entropy(model(augment(x[idx], gen)), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        _, p = classify(model, hx)
        acc = (p.argmax(1) == hy).float().mean().item()
        print(f"epoch {epoch + 1}/{a.epochs} loss {loss.item():.3f} held-out acc {acc:.4f} {time.time() - t0:.0f}s",
              flush=True)
    model.eval()
    all_x, _ = load_digits()
    feats, _ = classify(model, torch.from_numpy(all_x))
    mu, sigma = feats.double().mean(0), torch.cov(feats.double().T)
    a.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(a.out / "model.safetensors"))
    save_file({"mu": mu, "sigma": sigma}, str(a.out / "fid_reference.safetensors"))
    info = {"heldout_accuracy": acc, "heldout_images": len(hx), "train_images": len(x), "epochs": a.epochs,
            "seed": a.seed, "seconds": round(time.time() - t0, 1), "fid_reference": "all 5000 real digits",
            "torch": torch.__version__, "command": "python training/train_classifier.py --out tfmq/assets/classifier"}
    (a.out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
