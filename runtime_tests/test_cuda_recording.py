"""Recording the calibration set with the FP model on a CUDA device (marker ``cuda``): in
float32, float16 and bfloat16 the set stays float32 on the CPU, repeats exactly on a rerun,
and stays near the CPU float32 set; a calibration and an ONNX export run from it. Skipped
where torch sees no CUDA device."""
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="no CUDA device visible to this torch")]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_recording_repeats_and_stays_near_the_cpu_set(dtype):
    from tfmq.calibration.calibset import record
    from tfmq.compute import Compute
    from tfmq.models import load_model

    model = load_model("mnist-cond")
    gpu = Compute(device="cuda", dtype=dtype)
    a, b = (record(model, seeds=4, steps=6, compute=gpu) for _ in range(2))
    ref = record(model, seeds=4, steps=6)
    assert a.x.device.type == "cpu" and a.x.dtype == torch.float32 and torch.equal(a.x, b.x)
    rel = float((a.x - ref.x).norm() / ref.x.norm())
    print(f"{dtype}: rel L2 vs CPU float32 {rel:.2e} ({torch.cuda.get_device_name()})")
    assert rel < (1e-4 if dtype == "float32" else 0.05), rel
    assert a.meta["compute"]["device_name"] == torch.cuda.get_device_name()


def test_export_records_on_cuda_in_half_precision(tmp_path):
    out = tmp_path / "a"
    p = subprocess.run([sys.executable, "-m", "tfmq.cli.export", "--model", "mnist-cond", "--target", "onnx",
                        "--torch-device", "cuda", "--torch-dtype", "float16", "--iters", "0", "--calib-seeds", "4",
                        "--n", "8", "--steps", "6", "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    import json

    m = json.loads((out / "manifest.json").read_text())
    assert m["quant_state"]["calibration"]["calibration_set"]["compute"]["dtype"] == "float16"
    assert m["targets"]["onnx"]["parity"]["passed"]
