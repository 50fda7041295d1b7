"""tfmq-parity: re-check an artifact directory on this machine, without calibrating again."""
from __future__ import annotations

import json
from pathlib import Path

from tfmq.cli.common import EXIT_ERROR, parser, run

DESCRIPTION = """Re-run the parity checks of an artifact directory written by tfmq-export, here.

Each target in the artifact's manifest.json is checked against the golden data stored in
the artifact, without calibrating again:
  fp32  the golden seeds are sampled again in FP32 and must reproduce the stored images
        (PSNR threshold declared in tfmq/reference.py);
  onnx  level 2: the stored golden inputs run through the artifact here; its error vs the
        stored FP32 outputs must match the stored fake-quant error, and its outputs the
        stored ones (tolerances in the manifest, declared in targets/onnxruntime).
        --trajectory adds level 3 (DDIM runs vs FP32 and the artifact's QuantState).
  openvino, coreml, tensorrt  the same checks through their runtimes where those run
        (Core ML on macOS; TensorRT where it is installed, on the engine that
        tfmq-build-engine built); elsewhere reported as "not checked here" with why.
Prints one JSON verdict; exits 0 when every check passes, 2 otherwise.

example:
  tfmq-parity artifacts/mnist-ddpm
"""


def main(argv=None) -> int:
    ap = parser("tfmq-parity", DESCRIPTION)
    ap.add_argument("artifact", type=Path, help="artifact directory (holds manifest.json)")
    ap.add_argument("--model", help="load the model from here instead of the manifest's model spec")
    ap.add_argument("--trajectory", action="store_true", help="also re-run level 3 (whole DDIM runs) for quantized targets")
    return run("tfmq-parity", parity, ap.parse_args(argv))


def parity(args) -> int:
    from tfmq.artifacts import read_manifest
    from tfmq.errors import TfmqError
    from tfmq.models import load_model
    from tfmq.reference import check_reference

    manifest = read_manifest(args.artifact)
    verdicts = {}
    model = None
    for name, target in manifest["targets"].items():
        folder = args.artifact / target.get("dir", name)
        if not (folder / "golden.npz").is_file():
            raise TfmqError(f"{folder} has no golden.npz: the artifact is incomplete")
        if name == "fp32":
            model = model or load_model(args.model or manifest["model"]["spec"])
            verdicts[name] = check_reference(model, folder)
        else:
            verdicts[name] = _check_quantized(args, manifest, name, folder)
    passed = all(v["passed"] for v in verdicts.values())
    print(json.dumps({"artifact": str(args.artifact), "passed": passed, "targets": verdicts}, indent=2))
    return 0 if passed else EXIT_ERROR


def _check_quantized(args, manifest: dict, name: str, folder: Path) -> dict:
    from tfmq.calibration.state import QuantState
    from tfmq.errors import TfmqError
    from tfmq.exporter import parity as gates
    from tfmq.models import load_model
    from tfmq.targets.base import get_target

    try:
        target = get_target(name)
    except TfmqError as e:
        raise TfmqError(f"{args.artifact}: target {name!r} cannot be checked by this release of tfmq") from e
    target.require()
    why = target.runs_here()
    if why:  # e.g. Core ML off macOS: the export's Linux pre-gate stands, the runtime check waits
        return {"passed": True, "skipped": f"not checked here: {why}"}
    run = target.runner(folder)
    verdict = {"levels": {"target": gates.target_level(run, folder / "golden.npz", target.tolerance)}}
    if args.trajectory:
        model = load_model(args.model or manifest["model"]["spec"])
        state = QuantState.load(args.artifact / manifest["targets"][name].get("quant_state",
                                                                              manifest["quant_state"]["dir"]))
        sched = manifest["schedule"]
        verdict["levels"]["trajectory"] = gates.trajectory_level(
            model, state.apply(model, conv_outputs=target.conv_outputs), run, sched["steps"], sched.get("guidance", 1.0),
            target.tolerance, deployment=target.deployment_runner(folder))
    verdict["passed"] = all(v["passed"] for v in verdict["levels"].values())
    return verdict


if __name__ == "__main__":
    raise SystemExit(main())
