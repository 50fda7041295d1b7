"""The client folders in the real clients: optimum's ONNX Runtime and optimum-intel's OpenVINO
Stable Diffusion pipelines load ``<target>/pipeline/`` and generate, at the calibrated step
count and at another one. They run in their own environment (``.venv-clients``, built here
from tests/clients/requirements.txt on first use: optimum pins transformers < 4.58)."""
import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from helpers import REPO
from tfmq.hostcpu import int8_dot_saturates

pytestmark = pytest.mark.slow
# a CPU without VNNI: the OpenVINO export fails its parity gate (u8 x s8 saturation, tests/targets/openvino)
SATURATES = int8_dot_saturates()
CLIENTS = REPO / ".venv-clients"
REQUIREMENTS = REPO / "tests" / "clients" / "requirements.txt"


@pytest.fixture(scope="module")
def clients_python() -> Path:
    python = CLIENTS / "bin" / "python"
    stamp = CLIENTS / "requirements.txt"
    if not (python.is_file() and stamp.is_file() and stamp.read_text() == REQUIREMENTS.read_text()):
        venv.create(CLIENTS, with_pip=True, clear=True)
        p = subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
        stamp.write_text(REQUIREMENTS.read_text())
    return python


@pytest.fixture(scope="module")
def exported(sd_pipe, tmp_path_factory):
    import tfmq
    from tfmq.pipeline import ExportOptions

    out = tmp_path_factory.mktemp("client") / "a"
    opts = ExportOptions(n=4, steps=6, calib_seeds=4, iters=0, progress=False)
    manifest = tfmq.export(str(sd_pipe), "w8a8", ["onnx"] + ([] if SATURATES else ["openvino"]), out, opts)
    assert not manifest.failed
    return sd_pipe, out, manifest.data


@pytest.mark.parametrize("target,runtime", [("onnx", "onnxruntime"), ("openvino", "openvino")])
def test_optimum_pipeline_loads_the_client_folder_and_generates(clients_python, exported, target, runtime):
    if target == "openvino" and SATURATES:
        pytest.skip("this CPU has no VNNI: OpenVINO's INT8 export fails parity here, so there is no client folder")
    source, out, manifest = exported
    entry = manifest["targets"][target]["client_folder"]
    assert entry["passed"] and max(entry["float_parts_rel_l2"].values()) < 1e-4, entry
    p = subprocess.run([str(clients_python), str(REPO / "tests" / "clients" / "optimum_sd.py"), runtime,
                        str(source), str(out / target / "pipeline"), "6", "9"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    for steps, r in result.items():  # 6: the calibrated step count; 9: another (nearest-step parameters)
        assert r["finite"] and r["shape"] == [2, 16, 16, 3], (steps, r)
        # the client's own plumbing and float parts vs diffusers with the same UNet file: only
        # OpenVINO's bf16 float layers (its CPU default) differ
        assert r["vs_same_unet_db"] > 35, (steps, r)
        assert r["vs_fp32_db"] > 30, (steps, r)


def test_a_changed_client_folder_file_fails_the_recheck(exported, tmp_path):
    import shutil

    _, out, _ = exported
    copy = tmp_path / "a"
    shutil.copytree(out, copy)
    te = copy / "onnx" / "pipeline" / "text_encoder" / "model.onnx"
    te.write_bytes(te.read_bytes()[:-8] + b"\0" * 8)
    p = subprocess.run([sys.executable, "-m", "tfmq.cli.parity", str(copy)], capture_output=True, text=True)
    assert p.returncode != 0 and "onnx/pipeline/text_encoder/model.onnx" in p.stdout + p.stderr
