"""The class-token encoder of ``mnist-cond``: the small stand-in for Stable Diffusion's text encoder.

A digit label (0-9, or the null label 10 for classifier-free guidance) maps to a learned
sequence of ``tokens`` vectors of width ``dim``; the UNet attends to it through
cross-attention as ``encoder_hidden_states`` [B, tokens, dim]. Several tokens (not one) keep
the cross-attention softmax non-trivial, as it is with a real prompt.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

WEIGHTS_NAME = "embeddings.safetensors"
CONFIG_NAME = "config.json"


class ClassTokenEmbedder(nn.Module):
    def __init__(self, num_classes: int = 10, tokens: int = 4, dim: int = 64):
        super().__init__()
        self.num_classes = num_classes
        self.tokens = tokens
        self.dim = dim
        self.weight = nn.Parameter(torch.randn(num_classes + 1, tokens, dim) * 0.5)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.weight[labels]

    def config(self) -> dict:
        return {"num_classes": self.num_classes, "tokens": self.tokens, "dim": self.dim,
                "null_label": self.null_label}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config(), indent=2) + "\n")
        save_file({"weight": self.weight.detach().contiguous()}, str(folder / WEIGHTS_NAME))
