"""tfmq-build-engine: build an artifact's TensorRT engine where TensorRT and its GPU are."""
from __future__ import annotations

import json
from pathlib import Path

from tfmq.cli.common import EXIT_ERROR, parser, run

DESCRIPTION = """Build the TensorRT engine of an artifact directory (where TensorRT runs), prove INT8 per
quantized layer and re-run the parity gates against its golden data.

example:
  tfmq-build-engine artifacts/mnist-ddpm
"""


def main(argv=None) -> int:
    ap = parser("tfmq-build-engine", DESCRIPTION)
    ap.add_argument("artifact", type=Path, help="artifact directory written by tfmq-export --target tensorrt")
    return run("tfmq-build-engine", build, ap.parse_args(argv))


def build(args) -> int:
    from tfmq.artifacts import Manifest
    from tfmq.errors import TfmqError
    from tfmq.exporter import parity
    from tfmq.targets.registry import get_target
    from tfmq.targets.tensorrt.engine import build_engine

    manifest = Manifest.read(args.artifact)
    if "tensorrt" not in manifest.targets:
        raise TfmqError(f"{args.artifact}: the manifest has no tensorrt target")
    target = get_target("tensorrt")
    why = target.runs_here()
    if why:
        raise TfmqError(f"cannot build the engine here: {why}")
    folder = args.artifact / manifest.targets["tensorrt"]["dir"]
    info = build_engine(folder)
    level = parity.target_level(target.runner(folder), folder / "golden.npz", target.tolerance)
    (folder / "engine_parity.json").write_text(json.dumps(level, indent=2) + "\n")
    print(json.dumps({"engine": info["engine"], "int8_kernels": info["int8"], "unproven": info["unproven"],
                      "parity": level["passed"]}))
    return 0 if level["passed"] else EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
