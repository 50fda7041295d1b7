"""ONNX Runtime latency: the quantized artifacts vs the FP32 graph of the same model, side by side.

    python benchmarks/ort_speed.py --model mid --batch 1,8       # 128/256/256 UNet at 64x64, random weights
    python benchmarks/ort_speed.py --model mnist-ddpm --batch 1,8
    python benchmarks/ort_speed.py --model mid --batch 1,8 --groups 8   # + the channel-group cost

Three graphs timed in one process, alternating, on the same inputs (the machine is noisy;
the ratios are what count): FP32; ``qlinear``, what ``--target onnx`` ships (the recipe's ONNX
Runtime variant: convs as QLinearConv with per-step parameters, exporter/qlinear.py); and
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
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


def mid_model():
    """A mid-size UNet2DModel with random weights (speed only)."""
    from diffusers import DDPMScheduler, UNet2DModel

    from tfmq.models import DiffusionModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=64, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(128, 256, 256),
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")).eval()
    return DiffusionModel(name="mid-128-256-256", source="built in code (random weights)", unet=unet,
                          scheduler_config=dict(DDPMScheduler().config), scheduler_source="diffusers default DDPM")


def fp32_onnx(model, path: Path, batch: int) -> None:
    class W(torch.nn.Module):
        def __init__(self, u):
            super().__init__()
            self.u = u

        def forward(self, sample, timestep):
            return self.u(sample, timestep.expand(sample.shape[0])).sample

    with torch.no_grad():
        torch.onnx.export(W(model.unet), (torch.zeros(batch, *model.sample_shape), torch.tensor([500])), path,
                          dynamo=False, opset_version=20, input_names=["sample", "timestep"],
                          output_names=["out_sample"], dynamic_axes={"sample": {0: "b"}, "out_sample": {0: "b"}})


def alternating_ms(runs: dict, repeats: int) -> dict[str, float]:
    """Median latency (ms) of each zero-argument callable, one warm-up each, then ``repeats``
    rounds in which every callable runs once in turn (the machine is noisy; alternating keeps
    the ratios fair)."""
    for f in runs.values():
        f()
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def main() -> None:
    import onnxruntime as ort

    from tfmq.calibration.api import calibrate
    from tfmq.calibration.calibset import record
    from tfmq.calibration.recipe import Reconstruction, get_recipe
    from tfmq.exporter.deploy import build
    from tfmq.exporter.qdq_onnx import lower
    from tfmq.models import load_model
    from tfmq.targets.onnxruntime import OnnxRuntimeTarget

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
    recipe = replace(get_recipe(a.recipe), reconstruction=Reconstruction(iters=0)).for_onnxruntime()
    res = calibrate(model, recipe, cs, progress=False)
    fused = {}
    graphs = [("qlinear", True, True, res.state), ("folded", False, False, res.state)]  # (name, conv outputs, cast_int4)
    if 4 in {res.state.meta["layers"][n]["bits"] for n in res.state.meta["layers"]}:
        graphs.insert(1, ("qlinear-int4dq", True, False, res.state))
    if a.groups:  # the same recipe with the full-resolution conv inputs in channel groups
        grouped = replace(recipe, activations=replace(recipe.activations, channel_groups=a.groups))
        graphs.append((f"qlinear-cg{a.groups}", True, True, calibrate(model, grouped, cs, progress=False).state))
    for k, outputs, cast, state in graphs:
        (tmp / k).mkdir()
        lower(build(model, state, conv_outputs=outputs), tmp / k / "model.onnx", tuple(model.sample_shape), None,
              cast_int4=cast)
        fused[k] = OnnxRuntimeTarget().compile(tmp / k / "model.onnx", tmp / k)
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
