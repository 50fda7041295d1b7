"""What glibc's memory handling costs a sampling or calibration run, side by side in one run.

    python benchmarks/malloc_speed.py --model mnist-cond --n 250 --steps 10 --rounds 3
    python benchmarks/malloc_speed.py --job calibrate --model mnist-ddpm --recipe w8a8 --iters 200 --rounds 2

Each round runs the same job twice (FP32 DDIM sampling of --n images, or a calibration of
--recipe on a calibration set of --seeds trajectories x --steps steps, recorded outside the
timed part), each in a fresh process: once with
glibc's default malloc thresholds (TFMQ_KEEP_FREED_MEMORY=0) and once with
tfmq.hostcpu.keep_freed_memory() (what tfmq's console scripts, benchmarks and tests do),
in alternating order. Prints each run's wall, user and system seconds and minor page
faults, then the median ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def child(a) -> None:
    import torch

    from tfmq.hostcpu import keep_freed_memory
    from tfmq.models import load_model
    from tfmq.sampling import ddim_sample, initial_noise, unet_denoiser

    applied = keep_freed_memory()
    torch.set_num_threads(a.threads)
    model = load_model(a.model)
    if a.job == "calibrate":
        from dataclasses import replace

        from tfmq.calibration.api import calibrate
        from tfmq.calibration.calibset import record
        from tfmq.calibration.recipe import get_recipe

        calib = record(model, seeds=a.seeds, steps=a.steps, progress=False)
        recipe = get_recipe(a.recipe)
        recipe = replace(recipe, reconstruction=replace(recipe.reconstruction, iters=a.iters))
        job = lambda: calibrate(model, recipe, calib, progress=False)  # noqa: E731
    else:
        noise = initial_noise(range(a.n), model.sample_shape)
        job = lambda: ddim_sample(model, unet_denoiser(model.unet), noise, steps=a.steps,  # noqa: E731
                                  batch_size=a.n, progress=False)
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    job()
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"keep_freed_memory": applied, "wall_s": wall, "user_s": after.ru_utime - before.ru_utime,
                      "sys_s": after.ru_stime - before.ru_stime, "minor_faults": after.ru_minflt - before.ru_minflt}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", choices=("sample", "calibrate"), default="sample")
    ap.add_argument("--model", default="mnist-cond")
    ap.add_argument("--n", type=int, default=250, help="images, one batch (sample)")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps (sample) or schedule steps (calibrate)")
    ap.add_argument("--recipe", default="w8a8", help="calibrate: the preset")
    ap.add_argument("--iters", type=int, default=200, help="calibrate: AdaRound iterations per block")
    ap.add_argument("--seeds", type=int, default=8, help="calibrate: recorded trajectories")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    runs = {"default": [], "keep": []}
    for r in range(a.rounds):
        for name in (("default", "keep") if r % 2 == 0 else ("keep", "default")):
            env = {**os.environ, "TFMQ_KEEP_FREED_MEMORY": "0" if name == "default" else "1"}
            args = [f"--{k}={v}" for k, v in vars(a).items() if k not in ("child", "rounds")]
            out = subprocess.run([sys.executable, __file__, "--child", *args],
                                 env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"error: the {name} run failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
            m = json.loads(out.stdout.strip().splitlines()[-1])
            runs[name].append(m)
            print(f"round {r} {name:8} wall {m['wall_s']:7.1f} s  user {m['user_s']:7.1f} s  sys {m['sys_s']:6.1f} s  "
                  f"minor faults {m['minor_faults']:>10}  (applied: {m['keep_freed_memory']})", file=sys.stderr)
    med = {name: {k: statistics.median(m[k] for m in ms) for k in ("wall_s", "user_s", "sys_s", "minor_faults")}
           for name, ms in runs.items()}
    report = {"config": {k: v for k, v in vars(a).items() if k != "child"}, "median": med,
              "wall_ratio_default_over_keep": med["default"]["wall_s"] / med["keep"]["wall_s"],
              "sys_ratio_default_over_keep": med["default"]["sys_s"] / max(med["keep"]["sys_s"], 1e-9),
              "command": " ".join(["python", "benchmarks/malloc_speed.py", *sys.argv[1:]])}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
