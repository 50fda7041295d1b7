"""tfmq-parity: re-check an artifact directory on this machine, without calibrating again."""
from __future__ import annotations

import json
from pathlib import Path

from tfmq.cli.common import EXIT_ERROR, parser, run

DESCRIPTION = """Re-run the parity checks of an artifact directory written by tfmq-export, here.

Each target in the artifact's manifest.json is checked against the golden data stored in
the artifact, without calibrating again:
  fp32  the golden seeds are sampled again in FP32 and must reproduce the stored images;
  every quantized target whose runtime runs here: level 2, the stored golden inputs through
        the artifact; its error vs the stored FP32 outputs must match the stored fake-quant
        error, and its outputs the stored ones (tolerances in the manifest).
        --trajectory adds level 3 (DDIM runs vs FP32 and the artifact's QuantState).
A target whose runtime cannot run here (Core ML off macOS, TensorRT without its GPU) is
reported as "not checked here" with why: never as passed. Prints a table (or --json);
exits 0 when every check that ran passed, 2 otherwise.

example:
  tfmq-parity artifacts/mnist-ddpm
"""


def main(argv=None) -> int:
    ap = parser("tfmq-parity", DESCRIPTION)
    ap.add_argument("artifact", type=Path, help="artifact directory (holds manifest.json)")
    ap.add_argument("--model", help="load the model from here instead of the manifest's model spec")
    ap.add_argument("--trajectory", action="store_true", help="also re-run level 3 (whole DDIM runs) for quantized targets")
    ap.add_argument("--json", action="store_true", help="print the verdicts as JSON instead of the table")
    return run("tfmq-parity", parity, ap.parse_args(argv))


def parity(args) -> int:
    from tfmq.cli.report import table
    from tfmq.pipeline import recheck

    verdicts = recheck(args.artifact, args.model, args.trajectory)
    passed = all(v["passed"] for v in verdicts.values() if v["checked"])
    if args.json:
        print(json.dumps({"artifact": str(args.artifact), "passed": passed, "targets": verdicts}, indent=2))
    else:
        print(f"{args.artifact}: {'PASSED' if passed else 'FAILED'} (every check that ran here)")
        print(table([_row(name, v) for name, v in verdicts.items()]))
    return 0 if passed else EXIT_ERROR


def _row(name: str, v: dict) -> dict:
    if not v["checked"]:
        return {"target": name, "built": "yes", "executed": "no", "verdict": "not checked here",
                "numbers": v["why"].removeprefix("not checked here: ")}
    verdict = "PASSED" if v["passed"] else "FAILED"
    if name == "fp32":
        return {"target": name, "built": "yes", "executed": "here", "verdict": verdict,
                "numbers": f"golden images reproduced at {v['psnr_db'] if isinstance(v['psnr_db'], str) else round(v['psnr_db'], 1)} dB "
                           f"(>= {v['min_psnr_db']})"}
    levels = v["levels"]
    worst = max(r["artifact_vs_stored"] for r in levels["target"].get("golden", [{"artifact_vs_stored": float("nan")}]))
    numbers = f"golden outputs within {worst:.2g} relative L2 of the stored ones"
    if "trajectory" in levels:
        tr = levels["trajectory"]
        numbers += (f"; trajectory {tr['psnr_artifact_vs_fp32_db']:.1f} dB vs FP32 "
                    f"(fake-quant {tr['psnr_fake_quant_vs_fp32_db']:.1f})")
    failed = [k for k, lv in levels.items() if not lv["passed"]]
    return {"target": name, "built": "yes", "executed": "here",
            "verdict": verdict + (f" ({', '.join(failed)})" if failed else ""), "numbers": numbers}


if __name__ == "__main__":
    raise SystemExit(main())
