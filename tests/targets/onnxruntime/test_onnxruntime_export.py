"""tfmq-export --target onnx and tfmq-parity on its artifact, as a user runs them."""
import json
import shutil

import numpy as np
import pytest

from helpers import FAST, cli, one_line_error, summary_row
from tfmq.hostcpu import int8_dot_saturates

pytestmark = [pytest.mark.onnxruntime, pytest.mark.slow]


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("o") / "cond-w8a8"
    proc = cli("tfmq-export", "--model", "mnist-cond", "--target", "onnx", "--recipe", "w8a8", *FAST, "--out", out)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out, proc


def test_onnx_artifact_is_complete_and_passes_its_gates(onnx_artifact):
    out, proc = onnx_artifact
    assert "PASSED" in summary_row(proc.stdout, "onnx")
    m = json.loads((out / "manifest.json").read_text())
    o = m["targets"]["onnx"]
    assert o["opset"] == 21 and o["parity"]["passed"] is True
    assert set(o["parity"]["levels"]) == {"export", "target", "trajectory", "floor"}  # floor: a bundled model
    for f in ("model.onnx", "model.optimized.onnx", "golden.npz", "parity.json", "trajectory_error.png",
              "fp32_vs_artifact.png"):
        assert (out / "onnx" / f).is_file(), f
    assert json.loads((out / "onnx" / "parity.json").read_text())["passed"] is True
    # the preset's variant for ONNX Runtime: symmetric weights and conv output quantizers, so every
    # quantized conv is one QLinearConv and every quantized Linear a MatMulIntegerToFloat
    assert m["quant_state"]["recipe"] == "w8a8+sym-weights+sym-attn+conv-out"
    assert (out / "quant_state" / "quant_state.safetensors").is_file()
    # the deployment CPU defaults to this one: the resolved choice is recorded, not "default"
    assert o["compile"]["options"] == o["options"] == {"vnni": not int8_dot_saturates()}
    state = json.loads((out / "quant_state" / "quant_state.json").read_text())
    convs = [n for n, v in state["layers"].items() if v["kind"] == "Conv2d"]
    linears = [n for n, v in state["layers"].items() if v["kind"] == "Linear" and not n.startswith("time_embedding.")]
    assert convs and {f"{n}.out" for n in convs} <= set(state["activations"])
    assert o["compile"]["integer_kernels"]["QLinearConv"] == len(convs)
    assert o["compile"]["integer_kernels"]["MatMulIntegerToFloat"] >= len(linears)
    assert "note" not in o["compile"]
    assert o["tolerance"]["reasons"]["trajectory_db"]
    # on a CPU without VNNI every 8-bit integer tensor is unsigned (U8U8 kernels do not saturate):
    # the same values, weights offset by 128 with zero-point 128
    import onnx
    from onnx import numpy_helper

    from tfmq.calibration.state import QuantState

    u8 = int8_dot_saturates()
    assert o["compile"]["weights"].startswith("u8" if u8 else "s8")
    graph = onnx.load(str(out / "onnx" / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    ints = QuantState.load(out / "quant_state").tensors
    for name in convs + linears:
        w = inits[f"{name}.w_int"].astype(np.int16)
        assert o["lowering"]["weights"][name]["dtype"] == ("UINT8" if u8 else "INT8")
        want = ints[f"{name}.w_int"].numpy().astype(np.int16)
        assert np.array_equal(w - 128 * u8, want if name in convs else want.T), name
    zero_points = [inits[n.input[2]] for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                   and len(n.input) > 2 and n.input[2] in inits]
    # the attention operands are symmetric (int8) in the -ort recipe: unsigned only without VNNI
    assert zero_points and all(z.dtype == np.uint8 for z in zero_points) is u8


def test_parity_rechecks_the_onnx_artifact_and_catches_a_wrong_model(onnx_artifact, tmp_path):
    out, _ = onnx_artifact
    ok = cli("tfmq-parity", out, "--trajectory", "--json")
    assert ok.returncode == 0, ok.stderr
    v = json.loads(ok.stdout)
    assert v["passed"] and set(v["targets"]["onnx"]["levels"]) == {"integers", "target", "trajectory", "floor"}
    assert v["targets"]["files"]["passed"] and v["targets"]["onnx"]["levels"]["target"]["same_host"]
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    g = dict(np.load(bad / "onnx" / "golden.npz"))
    k = next(k for k in g if k.endswith(".artifact"))
    g[k] = g[k] * 1.2  # the artifact no longer gives what it gave at export
    np.savez(bad / "onnx" / "golden.npz", **g)
    fail = cli("tfmq-parity", bad, "--json")
    assert fail.returncode == 2 and json.loads(fail.stdout)["targets"]["onnx"]["passed"] is False


def test_quant_state_reuse_and_mismatches(onnx_artifact, tmp_path):
    out, _ = onnx_artifact
    qs = out / "quant_state"
    line = one_line_error(cli("tfmq-export", "--model", "mnist-ddpm", "--target", "onnx", "--quant-state", qs,
                              *FAST, "--out", tmp_path / "x"), "tfmq-export")
    assert "calibrated for model" in line and not (tmp_path / "x").exists()
    line = one_line_error(cli("tfmq-export", "--model", "mnist-cond", "--target", "onnx", "--quant-state", qs,
                              "--n", "4", "--steps", "8", "--out", tmp_path / "y"), "tfmq-export")
    assert "6-step schedule" in line and not (tmp_path / "y").exists()
    again = cli("tfmq-export", "--model", "mnist-cond", "--target", "onnx", "--quant-state", qs, "--skip-parity",
                "--n", "4", "--steps", "6", "--out", tmp_path / "z")
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "z" / "manifest.json").read_text())["targets"]["onnx"]["parity"] == "skipped"


def test_all_builds_every_target_from_one_quant_state(tmp_path):
    proc = cli("tfmq-export", "--target", "all", "--recipe", "w4a8", "--skip-parity", *FAST, "--out", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a" / "onnx" / "model.onnx").is_file()
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    # the targets whose models add no quantizers share one variant of the preset meeting all their
    # needs (OpenVINO's symmetric weights and attention operands; TensorRT needs only the
    # weights; Core ML nothing), and ONNX Runtime takes that plus its conv output quantizers,
    # calibrated in flow: both named by what changed, printed, and in the manifest per target
    shared, ort = "w4a8+sym-weights+sym-attn", "w4a8+sym-weights+sym-attn+conv-out"
    assert m["quant_state"] == {**m["quant_state"], "dir": "quant_state", "recipe": shared}
    assert [q["recipe"] for q in m["quant_states"]] == [shared, ort]
    assert m["recipes"] == {"coreml": shared, "onnx": ort, "openvino": shared, "tensorrt": shared}
    assert f"recipe {shared} for coreml, openvino, tensorrt" in proc.stderr and f"recipe {ort} for onnx" in proc.stderr
    assert m["targets"]["onnx"]["quant_state"] == f"quant_state_{ort}"
    assert m["targets"]["onnx"]["lowering"]["ops"].get("QLinearConv")
    from tfmq.calibration.state import QuantState

    a, b = QuantState.load(tmp_path / "a" / "quant_state"), QuantState.load(tmp_path / "a" / f"quant_state_{ort}")
    for name in a.meta["layers"]:  # one weight calibration's result twice: reconstruction runs in float
        assert np.array_equal(a.tensors[f"{name}.w_int"], b.tensors[f"{name}.w_int"]), name
    for t in ("openvino", "tensorrt", "coreml"):
        if t in m["targets"]:
            assert m["targets"][t]["quant_state"] == "quant_state" and m["targets"][t]["recipe"] == shared
            assert "QLinearConv" not in m["targets"][t].get("lowering", {}).get("ops", {}), t
    assert m["targets"]["tensorrt"]["engine"] == "not built (TensorRT unavailable)"
    assert "engine not built" in summary_row(proc.stdout, "tensorrt")
    for t, why in m.get("skipped", {}).items():  # only where a runtime is not installed
        assert "not installed" in why, (t, why)
    if "openvino" not in m.get("skipped", {}):
        assert (tmp_path / "a" / "openvino" / "model.xml").is_file()


def test_any_training_timestep_runs_and_one_outside_is_refused_by_the_host_wrapper(onnx_artifact):
    import torch

    from tfmq.calibration.qmodel import ScheduleError
    from tfmq.exporter.parity import runner_denoiser
    from tfmq.targets.registry import get_target

    out, _ = onnx_artifact
    m = json.loads((out / "manifest.json").read_text())
    sched = torch.tensor(m["schedule"]["timesteps"])
    den = runner_denoiser(get_target("onnx").runner(out / "onnx"), 1000)
    x, c = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 4, 64)
    on, off = (den(x, torch.full((2,), t), c) for t in (int(sched[1]), int(sched[1]) + 1))
    assert on.shape == x.shape and torch.isfinite(off).all() and not torch.equal(on, off)  # its own temporal row
    for bad in (1000, -1):
        with pytest.raises(ScheduleError, match="outside the model's training range"):
            den(x, torch.full((2,), bad), c)


def test_over_the_protobuf_limit_the_tensors_go_beside_the_graph(tmp_path, monkeypatch):
    """Over 2 GB (here the limit is lowered to 0 bytes) the lowered, ONNX Runtime-optimized and
    TensorRT-legal files keep their tensors in ``<file>.data`` beside them; ONNX Runtime runs
    them, the gates pass and tfmq-parity re-checks them."""
    from tfmq.cli.export import main
    from tfmq.exporter import qdq_onnx

    monkeypatch.setattr(qdq_onnx, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "big"
    assert main(["--target", "onnx", "--recipe", "w8a8", *FAST, "--out", str(out)]) == 0
    folder = out / "onnx"
    for f in ("model.onnx", "model.optimized.onnx"):
        data = folder / f"{f}.data"
        assert data.is_file() and data.stat().st_size > 2 * (folder / f).stat().st_size, f
    m = json.loads((out / "manifest.json").read_text())
    assert m["targets"]["onnx"]["parity"]["passed"] and m["targets"]["onnx"]["compile"]["external_data"]
    assert m["targets"]["onnx"]["compile"]["integer_kernels"]["QLinearConv"]
    ok = cli("tfmq-parity", out)
    assert ok.returncode == 0, ok.stderr + ok.stdout

    trt = tmp_path / "big-trt"
    assert main(["--target", "tensorrt", "--quant-state", str(out / "quant_state"), *FAST, "--out", str(trt)]) == 0
    folder = trt / "tensorrt"
    assert not (folder / ".legal").exists()
    files = json.loads((trt / "manifest.json").read_text())["targets"]["tensorrt"]["compile"]["files"]
    for f in ("model.onnx", "model.fp16.onnx"):
        assert (folder / f"{f}.data").is_file() and f in files and f"{f}.data" in files, f
