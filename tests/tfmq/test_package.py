"""Packaging: the namespace layout, a light `import tfmq`, and the console scripts."""
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, cli

RUNTIMES = ("onnxruntime", "openvino", "coremltools", "tensorrt")


def test_import_tfmq_loads_no_runtime_sdk():
    code = ("import sys, tfmq, tfmq.calibration, tfmq.exporter, tfmq.targets, tfmq.models, tfmq.sampling, "
            "tfmq.quality.harness, tfmq.cli.export, tfmq.cli.parity, tfmq.cli.calibrate, tfmq.cli.build_engine, "
            "tfmq.pipeline, tfmq.drop_in; from tfmq.targets.registry import targets; targets(); "
            f"print([m for m in {RUNTIMES!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_runtime_sdk_import_would_be_seen():
    # The check above can fail: onnxruntime is installed, and importing it shows up.
    code = "import sys, onnxruntime; print('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_code_folders_ship_under_the_tfmq_namespace():
    import tfmq.calibration
    import tfmq.exporter
    import tfmq.targets

    for mod, folder in ((tfmq.calibration, "calibration"), (tfmq.exporter, "exporter"), (tfmq.targets, "targets")):
        assert Path(mod.__file__).parent.name == folder
    for generic in ("calibration", "exporter", "targets"):
        code = f"import importlib.util, sys; sys.path.remove(''); print(importlib.util.find_spec({generic!r}))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
        assert out.stdout.strip() == "None", f"a top-level {generic!r} package is importable"


@pytest.mark.parametrize("prog, says", [("tfmq-export", "per-device artifacts"),
                                         ("tfmq-calibrate", "w4a8-mp-g16"),
                                         ("tfmq-parity", "parity checks"),
                                         ("tfmq-build-engine", "TensorRT engine")])
def test_console_scripts_have_help(prog, says):
    out = cli(prog, "--help")
    assert out.returncode == 0, out.stderr
    assert says in out.stdout


def test_bundled_assets_are_package_data():
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = cfg["tool"]["setuptools"]["package-data"]["tfmq"]
    shipped = set()
    for pat in patterns:
        shipped |= {p for p in (REPO / "tfmq").glob(pat)}
    for needed in ("assets/models/mnist-ddpm/unet/diffusion_pytorch_model.safetensors",
                   "assets/models/mnist-ddpm/scheduler/scheduler_config.json",
                   "assets/models/mnist-cond/class_embedder/embeddings.safetensors",
                   "assets/classifier/model.safetensors", "assets/classifier/fid_reference.safetensors"):
        assert REPO / "tfmq" / needed in shipped, needed
