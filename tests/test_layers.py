"""The package's large-scale shape: layers import one way, calibration names no target, the
exporter takes no target flag, and the code folders import only under the tfmq namespace."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

ROOTS = {"tfmq": REPO / "tfmq", "tfmq.calibration": REPO / "calibration", "tfmq.exporter": REPO / "exporter",
         "tfmq.targets": REPO / "targets"}
# cli -> api (pipeline, drop-in) -> targets -> exporter -> calibration -> core
LAYERS = ["core", "calibration", "exporter", "targets", "api", "cli"]
TARGET_NAMES = ("onnx", "openvino", "tensorrt", "coreml", "core ml")
TARGET_FLAGS = ("int4_weights", "cast_int4", "u8_only", "signed_zero", "decomposed", "for_openvino",
                "for_tensorrt", "for_onnxruntime")


def modules():
    for ns, folder in ROOTS.items():
        for f in sorted(folder.rglob("*.py")):
            parts = [p for p in f.relative_to(folder).with_suffix("").parts if p != "__init__"]
            yield ".".join([ns, *parts]), f


def layer(module: str) -> str:
    parts = module.split(".")
    if module == "tfmq":  # the package's facade: tfmq.export
        return "api"
    if len(parts) > 1 and parts[1] in ("calibration", "exporter", "targets", "cli"):
        return parts[1]
    if len(parts) > 1 and parts[1] in ("pipeline", "drop_in"):
        return "api"
    return "core"


def imports(path: Path, module: str):
    """Every tfmq module ``path`` imports, at module level or inside a function (line, name)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base]
        else:
            continue
        for n in names:
            if n == "tfmq" or n.startswith("tfmq."):
                yield node.lineno, n


def test_every_import_points_down_the_layers():
    wrong = []
    for module, path in modules():
        mine = LAYERS.index(layer(module))
        for line, name in imports(path, module):
            if LAYERS.index(layer(name)) > mine:
                wrong.append(f"{path.relative_to(REPO)}:{line} ({layer(module)}) imports {name} ({layer(name)})")
    assert not wrong, "\n".join(wrong)


def test_a_target_imports_no_other_target():
    wrong = []
    for module, path in modules():
        parts = module.split(".")
        if parts[:2] != ["tfmq", "targets"] or len(parts) < 3 or parts[2] in ("base", "registry"):
            continue
        for line, name in imports(path, module):
            other = name.split(".")
            if other[:2] == ["tfmq", "targets"] and len(other) > 2 and other[2] not in ("base", parts[2]):
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from tfmq.targets.registry import get_target\n")
    assert [n for _, n in imports(bad, "tfmq.calibration.bad")] == ["tfmq.targets.registry"]
    assert LAYERS.index(layer("tfmq.targets.registry")) > LAYERS.index(layer("tfmq.calibration.bad"))


def test_calibration_names_no_target_and_the_exporter_takes_no_target_flag():
    named = [f"{f.relative_to(REPO)}: {w}" for f in (REPO / "calibration").rglob("*.py")
             for w in TARGET_NAMES if w in f.read_text().lower()]
    assert not named, named
    flags = [f"{f.relative_to(REPO)}: {w}" for f in (REPO / "exporter").rglob("*.py")
             for w in TARGET_FLAGS if w in f.read_text()]
    assert not flags, flags


@pytest.mark.parametrize("folder", ["calibration", "exporter", "targets"])
def test_a_bare_import_of_a_code_folder_is_refused(folder):
    out = subprocess.run([sys.executable, "-c", f"import {folder}"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0 and f"tfmq.{folder}" in out.stderr, out.stderr
