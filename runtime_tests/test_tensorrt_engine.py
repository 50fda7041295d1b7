"""The real TensorRT engine of an exported artifact (where TensorRT and an H800 or a Jetson Orin
Nano are present: the docker/tensorrt-*.Dockerfile images): build it with tfmq-build-engine,
prove INT8 per quantized layer, and re-run the golden and trajectory gates through the engine."""
import json

import pytest

from helpers import cli
from tfmq.targets.tensorrt import PROFILES, tensorrt_runs_here  # noqa: E402

WHY = tensorrt_runs_here()
pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.skipif(WHY is not None, reason=f"TensorRT not installed or no GPU here: {WHY}"),
]


def _device() -> str:
    from tfmq.targets.tensorrt.engine import gpu_compute_capability

    cap = gpu_compute_capability()
    for name, p in PROFILES.items():
        if p.compute_capability == cap:
            return name
    pytest.skip(f"this GPU (compute capability {cap}) has no device profile")


@pytest.mark.parametrize("model", ["mnist-ddpm", "mnist-cond"])
def test_engine_runs_int8_and_matches_the_golden_data(tmp_path, model):
    out = tmp_path / "trt"
    made = cli("tfmq-export", "--model", model, "--target", "tensorrt", "--device", _device(), "--recipe", "w8a8",
               "--iters", "0", "--calib-seeds", "4", "--n", "8", "--steps", "6", "--out", out)
    assert made.returncode == 0, made.stdout + made.stderr
    built = cli("tfmq-build-engine", out)
    assert built.returncode == 0, built.stdout + built.stderr
    info = json.loads((out / "tensorrt" / "engine.json").read_text())
    settings = json.loads((out / "tensorrt" / "tensorrt.json").read_text())
    assert not info["floating"] and info["int8"] + len(info["unproven"]) == len(settings["int8_kernels"])
    proc = cli("tfmq-parity", out, "--trajectory")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    v = json.loads(proc.stdout)["targets"]["tensorrt"]
    assert v["passed"] and set(v["levels"]) == {"integers", "target", "trajectory", "floor"}
