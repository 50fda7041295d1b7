"""ONNX Runtime latency: the quantized artifacts vs the FP32 graph of the same model, side by side.

    python benchmarks/ort_speed.py --model mid --batch 1,8       # 128/256/256 UNet at 64x64, random weights
    python benchmarks/ort_speed.py --model mnist-ddpm --batch 1,8
    python benchmarks/ort_speed.py --model mid --batch 1,8 --groups 8   # + the channel-group cost

Three graphs timed in one process, alternating, on the same inputs (the machine is noisy;
the ratios are what count): FP32; ``qlinear``, what ``--target onnx`` ships (the recipe's variant
for ONNX Runtime, its graph passes included: convs as QLinearConv with per-step parameters); and
``folded``, the portable QDQ graph of the same QuantState without the conv output quantizers
(FSC folded, convs in float: what the other targets' graphs are); for a recipe with 4-bit
weights also ``qlinear-int4dq``, the qlinear graph with its 4-bit Linears read by
DequantizeLinear straight from INT4 (before the target stored them as INT4 behind a Cast to
INT8: ONNX Runtime fuses only 8-bit weights into MatMulIntegerToFloat); with ``--groups G``
also ``qlinear-cgG``, the recipe with its full-resolution conv inputs in G channel groups
(those convs run in float per group on ONNX Runtime). All from one real
calibration (no reconstruction: speed does not depend on rounding decisions). Prints the
median latency of each, the ratios, the integer kernels ONNX Runtime fused, and file sizes.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np


def main() -> None:
    import onnxruntime as ort

    from tfmq.benchmarking import alternating_ms, fp32_onnx, mid_model
    from tfmq.calibration.api import calibrate
    from tfmq.calibration.calibset import record
    from tfmq.calibration.recipe import Reconstruction
    from tfmq.calibration.spec import load_recipe
    from tfmq.exporter.deploy import build
    from tfmq.exporter.qdq_onnx import lower
    from tfmq.models import load_model
    from tfmq.pipeline import recipes_for
    from tfmq.targets.base import Lowered
    from tfmq.targets.onnxruntime.passes import int4_behind_cast
    from tfmq.targets.registry import get_target

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mid")
    ap.add_argument("--recipe", default="w8a8")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--groups", type=int, help="also time the recipe with activations.channel_groups = GROUPS")
    a = ap.parse_args()
    model = mid_model() if a.model == "mid" else load_model(a.model)
    if model.conditional:
        raise SystemExit("this benchmark times unconditional models")
    tmp = Path(tempfile.mkdtemp())
    cs = record(model, seeds=4, steps=10, progress=False)
    target = get_target("onnx")
    opts = target.options()
    shipped = target.graph_passes(opts)  # what --target onnx runs on the canonical graph
    recipe = recipes_for(replace(load_recipe(a.recipe), reconstruction=Reconstruction(iters=0)), ["onnx"],
                         adapt=True)["onnx"]
    res = calibrate(model, recipe, cs, progress=False)
    fused = {}
    # (name, conv outputs, passes, state)
    graphs = [("qlinear", True, shipped, res.state), ("folded", False, shipped, res.state)]
    if 4 in {res.state.meta["layers"][n]["bits"] for n in res.state.meta["layers"]}:
        graphs.insert(1, ("qlinear-int4dq", True, [p for p in shipped if p is not int4_behind_cast], res.state))
    if a.groups:  # the same recipe with the full-resolution conv inputs in channel groups
        grouped = replace(recipe, activations=replace(recipe.activations, channel_groups=a.groups))
        graphs.append((f"qlinear-cg{a.groups}", True, shipped, calibrate(model, grouped, cs, progress=False).state))
    for k, outputs, passes, state in graphs:
        (tmp / k).mkdir()
        dep = build(model, state, conv_outputs=outputs)
        report = lower(dep, tmp / k / "model.onnx", passes=passes)
        fused[k] = target.compile(Lowered(dep, None, tmp / k / "model.onnx", report), tmp / k, opts)
    names = [k for k, *_ in graphs]
    fp32_onnx(model, tmp / "fp32.onnx", 1)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    sess = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
            for k, p in [("fp32", tmp / "fp32.onnx")] + [(k, tmp / k / "model.onnx") for k in names]}
    t = np.array([int(cs.timesteps[3])], dtype=np.int64)
    rows = {}
    for b in [int(x) for x in a.batch.split(",")]:
        x = np.random.default_rng(0).standard_normal((b, *model.sample_shape)).astype(np.float32)
        feed = {"sample": x, "timestep": t}
        med = alternating_ms({k: (lambda s=s, f=feed: s.run(None, f)) for k, s in sess.items()}, a.repeats)
        rows[f"batch {b}"] = {**{f"{k}_ms": round(v, 2) for k, v in med.items()},
                              **{f"{k}_speedup_vs_fp32": round(med["fp32"] / med[k], 3) for k in names}}
    sizes = {f"{k}_bytes": (tmp / k / "model.onnx").stat().st_size for k in names}
    sizes["fp32_bytes"] = (tmp / "fp32.onnx").stat().st_size
    sizes |= {f"{k}_size_ratio": round(sizes[f"{k}_bytes"] / sizes["fp32_bytes"], 3) for k in names}
    print(json.dumps({"model": model.name, "recipe": recipe.name, "threads": a.threads, "latency": rows, **sizes,
                      "integer_kernels": {k: v["integer_kernels"] for k, v in fused.items()},
                      "float_kernels": {k: v["float_kernels"] for k, v in fused.items()},
                      "command": "python benchmarks/ort_speed.py " + " ".join(
                          f"--{k} {v}" for k, v in vars(a).items())}, indent=2))


if __name__ == "__main__":
    main()
