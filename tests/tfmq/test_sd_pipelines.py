"""Text-to-image pipelines as input: a StableDiffusionPipeline folder's prompts go through its
own tokenizer and text encoder; a bare UNet2DConditionModel takes encoder states from a file or
is refused in one line; the reference stage fits a model that is not a bundled digit model."""
import json
import shutil

import numpy as np
import pytest
import tiny_sd
import torch
from safetensors.torch import save_file

from helpers import cli, one_line_error
from tfmq.calibration.calibset import record
from tfmq.conditioning import TEXT_GUIDANCE, read_prompts
from tfmq.models import ConditioningSource, load_model
from tfmq.quality.harness import EvalConfig, evaluate
from tfmq.reference import check_reference, write_reference


def test_prompts_are_encoded_as_the_diffusers_pipeline_encodes_them(sd_pipe):
    from diffusers import StableDiffusionPipeline

    m = load_model(sd_pipe, ConditioningSource(prompts=["a red bicycle", "a cat"]))
    assert m.conditioning.kind == "prompts" and m.default_guidance == TEXT_GUIDANCE and m.vae is not None
    cond, uncond = m.conditioning.states(5)
    assert cond.shape == (5, tiny_sd.TOKENS, 32) and uncond.shape == cond.shape
    pipe = StableDiffusionPipeline.from_pretrained(sd_pipe)
    want, neg = pipe.encode_prompt(["a red bicycle", "a cat"], "cpu", 1, True, negative_prompt=None)
    assert torch.allclose(cond[:2], want, atol=1e-6) and torch.allclose(uncond[:1], neg[:1], atol=1e-6)
    assert torch.equal(cond[2], cond[0]) and torch.equal(cond[3], cond[1])  # prompts cycle over the samples


def test_the_shipped_prompts_are_the_default(sd_pipe):
    m = load_model(sd_pipe)
    shipped = read_prompts()
    assert m.conditioning.prompts == shipped and len(shipped) >= 30 and len(set(shipped)) == len(shipped)


def test_bare_unet_takes_encoder_states_from_a_file(sd_bare):
    folder, states = sd_bare
    m = load_model(folder, ConditioningSource(encoder_states=states))
    cond, uncond = m.conditioning.states(4)
    assert cond.shape == (4, tiny_sd.TOKENS, 32) and torch.equal(cond[3], cond[0]) and torch.equal(uncond[0], uncond[3])
    assert m.conditioning.describe()["entries"] == 3


def test_calibration_set_records_the_prompts_at_the_pipeline_guidance(sd_pipe):
    m = load_model(sd_pipe, ConditioningSource(prompts=["a", "b"]))
    cs = record(m, seeds=3, steps=3)
    assert cs.guidance == TEXT_GUIDANCE and cs.x.shape == (3, 3, 4, 8, 8)
    assert torch.equal(cs.cond, m.conditioning.states(3)[0])
    assert cs.meta["conditioning"] == {"kind": "prompts", "prompts": ["a", "b"], "negative": ""}
    assert record(m, seeds=2, steps=3, guidance=2.0).guidance == 2.0


def test_ddim_clips_x0_only_where_the_model_scheduler_does(sd_pipe):
    """A PNDM config (Stable Diffusion's) states no clip_sample; DDIM's default (clip x0 to
    [-1, 1], for pixel models) would squash every latent step. The bundled DDPM configs clip."""
    from tfmq.models import load_model

    assert load_model(str(sd_pipe)).ddim_scheduler().config.clip_sample is False
    assert load_model("mnist-ddpm").ddim_scheduler().config.clip_sample is True


def test_only_a_text_to_image_pipeline_gets_a_client_folder(sd_pipe, sd_bare):
    from tfmq.exporter.client_folder import why_not

    folder, states = sd_bare
    assert why_not(load_model(str(sd_pipe))) is None
    assert "not a text-to-image pipeline" in why_not(load_model("mnist-cond"))
    assert "not loaded from a diffusers pipeline" in why_not(load_model(folder, ConditioningSource(encoder_states=states)))


def test_reference_stage_of_a_latent_model_uses_paired_metrics_only(sd_pipe, tmp_path):
    m = load_model(sd_pipe, ConditioningSource(prompts=["a", "b"]))
    cfg = EvalConfig(n=3, steps=3, guidance=TEXT_GUIDANCE)
    report = write_reference(m, tmp_path / "ref", cfg, progress=False)
    assert "fid_mnist" not in report["fp32"] and "no judge" in report["metrics"]
    assert (tmp_path / "ref" / "grid_fp32.png").is_file() and check_reference(m, tmp_path / "ref")["passed"]
    noisy = evaluate(m, [], cfg, progress=False)
    assert noisy["config"]["guidance"] == TEXT_GUIDANCE


def test_candidate_metrics_decode_through_the_vae(sd_pipe):
    from tfmq.quality.harness import Candidate
    from tfmq.sampling import unet_denoiser

    m = load_model(sd_pipe, ConditioningSource(prompts=["a"]))
    den = unet_denoiser(m.unet)
    rep = evaluate(m, [Candidate("scaled", lambda x, t, c: den(x, t, c) * 1.01)], EvalConfig(n=2, steps=3),
                   progress=False)["candidates"]["scaled"]
    assert {"psnr_db", "ssim", "latent_psnr_db", "per_step_latent_rel_err"} <= set(rep)
    assert "fid_ratio" not in rep and np.isfinite(rep["psnr_db"])


def test_a_three_channel_unet_gets_through_the_reference_stage(tmp_path):
    # the MNIST classifier ran on every model's samples: a 3-channel UNet crashed the FP32 stage
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=8).save_pretrained(tmp_path / "rgb")
    proc = cli("tfmq-export", "--model", tmp_path / "rgb", "--n", "2", "--steps", "2", "--out", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    assert "fid_mnist" not in json.loads((tmp_path / "a" / "reference" / "metrics.json").read_text())["fp32"]


# bad input: one line, non-zero exit, nothing written


def _refused(tmp_path, *args, prog="tfmq-export"):
    out = tmp_path / "out"
    line = one_line_error(cli(prog, *args, "--out", out), prog)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return line


def test_bare_unet_without_states_says_what_to_pass(sd_bare, tmp_path):
    line = _refused(tmp_path, "--model", sd_bare[0], "--target", "onnx")
    assert "--encoder-hidden-states" in line
    assert "--encoder-hidden-states" in _refused(tmp_path, "--model", sd_bare[0], prog="tfmq-calibrate")


@pytest.mark.parametrize("part", ["text_encoder", "tokenizer"])
def test_pipeline_missing_its_text_encoder_or_tokenizer(sd_pipe, tmp_path, part):
    broken = tmp_path / "pipe"
    shutil.copytree(sd_pipe, broken)
    shutil.rmtree(broken / part)
    assert f"no {part}/" in _refused(tmp_path, "--model", broken)


@pytest.mark.parametrize("content,says", [(b"", "holds no prompts"), (b"\n  \n", "holds no prompts"),
                                          (b"a cat\n\xff\xfe dog\n", "not UTF-8")])
def test_bad_prompts_file(sd_pipe, tmp_path, content, says):
    f = tmp_path / "prompts.txt"
    f.write_bytes(content)
    assert says in _refused(tmp_path, "--model", sd_pipe, "--prompts", f)


def test_missing_prompts_file(sd_pipe, tmp_path):
    assert "cannot read the prompts file" in _refused(tmp_path, "--model", sd_pipe, "--prompts", tmp_path / "none.txt")


@pytest.mark.parametrize("tensors,says", [
    ({"encoder_hidden_states": torch.zeros(2, 16, 48)}, "48 wide"),
    ({"states": torch.zeros(2, 16, 32)}, "must hold 'encoder_hidden_states'"),
    ({"encoder_hidden_states": torch.zeros(16, 32)}, "[P, L, D]"),
    ({"encoder_hidden_states": torch.full((1, 16, 32), float("nan"))}, "NaN"),
    ({"encoder_hidden_states": torch.zeros(2, 16, 32), "negative_encoder_hidden_states": torch.zeros(2, 8, 32)},
     "does not fit"),
])
def test_bad_encoder_states(sd_bare, tmp_path, tensors, says):
    f = tmp_path / "states.safetensors"
    save_file(tensors, str(f))
    assert says in _refused(tmp_path, "--model", sd_bare[0], "--encoder-hidden-states", f)


def test_states_without_negative_run_at_guidance_one(sd_bare, tmp_path):
    f = tiny_sd.encoder_states(tmp_path / "s.safetensors", negative=False)
    line = _refused(tmp_path, "--model", sd_bare[0], "--encoder-hidden-states", f, "--guidance", "7.5")
    assert "needs unconditional states" in line
    m = load_model(sd_bare[0], ConditioningSource(encoder_states=f))
    assert m.default_guidance == 1.0
    proc = cli("tfmq-export", "--model", sd_bare[0], "--encoder-hidden-states", f, "--n", "2", "--steps", "2",
               "--out", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr


def test_not_safetensors_states(sd_bare, tmp_path):
    f = tmp_path / "states.safetensors"
    f.write_bytes(b"\x80\x04pickle")
    assert "cannot read the encoder states" in _refused(tmp_path, "--model", sd_bare[0], "--encoder-hidden-states", f)


def test_prompts_for_a_model_that_takes_labels(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n")
    assert "labels" in _refused(tmp_path, "--model", "mnist-cond", "--prompts", f)
    assert "neither prompts" in _refused(tmp_path, "--model", "mnist-ddpm", "--prompts", f)
