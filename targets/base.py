"""The interface every deployment target implements, and the registry of targets.

A target names what it consumes (the portable QDQ ONNX graph, or the torch deploy module),
refuses impossible recipes *before* calibration (``check``), compiles the lowered model into
its artifact files (``compile``), runs them (``runner``), and declares once, with reasons,
the tolerances its parity gates use. Targets import their runtime SDK only inside these
methods, so ``import tfmq`` never pulls a runtime in.
"""
from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tfmq.calibration.recipe import Recipe
from tfmq.errors import TargetUnavailable

LOWERING = "lowering.json"  # the lowering report beside the target's model.onnx (exporter/qdq_onnx.py)

# (sample [B, C, H, W], timestep [1] int64, encoder_hidden_states [B, L, D] or None) -> eps
Runner = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]


@dataclass(frozen=True)
class Tolerance:
    """Parity gates of one target (see exporter/parity.py for how each is used)."""

    # level 1 and 2: the runtime's error vs FP32 may exceed fake-quant's error vs FP32 by this
    # fraction of it (plus ``error_floor``): a quantized net is chaotic under rounding, so a
    # rounding-order difference moves single outputs, not the error level.
    error_margin: float
    error_floor: float
    # level 2 on another machine: the runtime's outputs vs the ones stored at export
    golden_rel_l2: float
    # level 3: final-image PSNR vs FP32 may be this much lower than fake-quant's
    trajectory_db: float
    reasons: dict[str, str] = field(default_factory=dict)
    # ... unless the artifact's images are this close to FP32 or to fake-quant (see TRAJECTORY_FLOOR)
    trajectory_floor_db: float = 45.0


TRAJECTORY_FLOOR = ("an artifact whose final images are within 45 dB PSNR of FP32, or of fake-quant (RMS error 0.56% "
                    "of the range), passes even when it is more than the margin below fake-quant: the runtime's own "
                    "rounding-order flips add an error of their own (measured: 0.7 dB off fake-quant's 49.3 dB on "
                    "ONNX Runtime, 1.5 dB on OpenVINO, bundled model, full W8A8), and the margin in dB is ill-posed "
                    "once fake-quant's error comes down to that level; a lowering or kernel fault (a wrong scale, "
                    "int16 saturation: 34 vs 41 dB) moves the artifact far more than 45 dB from fake-quant. The raw "
                    "comparison stays in parity.json as within_margin")


class Target(ABC):
    name: str
    consumes: str  # "qdq-onnx" or "deploy-module"
    package: str | None = None  # the Python module the runtime needs
    install_hint: str = ""
    u8_only: bool = False  # 8-bit weights as UINT8 + 128 (exporter/qdq_onnx.py: rewrite)
    int4_weights: bool = True  # 4-bit weights as INT4 in the graph (else 8-bit containers holding 4-bit values)
    # 4-bit weights stored as INT4 behind a Cast to 8 bits, which the runtime folds at load
    # into the 8-bit initializer its integer kernels take (a 4-bit file, 8-bit kernels)
    cast_int4: bool = False
    signed_zero: bool = False  # asymmetric activations folded onto zero-point 0 (exporter/deploy.py FoldedAct)
    # the QuantState's conv output quantizers in this target's model (convs as QLinearConv,
    # exporter/qlinear.py); a target whose convs write float runs the model without them
    conv_outputs: bool = False
    tolerance: Tolerance

    def unavailable(self) -> str | None:
        """Why this target cannot run here (None when it can)."""
        if self.package and importlib.util.find_spec(self.package) is None:
            return f"{self.package} is not installed ({self.install_hint})"
        return None

    # a target whose artifacts may be built where they cannot run names its pre-gate level
    # (name, what it runs) and gives its runner with ``pregate_runner(dep, out_dir)``
    pregate: tuple[str, str] | None = None

    def runs_here(self) -> str | None:
        """Why this target's artifacts cannot be *run* here, though they can be built (None: they can)."""
        return self.unavailable()

    def require(self) -> None:
        why = self.unavailable()
        if why:
            raise TargetUnavailable(f"target {self.name!r}: {why}")

    def check(self, recipe: Recipe, options: dict | None = None) -> None:  # noqa: B027 - most targets take any recipe
        """Refuse a recipe (or options) this target cannot deploy, before calibration starts."""

    def adapt(self, recipe: Recipe) -> Recipe:
        """The variant of a preset this target needs (e.g. symmetric weights); custom recipes
        are not adapted, ``check`` refuses them with the setting to change."""
        return recipe

    @abstractmethod
    def compile(self, lowered, out_dir: Path, options: dict | None = None) -> dict:
        """Build the target's files in ``out_dir`` from the lowered model (the QDQ ONNX path, or
        (deploy module, sample shape, cross-attention shape) for a deploy-module target)."""

    @abstractmethod
    def runner(self, out_dir: Path, options: dict | None = None) -> Runner:
        """A callable running the compiled artifact."""

    def deployment_runner(self, out_dir: Path) -> tuple[str, Runner] | None:
        """Where the parity runner uses other settings than the artifact deploys with (OpenVINO:
        the f32 hint for parity, bf16 by default at deployment): what differs, and a runner with
        the deployment's settings, so the trajectory is also reported as the artifact ships."""
        return None


class TargetOptions:
    """Mixin for a target's frozen options dataclass: ``of`` builds it from a dict (None values
    dropped, unknown keys refused naming the target)."""

    label = "target"

    @classmethod
    def of(cls, options: dict | None):
        o = {k: v for k, v in (options or {}).items() if v is not None}
        unknown = set(o) - set(cls.__dataclass_fields__)
        if unknown:
            from tfmq.errors import TfmqError

            raise TfmqError(f"unknown {cls.label} options: {sorted(unknown)}")
        return cls(**o)


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


def get_target(name: str) -> Target:
    from tfmq.targets.coreml import CoreMLTarget
    from tfmq.targets.onnxruntime import OnnxRuntimeTarget
    from tfmq.targets.openvino import OpenVinoTarget
    from tfmq.targets.tensorrt import TensorRTTarget

    targets = {t.name: t for t in (OnnxRuntimeTarget(), OpenVinoTarget(), CoreMLTarget(), TensorRTTarget())}
    if name not in targets:
        from tfmq.errors import TfmqError

        raise TfmqError(f"unknown target {name!r}: one of {', '.join(targets)}")
    return targets[name]
