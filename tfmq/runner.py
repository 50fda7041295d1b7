"""What runs an artifact and how close it must come: the types every layer shares.

A ``Runner`` is any callable with the diffusers calling convention on numpy arrays; every
target's compiled artifact is run through one, and the parity gates (``tfmq.exporter.parity``)
compare it with FP32 and fake-quant. A ``Tolerance`` holds one target's gate values, each a
number with a one-line reason (docs/design.md, "Parity tolerances", has the measurements).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# (sample [B, C, H, W], timestep [1] int64, encoder_hidden_states [B, L, D] or None) -> eps
Runner = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]

TOLERANCE_DOCS = "docs/design.md#parity-tolerances"


@dataclass(frozen=True)
class Tolerance:
    """The parity gates of one target (``tfmq.exporter.parity`` says how each is used)."""

    # levels 1 and 2: the artifact's error vs FP32 may exceed fake-quant's by this fraction of
    # it, plus ``error_floor``
    error_margin: float
    error_floor: float
    # level 2: relative L2 of the outputs against the ones stored at export
    golden_rel_l2: float
    # level 3: final-image PSNR vs FP32 may be this much below fake-quant's ...
    trajectory_db: float
    reasons: dict[str, str] = field(default_factory=dict)
    # ... or the artifact's images must be at least this close to FP32 or to fake-quant
    trajectory_floor_db: float = 45.0
    # level 2 on the machine and runtime builds that stored the golden outputs: the same kernels
    # in the same order (measured: 0.0 on the bundled models), so a changed file shows
    golden_same_host_rel_l2: float = 1e-6

    def to_dict(self) -> dict:
        return {"error_margin": self.error_margin, "error_floor": self.error_floor,
                "golden_rel_l2": self.golden_rel_l2, "golden_same_host_rel_l2": self.golden_same_host_rel_l2,
                "trajectory_db": self.trajectory_db,
                "trajectory_floor_db": self.trajectory_floor_db, "reasons": dict(self.reasons),
                "docs": TOLERANCE_DOCS}


# one-line reasons every target shares
MARGIN_REASON = ("rounding-order differences flip single integers at .5 ties; the network amplifies single "
                 "outputs, not the error level")
FLOOR_REASON = "at the first steps the quantization error itself is about 1e-3 relative"
TRAJECTORY_FLOOR = ("within 45 dB of FP32 or of fake-quant the margin in dB is ill-posed; a lowering or kernel "
                    "fault lands far below it")


def in_chunks(once: Runner, fixed: int | None) -> Runner:
    """A Runner for any batch over ``once``, which takes exactly ``fixed`` samples (None: any):
    chunks of ``fixed``, the last one padded by repeating its last sample."""

    def run(sample, timestep, encoder_hidden_states=None):
        if fixed is None or len(sample) == fixed:
            return once(sample, timestep, encoder_hidden_states)
        outs = []
        for i in range(0, len(sample), fixed):
            chunk = [a[i:i + fixed] if a is not None else None for a in (sample, encoder_hidden_states)]
            n = len(chunk[0])
            pad = [None if a is None else np.concatenate([a, np.repeat(a[-1:], fixed - n, 0)]) for a in chunk]
            outs.append(once(pad[0], timestep, pad[1])[:n])
        return np.concatenate(outs)

    return run


def onnx_session(path, threads: int | None = None, extended_only: bool = False) -> Runner:
    """An ONNX Runtime CPU session on a graph with the diffusers calling convention.
    ``extended_only``: graph optimizations up to ORT_ENABLE_EXTENDED (no hardware-specific
    layouts); a target asks for it where the full level loses precision."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    if extended_only:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    sess = ort_session(path, so)
    names = {i.name for i in sess.get_inputs()}

    def run(sample, timestep, encoder_hidden_states=None):
        feed = {"sample": sample, "timestep": timestep}
        if "encoder_hidden_states" in names:
            feed["encoder_hidden_states"] = encoder_hidden_states
        return sess.run(["out_sample"], feed)[0]

    return run


def ort_session(path, so=None):
    """An ONNX Runtime CPU session; a missing, corrupt or refused file is one error line."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    from tfmq.errors import TfmqError, first_line

    refused = tuple(getattr(state, n) for n in ("Fail", "InvalidArgument", "NoSuchFile", "InvalidProtobuf",
                                                 "InvalidGraph", "RuntimeException", "NotImplemented")
                    if hasattr(state, n))
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except refused as e:
        raise TfmqError(f"ONNX Runtime cannot load {path}: {first_line(e).split(' : ')[-1][:300]}") from e
