"""Quality benchmark: FP32 and candidates on the same seeds; prints a JSON table, writes PNGs.

    python benchmarks/quality.py --model mnist-ddpm --n 1000 --out bench/ddpm
    python benchmarks/quality.py --model mnist-cond --n 1000 --out bench/cond
    python benchmarks/quality.py --model mnist-ddpm --n 200 --candidate fp16-weights --candidate bf16-weights
    python benchmarks/quality.py --model mnist-cond --candidate state:quant/w4a8   # a saved QuantState
    python benchmarks/quality.py --model mnist-cond --candidate 'state:quant/w4a8@float=^up_blocks'
        # the same with the activation quantizers whose names match the regex left in float
    python benchmarks/quality.py --model mnist-cond --candidate 'state:quant/w4a8@float=.@steps=45-49'
        # ... only at those sampling steps (0 = the first, noisiest)
    python benchmarks/quality.py --model mnist-cond --candidate 'state:quant/w4a8@groups=8:^up_blocks[.]2[.]'
        # the matching conv-input quantizers as 8 channel groups, each per tensor per step
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
import re
import sys
import time
from pathlib import Path

import torch

from tfmq.calibration.quantizers import fake_quant, params_from_range
from tfmq.hostcpu import keep_freed_memory
from tfmq.errors import TfmqError
from tfmq.models import load_model
from tfmq.quality.harness import Candidate, EvalConfig, cell, evaluate
from tfmq.sampling import DEFAULT_GUIDANCE, unet_denoiser


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


def _matching(q, folder: Path, option: str, regex: str) -> list[str]:
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise SystemExit(f"bad {option}= regex {regex!r}: {e}") from None
    hit = [n for n in q.act_quantizers if pattern.search(n)]
    if not hit:
        raise SystemExit(f"{option}={regex!r} matches none of the {len(q.act_quantizers)} activation "
                         f"quantizers of {folder}")
    return hit


class GroupedActQuant(torch.nn.Module):
    """A conv input quantized per group of channels: per step, each group has its own per-tensor
    scale and zero-point (``scale``/``zero`` [steps, channels], equal within a group). A runtime
    runs it as one integer conv per group (its input channels, its slice of the weights) and an
    Add, so every Q/DQ stays per tensor."""

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor, ctx, bits: int, symmetric: bool):
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.ctx, self.bits, self.symmetric = ctx, bits, symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.ctx.step
        return fake_quant(x, self.scale[s].view(1, -1, 1, 1), self.zero[s].view(1, -1, 1, 1), self.bits,
                          self.symmetric)


@torch.no_grad()
def group_channels(q, model, state, names: list[str], groups: int) -> None:
    """Replace the input quantizers of the conv layers ``names`` of the QuantUNet ``q`` by
    :class:`GroupedActQuant`: channels sorted by their mean range over the steps, cut into
    ``groups`` runs of (nearly) equal size; each group's per-step range is the min-max of the FP32
    model's inputs on the state's own calibration set (recorded again from its seeds)."""
    from tfmq.calibration.calibset import record

    cal = state.meta.get("calibration", {}).get("calibration_set")
    if cal is None:
        raise SystemExit("groups=: the state does not say which calibration set it was made on")
    guidance = DEFAULT_GUIDANCE if cal.get("guidance") is None else cal["guidance"]
    cs = record(model, seeds=len(cal["seeds"]), steps=cal["steps"], seed0=cal["seeds"][0], guidance=guidance)
    mods = dict(model.unet.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0])) for n in names]
    lo: dict[str, list] = {n: [] for n in names}
    hi: dict[str, list] = {n: [] for n in names}
    try:
        for s in range(cs.steps):
            x, t, e = cs.step_inputs(s)
            model.unet(x, t, **({} if e is None else {"encoder_hidden_states": e}))
            for n in names:
                c = seen[n].transpose(0, 1).flatten(1)
                lo[n].append(c.amin(1))
                hi[n].append(c.amax(1))
    finally:
        for h in hooks:
            h.remove()
    for n in names:
        low, high = torch.stack(lo[n]), torch.stack(hi[n])  # [steps, channels]
        for run in torch.argsort((high - low).mean(0)).chunk(groups):
            low[:, run] = low[:, run].amin(1, keepdim=True)
            high[:, run] = high[:, run].amax(1, keepdim=True)
        old = q.layers[n].act
        scale, zero = params_from_range(low, high, old.bits, old.symmetric)
        q.layers[n].act = GroupedActQuant(scale, zero, q.ctx, old.bits, old.symmetric)


def saved_state(folder: Path, float_acts: str | None = None, steps: range | None = None,
                groups: tuple[int, str] | None = None):
    """A QuantState saved by tfmq-calibrate or benchmarks/calibration.py, as a fake-quant
    candidate; ``float_acts`` (a regex searched in the activation quantizers' names) leaves the
    matching ones in float, at every step or only at ``steps`` (schedule step indices, 0 = the
    first, noisiest): which activations cost the quality, and where in the trajectory
    (everything else, the output bias correction included, stays as calibrated). ``groups``
    (G, regex) instead quantizes the matching conv inputs per group of channels (group_channels)."""
    def make(model):
        from tfmq.calibration.state import QuantState

        state = QuantState.load(folder)
        q = state.apply(model)
        denoise = unet_denoiser(q)
        if groups is not None:
            g, regex = groups
            names = _matching(q, folder, "groups", regex)
            convs = [n for n in names if isinstance(getattr(q.layers.get(n), "layer", None), torch.nn.Conv2d)]
            if convs != names:
                raise SystemExit(f"groups={g}:{regex}: not conv inputs: {', '.join(sorted(set(names) - set(convs)))}")
            group_channels(q, model, state, names, g)
            name = f"{folder.name}@groups={g}:{regex}"
            print(f"{name}: {len(names)} conv inputs in {g} channel groups", file=sys.stderr)
            return Candidate(name, denoise, q)
        if float_acts is None:
            return Candidate(folder.name, denoise, q)
        hit = [q.act_quantizers[n] for n in _matching(q, folder, "float", float_acts)]
        for aq in hit:
            aq.mode = "off"
        name = f"{folder.name}@float={float_acts}"
        if steps is not None:
            if steps.stop > len(q.timesteps):
                raise SystemExit(f"steps={steps.start}-{steps.stop - 1}: the state has {len(q.timesteps)} steps")
            name += f"@steps={steps.start}-{steps.stop - 1}"
            denoise = only_at(steps, q, hit, denoise)
        print(f"{name}: {len(hit)} of {len(q.act_quantizers)} activation quantizers in float", file=sys.stderr)
        return Candidate(name, denoise, q)
    return make


def only_at(steps: range, q, quantizers, denoise):
    """``denoise`` with ``quantizers`` of the QuantUNet ``q`` in float at ``steps``, quantized elsewhere."""
    def at_step(sample, timestep, encoder_hidden_states=None):
        mode = "off" if q.step_of(timestep) in steps else "quant"
        for aq in quantizers:
            aq.mode = mode
        return denoise(sample, timestep, encoder_hidden_states)
    return at_step


def state_candidate(spec: str):
    """state:FOLDER[@float=REGEX[@steps=A-B]] or state:FOLDER@groups=G:REGEX"""
    usage = ("state:FOLDER, state:FOLDER@float=REGEX, state:FOLDER@float=REGEX@steps=A-B or "
             "state:FOLDER@groups=G:REGEX")
    folder, *opts = spec.removeprefix("state:").split("@")
    kv = dict(o.partition("=")[::2] for o in opts)
    if (len(kv) != len(opts) or not set(kv) <= {"float", "steps", "groups"} or ("steps" in kv and "float" not in kv)
            or ("groups" in kv and len(kv) > 1)):
        raise SystemExit(f"unknown options in {spec!r}: {usage}")
    if "groups" in kv:
        m = re.fullmatch(r"(\d+):(.+)", kv["groups"])
        if m is None or int(m[1]) < 1:
            raise SystemExit(f"groups={kv['groups']!r} in {spec!r} is not G:REGEX with G >= 1")
        return saved_state(Path(folder), groups=(int(m[1]), m[2]))
    steps = None
    if "steps" in kv:
        m = re.fullmatch(r"(\d+)-(\d+)", kv["steps"])
        if m is None or int(m[1]) > int(m[2]):
            raise SystemExit(f"steps={kv['steps']!r} in {spec!r} is not A-B with A <= B (schedule step indices)")
        steps = range(int(m[1]), int(m[2]) + 1)
    return saved_state(Path(folder), kv.get("float"), steps)


def resolve(spec: str):
    if spec in BUILTIN:
        return BUILTIN[spec]
    if spec.startswith("state:"):
        return state_candidate(spec)
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
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
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
