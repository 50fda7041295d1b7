"""Core ML package sizes and conversion time: our W8A8 (iOS17) and W4A8 (iOS18) packages vs the
FP16 package of the same UNet, converted the same way (torch.export -> coremltools).

    python benchmarks/coreml_size.py --model mnist-ddpm
    python benchmarks/coreml_size.py --model mnist-cond --shared

The quantized packages come from a calibration without reconstruction (size and conversion do
not depend on rounding decisions) and are verified like tfmq-export verifies them (integers,
scales, activation parameters bit for bit). --shared adds each recipe with one shared
activation parameter set (no FSC fold constants). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    import torch

    from tfmq.calibration.api import calibrate
    from tfmq.calibration.calibset import record
    from tfmq.calibration.recipe import ActivationSchedule, Reconstruction, get_recipe
    from tfmq.models import load_model
    from tfmq.pipeline import build_target
    from tfmq.targets.coreml import load_coremltools
    from tfmq.targets.registry import get_target

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--shared", action="store_true")
    a = ap.parse_args()
    ct = load_coremltools()
    model = load_model(a.model)
    tmp = Path(tempfile.mkdtemp())
    cs = record(model, seeds=4, steps=10, progress=False)
    cross = tuple(cs.cond.shape[1:]) if model.conditional else None

    class Plain(torch.nn.Module):  # the FP UNet, called as the deploy module is
        def __init__(self, u):
            super().__init__()
            self.u = u

        def forward(self, sample, timestep, *ehs):
            t = timestep.expand(sample.shape[0])
            return (self.u(sample, t, encoder_hidden_states=ehs[0]) if ehs else self.u(sample, t)).sample

    args = (torch.zeros(2, *model.sample_shape), torch.tensor([500]))
    if cross:
        args += (torch.zeros(2, *cross),)
    t0 = time.time()
    ep = torch.export.export(Plain(model.unet).eval(), args, strict=False).run_decompositions({})
    fp = ct.convert(ep, minimum_deployment_target=ct.target.iOS17, compute_precision=ct.precision.FLOAT16,
                    skip_model_load=True)
    fp.save(str(tmp / "fp16.mlpackage"))
    rows = {"fp16": {"bytes": size(tmp / "fp16.mlpackage"), "conversion_seconds": round(time.time() - t0, 1)}}
    names = ["w8a8", "w4a8"] + (["w8a8-shared", "w4a8-shared"] if a.shared else [])
    for name in names:
        recipe = get_recipe(name.removesuffix("-shared"))
        if name.endswith("-shared"):
            recipe = replace(recipe, activations=replace(recipe.activations, schedule=ActivationSchedule.SHARED))
        res = calibrate(model, replace(recipe, reconstruction=Reconstruction(iters=0)), cs, progress=False)
        (tmp / name).mkdir()
        target = get_target("coreml")
        rep = build_target(target, model, res.state, cs, tmp / name, None, True, target.options())["compile"]
        rows[name] = {"bytes": rep["package_bytes"], "vs_fp16": round(rep["package_bytes"] / rows["fp16"]["bytes"], 3),
                      "deployment_target": rep["deployment_target"], "conversion_seconds": rep["conversion_seconds"],
                      "verification": rep["verification"]}
    print(json.dumps({"model": model.name, "coremltools": ct.__version__, "packages": rows,
                      "command": f"python benchmarks/coreml_size.py --model {a.model}" + (" --shared" if a.shared else "")},
                     indent=2))


if __name__ == "__main__":
    main()
