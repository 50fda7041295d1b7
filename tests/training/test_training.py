"""The training script is deterministic: the same seed gives bit-identical weights."""
import subprocess
import sys

import pytest
import torch
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


def train_sd(out, seed):
    cmd = [sys.executable, str(REPO / "training" / "train_sd.py"), "--vae-steps", "2", "--steps", "2", "--batch", "4",
           "--threads", "1", "--seed", str(seed), "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    return {part: load_file(str(out / part / f)) for part, f in (("unet", "diffusion_pytorch_model.safetensors"),
                                                                  ("vae", "diffusion_pytorch_model.safetensors"),
                                                                  ("text_encoder", "model.safetensors"))}


@pytest.mark.slow
def test_the_text_to_image_reference_trains_deterministically_into_a_pipeline_folder(tmp_path):
    """mnist-sd's script: the same seed gives the same weights of all three parts, another seed
    others; the folder is a StableDiffusionPipeline that diffusers and tfmq load, with the VAE's
    measured latent scale and captions the tokenizer holds whole."""
    import importlib.util
    import json

    from diffusers import StableDiffusionPipeline

    from tfmq.models import load_model

    spec = importlib.util.spec_from_file_location("train_sd", REPO / "training" / "train_sd.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    a, b, c = train_sd(tmp_path / "a", 0), train_sd(tmp_path / "b", 0), train_sd(tmp_path / "c", 1)
    for part in a:
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
        assert any(not torch.equal(a[part][k], c[part][k]) for k in a[part]), part
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "a", local_files_only=True)
    meta = json.loads((tmp_path / "a" / "training.json").read_text())
    assert pipe.vae.config.scaling_factor == meta["scaling_factor"] > 0
    longest = max((script.caption(d, k) for d in range(10) for k in range(len(script.TEMPLATES))), key=len)
    ids = pipe.tokenizer(longest, truncation=False).input_ids
    assert len(ids) <= script.TOKENS and ids[-1] == pipe.tokenizer.eos_token_id
    model = load_model(str(tmp_path / "a"))
    assert model.sample_shape == (4, 16, 16) and model.vae is not None
    assert (tmp_path / "a" / "train_log.csv").read_text().startswith("stage,step,loss")
