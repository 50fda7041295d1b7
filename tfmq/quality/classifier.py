"""The project's digit classifier: the feature network of FID-mnist, the Inception-score
analogue and conditional accuracy. Trained by training/train_classifier.py on the same
split as the diffusion models; weights ship in the package (safetensors)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "assets" / "classifier"
FEATURES = 128


class DigitClassifier(nn.Module):
    """A small CNN on 32x32 digits in [-1, 1]; ``features`` is its 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(128, FEATURES), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_classifier(folder: Path = CLASSIFIER_DIR) -> DigitClassifier:
    from safetensors.torch import load_file

    model = DigitClassifier()
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, 128], softmax probabilities [N, 10]) for images in [-1, 1]."""
    feats, probs = [], []
    for s in range(0, len(images), batch):
        f = model.features(images[s:s + batch].clamp(-1, 1).float())
        feats.append(f)
        probs.append(model.head(f).softmax(-1))
    return torch.cat(feats), torch.cat(probs)
