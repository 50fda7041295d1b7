"""A Stable Diffusion pipeline folder through tfmq-export to every target, and tfmq-parity on the
artifact: what the artifact asked the model for (prompts, or encoder states from a file) travels
with it, so the re-check asks for the same thing."""
import json
import shutil

import pytest
import tiny_sd

from helpers import FAST, cli, summary_row
from tfmq.hostcpu import int8_dot_saturates

pytestmark = pytest.mark.slow
# a CPU without VNNI: OpenVINO's u8 x s8 kernels saturate and its export fails parity, saying so
# (tests/targets/openvino checks that path); every other target passes there
SATURATES = int8_dot_saturates()


def test_tiny_sd_pipeline_to_every_target_and_rechecked(sd_pipe, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bicycle\na bowl of ramen\n")
    out = tmp_path / "a"
    proc = cli("tfmq-export", "--model", sd_pipe, "--prompts", prompts, "--target", "all", *FAST, "--out", out)
    if SATURATES:
        assert proc.returncode == 2 and "parity failed for openvino (" in proc.stderr, proc.stderr
        assert "this CPU has no VNNI" in proc.stdout, proc.stdout
    else:
        assert proc.returncode == 0, proc.stderr
    for t in ("onnx", "coreml", "tensorrt") + (() if SATURATES else ("openvino",)):
        assert "PASSED" in summary_row(proc.stdout, t), proc.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["conditioning"] == {"kind": "prompts", "prompts": ["a red bicycle", "a bowl of ramen"],
                                          "negative": ""}
    assert m["schedule"]["guidance"] == 7.5 and m["model"]["vae"] is True
    assert "no judge" in json.loads((out / "reference" / "metrics.json").read_text())["metrics"]
    re = cli("tfmq-parity", out)
    assert re.returncode == (2 if SATURATES else 0), re.stdout + re.stderr
    assert "PASSED" in summary_row(re.stdout, "fp32") and "PASSED" in summary_row(re.stdout, "onnx")


def test_v_prediction_pipeline_at_its_own_guidance(tmp_path):
    pipe = tiny_sd.pipeline(tmp_path / "sd2", prediction_type="v_prediction")
    out = tmp_path / "a"
    proc = cli("tfmq-export", "--model", pipe, "--target", "onnx", "--guidance", "3", *FAST, "--out", out)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["scheduler_config"]["prediction_type"] == "v_prediction" and m["schedule"]["guidance"] == 3.0
    assert m["targets"]["onnx"]["parity"]["passed"] is True


def test_bare_unet_with_encoder_states_file(sd_bare, tmp_path):
    folder, states = sd_bare
    out = tmp_path / "a"
    proc = cli("tfmq-export", "--model", folder, "--encoder-hidden-states", states, "--target", "onnx", *FAST,
               "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert (out / "conditioning.safetensors").read_bytes() == (out / "conditioning.safetensors").read_bytes()
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["conditioning"]["kind"] == "states" and "conditioning.safetensors" in m["digests"]
    assert cli("tfmq-parity", out).returncode == 0
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    tiny_sd.encoder_states(bad / "conditioning.safetensors", seed=1)  # other states: another artifact
    re = cli("tfmq-parity", bad)
    assert re.returncode == 2 and "conditioning.safetensors" in summary_row(re.stdout, "files")
