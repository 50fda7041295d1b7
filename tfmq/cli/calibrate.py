"""tfmq-calibrate: TFMQ-DM post-training quantization of a diffusion UNet into a QuantState."""
from __future__ import annotations

from pathlib import Path

from tfmq.cli.common import add_compute_options, add_model_options, compute_from, model_from, parser, run

DESCRIPTION = """Calibrate a diffusers UNet with TFMQ-DM and write its QuantState (every scale,
zero-point, rounding decision, per-step activation parameter and temporal table; safetensors
+ JSON) to --out, with the calibration set it used (reusable with --calib-set) and a report.

recipes (docs/calibration.md says what each pays):
{presets}
or a recipe JSON file (the format of Recipe.to_dict).

examples:
  tfmq-calibrate --model mnist-ddpm --recipe w8a8 --out quant/mnist-ddpm-w8a8
  tfmq-calibrate --model mnist-ddpm --recipe qdiff-w4a8 --calib-set quant/mnist-ddpm-w8a8/calibration_set --out q2
"""


def main(argv=None) -> int:
    from tfmq.calibration.recipe import PRESET_NOTES

    ap = parser("tfmq-calibrate", DESCRIPTION.format(
        presets="\n".join(f"  {name:<13} {note}" for name, note in PRESET_NOTES.items())))
    add_model_options(ap)
    ap.add_argument("--recipe", default="w8a8", help="preset name or recipe JSON file (default w8a8)")
    ap.add_argument("--out", type=Path, required=True, help="QuantState directory")
    ap.add_argument("--calib-set", type=Path, help="reuse a recorded calibration set instead of recording one")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps of the deployment schedule (default 50)")
    ap.add_argument("--seeds", type=int, help="sampler trajectories to record (default: the recipe's)")
    ap.add_argument("--iters", type=int, help="override the recipe's reconstruction iterations per block")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_compute_options(ap)
    return run("tfmq-calibrate", calibrate, ap.parse_args(argv))


def calibrate(args) -> int:
    from tfmq.artifacts import atomic_dir, write_json
    from tfmq.calibration import calibset
    from tfmq.calibration.api import calibrate as run_calibration
    from tfmq.calibration.api import check
    from tfmq.calibration.spec import load_recipe
    from tfmq.errors import TfmqError

    recipe = load_recipe(args.recipe)
    if args.iters is not None:
        if args.iters < 0:
            raise TfmqError(f"--iters {args.iters}: must be >= 0")
        recipe = recipe.with_iters(args.iters)
    if not 1 <= args.steps <= 1000:
        raise TfmqError(f"--steps {args.steps}: DDIM steps must be between 1 and 1000")
    if args.seeds is not None and args.seeds < 1:
        raise TfmqError(f"--seeds {args.seeds}: at least 1 calibration trajectory")
    compute = compute_from(args)
    model = model_from(args)
    check(recipe, model)
    with atomic_dir(args.out, overwrite=args.overwrite, marker="quant_state.json") as tmp:
        if args.calib_set is not None:
            cs = calibset.load(args.calib_set)
        else:
            seeds = recipe.data.seeds if args.seeds is None else args.seeds
            print(f"recording the calibration set: {seeds} {compute.dtype} trajectories x {args.steps} steps "
                  f"on {compute.device}")
            cs = calibset.record(model, seeds=seeds, steps=args.steps, guidance=args.guidance, progress=True,
                                 compute=compute)
        cs.check_for(model, model.schedule(args.steps))
        cs.save(tmp / "calibration_set")
        result = run_calibration(model, recipe, cs)
        state, report = result.state, result.report
        state.save(tmp)
        write_json(tmp / "report.json", report)
    n_w = len(state.meta["layers"])
    n_a = len(state.meta["activations"])
    print(f"{model.name} {recipe.name}: {n_w} quantized layers, {n_a} activation quantizers x "
          f"{max(state.meta['param_sets']) + 1} parameter sets, {len(state.meta['temporal_tables'])} temporal "
          f"tables; {report['seconds']:.0f}s -> {args.out}")
    if "mixed_precision" in report:
        mp = report["mixed_precision"]
        print(f"mixed precision: {len(mp['promoted'])} layers at 8 bit, average {mp['average_bits']} weight bits "
              f"(budget {mp['budget']})")
    if "temporal_selection" in report:
        chosen = [v["chosen"] for v in report["temporal_selection"].values()]
        print(f"temporal features: {chosen.count('cached')} cached, {chosen.count('reconstructed')} reconstructed")
    if "bias_correction" in report:
        bc = report["bias_correction"]
        print(f"bias correction: mean eps error per step removed (mean {bc['mean']:+.4f}, largest {bc['max_abs']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
