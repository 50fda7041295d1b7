"""The training script is deterministic: the same seed gives bit-identical weights."""
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from helpers import REPO


def train(out, seed):
    cmd = [sys.executable, str(REPO / "training" / "train_unet.py"), "--model", "mnist-cond", "--steps", "2",
           "--batch", "4", "--threads", "1", "--seed", str(seed), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_same_seed_same_weights(tmp_path):
    a, b, c = train(tmp_path / "a", 0), train(tmp_path / "b", 0), train(tmp_path / "c", 1)
    assert all((a[k] == b[k]).all() for k in a)
    assert any(not (a[k] == c[k]).all() for k in a)
    assert (tmp_path / "a" / "train_log.csv").read_text().startswith("step,loss")
    assert (tmp_path / "a" / "class_embedder" / "embeddings.safetensors").is_file()
