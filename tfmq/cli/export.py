"""tfmq-export: quantize a diffusion UNet and compile per-device artifacts, each with a parity verdict."""
from __future__ import annotations

import json
import time
from pathlib import Path

from tfmq.cli.common import parser, run

DESCRIPTION = """Quantize a diffusers UNet with TFMQ-DM and write per-device artifacts with parity verdicts.

This release builds the FP32 reference stage that every artifact starts from: the model is
loaded, sampled with DDIM on fixed seeds, and DIR gets manifest.json and reference/ with a
sample grid, FP32 metrics (FID-mnist, IS, conditional accuracy) and golden images that
tfmq-parity re-checks on another machine. The quantized targets (onnx, openvino, tensorrt,
coreml) are refused with a clear message until they land.

examples:
  tfmq-export --out artifacts/mnist-ddpm
  tfmq-export --model mnist-cond --n 500 --out artifacts/mnist-cond
  tfmq-export --model path/to/diffusers/folder --out artifacts/mine
"""
TARGETS = ("fp32", "onnx", "openvino", "tensorrt", "coreml", "all")
AVAILABLE = ("fp32",)


def add_model_args(ap) -> None:
    ap.add_argument("--model", default="mnist-ddpm",
                    help="bundled name (mnist-ddpm, mnist-cond), diffusers folder, or hub id (default: mnist-ddpm)")


def main(argv=None) -> int:
    ap = parser("tfmq-export", DESCRIPTION)
    add_model_args(ap)
    ap.add_argument("--target", choices=TARGETS, default="fp32",
                    help="what to build (this release: fp32, the reference stage)")
    ap.add_argument("--out", type=Path, help="artifact directory (default: artifacts/<model name>)")
    ap.add_argument("--n", type=int, default=200, help="images for the FP32 metrics (default 200; FID wants 1000+)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps of the deployment schedule (default 50)")
    ap.add_argument("--seed", type=int, default=0, help="image i is drawn from seed + i (default 0)")
    ap.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (conditional models)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing artifact directory")
    return run("tfmq-export", export, ap.parse_args(argv))


def export(args) -> int:
    from tfmq.artifacts import atomic_dir, versions, write_json
    from tfmq.errors import TfmqError
    from tfmq.models import load_model
    from tfmq.quality.harness import EvalConfig
    from tfmq.reference import write_reference
    from tfmq.sampling import DEFAULT_GUIDANCE

    if args.target not in AVAILABLE:
        raise TfmqError(f"target {args.target!r} is not in this release of tfmq (it has: {', '.join(AVAILABLE)}); "
                        "the quantized targets come with the calibration and lowering stages")
    if args.n < 2:
        raise TfmqError(f"--n {args.n}: need at least 2 images for the feature statistics")
    if not 1 <= args.steps <= 1000:
        raise TfmqError(f"--steps {args.steps}: DDIM steps must be between 1 and 1000")
    model = load_model(args.model)
    out = args.out or Path("artifacts") / Path(model.name).name
    cfg = EvalConfig(n=args.n, seed=args.seed, steps=args.steps,
                     guidance=DEFAULT_GUIDANCE if args.guidance is None else args.guidance)
    t0 = time.time()
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        report = write_reference(model, tmp / "reference", cfg)
        write_json(tmp / "reference" / "metrics.json", report)
        manifest = {
            "tool": "tfmq-dm", "versions": versions(),
            "model": {"spec": str(args.model), "name": model.name, "source": model.source,
                      "class": type(model.unet).__name__, "conditional": model.conditional,
                      "scheduler": model.scheduler_source},
            "schedule": {"sampler": "DDIM", "steps": cfg.steps, "eta": 0.0,
                         "timesteps": model.schedule(cfg.steps).tolist()},
            "targets": {"fp32": {"dir": "reference", "metrics": report["fp32"],
                                 "files": sorted(p.name for p in (tmp / "reference").iterdir())}},
        }
        write_json(tmp / "manifest.json", manifest)
    fp = report["fp32"]
    extra = f", conditional accuracy {fp['cond_accuracy']:.3f}" if "cond_accuracy" in fp else ""
    print(f"{model.name}: FP32 reference, {cfg.n} images x {cfg.steps} DDIM steps: FID-mnist {fp['fid_mnist']:.2f}, "
          f"IS {fp['inception_score']:.2f}{extra} ({time.time() - t0:.0f}s) -> {out}")
    print(json.dumps({"artifact": str(out), "fp32": fp}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
