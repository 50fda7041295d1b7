"""What this machine's CPU does with 8-bit dot products.

x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake, e.g. this project's AMD EPYC CI
machines) multiply u8 x s8 with ``vpmaddubsw``, which adds pairs of products into int16 with
saturation: 2 x 255 x 127 > 32767, so a u8 x s8 kernel can clip its partial sums (OpenVINO's
"saturation issue"; ONNX Runtime's MLAS U8S8 kernels on AVX2 alike). VNNI (``vpdpbusd``)
accumulates in int32 and cannot. Measured on an AVX2 host: mnist-cond W8A8 through ONNX
Runtime's U8S8 kernels 34.0 dB trajectory PSNR vs fake-quant 41.0 dB; with the same integers
as U8U8 the export-level errors match fake-quant's again (README, "What was run where").
"""
from __future__ import annotations

import functools
import os
import platform

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def int8_dot_saturates() -> bool:
    """True on an x86 CPU whose u8 x s8 dot products can saturate (no VNNI). Override with
    TFMQ_INT8_SATURATES=0|1 (e.g. to build for another machine than this one)."""
    env = os.environ.get("TFMQ_INT8_SATURATES")
    if env in ("0", "1"):
        return env == "1"
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    flags = cpu_flags()
    return bool(flags) and not any(f in flags for f in VNNI_FLAGS)


def describe() -> dict:
    flags = cpu_flags()
    return {"machine": platform.machine(), "vnni": sorted(f for f in VNNI_FLAGS if f in flags),
            "int8_dot_saturates": int8_dot_saturates()}
