"""Teacher-forced noise-prediction error of calibrated recipes: where a quantized model's error
comes from, without sampling.

    python benchmarks/eps_error.py bench/diag minmax-w4a8,w4a8:near,w4a8 w4a8 --model mnist-cond

On held-out FP32 trajectories (10 seeds from 20,000, every step's UNet input), each recipe's
eps error vs FP32 (relative L2 of the conditional branch) per step and per class, with
weights and activations quantized, weights only, activations only; the optional third
argument names a recipe whose error is attributed per reconstruction unit (that unit's
weights back in float). Calibration sets and QuantStates are kept under OUT and reused
(recipe specs with modifiers, calibration/spec.py).
"""
import argparse
import json
import time
from pathlib import Path

import torch

from tfmq.calibration.api import calibrate
from tfmq.calibration.calibset import load as load_cs
from tfmq.calibration.calibset import record
from tfmq.calibration.reconstruct import units as reconstruction_units
from tfmq.calibration.spec import load_recipe
from tfmq.calibration.state import QuantState
from tfmq.hostcpu import keep_freed_memory
from tfmq.models import load_model
from tfmq.sampling import unet_denoiser

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("out", type=Path)
ap.add_argument("recipes")
ap.add_argument("attribute", nargs="?")
ap.add_argument("--model", default="mnist-cond")
ap.add_argument("--threads", type=int, default=torch.get_num_threads())
a = ap.parse_args()
torch.set_num_threads(a.threads)
keep_freed_memory()
OUT, specs = a.out, a.recipes.split(",")
model = load_model(a.model)
if not model.conditional:
    raise SystemExit(f"eps_error.py: {a.model} is not class-conditional (the error is split by class)")
cal_dir, held_dir = OUT / "calib", OUT / "held"
if not (cal_dir / "calib.json").exists():
    record(model, seeds=32, steps=50).save(cal_dir)
    record(model, seeds=10, steps=50, seed0=20_000).save(held_dir)
cs, held = load_cs(cal_dir), load_cs(held_dir)
states = {}
for spec in specs:
    d = OUT / "states" / spec
    if not (d / "quant_state.json").exists():
        t0 = time.time()
        res = calibrate(model, load_recipe(spec), cs, progress=False)
        res.state.save(d)
        (d / "report.json").write_text(json.dumps(res.report, indent=1, default=str))
        print(spec, "calibrated", round(time.time() - t0), "s", flush=True)
    states[spec] = QuantState.load(d)

fp = unet_denoiser(model.unet)
labels = torch.tensor(held.meta["labels"])

@torch.no_grad()
def eps_err(den, stride=1):
    """Every ``stride``-th step: rel L2 and mean signed error of the conditional branch; per
    class, rel L2 over those steps."""
    classes = int(labels.max()) + 1
    rel, bias, cls_num, cls_den = [], [], torch.zeros(classes), torch.zeros(classes)
    for s in range(0, held.steps, stride):
        x, t, c = held.step_inputs(s)
        ref, out = fp(x, t, c), den(x, t, c)
        n = len(x) // 2
        d, r = (out - ref)[n:], ref[n:]  # [uncond, cond]: the conditional half
        rel.append(float(d.norm() / r.norm()))
        bias.append(float(d.mean()))
        cls_num.index_add_(0, labels, d.flatten(1).pow(2).sum(1))
        cls_den.index_add_(0, labels, r.flatten(1).pow(2).sum(1))
    return rel, bias, (cls_num / cls_den).sqrt()

def summary(tag, r):
    rel, bias, cls = r
    last = len(rel) - 1
    print(f"{tag:38} mean rel {sum(rel)/len(rel):.4f} | steps 0/20%/50%/80%/last " +
          " ".join(f"{rel[round(f * last)]:.4f}" for f in (0, 0.2, 0.5, 0.8, 1)) +
          f" | bias max {max(map(abs, bias)):.4f} | class " + " ".join(f"{v:.3f}" for v in cls.tolist()), flush=True)

for spec, st in states.items():
    q = st.apply(model)
    summary(spec, eps_err(unet_denoiser(q)))
    q.set_act_mode("off")
    summary(spec + " [weights only]", eps_err(unet_denoiser(q)))
    q.set_act_mode("quant")
    q.set_weight_quant(False)
    summary(spec + " [acts only]", eps_err(unet_denoiser(q)))

if a.attribute:  # per-unit attribution, weights only
    spec = a.attribute
    q = states[spec].apply(model)
    q.set_act_mode("off")
    x, t, c = held.step_inputs(0)
    units = reconstruction_units(q, (x[:2], t[:2], c[:2]))


    def mean_rel():  # every 5th step, to keep one evaluation per unit short
        rel = eps_err(unet_denoiser(q), stride=5)[0]
        return sum(rel) / len(rel)

    base = mean_rel()
    print("base", base)
    for unit, names in units:
        for n in names:
            q.layers[n].use_wq = False
        e = mean_rel()
        for n in names:
            q.layers[n].use_wq = True
        print(f"{unit:50} {len(names):3} FP-> {e:.4f} ({e - base:+.4f})", flush=True)
