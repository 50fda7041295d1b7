"""Real size: a Stable Diffusion pipeline at its published config through every stage of
``tfmq-export``, with wall time and peak RSS per stage and the artifact sizes.

    python benchmarks/sd_scale.py --config sd15 --work /tmp/sd-scale            # SD-1.5, 64x64 latents
    python benchmarks/sd_scale.py --config sd21 --work /tmp/sd-scale            # SD-2.1 (v-prediction)
    python benchmarks/sd_scale.py --config sd15 --latent 32 --targets onnx      # a quicker look

The pipeline (UNet 860M parameters, CLIP text encoder, VAE; random weights, seeded:
``tfmq.benchmarking.sd_pipeline``) is built once into ``--work/<config>-<latent>`` and reused.
Then one ``tfmq.export`` runs with the cheapest settings that still run every stage: the
recipe's scales (no reconstruction), one calibration trajectory, a few DDIM steps, two
reference images, one trajectory-gate seed. A sampler thread reads the process's resident set
every 50 ms; a stage is the span between two of tfmq's log lines, and its peak is the largest
resident set seen in it (the kernel's high-water mark bounds the whole run). Prints the stage
table and writes it as JSON (``--json``). Random weights make no quality claim.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import threading
import time
from pathlib import Path

GIB = 1024 ** 3


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Stages(logging.Handler):
    """Each tfmq log line opens a stage; the RSS sampler keeps each stage's peak."""

    def __init__(self, period: float = 0.05):
        super().__init__(logging.INFO)
        self.rows: list[dict] = []
        self.t0 = time.time()
        self._open("start")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(period,), daemon=True)
        self._thread.start()

    def _open(self, what: str) -> None:
        self.rows.append({"stage": what, "start_s": round(time.time() - self.t0, 1), "peak_rss": rss_bytes()})

    def _sample(self, period: float) -> None:
        while not self._stop.wait(period):
            row = self.rows[-1]
            row["peak_rss"] = max(row["peak_rss"], rss_bytes())

    def emit(self, record: logging.LogRecord) -> None:
        self._open(record.getMessage())
        print(f"[{time.time() - self.t0:7.1f} s  {rss_bytes() / GIB:5.1f} GiB] {record.getMessage()}", flush=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        end = time.time() - self.t0
        for row, nxt in zip(self.rows, self.rows[1:] + [{"start_s": end}], strict=True):
            row["seconds"] = round(nxt["start_s"] - row["start_s"], 1)
        super().close()


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=("sd15", "sd21"), default="sd15")
    ap.add_argument("--latent", type=int, default=64, help="latent height and width (64: 512 px)")
    ap.add_argument("--work", type=Path, required=True, help="where the pipeline and the artifact go")
    ap.add_argument("--targets", default="all", help="target, comma list or all (default all)")
    ap.add_argument("--recipe", default="w8a8")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--n", type=int, default=2, help="FP32 reference images")
    ap.add_argument("--parity-seeds", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the stage table here")
    args = ap.parse_args()

    import torch

    from tfmq import benchmarking
    from tfmq.hostcpu import describe, signature
    from tfmq.pipeline import ExportOptions, export

    torch.manual_seed(0)
    model_dir = args.work / f"{args.config}-{args.latent}"
    if not (model_dir / "model_index.json").is_file():
        t = time.time()
        benchmarking.sd_pipeline(model_dir, args.config, args.latent)
        print(f"built {model_dir} in {time.time() - t:.0f} s ({folder_bytes(model_dir) / GIB:.2f} GiB)")
    out = args.work / f"artifact-{args.config}-{args.latent}"
    targets = args.targets if args.targets in ("all", "fp32") else args.targets.split(",")
    logging.getLogger("tfmq").setLevel(logging.INFO)
    stages = Stages()
    logging.getLogger("tfmq").addHandler(stages)
    t0 = time.time()
    error = None
    try:
        manifest = export(str(model_dir), args.recipe, targets, out,
                          ExportOptions(n=args.n, steps=args.steps, calib_seeds=1, iters=0, overwrite=True,
                                        parity_seeds=args.parity_seeds, progress=False))
    except Exception as e:  # the table up to the failure is the result
        error, manifest = f"{type(e).__name__}: {e}", None
    stages.close()
    wall = time.time() - t0
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"config": args.config, "latent": args.latent, "recipe": args.recipe, "steps": args.steps,
              "n": args.n, "parity_seeds": args.parity_seeds, "host": signature() | describe(),
              "torch_threads": torch.get_num_threads(), "wall_s": round(wall, 1), "peak_rss_gib": round(hwm / GIB, 2),
              "error": error, "stages": [r | {"peak_rss_gib": round(r.pop("peak_rss") / GIB, 2)} for r in stages.rows]}
    if manifest is not None:
        result["targets"] = {}
        for name, entry in manifest.targets.items():
            sub = out / entry.get("dir", name)
            par = entry.get("parity")
            result["targets"][name] = {
                "bytes": folder_bytes(sub), "files": sorted(p.name for p in sub.iterdir()),
                "passed": par.get("passed") if isinstance(par, dict) else par,
                "external_data": (entry.get("compile") or {}).get("external_data")}
    print(f"\n{args.config} at {args.latent}x{args.latent} latents, {args.recipe}: {wall:.0f} s, "
          f"peak RSS {hwm / GIB:.2f} GiB" + (f", FAILED: {error}" if error else ""))
    print(f"{'stage':70s} {'s':>7s} {'GiB':>6s}")
    for r in result["stages"]:
        print(f"{r['stage'][:70]:70s} {r['seconds']:7.1f} {r['peak_rss_gib']:6.2f}")
    for name, t in result.get("targets", {}).items():
        print(f"{name}: {t['bytes'] / GIB:.2f} GiB, parity {t['passed']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
