"""The Core ML client folder of a text-to-image pipeline: the resource folder Apple's
ml-stable-diffusion Swift pipeline loads (Unet, TextEncoder, VAEDecoder packages and the
tokenizer files), with the interfaces its code reads; the interface check fails on a folder
that does not have them. Predicting the packages needs macOS (runtime_tests)."""
import json
import shutil

import numpy as np
import pytest

from helpers import cli

ct = pytest.importorskip("coremltools", reason="coremltools is not installed (pip install 'tfmq-dm[coreml]')")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(sd_pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("cm") / "a"
    proc = cli("tfmq-export", "--model", sd_pipe, "--target", "coreml", "--iters", "0", "--calib-seeds", "2",
               "--n", "2", "--steps", "4", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_the_swift_pipeline_finds_its_models_and_tokenizer_files(folder, sd_pipe):
    import tiny_sd

    from tfmq.targets.coreml.client import io_shapes

    pipe = folder / "coreml" / "pipeline"
    assert {p.name for p in pipe.iterdir()} == {"Unet.mlpackage", "TextEncoder.mlpackage", "VAEDecoder.mlpackage",
                                                "vocab.json", "merges.txt"}
    assert (pipe / "vocab.json").read_bytes() == (sd_pipe / "tokenizer" / "vocab.json").read_bytes()
    # the verified package, not a second conversion: the same files
    main = folder / "coreml" / "model.mlpackage"
    for f in main.rglob("*"):
        if f.is_file():
            assert (pipe / "Unet.mlpackage" / f.relative_to(main)).read_bytes() == f.read_bytes()
    u_in, u_out = io_shapes(ct, pipe / "Unet.mlpackage")
    t_in, t_out = io_shapes(ct, pipe / "TextEncoder.mlpackage")
    d_in, d_out = io_shapes(ct, pipe / "VAEDecoder.mlpackage")
    width = json.loads((sd_pipe / "text_encoder" / "config.json").read_text())["hidden_size"]
    latent = json.loads((sd_pipe / "unet" / "config.json").read_text())["sample_size"]
    assert u_in == {"sample": [2, 4, latent, latent], "timestep": [2],
                    "encoder_hidden_states": [2, width, 1, tiny_sd.TOKENS]}
    assert t_in == {"input_ids": [1, tiny_sd.TOKENS]}
    assert t_out["last_hidden_state"] == [1, tiny_sd.TOKENS, width]
    assert d_in == {"z": [1, 4, latent, latent]} and list(d_out) == ["image"]
    m = json.loads((folder / "manifest.json").read_text())
    c = m["targets"]["coreml"]["client_folder"]
    assert c["interface"] == "checked" and c["latent_scale_correction"] == 1.0
    assert "coreml/pipeline/TextEncoder.mlpackage/Manifest.json" in m["digests"]


def test_the_interface_check_fails_on_the_wrong_packages(folder, sd_pipe, tmp_path):
    from tfmq.models import load_model
    from tfmq.targets.coreml import client

    model = load_model(str(sd_pipe))
    bad = tmp_path / "pipeline"
    shutil.copytree(folder / "coreml" / "pipeline", bad)
    assert client.check_interface(ct, bad, model) == []
    shutil.rmtree(bad / "TextEncoder.mlpackage")
    shutil.copytree(bad / "VAEDecoder.mlpackage", bad / "TextEncoder.mlpackage")
    problems = client.check_interface(ct, bad, model)
    assert problems and "last_hidden_state" in problems[0], problems


def test_the_pregate_runs_the_package_layout(folder):
    """The pre-gate's program takes the tfmq runner convention and feeds the package layout
    (timestep float [batch], states [batch, width, 1, tokens]) through the converted entry."""
    import torch

    from tfmq.targets.coreml.program import apple_inputs

    x, t, e = torch.zeros(2, 4, 8, 8), torch.tensor([501]), torch.arange(2 * 16 * 32.).reshape(2, 16, 32)
    s, tt, ee = apple_inputs(x, t, e)
    assert tt.dtype == torch.float32 and tt.tolist() == [501.0, 501.0]
    assert ee.shape == (2, 32, 1, 16) and ee.is_contiguous()
    assert np.array_equal(ee.squeeze(2).transpose(1, 2).numpy(), e.numpy())
