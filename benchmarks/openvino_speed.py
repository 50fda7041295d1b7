"""OpenVINO latency on this CPU: the INT8 IR vs OpenVINO FP32 and BF16 of the same model, side by side.

    python benchmarks/openvino_speed.py --model mid --batch 1,8          # 128/256/256 UNet at 64x64
    python benchmarks/openvino_speed.py --model mnist-ddpm --batch 1,8
    python benchmarks/openvino_speed.py --model mid --recipes w8a8,w4a8,w8a8:skipq --profile

Every configuration is compiled in one process and timed alternating on the same inputs (the
machine is noisy; the ratios are what counts): FP32 and BF16 are the FP32 ONNX graph compiled
with the f32 / bf16 inference-precision hint; "<recipe>" is the QDQ artifact as tfmq-export
builds it for --target openvino (the preset's variant for it, lowered, compiled by the target,
INT8 proven per layer: tfmq.pipeline.build_target) with the f32 hint for the layers left in float, "<recipe>+bf16" the
same with the bf16 hint. Calibration uses no reconstruction (speed does not depend on
rounding decisions). --profile prints OpenVINO's per-layer-type time for each configuration
(what limits the ratio); --shared adds each recipe with one shared activation parameter set,
whose graph has no FSC fold ops (the cost of per-step parameters at deploy time). A recipe is
a spec with modifiers (calibration/spec.py; ``w8a8+skipq``: shortcut and downsample convs
quantized too; ``w8a8+shared`` is what --shared adds).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np


def profile(request) -> dict[str, float]:
    """ms per (layer type, runtime precision), from OpenVINO's performance counters."""
    out: dict[str, float] = {}
    for p in request.get_profiling_info():
        if p.status == p.Status.EXECUTED:
            k = f"{p.node_type}/{p.exec_type}"
            out[k] = out.get(k, 0.0) + p.real_time.total_seconds() * 1000
    return dict(sorted(((k, round(v, 2)) for k, v in out.items()), key=lambda kv: -kv[1])[:8])


def main() -> None:
    import openvino as ov

    from tfmq.benchmarking import alternating_ms, fp32_onnx, mid_model
    from tfmq.calibration.api import calibrate
    from tfmq.calibration.calibset import record
    from tfmq.calibration.recipe import Reconstruction
    from tfmq.calibration.spec import load_recipe
    from tfmq.models import load_model
    from tfmq.pipeline import build_target, recipes_for
    from tfmq.targets.registry import get_target

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mid")
    ap.add_argument("--recipes", default="w8a8")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--shared", action="store_true",
                    help="also time each recipe with one shared activation parameter set (no FSC fold ops)")
    a = ap.parse_args()
    model = mid_model() if a.model == "mid" else load_model(a.model)
    if model.conditional:
        raise SystemExit("this benchmark times unconditional models")
    tmp = Path(tempfile.mkdtemp())
    target = get_target("openvino")
    cs = record(model, seeds=4, steps=10, progress=False)
    fp32_onnx(model, tmp / "fp32.onnx", 1)
    core = ov.Core()
    cfg = {"INFERENCE_NUM_THREADS": a.threads, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": a.profile}
    fp = core.read_model(str(tmp / "fp32.onnx"))
    compiled = {"fp32": core.compile_model(fp, "CPU", {**cfg, "INFERENCE_PRECISION_HINT": "f32"}),
                "bf16": core.compile_model(fp, "CPU", {**cfg, "INFERENCE_PRECISION_HINT": "bf16"})}
    fp_ir = tmp / "fp32.xml"
    ov.save_model(fp, str(fp_ir), compress_to_fp16=False)
    sizes = {"fp32_ir_bytes": fp_ir.with_suffix(".bin").stat().st_size}
    census = {}
    names = a.recipes.split(",")
    names += [f"{r}+shared" for r in names] if a.shared else []
    for name in names:
        recipe = recipes_for(replace(load_recipe(name), reconstruction=Reconstruction(iters=0)), ["openvino"],
                             adapt=True)["openvino"]
        res = calibrate(model, recipe, cs, progress=False)
        (tmp / name).mkdir()
        entry = build_target(target, model, res.state, cs, tmp / name, None, True, target.options({"threads": a.threads}))
        d = tmp / name / entry["dir"]
        out = entry["compile"]
        census[name] = out["by_kernel"]
        sizes[f"{name}_ir_bytes"] = out["ir"]["bin_bytes"]
        sizes[f"{name}_ir_vs_fp32"] = round(out["ir"]["bin_bytes"] / sizes["fp32_ir_bytes"], 3)
        q = core.read_model(str(d / "model.xml"))
        compiled[name] = core.compile_model(q, "CPU", {**cfg, "INFERENCE_PRECISION_HINT": "f32"})
        compiled[f"{name}+bf16"] = core.compile_model(q, "CPU", {**cfg, "INFERENCE_PRECISION_HINT": "bf16"})
    t = np.array([int(cs.timesteps[3])], dtype=np.int64)
    rows, profiles = {}, {}
    for b in [int(x) for x in a.batch.split(",")]:
        x = np.random.default_rng(0).standard_normal((b, *model.sample_shape)).astype(np.float32)
        reqs = {k: c.create_infer_request() for k, c in compiled.items()}
        feed = {"sample": x, "timestep": t}
        med = alternating_ms({k: (lambda r=r, f=feed: r.infer(f)) for k, r in reqs.items()}, a.repeats)
        row = {f"{k}_ms": round(v, 2) for k, v in med.items()}
        for name in names:
            row[f"{name}_vs_fp32"] = round(med["fp32"] / med[name], 3)
            row[f"{name}_vs_bf16"] = round(med["bf16"] / med[name], 3)
            row[f"{name}+bf16_vs_fp32"] = round(med["fp32"] / med[f"{name}+bf16"], 3)
            row[f"{name}+bf16_vs_bf16"] = round(med["bf16"] / med[f"{name}+bf16"], 3)
        rows[f"batch {b}"] = row
        if a.profile:
            profiles[f"batch {b}"] = {k: profile(r) for k, r in reqs.items()}
    print(json.dumps({"model": model.name, "threads": a.threads, "cpu": core.get_property("CPU", "FULL_DEVICE_NAME"),
                      "openvino": ov.get_version(), "latency": rows, **sizes, "int8_census": census,
                      **({"profile_ms": profiles} if a.profile else {}),
                      "command": "python benchmarks/openvino_speed.py " + " ".join(
                          f"--{k} {v}" for k, v in vars(a).items() if k not in ("profile", "shared"))
                          + (" --profile" if a.profile else "") + (" --shared" if a.shared else "")},
                     indent=2))


if __name__ == "__main__":
    main()
