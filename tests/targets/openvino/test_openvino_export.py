"""tfmq-export --target openvino and tfmq-parity on its artifact, with the real OpenVINO runtime;
the per-layer INT8 proof, shown to fail on a graph OpenVINO cannot run in INT8."""
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from helpers import FAST, cli, one_line_error, summary_row
from tfmq.hostcpu import int8_dot_saturates
from tfmq.targets.openvino import OpenVinoTarget

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'tfmq-dm[openvino]')")
pytestmark = [pytest.mark.openvino, pytest.mark.slow]
SATURATES = int8_dot_saturates()


@pytest.fixture(scope="module")
def ov_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("ov") / "cond-w8a8"
    proc = cli("tfmq-export", "--model", "mnist-cond", "--target", "openvino", "--recipe", "w8a8", *FAST,
               "--threads", "2", "--out", out)
    if SATURATES and proc.returncode == 2:
        # a CPU without VNNI: OpenVINO's u8 x s8 kernels saturate (measured: export level and trajectory
        # fail, 35.2 vs fake-quant 43.9 dB); the export must say so and keep the artifacts
        assert "parity failed for openvino (" in proc.stderr and "the artifacts are kept" in proc.stderr, proc.stderr
        assert "this CPU has no VNNI" in proc.stdout, proc.stdout  # the note under the summary table
    else:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return out, proc


def test_openvino_artifact_runs_every_quantized_kernel_in_int8(ov_artifact):
    out, proc = ov_artifact
    passed = proc.returncode == 0
    assert ("PASSED" if passed else "FAILED") in summary_row(proc.stdout, "openvino")
    m = json.loads((out / "manifest.json").read_text())
    o = m["targets"]["openvino"]
    # the preset's variant for OpenVINO, named by what changed, in the manifest
    assert m["quant_state"]["recipe"] == o["recipe"] == "w8a8+sym-weights+sym-attn"
    assert o["needs"]["symmetric_weights"] and o["needs"]["symmetric_attention"]
    for f in ("model.xml", "model.bin", "openvino.json", "lowering.json", "golden.npz", "parity.json"):
        assert (out / "openvino" / f).is_file(), f
    c = o["compile"]
    kernels = json.loads((out / "openvino" / "lowering.json").read_text())["kernels"]
    assert set(c["layers"]) == set(kernels) and any(k.endswith("matmul_0") for k in kernels)
    assert not c["floating"] and all(v["precision"] in ("u8", "i8") for v in c["layers"].values())
    assert "f16" not in c["ir"]["constants"] and c["ir"]["weights_checked"] == len(o["lowering"]["weights"])
    assert c["options"]["threads"] == 2
    assert o["parity"]["passed"] is passed and (passed or SATURATES)


def test_the_ir_holds_the_quant_state_integers(ov_artifact):
    import openvino as ov

    from tfmq.calibration.state import QuantState

    out, _ = ov_artifact
    state = QuantState.load(out / "quant_state")
    consts = {op.get_friendly_name(): op for op in ov.Core().read_model(str(out / "openvino" / "model.xml")).get_ordered_ops()
              if op.get_type_name() == "Constant"}
    layers = json.loads((out / "openvino" / "lowering.json").read_text())["weights"]
    for layer in layers:
        ints = state.tensors[f"{layer}.w_int"].numpy()
        if state.meta["layers"][layer]["kind"] == "Linear":
            ints = ints.T
        got = consts[f"{layer}.w_int"].get_data()
        assert got.dtype == np.int8 and np.array_equal(got, ints), layer  # symmetric: int8, our values


def test_parity_rechecks_the_ir_and_refuses_a_broken_one(ov_artifact, tmp_path):
    out, proc = ov_artifact
    ok = cli("tfmq-parity", out, "--trajectory", "--json")
    passed = proc.returncode == 0  # the re-check agrees with the export's verdict (False only without VNNI)
    assert (ok.returncode == 0) is passed, ok.stderr
    assert json.loads(ok.stdout)["targets"]["openvino"]["passed"] is passed
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "openvino" / "model.bin").unlink()
    proc = cli("tfmq-parity", bad)  # the files and the target fail, each by name; nothing else is claimed
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "FAILED" in summary_row(proc.stdout, "files") and "model.bin is missing" in summary_row(proc.stdout, "openvino")


def test_bad_options_and_recipes_are_refused_before_any_work(tmp_path):
    line = one_line_error(cli("tfmq-export", "--target", "openvino", "--device", "GPU", *FAST,
                              "--out", tmp_path / "a"), "tfmq-export")
    assert "device 'GPU' is not supported" in line and not (tmp_path / "a").exists()
    line = one_line_error(cli("tfmq-export", "--target", "onnx", "--threads", "2", *FAST,
                              "--out", tmp_path / "b"), "tfmq-export")
    assert "option of the openvino target" in line
    from tfmq.calibration.recipe import get_recipe

    custom = tmp_path / "asym.json"
    custom.write_text(json.dumps(get_recipe("w8a8").to_dict()))  # asymmetric weights, as the official code
    line = one_line_error(cli("tfmq-export", "--target", "openvino", "--recipe", custom, *FAST,
                              "--out", tmp_path / "c"), "tfmq-export")
    assert "weights.symmetric: true" in line and not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def lowered_pair(small_set, tmp_path_factory):
    """The same model lowered from an OpenVINO-ready state and from an asymmetric-weight one."""
    from tfmq.calibration.api import calibrate
    from tfmq.calibration.recipe import Reconstruction, get_recipe
    from tfmq.calibration.requirements import satisfy
    from tfmq.exporter.deploy import build
    from tfmq.exporter.qdq_onnx import lower
    from tfmq.targets.base import LOWERING, Lowered

    model, cs = small_set
    target = OpenVinoTarget()
    dirs, lowered = {}, {}
    for name, recipe in (("ov", satisfy(get_recipe("w8a8"), target.needs)), ("asym", get_recipe("w8a8"))):
        r = calibrate(model, replace(recipe, reconstruction=Reconstruction(iters=0)), cs, progress=False)
        d = tmp_path_factory.mktemp(name)
        dep = build(model, r.state)
        rep = lower(dep, d / "model.onnx", passes=target.graph_passes(target.options()))
        (d / LOWERING).write_text(json.dumps(rep.to_dict()))
        dirs[name], lowered[name] = d, Lowered(dep, None, d / "model.onnx", rep)
    compiled = target.compile(lowered["ov"], dirs["ov"], target.options())
    return model, cs, dirs, compiled, lowered


def test_the_int8_proof_fails_on_a_graph_openvino_runs_in_float(lowered_pair):
    """Asymmetric weights: OpenVINO's CPU plugin silently runs those convs in float. The export
    must fail and name them (the check can fail: this is the case that makes it)."""
    from tfmq.errors import ExportError

    *_, dirs, compiled, lowered = lowered_pair
    target = OpenVinoTarget()
    with pytest.raises(ExportError, match=r"in floating point, not INT8: .*conv1"):
        target.compile(lowered["asym"], dirs["asym"], target.options({"precision": "f32"}))
    assert compiled["floating"] == {} and compiled["layers"]


def test_a_static_batch_ir_runs_any_batch_in_chunks(lowered_pair, tmp_path):
    model, cs, dirs, _, lowered = lowered_pair
    static = tmp_path / "static"
    shutil.copytree(dirs["ov"], static)
    target = OpenVinoTarget()
    target.compile(replace(lowered["ov"], onnx=static / "model.onnx"), static, target.options({"batch": 3}))
    x, t, _ = cs.step_inputs(2)
    x = x.numpy()  # 4 samples: one full chunk of 3, one padded
    t = np.array([int(t[0])], dtype=np.int64)
    fixed, dynamic = target.runner(static)(x, t), target.runner(dirs["ov"])(x, t)
    assert fixed.shape == x.shape
    # other kernel shapes, another summation order: a few integers flip at .5 ties
    assert np.linalg.norm(fixed - dynamic) / np.linalg.norm(dynamic) < 1e-2


def test_the_trajectory_is_also_reported_at_the_deployment_precision(ov_artifact, lowered_pair, tmp_path):
    """Parity runs with the f32 hint; an IR that deploys with bf16 for its float layers (OpenVINO's
    default where the CPU has BF16) also gets its trajectory as deployed, and one pinned to f32
    needs none."""
    import openvino as ov

    bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    out, proc = ov_artifact
    traj = json.loads((out / "openvino" / "parity.json").read_text())["levels"]["trajectory"]
    assert ("deployment" in traj) is bf16 and ("as deployed (inference precision bf16" in proc.stdout) is bf16
    if bf16:
        d = traj["deployment"]
        assert d["gates"] is False and 10 < d["psnr_vs_fp32_db"] < 80 and d["psnr_vs_fake_quant_db"] > 10
    model, cs, dirs, _, lowered = lowered_pair
    target = OpenVinoTarget()
    pinned = tmp_path / "f32"
    shutil.copytree(dirs["ov"], pinned)
    target.compile(replace(lowered["ov"], onnx=pinned / "model.onnx"), pinned, target.options({"precision": "f32"}))
    assert target.deployment_runner(pinned) is None
    dep = target.deployment_runner(dirs["ov"])  # compiled with OpenVINO's default hint
    assert (dep is not None) is bf16
    if bf16:
        x, t, _ = cs.step_inputs(2)
        t = np.array([int(t[0])], dtype=np.int64)
        exact, deployed = target.runner(dirs["ov"])(x.numpy(), t), dep[1](x.numpy(), t)
        rel = np.linalg.norm(deployed - exact) / np.linalg.norm(exact)
        assert 0 < rel < 0.1, rel  # bf16 float layers: a different, close result


def test_diffusers_ddim_pipeline_runs_on_the_ir(tmp_path):
    """The stock DDIMPipeline with the IR as its UNet gives the FP32 pipeline's images (W8A8),
    at the exported schedule's step count and at another one (the nearest step's parameters)."""
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler

    from tfmq.drop_in import ddim_pipeline
    from tfmq.models import load_model

    out = tmp_path / "ddpm"
    proc = cli("tfmq-export", "--target", "openvino", "--recipe", "w8a8", "--skip-parity", *FAST, "--out", out)
    assert proc.returncode == 0, proc.stderr
    pipe = ddim_pipeline(out)
    model = load_model("mnist-ddpm")
    ref = DDIMPipeline(unet=model.unet, scheduler=DDIMScheduler.from_config(model.scheduler_config))
    for steps in (6, 9):
        kw = {"batch_size": 2, "num_inference_steps": steps, "output_type": "np"}
        got = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        want = ref(generator=torch.Generator().manual_seed(0), **kw).images
        psnr = 10 * np.log10(1.0 / np.mean((got - want) ** 2))
        assert got.shape == want.shape and psnr > 20, (steps, psnr)


def test_the_cfg_sampler_runs_on_the_conditional_ir(ov_artifact):
    import torch

    from tfmq.drop_in import ArtifactUNet
    from tfmq.models import load_model
    from tfmq.sampling import ddim_sample, initial_noise, unet_denoiser

    out, _ = ov_artifact
    model = load_model("mnist-cond")
    noise = initial_noise([0, 1], tuple(model.sample_shape))
    got = ddim_sample(model, unet_denoiser(ArtifactUNet(out)), noise, steps=6)
    want = ddim_sample(model, unet_denoiser(model.unet), noise, steps=6)
    assert got.images.shape == want.images.shape
    assert torch.mean((got.images - want.images) ** 2) < 0.01
    # the drop-in runs the IR as deployed (bf16 float layers where the CPU has BF16); the gates' f32 on request
    import openvino as ov

    gated = ddim_sample(model, unet_denoiser(ArtifactUNet(out, options={"precision": "f32"})), noise, steps=6)
    bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert torch.equal(got.images, gated.images) is not bf16
