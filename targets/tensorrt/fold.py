"""TensorRT's change to the deploy module: asymmetric activations on zero-point 0.

TensorRT quantizes with zero-point 0 only. An asymmetric b-bit activation quantizer keeps
its integers when its reference zero-point is the middle of its range, 2^(b-1), which is
zero-point 0 of the signed type (``legal.py`` then stores it as INT8): every step's own
zero-point becomes the fold's c_t (``FoldedAct.rebase``), carried exactly by the float ops
around the integer kernel, which keeps asymmetric quality (symmetric activations cost 8.7 dB
of trajectory PSNR on the bundled model; docs/targets/tensorrt.md).
"""
from __future__ import annotations


def signed_zero(dep) -> None:
    for act in dep.activations():
        if not act.symmetric:
            act.rebase(2 ** (act.bits - 1))
    dep.fix_shapes()
