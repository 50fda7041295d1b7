"""The real Core ML prediction of an exported package (macOS only): the level-2 golden check
and a whole DDIM trajectory against FP32, as tfmq-parity runs them on a Mac."""
import json
import sys

import pytest

from helpers import cli

pytestmark = [
    pytest.mark.coreml,
    pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predictions run only on macOS"),
]


def test_coreml_package_predicts_within_the_declared_tolerance(tmp_path):
    pytest.importorskip("coremltools")
    out = tmp_path / "cm"
    made = cli("tfmq-export", "--target", "coreml", "--recipe", "w8a8", "--iters", "0", "--calib-seeds", "4",
               "--n", "8", "--steps", "6", "--out", out)
    assert made.returncode == 0, made.stderr
    proc = cli("tfmq-parity", out, "--trajectory")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    v = json.loads(proc.stdout)["targets"]["coreml"]
    assert v["passed"] and set(v["levels"]) == {"integers", "target", "trajectory", "floor"}


def test_neural_engine_chunks_compose_to_the_whole_package(tmp_path):
    """bisect_model's chunks, run one after the other, give the whole package's outputs."""
    pytest.importorskip("coremltools")
    import numpy as np

    from tfmq.targets.coreml import CoreMLTarget

    out = tmp_path / "cm"
    made = cli("tfmq-export", "--target", "coreml", "--model", "mnist-cond", "--recipe", "w8a8", "--chunks", "4",
               "--iters", "0", "--calib-seeds", "4", "--n", "8", "--steps", "6", "--skip-parity", "--out", out)
    assert made.returncode == 0, made.stderr
    whole = CoreMLTarget().runner(out / "coreml")
    chained = CoreMLTarget().runner(out / "coreml", {"chunks": True})
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 1, 32, 32)).astype(np.float32)
    ehs = rng.standard_normal((2, 4, 64)).astype(np.float32)
    t = np.array([json.loads((out / "manifest.json").read_text())["schedule"]["timesteps"][0]], np.int64)
    a, b = whole(sample, t, ehs), chained(sample, t, ehs)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-3
