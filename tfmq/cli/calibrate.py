"""tfmq-calibrate: TFMQ-DM post-training quantization of a diffusion UNet into a QuantState."""
from __future__ import annotations

from pathlib import Path

from tfmq.cli.common import parser, run

DESCRIPTION = """Calibrate a diffusers UNet with TFMQ-DM (temporal information block reconstruction,
finite-set per-step activation calibration, block reconstruction) and write its QuantState
(every scale, zero-point and rounding decision; safetensors + JSON) to --out.

Not in this release: the calibration stage is being built. The command checks that the
model loads and then says so, with a non-zero exit, rather than writing anything.

example:
  tfmq-calibrate --model mnist-ddpm --recipe w4a8 --out quant/mnist-ddpm-w4a8
"""


def main(argv=None) -> int:
    ap = parser("tfmq-calibrate", DESCRIPTION)
    ap.add_argument("--model", default="mnist-ddpm", help="bundled name, diffusers folder, or hub id")
    ap.add_argument("--recipe", default="w4a8", help="quantization recipe preset")
    ap.add_argument("--out", type=Path, help="QuantState directory")
    return run("tfmq-calibrate", calibrate, ap.parse_args(argv))


def calibrate(args) -> int:
    from tfmq.errors import TfmqError
    from tfmq.models import load_model

    model = load_model(args.model)
    raise TfmqError(f"{model.name} loads, but calibration is not in this release of tfmq; nothing was written")


if __name__ == "__main__":
    raise SystemExit(main())
