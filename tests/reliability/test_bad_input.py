"""Bad input: one clear line on stderr, a non-zero exit, nothing half written, no user file lost."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import cli, one_line_error
from tfmq.calibration.recipe import get_recipe


def recipe_file(tmp_path, change):
    d = get_recipe("w8a8").to_dict()
    change(d)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.slow  # a console script per case
@pytest.mark.parametrize("args, says", [
    (["--calib-seeds", "0"], "--calib-seeds 0"), (["--calib-seeds", "-2"], "--calib-seeds -2"),
    (["--seed", "-1"], "--seed -1"), (["--guidance", "nan"], "--guidance nan"), (["--n", "1"], "--n 1"),
])
def test_export_numbers_are_checked_before_work(tmp_path, args, says):
    line = one_line_error(cli("tfmq-export", "--target", "onnx", *args, "--out", tmp_path / "o"), "tfmq-export")
    assert says in line and not (tmp_path / "o").exists()


@pytest.mark.slow  # a console script per case
@pytest.mark.parametrize("args, says", [(["--seeds", "0"], "--seeds 0"), (["--seeds", "-3"], "--seeds -3"),
                                        (["--steps", "0"], "--steps 0"), (["--iters", "-1"], "--iters -1")])
def test_calibrate_numbers_are_checked_before_work(tmp_path, args, says):
    line = one_line_error(cli("tfmq-calibrate", *args, "--out", tmp_path / "q"), "tfmq-calibrate")
    assert says in line and not (tmp_path / "q").exists()


@pytest.mark.slow  # a console script per case
@pytest.mark.parametrize("change, says", [
    (lambda d: d["reconstruction"].update(iters=-5), "reconstruction.iters = -5"),
    (lambda d: d["reconstruction"].update(iters="10"), "is not an integer"),
    (lambda d: d["reconstruction"].update(batch=0), "reconstruction.batch = 0"),
    (lambda d: d["activations"].update(running_momentum=math.nan), "running_momentum = nan"),
    (lambda d: d["data"].update(seeds=0), "data.seeds = 0"),
    (lambda d: d.update(bias_correction="no"), "is not true or false"),
    (lambda d: d.update(weights=[8]), "is a JSON object"),
])
def test_recipe_files_are_checked_before_work(tmp_path, change, says):
    line = one_line_error(cli("tfmq-calibrate", "--recipe", recipe_file(tmp_path, change), "--out", tmp_path / "q"),
                          "tfmq-calibrate")
    assert says in line and not (tmp_path / "q").exists()


@pytest.mark.slow  # a console script per case
def test_a_recipe_that_is_a_list_is_one_line(tmp_path):
    (tmp_path / "r.json").write_text("[1, 2]")
    line = one_line_error(cli("tfmq-export", "--target", "onnx", "--recipe", tmp_path / "r.json", "--out",
                              tmp_path / "o"), "tfmq-export")
    assert "holds no JSON object" in line


@pytest.mark.slow  # a console script per case
def test_overwrite_replaces_only_an_artifact(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    line = one_line_error(cli("tfmq-export", "--n", "2", "--steps", "1", "--out", mine, "--overwrite"), "tfmq-export")
    assert "not a tfmq output" in line and (mine / "notes.txt").read_text() == "keep me"
    line = one_line_error(cli("tfmq-export", "--n", "2", "--steps", "1", "--out", ".", "--overwrite", cwd=mine),
                          "tfmq-export")
    assert "current directory" in line and (mine / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_one_run_per_output_and_stale_leftovers_are_removed(tmp_path):
    out = tmp_path / "a"
    lock = tmp_path / ".a.lock"
    lock.write_text(str(os.getpid()))  # a live run holds it
    line = one_line_error(cli("tfmq-export", "--n", "2", "--steps", "1", "--out", out), "tfmq-export")
    assert f"process {os.getpid()}" in line and not out.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(str(dead.pid))  # a run that was killed left its lock and its temporary folder
    stale = tmp_path / f".a.{dead.pid}.xyz.partial"
    stale.mkdir()
    (stale / "half").write_text("x")
    ok = cli("tfmq-export", "--n", "2", "--steps", "1", "--out", out)
    assert ok.returncode == 0, ok.stderr
    assert (out / "manifest.json").is_file() and not lock.exists() and not stale.exists()
    assert "left by a run that was killed" in ok.stderr


@pytest.mark.slow
def test_sigterm_leaves_nothing_behind(tmp_path):
    out = tmp_path / "t"
    exe = shutil.which("tfmq-export")
    proc = subprocess.Popen([exe, "--n", "64", "--steps", "50", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".t.*.partial")) and time.time() < deadline:
        time.sleep(0.2)
    assert list(tmp_path.glob(".t.*.partial")), "the export never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted; nothing was left half-written" in err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "r"
    proc = cli("tfmq-export", "--n", "2", "--steps", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("damage, says", [
    ("extra", "damaged"), ("missing", "damaged"), ("truncated", "damaged"), ("object", "damaged"),
    ("deleted", "has no golden.npz"),
])
def test_a_damaged_golden_file_is_one_line(reference, tmp_path, damage, says):
    a = tmp_path / "a"
    shutil.copytree(reference, a)
    golden = a / "reference" / "golden.npz"
    g = dict(np.load(golden))
    if damage == "extra":
        np.savez(golden, **g, stray=np.zeros(1))
    elif damage == "missing":
        np.savez(golden, **{k: v for k, v in g.items() if k != "images"})
    elif damage == "truncated":
        golden.write_bytes(golden.read_bytes()[:100])
    elif damage == "object":
        np.savez(golden, **{**g, "seeds": np.array([{"a": 1}], dtype=object)}, allow_pickle=True)
    else:
        golden.unlink()
    line = one_line_error(cli("tfmq-parity", a), "tfmq-parity")
    assert says in line


@pytest.mark.slow  # a console script per case
def test_manifest_without_targets_is_one_line(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"targets": []}))
    line = one_line_error(cli("tfmq-parity", tmp_path), "tfmq-parity")
    assert "not a tfmq manifest" in line


def test_a_state_without_its_schedule_is_one_line(tmp_path):
    import torch
    from safetensors.torch import save_file

    from tfmq.calibration.state import QuantState, QuantStateError

    qs = tmp_path / "qs"
    qs.mkdir()
    save_file({"x": torch.zeros(1)}, str(qs / "quant_state.safetensors"))
    from tfmq.calibration.state import STATE_VERSION

    meta = {"version": STATE_VERSION, "recipe": get_recipe("w8a8").to_dict(), "model": {}, "param_sets": [0],
            "layers": {}, "activations": {}}
    (qs / "quant_state.json").write_text(json.dumps(meta))
    with pytest.raises(QuantStateError, match="no 'schedule'"):
        QuantState.load(qs)


def make_unet_folder(tmp_path, change):
    from safetensors.torch import load_file, save_file

    from tfmq.models import BUNDLED

    folder = tmp_path / "m"
    shutil.copytree(BUNDLED["mnist-ddpm"], folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    t = load_file(str(weights))
    change(t)
    save_file(t, str(weights))
    return folder


def test_checkpoint_tensors_the_config_does_not_use_are_refused(tmp_path):
    import torch

    from tfmq.errors import ModelLoadError
    from tfmq.models import load_model

    folder = make_unet_folder(tmp_path, lambda t: t.update({"extra.weight": torch.zeros(3)}))
    with pytest.raises(ModelLoadError, match="does not use .*extra.weight"):
        load_model(folder)


def test_nan_weights_are_refused_at_load(tmp_path):
    from tfmq.errors import ModelLoadError
    from tfmq.models import load_model

    def poison(t):
        k = sorted(t)[0]
        t[k].view(-1)[0] = float("nan")

    with pytest.raises(ModelLoadError, match="holds NaN or inf"):
        load_model(make_unet_folder(tmp_path, poison))


def test_a_full_disk_is_an_artifact_error_not_a_traceback(tmp_path, monkeypatch):
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from tfmq.artifacts import ArtifactError, save_tensors_and_meta

    def full(*a, **k):
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ArtifactError, match="No space left"):
        save_tensors_and_meta(tmp_path / "s", {"x": torch.zeros(1)}, {"version": 1}, "t.safetensors", "t.json")


def test_onnx_files_the_runtime_refuses_are_one_line(tmp_path):
    from tfmq.errors import TfmqError
    from tfmq.runner import onnx_session

    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(TfmqError, match="ONNX Runtime cannot load"):
        onnx_session(tmp_path / "bad.onnx")
    with pytest.raises(TfmqError, match="ONNX Runtime cannot load"):
        onnx_session(tmp_path / "absent.onnx")


def test_external_data_that_leaves_the_folder_is_refused_in_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from tfmq.errors import TfmqError
    from tfmq.runner import onnx_session

    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("float_data")
    for k, v in (("location", "../outside.bin"), ("offset", "0"), ("length", "4")):
        entry = w.external_data.add()
        entry.key, entry.value = k, v
    graph = helper.make_graph([helper.make_node("Add", ["sample", "w"], ["out_sample"])], "g",
                              [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, [1])], [w])
    (tmp_path / "sub").mkdir()
    onnx.save(helper.make_model(graph), str(tmp_path / "sub" / "m.onnx"))
    (tmp_path / "outside.bin").write_bytes(b"\0\0\x80?")
    with pytest.raises(TfmqError, match="ONNX Runtime cannot load"):
        onnx_session(tmp_path / "sub" / "m.onnx")


def test_timesteps_off_the_training_range_or_not_whole_are_refused():
    import torch

    from tfmq.calibration.qmodel import ScheduleError, schedule_step

    schedule = torch.tensor([750, 500, 250])
    assert schedule_step(schedule, torch.tensor([750.0, 750.0]), 1000) == 0
    assert schedule_step(schedule, 749, 1000) == 0 and schedule_step(schedule, 374, 1000) == 2
    assert schedule_step(schedule, 375, 1000) == 1  # a tie: the earlier step in sampling order
    with pytest.raises(ScheduleError, match="750.6 is not a whole number"):
        schedule_step(schedule, torch.tensor([750.6]), 1000)
    for bad in (1000, -1):
        with pytest.raises(ScheduleError, match=r"outside the model's training range \[0, 1000\)"):
            schedule_step(schedule, bad, 1000)


def test_the_same_seed_gives_byte_identical_states(small_set, tmp_path):
    from dataclasses import replace

    from tfmq.calibration.api import calibrate
    from tfmq.calibration.recipe import Reconstruction

    model, cs = small_set
    recipe = replace(get_recipe("w8a8"), reconstruction=Reconstruction(iters=2, batch=4))
    for k in ("a", "b"):
        calibrate(model, recipe, cs, progress=False).state.save(tmp_path / k)
    for f in ("quant_state.safetensors",):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
