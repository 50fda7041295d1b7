"""A verdict means the artifact is the one that was verified: a one-step change of one integer
or a 1.05x change of one scale in any target's model file fails tfmq-parity, naming the file;
paths read from the artifact never leave it; a broken state fails before any work."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from helpers import FAST, cli, one_line_error, summary_row
from tfmq.pipeline import recheck

pytestmark = pytest.mark.slow  # one export of every target, then re-checks of tampered copies


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("tamper") / "all"
    proc = cli("tfmq-export", "--target", "all", "--recipe", "w8a8", *FAST, "--out", out)
    assert proc.returncode in (0, 2), proc.stderr  # 2: OpenVINO on a CPU without VNNI (its verdict, not ours)
    return out


def copy(artifact, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def edit_initializer(path, pick, change):
    """Change the first initializer ``pick(name, array)`` selects, in place; returns its name."""
    m = onnx.load(str(path))
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if pick(t.name, a):
            t.CopyFrom(numpy_helper.from_array(change(a.copy()), t.name))
            onnx.save(m, str(path))
            return t.name
    raise AssertionError(f"nothing to edit in {path}")


def int_plus_one(a):
    flat = a.reshape(-1)
    flat[0] = flat[0] + 1 if flat[0] < np.iinfo(a.dtype).max else flat[0] - 1
    return a


EDITS = {
    "weight integer +1": (lambda n, a: n.endswith(".w_int") and a.dtype in (np.int8, np.uint8), int_plus_one),
    "weight scale x1.05": (lambda n, a: n.endswith(".w_scale"), lambda a: (a * 1.05).astype(a.dtype)),
    "activation scale x1.05": (lambda n, a: ".q_scale." in n, lambda a: (a * 1.05).astype(a.dtype)),
}


@pytest.mark.parametrize("target, file", [("onnx", "model.onnx"), ("openvino", "model.onnx"),
                                          ("tensorrt", "model.onnx"), ("tensorrt", "model.fp16.onnx")])
@pytest.mark.parametrize("edit", list(EDITS))
def test_a_changed_integer_or_scale_fails_and_is_named(artifact, tmp_path, target, file, edit):
    if target not in json.loads((artifact / "manifest.json").read_text())["targets"]:
        pytest.skip(f"{target} was not built here")
    a = copy(artifact, tmp_path)
    pick, change = EDITS[edit]
    edit_initializer(a / target / file, pick, change)
    verdicts = recheck(a)
    assert verdicts["files"]["changed"] == {f"{target}/{file}": "changed"}
    assert verdicts[target]["passed"] is False and verdicts[target]["levels"]["integers"]["passed"] is False
    others = [t for t, v in verdicts.items() if t not in ("files", target, "fp32") and v["levels"]["integers"]["passed"]]
    assert len(others) == len(verdicts) - 3  # only the edited target's integers differ


def test_the_digests_of_a_qlinearconv_scale_and_the_cli_line(artifact, tmp_path):
    a = copy(artifact, tmp_path)
    # a QLinearConv's weight scale (ONNX Runtime's integer convs read it as an input)
    m = onnx.load(str(a / "onnx" / "model.onnx"))
    node = next(n for n in m.graph.node if n.op_type == "QLinearConv")
    name = node.input[4]
    edit_initializer(a / "onnx" / "model.onnx", lambda n, _: n == name, lambda v: (v * 1.05).astype(v.dtype))
    proc = cli("tfmq-parity", a)
    assert proc.returncode == 2
    assert "onnx/model.onnx changed" in summary_row(proc.stdout, "files")
    assert "FAILED" in summary_row(proc.stdout, "onnx")


def test_openvino_ir_and_coreml_package_changes_are_caught(artifact, tmp_path):
    targets = json.loads((artifact / "manifest.json").read_text())["targets"]
    a = copy(artifact, tmp_path)
    changed = {}
    if "openvino" in targets:  # one integer weight in the IR's blob
        blob = a / "openvino" / "model.bin"
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 1
        blob.write_bytes(bytes(data))
        changed["openvino/model.bin"] = "changed"
    if "coreml" in targets:
        weights = a / "coreml" / "model.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
        data = bytearray(weights.read_bytes())
        data[-100] ^= 1
        weights.write_bytes(bytes(data))
        changed["coreml/model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"] = "changed"
    verdicts = recheck(a)
    assert verdicts["files"]["changed"] == changed and verdicts["files"]["passed"] is False


def test_an_intact_artifact_rechecks_on_the_tight_same_machine_bound(artifact):
    verdicts = recheck(artifact)
    assert verdicts["files"]["passed"] and verdicts["files"]["files"] > 10
    for t, v in verdicts.items():
        if t in ("files", "fp32"):
            continue
        assert v["levels"]["integers"]["passed"], (t, v["levels"]["integers"])
        if v["runtime_checked"]:
            assert v["levels"]["target"]["same_host"] is True
            assert "1e-06" in v["levels"]["target"]["rule"]
        else:
            assert v["passed"] is True and "not checked here" in v["runtime"]


def test_a_manifest_dir_that_leaves_the_artifact_is_refused(artifact, tmp_path):
    a = copy(artifact, tmp_path)
    m = json.loads((a / "manifest.json").read_text())
    m["targets"]["onnx"]["dir"] = "../../other/onnx"
    (a / "manifest.json").write_text(json.dumps(m))
    line = one_line_error(cli("tfmq-parity", a), "tfmq-parity")
    assert "'../../other/onnx' leaves" in line


def test_an_engine_name_that_leaves_the_artifact_is_refused(artifact):
    from tfmq.artifacts import ArtifactError, inside

    with pytest.raises(ArtifactError, match="leaves"):
        inside(artifact / "tensorrt", "../../x.engine", "the engine named in tensorrt.json")
    with pytest.raises(ArtifactError, match="leaves"):
        inside(artifact / "tensorrt", "/etc/passwd", "the engine named in tensorrt.json")
    assert inside(artifact / "tensorrt", "model.h800.engine", "x") == artifact / "tensorrt" / "model.h800.engine"


def test_a_broken_state_fails_before_any_work(artifact, tmp_path):
    from safetensors.torch import load_file, save_file

    qs = tmp_path / "qs"
    shutil.copytree(artifact / "quant_state", qs)
    t = load_file(str(qs / "quant_state.safetensors"))
    k = sorted(n for n in t if n.endswith(".w_scale"))[0]
    t[k][0] = -1.0
    save_file(t, str(qs / "quant_state.safetensors"))
    line = one_line_error(cli("tfmq-export", "--target", "onnx", "--quant-state", qs, *FAST, "--out", tmp_path / "o"),
                          "tfmq-export")
    assert k in line and "not finite and > 0" in line and not (tmp_path / "o").exists()


def test_artifacts_are_readable_by_other_users(artifact):
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    for p in [artifact, *artifact.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        want = (0o777 if p.is_dir() or mode & 0o100 else 0o666) & ~mask
        assert mode == want, (p, oct(mode))


def test_a_deleted_or_corrupt_model_file_fails_its_target_by_name(artifact, tmp_path):
    a = copy(artifact, tmp_path)
    (a / "onnx" / "model.onnx").unlink()
    (a / "tensorrt" / "model.onnx").write_bytes(b"not a graph")
    verdicts = recheck(a)
    assert verdicts["files"]["changed"] == {"onnx/model.onnx": "missing", "tensorrt/model.onnx": "changed"}
    for t in ("onnx", "tensorrt"):
        assert verdicts[t]["passed"] is False and "model.onnx" in verdicts[t]["error"], verdicts[t]
    proc = cli("tfmq-parity", a)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_another_user_can_read_an_artifact_root_wrote(artifact):
    """As the deployment images run: a non-root user reads every file (where this runs as root)."""
    import os
    import subprocess
    import tempfile

    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to act as another user")
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        base.chmod(0o755)
        shutil.copytree(artifact, base / "a")  # copy2 keeps the modes the export gave
        files = [p for p in (base / "a").rglob("*") if p.is_file()]
        nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        out = subprocess.run([*nobody, "cat", *map(str, files)], capture_output=True)
        assert out.returncode == 0, out.stderr.decode()[:500]
    finally:
        shutil.rmtree(base, ignore_errors=True)
