"""The console scripts as a user runs them: the main job, parity, and bad input."""
import json
import shutil

import numpy as np
import pytest

from helpers import cli, one_line_error
from tfmq.models import BUNDLED

pytestmark = pytest.mark.slow  # the console scripts as a user runs them, each a new process


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("a") / "mnist-cond"
    proc = cli("tfmq-export", "--model", "mnist-cond", "--n", "8", "--steps", "4", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_export_writes_a_complete_artifact(artifact):
    out, proc = artifact
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["artifact"] == str(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["class"] == "UNet2DConditionModel"
    assert manifest["schedule"]["steps"] == 4 and len(manifest["schedule"]["timesteps"]) == 4
    assert {"torch", "diffusers", "tfmq"} <= set(manifest["versions"])
    for f in ("grid_fp32.png", "golden.npz", "metrics.json"):
        assert (out / "reference" / f).is_file(), f
    assert "cond_accuracy" in manifest["targets"]["fp32"]["metrics"]
    assert not list(out.parent.glob(".*partial")), "temporary directory left behind"


def test_parity_passes_then_fails_on_tampered_golden(artifact, tmp_path):
    out, _ = artifact
    ok = cli("tfmq-parity", out, "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["passed"] is True
    table = cli("tfmq-parity", out)
    assert table.returncode == 0 and "fp32" in table.stdout and "PASSED" in table.stdout
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    g = dict(np.load(bad / "reference" / "golden.npz"))
    g["images"] = g["images"] + 0.05
    np.savez(bad / "reference" / "golden.npz", **g)
    fail = cli("tfmq-parity", bad, "--json")
    assert fail.returncode == 2
    assert json.loads(fail.stdout)["passed"] is False


def test_existing_output_is_refused_without_overwrite(artifact):
    out, _ = artifact
    before = (out / "manifest.json").read_text()
    line = one_line_error(cli("tfmq-export", "--model", "mnist-cond", "--n", "2", "--steps", "1", "--out", out),
                          "tfmq-export")
    assert "--overwrite" in line
    assert (out / "manifest.json").read_text() == before


def test_failed_export_leaves_nothing(tmp_path):
    out = tmp_path / "never"
    one_line_error(cli("tfmq-export", "--model", tmp_path / "nope", "--out", out), "tfmq-export")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _broken_models(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(BUNDLED["mnist-ddpm"], corrupt)
    (corrupt / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    return {"missing": (tmp_path / "missing", "no such model"), "no-config": (empty, "no UNet config"),
            "corrupt": (corrupt, "cannot read the UNet weights"), "unsupported": (vae, "AutoencoderKL")}


@pytest.mark.parametrize("case", ["missing", "no-config", "corrupt", "unsupported"])
@pytest.mark.parametrize("prog", ["tfmq-export", "tfmq-calibrate"])
def test_bad_models_give_one_line_errors(tmp_path, case, prog):
    path, says = _broken_models(tmp_path)[case]
    line = one_line_error(cli(prog, "--model", path, "--out", tmp_path / "out"), prog)
    assert says in line
    assert not (tmp_path / "out").exists()


def test_unknown_tensorrt_device_is_refused_clearly(tmp_path):
    line = one_line_error(cli("tfmq-export", "--target", "tensorrt", "--device", "xavier", "--out", tmp_path / "o"),
                          "tfmq-export")
    assert "'xavier'" in line and "h800" in line and "orin-nano" in line and not (tmp_path / "o").exists()


def test_parity_on_a_non_artifact(tmp_path):
    line = one_line_error(cli("tfmq-parity", tmp_path), "tfmq-parity")
    assert "manifest.json" in line


def test_calibrate_writes_a_quant_state(tmp_path):
    out = tmp_path / "q"
    proc = cli("tfmq-calibrate", "--model", "mnist-ddpm", "--recipe", "w8a8", "--seeds", "2", "--steps", "3",
               "--iters", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "quant_state.json").read_text())
    assert meta["recipe"]["name"] == "w8a8" and len(meta["schedule"]["timesteps"]) == 3
    assert (out / "quant_state.safetensors").is_file() and (out / "calibration_set" / "calib.json").is_file()
    assert meta["recipe"]["bias_correction"] and "bias correction: mean eps error per step removed" in proc.stdout
    # the recorded set is reusable; one for another schedule is refused
    again = cli("tfmq-calibrate", "--recipe", "minmax-w8a8", "--calib-set", out / "calibration_set",
                "--steps", "3", "--out", tmp_path / "q2")
    assert again.returncode == 0, again.stderr
    line = one_line_error(cli("tfmq-calibrate", "--calib-set", out / "calibration_set", "--steps", "5",
                              "--out", tmp_path / "q3"), "tfmq-calibrate")
    assert "3-step schedule" in line and not (tmp_path / "q3").exists()


def test_calibrate_bad_recipes(tmp_path):
    line = one_line_error(cli("tfmq-calibrate", "--recipe", "w2a8", "--out", tmp_path / "q"), "tfmq-calibrate")
    assert "unknown recipe 'w2a8'" in line
    from tfmq.calibration.recipe import get_recipe

    d = get_recipe("w4a8").to_dict()
    d["weights"]["bits"] = 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    line = one_line_error(cli("tfmq-calibrate", "--recipe", bad, "--out", tmp_path / "q"), "tfmq-calibrate")
    assert "weight bits 3" in line and not (tmp_path / "q").exists()
