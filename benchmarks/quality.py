"""Quality benchmark: FP32 and candidates on the same seeds; prints a JSON table, writes PNGs.

    python benchmarks/quality.py --model mnist-ddpm --n 1000 --out bench/ddpm
    python benchmarks/quality.py --model mnist-cond --n 1000 --out bench/cond
    python benchmarks/quality.py --model mnist-ddpm --n 200 --candidate fp16-weights --candidate bf16-weights
    python benchmarks/quality.py --model mnist-cond --candidate state:quant/w4a8   # a saved QuantState
    python benchmarks/quality.py --model mnist-cond --candidate 'state:quant/w4a8@float=^up_blocks'
        # the same with the activation quantizers whose names match the regex left in float
    python benchmarks/quality.py --model mnist-cond --candidate 'state:quant/w4a8@float=.@steps=45-49'
        # ... only at those sampling steps (0 = the first, noisiest)
    python benchmarks/quality.py --candidate mypackage.module:make_candidate   # make_candidate(model) -> Candidate

A candidate is anything that maps (sample, timestep, encoder_hidden_states) to a noise
prediction, wrapped in tfmq.quality.harness.Candidate (with its torch module, if it has one,
for the temporal-feature plot). The built-in ones round the FP32 weights to a 16-bit float
format: small, known perturbations that show what the paired metrics resolve.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from tfmq.calibration.ablation import state_candidate
from tfmq.errors import TfmqError
from tfmq.hostcpu import keep_freed_memory
from tfmq.models import load_model
from tfmq.quality.harness import Candidate, EvalConfig, cell, evaluate
from tfmq.sampling import unet_denoiser


def rounded_weights(name, dtype):
    def make(model):
        unet = copy.deepcopy(model.unet)
        with torch.no_grad():
            for p in unet.parameters():
                p.copy_(p.to(dtype).float())
        return Candidate(name, unet_denoiser(unet), unet)
    return make


BUILTIN = {name: rounded_weights(name, dtype)
           for name, dtype in (("fp16-weights", torch.float16), ("bf16-weights", torch.bfloat16))}


def resolve(spec: str):
    if spec in BUILTIN:
        return BUILTIN[spec]
    if spec.startswith("state:"):
        return lambda model: state_candidate(spec, model)
    if ":" not in spec:
        raise SystemExit(f"unknown candidate {spec!r}: one of {', '.join(BUILTIN)}, state:FOLDER or module:function")
    mod, fn = spec.split(":", 1)
    return getattr(importlib.import_module(mod), fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's (7.5 for prompts, 1 for labels)")
    ap.add_argument("--candidate", action="append", default=[], help="built-in name or module:function (repeatable)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TFMQ_THREADS", torch.get_num_threads())))
    ap.add_argument("--real", action="store_true",
                    help="add a row for the 500 held-out real digits (the floor FID and IS can reach here)")
    ap.add_argument("--out", type=Path, help="folder for PNGs and report.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    keep_freed_memory()
    model = load_model(a.model)
    try:
        cands = [resolve(c)(model) for c in a.candidate]
    except TfmqError as e:
        raise SystemExit(f"error: {e}") from None
    cfg = EvalConfig(n=a.n, seed=a.seed, steps=a.steps, guidance=a.guidance)
    t0 = time.time()
    try:
        report = evaluate(model, cands, cfg, out_dir=a.out)
    except ValueError as e:  # two saved states in folders of one name: copy or rename one
        raise SystemExit(f"error: {e}") from None
    report["seconds"] = round(time.time() - t0, 1)
    report["command"] = " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]])
    if a.real:
        from tfmq.data import split
        from tfmq.quality.classifier import load_classifier
        from tfmq.quality.harness import sample_metrics

        d = split()
        labels = torch.from_numpy(d.heldout_labels) if model.conditional else None
        report["real_heldout_500"], _, _ = sample_metrics(load_classifier(), torch.from_numpy(d.heldout_images), labels)
    if a.out is not None:
        (a.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [("fp32", report["fp32"])] + list(report["candidates"].items())
    if a.real:
        rows.append(("real (500)", report["real_heldout_500"]))
    keys = ["fid_mnist", "fid_ratio", "fid_ratio_ci95", "inception_score", "cond_accuracy", "psnr_db", "ssim",
            "label_agreement", "sampling_seconds"]
    print(f"{'':14}" + "".join(f"{k:>17}" for k in keys), file=sys.stderr)
    for name, m in rows:
        print(f"{name:14}" + "".join(f"{cell(m.get(k)):>17}" for k in keys), file=sys.stderr)
    summary = {k: v for k, v in report.items()}
    for c in summary["candidates"].values():
        c.pop("per_step_latent_rel_err", None), c.pop("temporal_rel_err", None)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
