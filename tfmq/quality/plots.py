"""PNG outputs people look at: sample grids, FP32-vs-candidate pairs, per-step curves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tfmq.quality.metrics import to_unit


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10, scale: int = 2) -> None:
    """Images [N, C, H, W] in [-1, 1] as one PNG, ``nrow`` per row, 2 px gaps: RGB for 3
    channels, else the first channel in grayscale (a latent without a VAE)."""
    from PIL import Image

    rgb = images.shape[1] == 3
    x = to_unit(images)
    x = (x.permute(0, 2, 3, 1) if rgb else x[:, 0]).numpy()
    x = (x * 255).round().astype(np.uint8)
    n, h, w = x.shape[:3]
    rows = (n + nrow - 1) // nrow
    canvas = np.full((rows * (h + 2) + 2, nrow * (w + 2) + 2, *x.shape[3:]), 128, np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = x[i]
    img = Image.fromarray(canvas)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def save_pairs(reference: torch.Tensor, candidate: torch.Tensor, path: Path, n: int = 20) -> None:
    """Rows alternate FP32 / candidate for the first ``n`` seeds (10 per row)."""
    n = min(n, len(reference))
    rows = []
    for s in range(0, n, 10):
        rows += [reference[s:s + 10], candidate[s:s + 10]]
    save_grid(torch.cat(rows), path, nrow=10)


def plot_curves(x, series: dict[str, list[float]], path: Path, xlabel: str, ylabel: str, title: str,
                logy: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in series.items():
        ax.plot(x, ys, marker=".", lw=1, label=name)
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.set_title(title)
    if logy and any(v > 0 for ys in series.values() for v in ys):  # all-zero curves stay linear
        ax.set_yscale("log")
    ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
