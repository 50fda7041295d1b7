"""tfmq-parity: re-check an artifact directory on this machine, without calibrating again."""
from __future__ import annotations

import json
from pathlib import Path

from tfmq.cli.common import EXIT_ERROR, parser, run

DESCRIPTION = """Re-run the parity checks of an artifact directory written by tfmq-export, here.

First every file the export verified is checked against the sha256 the manifest recorded
(a changed or missing one is named and fails the check); then each target in the manifest
is checked against the golden data stored in the artifact, without calibrating again:
  fp32  the golden seeds are sampled again in FP32 and must reproduce the stored images;
  every quantized target whose runtime runs here: level 2, the stored golden inputs through
        the artifact; its error vs the stored FP32 outputs must match the stored fake-quant
        error, and its outputs the stored ones (tolerances in the manifest).
        --trajectory adds level 3 (DDIM runs vs FP32 and the artifact's QuantState).
Every target's integers and scales are compared with a fresh lowering of its QuantState
(wherever the artifact can be read back). A target whose runtime cannot run here (Core ML
off macOS, TensorRT without its GPU) has its runtime reported as "not checked here" with
why: never as passed. Prints a table (or --json); exits 0 when every check that ran
passed, 2 otherwise.

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
    passed = all(v["passed"] for v in verdicts.values())
    if args.json:
        print(json.dumps({"artifact": str(args.artifact), "passed": passed, "targets": verdicts}, indent=2))
    else:
        print(f"{args.artifact}: {'PASSED' if passed else 'FAILED'} (every check that ran here)")
        print(table([_row(name, v) for name, v in verdicts.items()]))
    return 0 if passed else EXIT_ERROR


def _row(name: str, v: dict) -> dict:
    if name == "files":
        changed = ", ".join(f"{f} {how}" for f, how in v["changed"].items())
        return {"target": "files", "built": f"{v['files']} recorded", "executed": "here",
                "verdict": "PASSED" if v["passed"] else "FAILED",
                "numbers": v.get("error") or (f"changed since export: {changed}" if changed else
                                              "every file is the one that was verified (sha256)")}
    verdict = "PASSED" if v["passed"] else "FAILED"
    if "error" in v:
        return {"target": name, "built": "yes", "executed": "no", "verdict": "FAILED", "numbers": v["error"]}
    if name == "fp32":
        return {"target": name, "built": "yes", "executed": "here", "verdict": verdict,
                "numbers": f"golden images reproduced at {v['psnr_db'] if isinstance(v['psnr_db'], str) else round(v['psnr_db'], 1)} dB "
                           f"(>= {v['min_psnr_db']})"}
    levels = v["levels"]
    ints = levels["integers"]
    numbers = f"{ints['checked']} {'as lowered from the QuantState' if ints['passed'] else 'differ: '}" + (
        "" if ints["passed"] else "; ".join(ints["differs"][:3]))
    if not v["runtime_checked"]:
        return {"target": name, "built": "yes", "executed": "integers only",
                "verdict": f"integers {verdict}; runtime not checked here", "numbers": numbers,
                "note": v["runtime"]}
    worst = max(r["artifact_vs_stored"] for r in levels["target"]["golden"])
    numbers += f"; golden outputs within {worst:.2g} relative L2 of the stored ones"
    if "trajectory" in levels:
        tr = levels["trajectory"]
        numbers += (f"; trajectory {tr['psnr_artifact_vs_fp32_db']:.1f} dB vs FP32 "
                    f"(fake-quant {tr['psnr_fake_quant_vs_fp32_db']:.1f})")
    failed = [k for k, lv in levels.items() if not lv["passed"]]
    return {"target": name, "built": "yes", "executed": "here",
            "verdict": verdict + (f" ({', '.join(failed)})" if failed else ""), "numbers": numbers}


if __name__ == "__main__":
    raise SystemExit(main())
