"""Tried, not shipped: PTQD-style per-step correction of the quantized noise prediction.

    python benchmarks/output_correction.py --state bench/w4s128/states/w4a8 --n 1000 --seeds 32

PTQD (Quantization noise correction, He et al. 2023) splits the quantized UNet's error
d = eps_q - eps_fp into a part correlated with eps_fp and a residual. Per sampling step t this
script fits, on the FP32 calibration inputs (seeds 10,000+), one gain and one bias over all
pixels by least squares, d ~ k_t * eps_fp + b_t, and samples with
eps' = (eps_q - b_t) / (1 + k_t). It prints the fit per step (relative error before and
after), then the harness's paired metrics for the state as is and corrected, on the same
seeds. Unconditional models only (the fit has no CFG branch handling).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from tfmq.calibration.calibset import record
from tfmq.calibration.state import QuantState
from tfmq.hostcpu import keep_freed_memory
from tfmq.models import load_model
from tfmq.quality.harness import Candidate, EvalConfig, evaluate
from tfmq.sampling import unet_denoiser


@torch.no_grad()
def fit(model, qunet, cs) -> dict[int, tuple[float, float, float, float]]:
    """Per step: timestep -> (gain k, bias b, |d|/|eps_fp|, |residual|/|eps_fp|)."""
    out = {}
    for s in range(cs.x.shape[0]):
        x, t = cs.x[s], cs.timesteps[s]
        tt = t.repeat(x.shape[0])
        ef = model.unet(x, tt).sample
        d = qunet(x, tt).sample - ef
        fm, dm = ef.mean(), d.mean()
        k = ((d - dm) * (ef - fm)).mean() / (ef - fm).pow(2).mean()
        b = dm - k * fm
        r = d - k * ef - b
        out[int(t)] = (float(k), float(b), float(d.norm() / ef.norm()), float(r.norm() / ef.norm()))
    return out


def corrected(qunet, table):
    def denoise(sample, timestep, encoder_hidden_states=None):
        k, b = table[int(timestep.reshape(-1)[0])][:2]
        return (qunet(sample, timestep).sample - b) / (1 + k)
    return denoise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--state", type=Path, required=True, help="a QuantState directory")
    ap.add_argument("--n", type=int, default=1000, help="paired evaluation samples")
    ap.add_argument("--seeds", type=int, default=32, help="calibration trajectories the correction is fitted on")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TFMQ_THREADS", torch.get_num_threads())))
    ap.add_argument("--out", type=Path, help="write the JSON report here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    keep_freed_memory()
    model = load_model(a.model)
    if model.conditional:
        raise SystemExit(f"error: {a.model} is conditional; this benchmark fits unconditional models only")
    q = QuantState.load(a.state).apply(model)
    cs = record(model, seeds=a.seeds, steps=a.steps)
    table = fit(model, q, cs)
    for t, (k, b, rel, res) in list(table.items())[::5]:
        print(f"t={t:4d} k={k:+.4f} b={b:+.4f} error {rel:.4f} -> residual {res:.4f}", file=sys.stderr)
    rep = evaluate(model, [Candidate("quantized", unet_denoiser(q)), Candidate("quantized+correction", corrected(q, table))],
                   EvalConfig(n=a.n, steps=a.steps), out_dir=None, progress=False)
    keys = ("fid_mnist", "inception_score", "psnr_db", "ssim", "label_agreement")
    report = {name: {k: round(m[k], 4) for k in keys if k in m}
              for name, m in [("fp32", rep["fp32"])] + list(rep["candidates"].items())}
    report["fit"] = {t: dict(zip(("gain", "bias", "rel_error", "rel_residual"), v, strict=True)) for t, v in table.items()}
    report["command"] = " ".join(["python", "benchmarks/output_correction.py", *sys.argv[1:]])
    text = json.dumps(report, indent=2)
    if a.out is not None:
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
