"""What this machine's CPU does with 8-bit dot products, and how its C library hands out memory.

x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake) multiply u8 x s8 with
``vpmaddubsw``, which adds pairs of products into int16 with saturation: 2 x 255 x 127 > 32767,
so a u8 x s8 kernel can clip its partial sums (OpenVINO documents this saturation; ONNX
Runtime's MLAS U8S8 kernels on AVX2 alike). VNNI (``vpdpbusd``) accumulates in int32 and
cannot. What it costs and how the targets avoid it: docs/targets/onnxruntime.md,
troubleshooting.
"""
from __future__ import annotations

import ctypes
import ctypes.util
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


RUNTIMES = ("onnxruntime", "openvino", "coremltools", "tensorrt", "torch")


def signature() -> dict:
    """What decides a runtime's float order on this machine: the CPU (model, ISA flags, cores)
    and the installed runtime builds. Two runs with equal signatures give the same outputs."""
    import hashlib
    from importlib import metadata

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    versions = {}
    for name in RUNTIMES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
    return {"machine": platform.machine(), "cpu": model or platform.processor(), "cpu_flags": flags,
            "cores": os.cpu_count(), "runtimes": versions}


def describe() -> dict:
    flags = cpu_flags()
    return {"machine": platform.machine(), "vnni": sorted(f for f in VNNI_FLAGS if f in flags),
            "int8_dot_saturates": int8_dot_saturates()}


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_MMAP_ABOVE, _TRIM_ABOVE = 1 << 30, 2**31 - 1  # bytes; mallopt takes a C int


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    PyTorch's CPU tensors come from malloc, and every UNet call frees and allocates the same
    large activations again. With glibc's defaults each block above the mmap threshold is a
    fresh mmap whose pages the kernel zeroes again on first touch, and the freed top of the
    heap is trimmed back: on this project's 2-core machines that is up to 40% of a sampling
    run spent in the kernel (``benchmarks/malloc_speed.py`` measures it side by side). This
    sets the mmap threshold to 1 GiB and the trim threshold to 2 GiB, process-wide, once;
    the cost is that the process keeps its peak memory until it exits. Returns True where
    applied (glibc), False elsewhere or with TFMQ_KEEP_FREED_MEMORY=0."""
    if os.environ.get("TFMQ_KEEP_FREED_MEMORY") == "0" or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # musl: its malloc has no such knobs
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_ABOVE)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE))
