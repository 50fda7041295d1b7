"""What the TensorRT legalization did to an artifact, and what FP16 float parts cost, on CPU.

    python benchmarks/tensorrt_legal.py artifacts/mnist-ddpm

Reads ARTIFACT/tensorrt (written by tfmq-export --target tensorrt or all) and prints one JSON
object: the legalization census and changes, file sizes, and per golden step the error vs
FP32 of fake-quant, of the legal FP32-float graph and of the legal FP16-float graph (both run
by ONNX Runtime on the CPU here: TensorRT itself is not installed on this machine).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from tfmq.exporter.parity import target_level
    from tfmq.hostcpu import int8_dot_saturates
    from tfmq.runner import onnx_session
    from tfmq.targets.tensorrt import ONNX, ONNX_FP16, REPORT, TensorRTTarget

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    folder = ap.parse_args().artifact / "tensorrt"
    report = json.loads((folder / REPORT).read_text())
    tol = TensorRTTarget().tolerance
    rows = {}
    for f in (ONNX, ONNX_FP16):
        if (folder / f).is_file():
            run = onnx_session(folder / f, extended_only=int8_dot_saturates())  # as the pre-gate runs it
            level = target_level(run, folder / "golden.npz", tol)
            rows[f] = [{"golden": r["golden"], "fake_quant_vs_fp32": round(r["fake_quant_vs_fp32"], 5),
                        "onnx_vs_fp32": round(r["artifact_vs_fp32"], 5)} for r in level["golden"]]
    print(json.dumps({"artifact": str(folder.parent), "opset": report["opset"], "census": report["census"],
                      "changes": len(report["changes"]), "int8_kernels": len(report["int8_kernels"]),
                      "weight_only": len(report["weight_only"]), "fp16": report.get("fp16"),
                      "bytes": {f: (folder / f).stat().st_size for f in (ONNX, ONNX_FP16) if (folder / f).is_file()},
                      "errors_vs_fp32": rows}, indent=1))


if __name__ == "__main__":
    main()
