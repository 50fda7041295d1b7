"""tfmq-export --target coreml on Linux: the package carries our integers (read back and checked
bit for bit by coremltools' own loader), deployment targets that cannot express a recipe are
refused before calibration, and the Linux pre-gate runs the converted program. Core ML
predictions themselves need macOS (runtime_tests, marker coreml)."""
import json
import sys

import numpy as np
import pytest

from helpers import FAST, cli, one_line_error, summary_row

pytest.importorskip("coremltools", reason="coremltools is not installed (pip install 'tfmq-dm[coreml]')")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def coreml_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cm") / "cond-w4a8"
    proc = cli("tfmq-export", "--model", "mnist-cond", "--target", "coreml", "--recipe", "w4a8", *FAST, "--out", out)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out, proc


def test_package_holds_the_quant_state_and_passes_the_linux_pregate(coreml_artifact):
    out, proc = coreml_artifact
    m = json.loads((out / "manifest.json").read_text())
    c = m["targets"]["coreml"]
    assert c["consumes"] == "deploy-module"
    comp = c["compile"]
    assert comp["deployment_target"] == "iOS18"  # 4-bit weights: the lowest target that has them
    assert comp["inputs"] == ["sample", "timestep", "encoder_hidden_states"]  # the diffusers calling convention
    v = comp["verification"]
    state_layers = json.loads((out / "quant_state" / "quant_state.json").read_text())["layers"]
    assert v["weights_bit_exact"] == len([n for n in state_layers if not n.startswith("time_embedding.")])
    assert v["activation_params_exact"] > 0 and v["extra_constexpr"] == 0
    assert comp["ops"]["constexpr_blockwise_shift_scale"] == v["weights_bit_exact"]
    assert comp["ops"]["quantize"] > 0
    p = c["parity"]
    assert p["passed"] is True and set(p["levels"]) == {"linux_pregate", "linux_pregate_trajectory", "floor"}
    assert "macOS" in p["runtime"]
    assert (out / "coreml" / "model.mlpackage").is_dir() and (out / "coreml" / "golden.npz").is_file()
    assert "pre-gate PASSED" in summary_row(proc.stdout, "coreml")
    # alone, Core ML takes the preset as it is (it needs nothing of a recipe); inside --target all
    # it shares the variant the other float-conv targets need (tests/tfmq/test_pipeline.py)
    assert c["recipe"] == m["quant_state"]["recipe"] == "w4a8"


def test_the_package_stores_4bit_weights_as_int4(coreml_artifact):
    from tfmq.targets.coreml import read_program

    out, _ = coreml_artifact
    spec, _ = read_program(out / "coreml" / "model.mlpackage")
    from coremltools.proto import MIL_pb2

    f = spec.mlProgram.functions["main"]
    ops = [op for op in f.block_specializations[f.opset].operations if op.type == "constexpr_blockwise_shift_scale"]
    types = {MIL_pb2.DataType.Name(op.inputs["data"].arguments[0].value.type.tensorType.dataType) for op in ops}
    assert ops and types <= {"UINT4", "INT4"}, types


def test_verification_fails_when_the_package_differs(coreml_artifact):
    """The check can fail: one integer, or one activation scale, that differs is caught."""
    from tfmq.calibration.state import QuantState
    from tfmq.errors import ExportError
    from tfmq.exporter.deploy import FoldedAct, build
    from tfmq.models import load_model
    from tfmq.targets.coreml import verify

    out, _ = coreml_artifact
    package = out / "coreml" / "model.mlpackage"
    dep = build(load_model("mnist-cond"), QuantState.load(out / "quant_state"))
    assert verify(package, dep, np.float16)["verification"]["extra_quantize"] == 0
    layer = next(iter(dep.layers.values()))
    layer.w_int.view(-1)[0] += 1
    with pytest.raises(ExportError, match="not in the package bit for bit"):
        verify(package, dep, np.float16)
    layer.w_int.view(-1)[0] -= 1
    act = next(m for m in dep.modules() if isinstance(m, FoldedAct))
    act.s *= 1.37  # a value no quantizer of this model has (the check matches values, see verify)
    with pytest.raises(ExportError, match="activation quantizers have no quantize op"):
        verify(package, dep, np.float16)


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS tfmq-parity runs the real prediction")
def test_parity_off_macos_says_what_it_did_not_check(coreml_artifact):
    out, _ = coreml_artifact
    ok = cli("tfmq-parity", out, "--json")
    assert ok.returncode == 0, ok.stderr
    v = json.loads(ok.stdout)["targets"]["coreml"]
    # the package's integers are read back here; the Core ML runtime is not checked, never passed
    assert v["levels"]["integers"]["passed"] and not v["runtime_checked"] and "only on macOS" in v["runtime"]
    table = cli("tfmq-parity", out)
    assert "integers PASSED; runtime not checked here" in summary_row(table.stdout, "coreml")


def test_deployment_targets_that_cannot_express_the_recipe_are_refused(tmp_path):
    line = one_line_error(cli("tfmq-export", "--target", "coreml", "--recipe", "w8a8", "--deployment-target",
                              "iOS16", *FAST, "--out", tmp_path / "a"), "tfmq-export")
    assert "activation quantization" in line and "iOS17" in line and not (tmp_path / "a").exists()
    line = one_line_error(cli("tfmq-export", "--target", "coreml", "--recipe", "w4a8", "--deployment-target",
                              "iOS17", *FAST, "--out", tmp_path / "b"), "tfmq-export")
    assert "4-bit weights" in line and "iOS18" in line
    line = one_line_error(cli("tfmq-export", "--target", "coreml", "--threads", "2", *FAST,
                              "--out", tmp_path / "c"), "tfmq-export")
    assert "option of the openvino target" in line


def test_neural_engine_chunks_hold_the_whole_model(coreml_artifact, tmp_path):
    """bisect_model twice (4 chunks): together the chunks hold every integer and activation
    parameter bit for bit and exactly the model's compute ops, each chunk fed by the inputs
    or earlier chunks; a chunk left out is caught. (Running them is macOS: runtime_tests.)"""
    from tfmq.calibration.state import QuantState
    from tfmq.errors import ExportError
    from tfmq.exporter.deploy import build
    from tfmq.models import load_model
    from tfmq.targets.coreml import make_chunks, verify

    out, _ = coreml_artifact
    package = out / "coreml" / "model.mlpackage"
    dep = build(load_model("mnist-cond"), QuantState.load(out / "quant_state"))
    ops = verify(package, dep, np.float16)["ops"]
    report = make_chunks(package, tmp_path / "chunks", 4, dep, np.float16, ops)
    assert report["count"] == 4 and report["verification"]["weights_bit_exact"] == len(dep.layers)
    assert report["verification"]["extra_constexpr"] == 0
    assert report["chunks"][-1]["outputs"] == ["out_sample"]
    paths = sorted((tmp_path / "chunks").glob("chunk*.mlpackage"))
    with pytest.raises(ExportError, match="not in the package bit for bit"):
        verify(paths[:-1], dep, np.float16)
