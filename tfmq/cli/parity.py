"""tfmq-parity: re-check an artifact directory on this machine, without calibrating again."""
from __future__ import annotations

import json
from pathlib import Path

from tfmq.cli.common import EXIT_ERROR, parser, run

DESCRIPTION = """Re-run the parity checks of an artifact directory written by tfmq-export, here.

Each target in the artifact's manifest.json is checked against the golden data stored in
the artifact. This release checks the FP32 reference stage: the golden seeds are sampled
again in FP32 and must reproduce the stored images (PSNR threshold declared in
tfmq/reference.py). Prints one JSON verdict; exits 0 when every check passes, 2 otherwise.

example:
  tfmq-parity artifacts/mnist-ddpm
"""


def main(argv=None) -> int:
    ap = parser("tfmq-parity", DESCRIPTION)
    ap.add_argument("artifact", type=Path, help="artifact directory (holds manifest.json)")
    ap.add_argument("--model", help="load the model from here instead of the manifest's model spec")
    return run("tfmq-parity", parity, ap.parse_args(argv))


def parity(args) -> int:
    from tfmq.artifacts import read_manifest
    from tfmq.errors import TfmqError
    from tfmq.models import load_model
    from tfmq.reference import check_reference

    manifest = read_manifest(args.artifact)
    verdicts = {}
    for name, target in manifest["targets"].items():
        if name != "fp32":
            raise TfmqError(f"{args.artifact}: target {name!r} cannot be checked by this release of tfmq")
        folder = args.artifact / target.get("dir", "reference")
        if not (folder / "golden.npz").is_file():
            raise TfmqError(f"{folder} has no golden.npz: the artifact is incomplete")
        model = load_model(args.model or manifest["model"]["spec"])
        verdicts[name] = check_reference(model, folder)
    passed = all(v["passed"] for v in verdicts.values())
    print(json.dumps({"artifact": str(args.artifact), "passed": passed, "targets": verdicts}, indent=2))
    return 0 if passed else EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
