"""The TensorRT target on a machine without TensorRT: legalization, the static legality
checker (against deliberately illegal graphs), the legal ONNX vs fake-quant in ONNX Runtime,
the build script, and the engine inspector's precision census."""
import json
import subprocess
from dataclasses import replace

import numpy as np
import pytest

from helpers import FAST, cli, one_line_error, summary_row

NOT_BUILT = "not built (TensorRT unavailable)"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trt_artifact(tmp_path_factory):
    """mnist-cond (attention, cross-attention) W4A8 for the Jetson: 4-bit convs and attention projections."""
    out = tmp_path_factory.mktemp("trt") / "a"
    proc = cli("tfmq-export", "--model", "mnist-cond", "--target", "tensorrt", "--device", "orin-nano",
               "--recipe", "w4a8", *FAST, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_export_without_tensorrt_writes_everything_but_the_engine(trt_artifact):
    out, proc = trt_artifact
    m = json.loads((out / "manifest.json").read_text())
    entry = m["targets"]["tensorrt"]
    assert m["quant_state"]["recipe"] == "w4a8+sym-weights"  # the preset's variant, named by what changed
    row = summary_row(proc.stdout, "tensorrt")
    assert entry["engine"] == NOT_BUILT and "engine not built" in row and "pre-gate PASSED" in row
    assert "engine not built: build it on the Jetson itself" in proc.stdout  # the note under the table
    for f in ("model.onnx", "legalization.json", "tensorrt.json", "build_engine.sh", "golden.npz", "parity.json"):
        assert (out / "tensorrt" / f).is_file(), f
    settings = json.loads((out / "tensorrt" / "tensorrt.json").read_text())
    assert settings["sm"] == "sm_87" and settings["workspace_mb"] == 1024
    assert settings["inputs"]["sample"]["max"] == [4, 1, 32, 32]


def test_legalization_keeps_4bit_values_in_int8_and_the_file_is_legal(trt_artifact):
    import onnx
    from onnx import numpy_helper

    from tfmq.calibration.state import QuantState
    from tfmq.targets.tensorrt.legal import check_file

    out, _ = trt_artifact
    folder = out / "tensorrt"
    report = json.loads((folder / "legalization.json").read_text())
    kernels = json.loads((folder / "lowering.json").read_text())["kernels"]
    assert check_file(folder / "model.onnx", kernels) == [] and report["violations"] == []
    assert report["opset"] == 20  # no INT4 left: the opset every TensorRT 10.x parser reads
    # every 4-bit layer changed container, and says why; W4A8 quantizes every kernel's input;
    # the asymmetric activations (folded onto zero-point 128 by the deploy module) became INT8
    # with zero-point 0, every one of them
    state = QuantState.load(out / "quant_state")
    four = {k for k, v in state.meta["layers"].items() if v["bits"] == 4 and k in kernels}
    assert {c["layer"] for c in report["changes"]} == four | {"activations"} and four
    assert all("INT8" in c["change"] and c["values"] == "unchanged" and c["why"] for c in report["changes"])
    n_act = json.loads((folder / "lowering.json").read_text())["activations"]
    assert report["census"]["activation Q/DQ (INT8, per tensor)"] >= len(n_act)
    assert [c for c in report["changes"] if c["layer"] == "activations"][0]["change"].startswith(f"{len(n_act)} ")
    assert set(report["int8_kernels"]) == set(kernels) and not report["weight_only"]
    m = onnx.load(str(folder / "model.onnx"))
    assert {o.domain: o.version for o in m.opset_import}[""] == 20
    inits = {i.name: i for i in m.graph.initializer}
    for n in m.graph.node:  # the integers are still the QuantState's, as INT8 in [-8, 7]
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            t = inits[n.input[0]]
            assert t.data_type == onnx.TensorProto.INT8
            layer = n.input[0].split(".w_int")[0]
            if state.meta["layers"].get(layer, {}).get("bits") == 4:
                ints = numpy_helper.to_array(t)
                want = state.tensors[f"{layer}.w_int"].numpy()
                matmul = kernels[layer].endswith("MatMul")  # a Linear's graph weight is W^T
                assert np.array_equal(ints, want.T if matmul else want), layer
                assert ints.min() >= -8 and ints.max() <= 7


def test_the_legal_onnx_matches_fake_quant_in_onnxruntime(trt_artifact):
    """The CPU pre-gate ran the file the engine is built from (FP16 float parts: the profile's
    default) against fake-quant within the target's declared tolerance; the FP32 legal graph
    passes the same gate on the golden data, and the FP16 one is legal too."""
    from tfmq.exporter.parity import target_level
    from tfmq.runner import onnx_session
    from tfmq.targets.tensorrt import TensorRTTarget
    from tfmq.targets.tensorrt.legal import check_file

    out, _ = trt_artifact
    folder = out / "tensorrt"
    p = json.loads((folder / "parity.json").read_text())
    assert p["passed"] is True and set(p["levels"]) == {"cpu_pregate", "cpu_pregate_trajectory", "floor"}
    assert "TensorRT" in p["runtime"]
    assert json.loads((folder / "tensorrt.json").read_text())["onnx"] == "model.fp16.onnx"
    kernels = json.loads((folder / "lowering.json").read_text())["kernels"]
    assert check_file(folder / "model.fp16.onnx", kernels) == []
    fp16 = json.loads((folder / "legalization.json").read_text())["fp16"]
    assert 0 < fp16["scales_max_relative_change"] < 2 ** -10 and not fp16["scales_below_fp16_normal"]
    tol = TensorRTTarget().tolerance
    same = target_level(TensorRTTarget().pregate_runner(None, folder), folder / "golden.npz", tol)
    assert same["passed"] and all(r["artifact_vs_stored"] < 1e-5 for r in same["golden"])  # same file and runtime
    fp32 = target_level(onnx_session(folder / "model.onnx"), folder / "golden.npz", tol)
    assert all(abs(r["artifact_vs_fp32"] - r["fake_quant_vs_fp32"]) <= tol.error_margin * r["fake_quant_vs_fp32"]
               + tol.error_floor for r in fp32["golden"]), fp32


def test_build_script_and_trtexec_line(trt_artifact):
    out, _ = trt_artifact
    script = out / "tensorrt" / "build_engine.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for flag in ("--stronglyTyped", "--onnx=model.fp16.onnx", "--minShapes=sample:1x1x32x32", "--maxShapes=sample:4x1x32x32",
                 "encoder_hidden_states:4x4x64", "--memPoolSize=workspace:1024M", "--builderOptimizationLevel=3",
                 "--timingCacheFile=timing.orin-nano.cache", "--saveEngine=model.orin-nano.engine",
                 "tfmq-build-engine .."):
        assert flag in text, flag


def test_parity_and_build_engine_say_what_this_machine_cannot_do(trt_artifact):
    out, _ = trt_artifact
    proc = cli("tfmq-parity", out, "--json")
    assert proc.returncode == 0, proc.stderr
    v = json.loads(proc.stdout)["targets"]["tensorrt"]
    assert "not checked here" in v["runtime"] and not v["runtime_checked"] and v["levels"]["integers"]["passed"]
    line = one_line_error(cli("tfmq-build-engine", out), "tfmq-build-engine")
    assert "TensorRT is not installed" in line


def test_asymmetric_weights_in_a_custom_recipe_are_refused_before_calibration(tmp_path):
    from tfmq.calibration.recipe import get_recipe

    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(replace(get_recipe("w8a8"), name="mine").to_dict()))
    line = one_line_error(cli("tfmq-export", "--target", "tensorrt", "--recipe", recipe, "--out", tmp_path / "o"),
                          "tfmq-export")
    assert "weights.symmetric: true" in line and not (tmp_path / "o").exists()


# --- the static checker on deliberately illegal graphs -------------------------------------

@pytest.fixture(scope="module")
def legal_graph(trt_artifact):
    out, _ = trt_artifact
    return out / "tensorrt" / "model.onnx", json.loads((out / "tensorrt" / "lowering.json").read_text())["kernels"]


def _first(model, op, weight: bool | None = None, consumer: str | None = None):
    from tfmq.targets.tensorrt.legal import _const

    for n in model.graph:
        if n.op_type != op:
            continue
        if weight is not None and (_const(n.inputs[0]) is not None) != weight:
            continue
        if consumer and consumer not in [u.node.op_type for u in n.outputs[0].uses()]:
            continue
        return n
    raise AssertionError(f"no {op}")


def _set_const(model, node, index, arr, dtype):
    import onnx_ir as ir

    v = ir.Value(name=f"bad.{node.name}.{index}", const_value=ir.tensor(arr, dtype=dtype))
    v.shape, v.type = ir.Shape(arr.shape), ir.TensorType(dtype)
    model.graph.register_initializer(v)
    node.replace_input_with(index, v)


def _zero_point(m):
    import onnx_ir as ir

    _set_const(m, _first(m, "QuantizeLinear", weight=False), 2, np.array(3, np.int8), ir.DataType.INT8)


def _unsigned(m):
    import onnx_ir as ir

    q = _first(m, "QuantizeLinear", weight=False)
    _set_const(m, q, 2, np.array(0, np.uint8), ir.DataType.UINT8)


def _dynamic_scale(m):
    import onnx_ir as ir

    q = _first(m, "QuantizeLinear", weight=False)
    node = ir.node("Abs", inputs=[q.inputs[1]], name="computed_scale")
    m.graph.insert_before(q, node)
    q.replace_input_with(1, node.outputs[0])


def _negative_scale(m):
    import onnx_ir as ir

    _set_const(m, _first(m, "QuantizeLinear", weight=False), 1, np.array(-0.1, np.float32), ir.DataType.FLOAT)


def _per_channel_activation(m):
    import onnx_ir as ir

    _set_const(m, _first(m, "QuantizeLinear", weight=False), 1, np.full(4, 0.1, np.float32), ir.DataType.FLOAT)


def _int4_conv(m):
    import onnx_ir as ir

    from tfmq.targets.tensorrt.legal import _const

    dq = _first(m, "DequantizeLinear", weight=True, consumer="Conv")
    _set_const(m, dq, 0, _const(dq.inputs[0]), ir.DataType.INT4)
    _set_const(m, dq, 2, _const(dq.inputs[2]), ir.DataType.INT4)


def _weight_axis(m):
    import onnx_ir as ir

    dq = _first(m, "DequantizeLinear", weight=True, consumer="Conv")
    dq.attributes["axis"] = ir.AttrInt64("axis", 1)


def _lone_quantize(m):
    import onnx_ir as ir

    q = _first(m, "QuantizeLinear", weight=False)
    cast = ir.node("Cast", inputs=[q.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name="reads_integers")
    m.graph.insert_after(q, cast)


@pytest.mark.parametrize("breaks, rule", [
    (_zero_point, "zero-point"), (_unsigned, "unsigned"), (_dynamic_scale, "dynamic-scale"),
    (_negative_scale, "scale"), (_per_channel_activation, "activation-granularity"), (_int4_conv, "int4-placement"),
    (_weight_axis, "weight-axis"), (_lone_quantize, "placement")])
def test_the_checker_names_each_broken_rule(legal_graph, tmp_path, breaks, rule):
    import onnx_ir as ir

    from tfmq.targets.tensorrt.legal import check_graph

    path, kernels = legal_graph
    model = ir.load(path)
    breaks(model)
    rules = {v.rule for v in check_graph(model, kernels)}
    assert rules == {rule}, rules


def test_an_illegal_graph_fails_the_export_with_the_rule(legal_graph, tmp_path):
    import shutil

    import onnx_ir as ir

    from tfmq.errors import ExportError
    from tfmq.exporter.qdq_onnx import LoweringReport
    from tfmq.targets.base import Lowered
    from tfmq.targets.tensorrt import TensorRTTarget

    path, kernels = legal_graph
    model = ir.load(path)
    _zero_point(model)
    ir.save(model, tmp_path / "bad.onnx")
    folder = tmp_path / "t"
    folder.mkdir()
    shutil.copy(path.parent / "lowering.json", folder)
    target = TensorRTTarget()
    lowered = Lowered(None, None, tmp_path / "bad.onnx", LoweringReport(kernels=kernels))
    with pytest.raises(ExportError, match="zero-point"):
        target.compile(lowered, folder, target.options({"device": "h800"}))


def test_the_kernel_census_survives_only_if_the_kernels_do(legal_graph):
    import onnx_ir as ir

    from tfmq.targets.tensorrt.legal import check_graph

    path, kernels = legal_graph
    model = ir.load(path)
    rules = {v.rule for v in check_graph(model, {**kernels, "ghost": "/d/unet/ghost/Conv"})}
    assert rules == {"kernel"}


# --- INT4 as TensorRT takes it: blocked, weight-only MatMul -----------------------------------

def test_weight_only_int4_matmuls_become_blocked_with_the_same_values(cond, tmp_path):
    import onnx_ir as ir
    import onnxruntime as ort

    from tfmq.calibration.api import calibrate
    from tfmq.calibration.calibset import record
    from tfmq.calibration.recipe import Reconstruction, get_recipe
    from tfmq.exporter.deploy import build
    from tfmq.exporter.qdq_onnx import lower
    from tfmq.targets.tensorrt.legal import check_file, legalize

    cs = record(cond, seeds=2, steps=3)
    recipe = replace(get_recipe("w4a16").symmetric(), reconstruction=Reconstruction(iters=0))
    dep = build(cond, calibrate(cond, recipe, cs, progress=False).state)
    report = lower(dep, tmp_path / "lowered.onnx", tuple(cs.cond.shape[1:]))
    rep = legalize(tmp_path / "lowered.onnx", tmp_path / "legal.onnx", report.kernels)
    blocked = [c for c in rep.changes if "blocked" in c["change"]]
    assert blocked and rep.opset == 21 and rep.census.get("weights INT4 blocked") == len(blocked)
    assert check_file(tmp_path / "legal.onnx", report.kernels) == []
    assert not rep.int8_kernels and set(rep.weight_only) == set(report.kernels)  # W4A16: nothing runs INT8
    m = ir.load(tmp_path / "legal.onnx")
    for n in m.graph:
        if n.op_type == "DequantizeLinear" and n.attributes.get("block_size") is not None:
            k = n.inputs[0].const_value.shape[0]
            assert n.attributes["block_size"].value == k and n.attributes["axis"].value == 0
    import torch

    x, t, c = cs.inputs(torch.zeros(2, dtype=torch.long), torch.arange(2))
    feed = {"sample": x.numpy(), "timestep": t[:1].numpy(), "encoder_hidden_states": c.numpy()}
    a, b = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, feed)[0]
            for f in ("lowered.onnx", "legal.onnx"))
    # ORT picks other MatMul kernels for the two forms (float summation order): equal up to that;
    # a misread block layout would be off by orders of magnitude
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-4, np.abs(a - b).max()


# --- the engine inspector's precision census (the JSON TensorRT writes, detailed verbosity) ----

def test_precision_census_reads_the_inspector_layers():
    from tfmq.targets.tensorrt.engine import precision_census

    info = {"Layers": [
        {"Name": "/d/unet/a/conv1/Conv + /d/unet/a/Div", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "x", "Format/Datatype": "Channel major INT8 format where channel % 32 == 0"}],
         "Metadata": "[ONNX Layer: /d/unet/a/conv1/Conv]\x1e[ONNX Layer: /d/unet/a/Div]"},
        {"Name": "/d/unet/b/conv2/Conv", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "y", "Format/Datatype": "Row major linear FP32"}], "Metadata": ""},
        {"Name": "[CONVOLUTION]-[/d/unet/c/conv1/Conv] + [ELEMENTWISE]-[/d/unet/c/Div]", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "z", "Format/Datatype": "N/A due to dynamic shapes"}], "Metadata": ""},
        {"Name": "{ForeignNode[/d/unet/mid/attn/MatMul.../d/unet/mid/attn/Softmax]}", "LayerType": "Myelin",
         "Inputs": [], "Metadata": ""}]}
    got = precision_census(info, {"a.conv1": "/d/unet/a/conv1/Conv", "b.conv2": "/d/unet/b/conv2/Conv",
                                  "c.conv1": "/d/unet/c/conv1/Conv", "mid.attn.matmul_1": "/d/unet/mid/attn/MatMul_1"})
    assert got["layers"]["a.conv1"]["precision"] == "int8"
    # the silent fallback, named; and a format the inspector did not resolve is no proof of INT8
    assert got["floating"] == {"b.conv2": "Row major linear FP32", "c.conv1": "N/A due to dynamic shapes"}
    assert got["unproven"] == ["mid.attn.matmul_1"] and got["int8"] == 1
