"""tfmq-export: quantize a diffusion UNet and compile per-device artifacts, each with a parity verdict."""
from __future__ import annotations

import json
from pathlib import Path

from tfmq.cli.common import add_compute_options, add_model_options, compute_from, model_from, parser, run
from tfmq.cli.options import add_target_options, target_options
from tfmq.exporter.parity import TRAJECTORY_SEEDS

EXAMPLES = """
examples:
  tfmq-export --target onnx --out artifacts/mnist-ddpm
  tfmq-export --target all --recipe w8a8 --model mnist-cond --out artifacts/mnist-cond
  tfmq-export --target onnx --quant-state quant/w4a8 --out artifacts/w4a8
  tfmq-export --target openvino --precision bf16 --out artifacts/mnist-ddpm-ov
  tfmq-export --target tensorrt --device orin-nano --out artifacts/mnist-ddpm-orin
"""


def description() -> str:
    from tfmq.calibration.recipe import PRESETS
    from tfmq.targets.registry import targets

    lines = ["Quantize a diffusers UNet with TFMQ-DM and write per-device artifacts with parity verdicts.", "",
             "Every export writes the FP32 reference stage (reference/: sample grid, FP32 metrics, golden images).",
             "A quantized target then calibrates (or lowers --quant-state as it is), lowers the model to the",
             "canonical QDQ ONNX graph (temporal block as per-step tables, FSC folded into constant-scale Q/DQ)",
             "or the deploy module, compiles it and runs the parity gates (export, target, trajectory) into",
             "DIR/<target>/. A preset is adapted to what the targets need, named by what changed (e.g.",
             "w8a8+sym-weights); with --target all the targets that add no quantizers share one calibration.",
             "Writes are atomic. A failed gate exits 2 and keeps the artifacts.", "", "targets:",
             "  fp32       the reference stage only"]
    lines += [f"  {t.name:<10} {t.description}" for t in targets().values()]
    lines += ["  all        every target buildable here (says which it skipped and why)", "",
              f"recipes: {', '.join(PRESETS)}, or a recipe JSON file"]
    return "\n".join(lines) + "\n" + EXAMPLES


def main(argv=None) -> int:
    from tfmq.targets.registry import targets

    ap = parser("tfmq-export", description())
    add_model_options(ap)
    ap.add_argument("--target", choices=("fp32", *targets(), "all"), default="fp32",
                    help="what to build (default fp32)")
    ap.add_argument("--recipe", default="w8a8", help="preset or recipe JSON for quantized targets (default w8a8)")
    ap.add_argument("--quant-state", type=Path, help="lower this QuantState directory as it is instead of calibrating")
    ap.add_argument("--iters", type=int, help="override the recipe's reconstruction iterations per block")
    ap.add_argument("--calib-seeds", type=int, help="calibration trajectories (default: the recipe's)")
    ap.add_argument("--skip-parity", action="store_true", help="do not run the parity gates (stamped 'skipped')")
    ap.add_argument("--parity-seeds", type=int, default=TRAJECTORY_SEEDS,
                    help=f"DDIM runs of each target's trajectory gate (default {TRAJECTORY_SEEDS})")
    ap.add_argument("--out", type=Path, help="artifact directory (default: artifacts/<model name>)")
    ap.add_argument("--n", type=int, default=200, help="images for the FP32 metrics (default 200; FID wants 1000+)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps of the deployment schedule (default 50)")
    ap.add_argument("--seed", type=int, default=0, help="image i is drawn from seed + i (default 0)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing artifact directory")
    ap.add_argument("--json", action="store_true", help="print a JSON summary line instead of the table")
    add_compute_options(ap)
    add_target_options(ap)
    return run("tfmq-export", export, ap.parse_args(argv))


def export(args) -> int:
    from tfmq.calibration.spec import load_recipe
    from tfmq.calibration.state import QuantState
    from tfmq.cli.report import fp32_row, table
    from tfmq.pipeline import ExportOptions, resolve_targets
    from tfmq.pipeline import export as run_export
    from tfmq.targets.registry import get_target

    build, _ = resolve_targets(args.target)
    given = target_options(args, args.target)
    opts = ExportOptions(n=args.n, steps=args.steps, seed=args.seed, guidance=args.guidance,
                         calib_seeds=args.calib_seeds, iters=args.iters, skip_parity=args.skip_parity,
                         parity_seeds=args.parity_seeds,
                         overwrite=args.overwrite, target_options=given, compute=compute_from(args))
    for t in build:  # bad options fail before the model loads
        get_target(t).options(given.get(t))
    if args.quant_state is not None:
        what = QuantState.load(args.quant_state) if build else None
    else:
        what = load_recipe(args.recipe) if build else None
    custom = args.recipe.endswith(".json") or Path(args.recipe).is_file()  # checked, never changed
    manifest = run_export(model_from(args), what, args.target, args.out, opts, adapt=not custom)
    data = manifest.data
    if args.json:
        print(json.dumps({"artifact": str(manifest.folder), "fp32": data["targets"]["fp32"]["metrics"],
                          "parity": {t: (v if v == "skipped" else v["passed"]) for t, v in manifest.verdicts().items()}}))
    else:
        rows = [fp32_row(data["targets"]["fp32"])]
        rows += [get_target(t).summary(e) for t, e in data["targets"].items() if t != "fp32"]
        rows += [{"target": t, "built": "no", "executed": "no", "verdict": "skipped", "numbers": why}
                 for t, why in data.get("skipped", {}).items()]
        print(f"{data['model']['name']} -> {manifest.folder}")
        print(table(rows))
    manifest.require_passed()  # a ParityError: one line, exit 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
