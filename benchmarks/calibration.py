"""Calibration benchmark: recipes side by side on one calibration set and the same seeds.

    python benchmarks/calibration.py --model mnist-ddpm --recipes minmax-w8a8,qdiff-w8a8,w8a8 --n 1000 --out bench/cal
    python benchmarks/calibration.py --model mnist-ddpm --recipes w4a8,w4a8:tiar,qdiff-w4a8 --iters 500 --n 200

A recipe is a spec with modifiers (calibration/spec.py: w4a8+tiar+nobc, w8a8+sym-weights+cg16, ...;
``w4a8:tiar`` says the same as ``w4a8+tiar``).
A recipe without bias correction whose twin with it is also asked for (``w4a8,w4a8:nobc``) is
not calibrated again: its state is the twin's with the correction left out, which is what
calibrating without it gives (the correction is the last step).
With --out, each recipe's QuantState is saved under OUT/states/<recipe> as soon as it is
calibrated, and a rerun with the same --out reuses it (an interrupted evaluation does not
cost the calibration again). Prints a JSON table (image PSNR vs FP32, SSIM, label agreement,
FID-mnist and its ratio to FP32's with a paired-bootstrap 95% interval, IS, conditional
accuracy, calibration seconds) and writes the per-step latent and temporal-feature error plots.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from tfmq.calibration.api import calibrate, check
from tfmq.calibration.calibset import record
from tfmq.calibration.recipe import RecipeError
from tfmq.calibration.spec import load_recipe
from tfmq.calibration.state import QuantState
from tfmq.hostcpu import keep_freed_memory
from tfmq.models import load_model
from tfmq.quality.harness import Candidate, EvalConfig, cell, evaluate
from tfmq.sampling import unet_denoiser


def parse(spec: str, iters: int | None):
    """A recipe spec (calibration/spec.py), with ``iters`` reconstruction iterations where it reconstructs."""
    r = load_recipe(spec)
    return r.with_iters(iters) if iters is not None and r.reconstruction.iters else r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--recipes", default="minmax-w8a8,qdiff-w8a8,w8a8,minmax-w4a8,qdiff-w4a8,w4a8")
    ap.add_argument("--n", type=int, default=1000, help="paired evaluation samples")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=32, help="calibration trajectories")
    ap.add_argument("--iters", type=int, help="reconstruction iterations per block (override)")
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's (7.5 for prompts, 1 for labels)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TFMQ_THREADS", torch.get_num_threads())))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    keep_freed_memory()
    model = load_model(a.model)
    try:
        recipes = [parse(s, a.iters) for s in a.recipes.split(",")]
    except RecipeError as e:  # an unknown preset, or a variation the recipe refuses (cg0)
        raise SystemExit(f"error: {e}") from None
    for r in recipes:
        check(r, model)
    t0 = time.time()
    cs = record(model, seeds=a.seeds, steps=a.steps, guidance=a.guidance, progress=True)
    record_s = time.time() - t0
    cands, cal, states = {}, {}, {}
    twin = {r.name: t.name for r in recipes for t in recipes
            if not r.bias_correction and t.bias_correction and replace(t, name=r.name, bias_correction=False) == r}
    for r in sorted(recipes, key=lambda r: r.name in twin):  # twins first
        if r.name in twin:
            states[r.name] = states[twin[r.name]].without_bias_correction()
            q = states[r.name].apply(model)
            cal[r.name] = {k: v for k, v in cal[twin[r.name]].items() if k != "bias_correction"}
            cal[r.name]["state_from"] = twin[r.name]
            cands[r.name] = Candidate(r.name, unet_denoiser(q), q)
            continue
        saved = a.out / "states" / r.name if a.out is not None else None
        if saved is not None and (saved / "report.json").is_file():  # calibrated by an earlier, interrupted run
            states[r.name] = QuantState.load(saved)
            q = states[r.name].apply(model)
            cal[r.name] = json.loads((saved / "report.json").read_text())
            print(f"{r.name}: QuantState reused from {saved}", file=sys.stderr)
            cands[r.name] = Candidate(r.name, unet_denoiser(q), q)
            continue
        res = calibrate(model, r, cs, progress=True)
        cal[r.name] = {"calibration_seconds": res.report["seconds"], "calibration_cpu_seconds": res.report["cpu_seconds"],
                       "activation_seconds": res.report["activation_seconds"]}
        for key in ("mixed_precision", "temporal_selection", "bias_correction"):
            if key in res.report:
                rep = res.report[key]
                if key == "mixed_precision":
                    rep = {"average_bits": rep["average_bits"], "promoted": len(rep["promoted"])}
                elif key == "temporal_selection":
                    rep = {c: sum(v["chosen"] == c for v in rep.values()) for c in ("cached", "reconstructed")}
                cal[r.name][key] = rep
        print(f"{r.name}: calibrated in {res.report['seconds']:.0f}s", file=sys.stderr)
        if saved is not None:  # so an interrupted evaluation does not cost the calibration again
            res.state.save(saved)
            (saved / "report.json").write_text(json.dumps(cal[r.name]) + "\n")
        states[r.name] = res.state
        cands[r.name] = Candidate(r.name, unet_denoiser(res.model), res.model)
    cands = [cands[r.name] for r in recipes]
    report = evaluate(model, cands, EvalConfig(n=a.n, steps=a.steps, guidance=a.guidance), out_dir=a.out)
    for name, m in report["candidates"].items():
        m.update(cal[name])
    report["calibration_set"] = {"seeds": a.seeds, "steps": a.steps, "record_seconds": round(record_s, 1)}
    report["command"] = " ".join(["python", "benchmarks/calibration.py", *sys.argv[1:]])
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    keys = ["psnr_db", "ssim", "label_agreement", "fid_mnist", "fid_ratio", "fid_ratio_ci95", "inception_score",
            "cond_accuracy", "calibration_seconds", "calibration_cpu_seconds"]
    print(f"{'':24}" + "".join(f"{k:>16}" for k in keys), file=sys.stderr)
    for name, m in [("fp32", report["fp32"])] + list(report["candidates"].items()):
        print(f"{name:24}" + "".join(f"{cell(m.get(k)):>16}" for k in keys), file=sys.stderr)
    for m in report["candidates"].values():
        m.pop("per_step_latent_rel_err", None), m.pop("temporal_rel_err", None)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
