"""Loading: both bundled models, both folder layouts, and every kind of bad input."""
import json
import logging
import shutil

import pytest
import torch

from tfmq.errors import ModelLoadError, UnsupportedModel
from tfmq.models import BUNDLED, load_model


def test_bundled_unconditional(ddpm):
    assert type(ddpm.unet).__name__ == "UNet2DModel"
    assert not ddpm.conditional and ddpm.conditioning is None and ddpm.vae is None and ddpm.bundled
    assert ddpm.sample_shape == (1, 32, 32)
    assert ddpm.scheduler_config["num_train_timesteps"] == 1000
    assert ddpm.scheduler_config["beta_schedule"] == "linear"
    assert 0.8e6 < sum(p.numel() for p in ddpm.unet.parameters()) < 1.5e6
    assert ddpm.info["steps"] >= 5000, "the bundled model should be the fully trained one"


def test_bundled_conditional(cond):
    assert type(cond.unet).__name__ == "UNet2DConditionModel"
    assert cond.conditional
    assert cond.conditioning.kind == "labels" and cond.default_guidance == 1.0
    emb = cond.conditioning.embedder
    assert emb.num_classes == 10 and emb.null_label == 10
    assert emb(torch.tensor([3])).shape == (1, emb.tokens, cond.unet.config.cross_attention_dim)
    c, u = cond.conditioning.states(12)
    assert torch.equal(c, emb(torch.arange(12) % 10)) and torch.equal(u, emb(torch.full((12,), 10)))


def test_pipeline_folder_by_path(tmp_path):
    dst = tmp_path / "pipe"
    shutil.copytree(BUNDLED["mnist-ddpm"], dst)
    m = load_model(str(dst))
    assert m.scheduler_source.endswith("scheduler/scheduler_config.json")
    ref = load_model("mnist-ddpm")
    for (k, a), (_, b) in zip(m.unet.state_dict().items(), ref.unet.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_bare_unet_folder_uses_default_schedule_and_says_so(tmp_path, caplog):
    dst = tmp_path / "bare"
    shutil.copytree(BUNDLED["mnist-ddpm"] / "unet", dst)
    with caplog.at_level(logging.INFO, logger="tfmq"):
        m = load_model(dst)
    assert m.scheduler_source == "default"
    assert m.scheduler_config["num_train_timesteps"] == 1000
    assert "standard 1000-step linear-beta DDPM schedule" in caplog.text


def test_bare_unet_folder_reads_scheduler_config_beside_it(tmp_path):
    dst = tmp_path / "bare"
    shutil.copytree(BUNDLED["mnist-ddpm"] / "unet", dst)
    cfg = json.loads((BUNDLED["mnist-ddpm"] / "scheduler" / "scheduler_config.json").read_text())
    cfg["beta_end"] = 0.012
    (dst / "scheduler_config.json").write_text(json.dumps(cfg))
    m = load_model(dst)
    assert m.scheduler_config["beta_end"] == 0.012
    assert m.ddim_scheduler().config.beta_end == 0.012


def test_missing_path():
    with pytest.raises(ModelLoadError, match="no such model"):
        load_model("/nonexistent/dir/model")


def test_folder_without_unet_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no UNet config"):
        load_model(tmp_path / "empty")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_safetensors(tmp_path, damage):
    dst = tmp_path / "bad"
    shutil.copytree(BUNDLED["mnist-ddpm"], dst)
    w = dst / "unet" / "diffusion_pytorch_model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 64)
    with pytest.raises(ModelLoadError, match="cannot read the UNet weights"):
        load_model(dst)


def test_unsupported_model_class(tmp_path):
    dst = tmp_path / "vae"
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(UnsupportedModel, match="AutoencoderKL.*UNet2DModel and UNet2DConditionModel"):
        load_model(dst)


def test_pickle_weights_are_refused(tmp_path):
    dst = tmp_path / "pickled"
    shutil.copytree(BUNDLED["mnist-ddpm"] / "unet", dst)
    (dst / "diffusion_pytorch_model.safetensors").rename(dst / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(dst)


def test_weights_that_do_not_fit_the_config(tmp_path):
    dst = tmp_path / "mismatch"
    shutil.copytree(BUNDLED["mnist-ddpm"] / "unet", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["block_out_channels"] = [32, 64, 128]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="do not fit the config"):
        load_model(dst)


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="expected a diffusers folder"):
        load_model(f)
