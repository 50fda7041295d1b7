"""The TensorRT target (NVIDIA H800, Jetson Orin Nano): a legal explicit-quantization ONNX,
an engine builder written against TensorRT's Python API (and the equivalent trtexec command),
per-device profiles, and the engine's per-layer INT8 proof where TensorRT runs.

Engines need an NVIDIA GPU, which the development and CI machines lack (TensorRT's Python
wheels with the libraries, ``tensorrt-cu12``/``-cu13``, install from PyPI on x86-64 Linux:
the ``[tensorrt]`` extra). So ``compile`` does everything that needs no GPU: legalization of
the shared QDQ graph (``legal.py``: symmetric, per-channel weights on the output axis, INT4
only as blocked weight-only MatMul weights, 4-bit conv weights as INT8 values in [-8, 7]),
the static legality check of the final ONNX (any violation fails the export), the
legalization report, ``tensorrt.json`` (device profile, shapes) and ``build_engine.sh``
(``tfmq-build-engine`` and the equivalent ``trtexec`` command). Where ``import tensorrt``
works and a GPU of the profile's architecture is present, it also builds the engine
(``engine.py``) and proves INT8 per layer; elsewhere the manifest says
``engine: not built (TensorRT unavailable)`` and the export exits 0.

Precision of the non-quantized layers (``precision``, default f16): a strongly typed network
takes its types from the ONNX, so for FP16 the legal graph is also written with its float
parts in FP16 (``model.fp16.onnx``; the Q/DQ scales then are FP16 too, as the operators'
type rules demand: their rounding is reported, 4.8e-4 relative at most on the bundled
models), and the engine is built from that file.

Parity where TensorRT is missing: the ONNX the engine is built from runs in ONNX Runtime
against fake-quant (level ``cpu_pregate``) and its outputs become the golden data; in the device images ``tfmq-build-engine`` + ``tfmq-parity`` run the engine (through
Polygraphy's TrtRunner) against that golden data.

The deploy module is changed first (``fold.signed_zero``): asymmetric activations are folded
onto zero-point 0 of the signed type, which TensorRT takes; the recipe only needs symmetric
weights (``requires``; the presets get that variant, tagged ``+sym-weights``).

Profiles: ``h800`` (sm_90, TensorRT 10.x/11) and ``orin-nano`` (sm_87, JetPack 6 =
TensorRT 10.3, 8 GB shared with the CPU: small workspace and batch; the engine must be built
on the Jetson itself, so the artifact carries the ONNX and the build script).
"""
from __future__ import annotations

import importlib.util
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tfmq.artifacts import inside
from tfmq.calibration.requirements import Requirements
from tfmq.errors import ExportError, TargetUnavailable, TfmqError
from tfmq.hostcpu import int8_dot_saturates
from tfmq.runner import FLOOR_REASON, MARGIN_REASON, TRAJECTORY_FLOOR, Runner, Tolerance, in_chunks, onnx_session
from tfmq.targets.base import Lowered, Target, TargetOptions
from tfmq.targets.tensorrt.fold import signed_zero

ONNX = "model.onnx"
ONNX_FP16 = "model.fp16.onnx"
PRECISIONS = ("f16", "f32")
CONFIG = "tensorrt.json"
REPORT = "legalization.json"
SCRIPT = "build_engine.sh"
ENGINE_INFO = "engine.json"
NOT_BUILT = "not built (TensorRT unavailable)"


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    gpu: str
    sm: str  # compute capability the engine is built for (engines are tied to it)
    tensorrt: str
    workspace_mb: int
    opt_level: int  # builder optimization level (0-5)
    batch: tuple[int, int, int]  # optimization profile: min, opt, max
    build_on: str

    @property
    def compute_capability(self) -> str:
        return f"{self.sm[3]}.{self.sm[4:]}"


PROFILES = {
    "h800": DeviceProfile("h800", "NVIDIA H800 (Hopper)", "sm_90", "10.x or 11.x", workspace_mb=8192, opt_level=5,
                          batch=(1, 8, 32), build_on="any sm_90 machine with the deployment's TensorRT version"),
    # 8 GB shared between CPU and GPU: a 1 GB workspace leaves room for the UNet and the app
    "orin-nano": DeviceProfile("orin-nano", "Jetson Orin Nano 8GB (Ampere)", "sm_87", "10.3 (JetPack 6)",
                               workspace_mb=1024, opt_level=3, batch=(1, 2, 4),
                               build_on="the Jetson itself (its TensorRT and sm_87 are not available elsewhere)"),
}


@dataclass(frozen=True)
class TensorRTOptions(TargetOptions):
    label = "TensorRT"
    device: str = field(default="h800", metadata={"help": "tensorrt: the device profile (h800, orin-nano)",
                                                  "choices": tuple(PROFILES)})
    # the non-quantized layers: FP16 (both devices' fast path) or FP32
    precision: str = field(default="f16", metadata={"help": "tensorrt: the layers left in float, f16 (default) "
                                                            "or f32", "choices": PRECISIONS})
    # the profile's opt batch unless given (min 1, max the larger of both)
    batch: int | None = field(default=None, metadata={"help": "tensorrt: the optimization profile's opt batch"})
    workspace_mb: int | None = field(default=None, metadata={
        "help": "tensorrt: builder workspace limit (default: the device profile's)"})
    opt_level: int | None = field(default=None, metadata={
        "help": "tensorrt: builder optimization level 0-5 (default: the profile's)"})

    def __post_init__(self):
        if self.device not in PROFILES:
            raise TfmqError(f"TensorRT device {self.device!r} is not supported by this target (one of: "
                            f"{', '.join(PROFILES)})")
        if self.precision not in PRECISIONS:
            raise TfmqError(f"TensorRT precision {self.precision!r} for the non-quantized layers: one of "
                            f"{', '.join(PRECISIONS)}")
        if self.batch is not None and self.batch < 1:
            raise TfmqError(f"TensorRT batch {self.batch}: must be >= 1")
        if self.workspace_mb is not None and self.workspace_mb < 64:
            raise TfmqError(f"TensorRT workspace {self.workspace_mb} MB: must be >= 64")
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise TfmqError(f"TensorRT builder optimization level {self.opt_level}: 0 to 5")

    @property
    def profile(self) -> DeviceProfile:
        return PROFILES[self.device]

    def profile_settings(self) -> dict:
        p = self.profile
        lo, opt, hi = p.batch
        if self.batch is not None:
            opt, hi = self.batch, max(hi, self.batch)
        return {"device": p.name, "gpu": p.gpu, "sm": p.sm, "tensorrt": p.tensorrt, "build_on": p.build_on,
                "workspace_mb": self.workspace_mb or p.workspace_mb, "opt_level": p.opt_level if self.opt_level is None
                else self.opt_level, "batch": [lo, opt, hi], "precision": self.precision,
                "onnx": ONNX_FP16 if self.precision == "f16" else ONNX,
                "network": "strongly typed: INT8 where the Q/DQ say so, "
                           f"{'FP16' if self.precision == 'f16' else 'FP32'} elsewhere (the ONNX's types)",
                "engine": f"model.{p.name}.engine",
                "timing_cache": f"timing.{p.name}.cache"}


def tensorrt_runs_here() -> str | None:
    """Why TensorRT engines cannot be built or run here (None: they can)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'tfmq-dm[tensorrt]' on x86-64 Linux, or the NGC/L4T images)"
    if importlib.util.find_spec("polygraphy") is None:
        return "polygraphy is not installed (pip install 'tfmq-dm[tensorrt]')"
    from tfmq.targets.tensorrt.engine import gpu_compute_capability

    if gpu_compute_capability() is None:
        return "no NVIDIA GPU is visible (nvidia-smi found none)"
    return None


class TensorRTTarget(Target):
    name = "tensorrt"
    consumes = "qdq-onnx"
    description = "TensorRT for H800 / Jetson Orin Nano: legal QDQ ONNX, CPU pre-gate, engine where TensorRT runs"
    package = None  # compile needs only onnx-ir and ONNX Runtime; the engine needs TensorRT
    Options = TensorRTOptions
    requires = Requirements(symmetric_weights=True,
                            why="TensorRT quantizes with zero-point 0 only, and a weight zero-point cannot be "
                                "moved out of an 8-bit container; asymmetric activations are fine")
    tolerance = Tolerance(
        error_margin=0.10, error_floor=1e-3, golden_rel_l2=0.05, trajectory_db=0.5,
        reasons={
            "error_margin": MARGIN_REASON + "; on a GPU not measured yet (no GPU with TensorRT was available)",
            "error_floor": FLOOR_REASON,
            "golden_rel_l2": "the engine's outputs vs the legal ONNX's in ONNX Runtime: the same flips as between "
                             "CPUs; not measured on a GPU yet",
            "trajectory_db": "the product's bar: trajectory PSNR within 0.5 dB of fake-quant vs FP32",
            "trajectory_floor_db": TRAJECTORY_FLOOR,
        })
    pregate = ("cpu_pregate", "the legal ONNX that TensorRT builds from, run by ONNX Runtime on the CPU, vs "
                              "fake-quant (plus the static legality check of that file at compile)")

    def runs_here(self) -> str | None:
        return tensorrt_runs_here()

    def prepare(self, dep, options: TensorRTOptions) -> None:
        signed_zero(dep)

    def compile(self, lowered: Lowered, out_dir: Path, options: TensorRTOptions) -> dict:
        from tfmq.targets.tensorrt import legal

        opts = options
        kernels = lowered.report.kernels
        tmp = out_dir / ".legal"  # written beside, then moved over the lowered file with its .data, if any
        tmp.mkdir(exist_ok=True)
        report = legal.legalize(lowered.onnx, tmp / ONNX, kernels)
        (out_dir / (ONNX + ".data")).unlink(missing_ok=True)
        for f in tmp.iterdir():
            f.replace(out_dir / f.name)
        tmp.rmdir()
        _require_legal(out_dir / ONNX, kernels)  # the file as TensorRT will read it
        settings = opts.profile_settings()
        files = [ONNX, REPORT, CONFIG, SCRIPT]
        if opts.precision == "f16":
            report.fp16 = legal.to_fp16(out_dir / ONNX, out_dir / ONNX_FP16)
            _require_legal(out_dir / ONNX_FP16, kernels)
            files.insert(1, ONNX_FP16)
        files[2:2] = [f.name for f in sorted(out_dir.glob("*.onnx.data"))]  # external data (over 2 GB)
        (out_dir / REPORT).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        settings["inputs"] = _input_shapes(out_dir / ONNX, settings["batch"])
        settings["int8_kernels"] = report.int8_kernels
        (out_dir / CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
        (out_dir / SCRIPT).write_text(build_script(settings))
        (out_dir / SCRIPT).chmod(0o755)
        result = {"device": settings, "legalization": {"opset": report.opset, "changes": len(report.changes),
                                                       "census": report.census, "violations": 0},
                  "files": files, "trtexec": trtexec_command(settings)}
        why = self.runs_here()
        if why:
            result["engine"] = NOT_BUILT
            result["engine_why"] = why
            return result
        from tfmq.targets.tensorrt.engine import build_engine

        result["engine_info"] = build_engine(out_dir)
        result["engine"] = result["engine_info"]["engine"]
        return result

    def verify(self, lowered: Lowered, out_dir: Path, options: TargetOptions) -> dict:
        """The legal files against the fresh lowering legalized the same way."""
        import tempfile

        from tfmq.exporter.qdq_onnx import initializer_differences
        from tfmq.targets.tensorrt import legal

        differs, checked = [], []
        with tempfile.TemporaryDirectory(prefix="tfmq-trt-verify-") as tmp:
            legal.legalize(lowered.onnx, Path(tmp) / ONNX, lowered.report.kernels)
            files = [(ONNX, Path(tmp) / ONNX)]
            if (out_dir / ONNX_FP16).is_file():
                legal.to_fp16(Path(tmp) / ONNX, Path(tmp) / ONNX_FP16)
                files.append((ONNX_FP16, Path(tmp) / ONNX_FP16))
            for name, fresh in files:
                differs += [f"{name}: {d}" for d in initializer_differences(out_dir / name, fresh)]
                checked.append(name)
        return {"passed": not differs, "checked": " and ".join(checked) + " initializers", "differs": differs[:10]}

    def summary(self, entry: dict) -> dict:
        row = super().summary(entry)
        if entry.get("engine") == NOT_BUILT:
            row["built"] = "tensorrt/model.onnx; engine not built"
            build = (f"engine not built: build it on {entry['compile']['device']['build_on']} with "
                     "`tfmq-build-engine ARTIFACT` (or tensorrt/build_engine.sh)")
            row["note"] = "; ".join(n for n in (build, row.get("note")) if n)
        return row

    def pregate_runner(self, lowered: Lowered, out_dir: Path) -> Runner:
        """The ONNX the engine is built from (FP16 or FP32 float parts), in ONNX Runtime on the
        CPU (graph optimizations up to EXTENDED where this CPU's u8 x s8 products saturate, as
        the onnx target runs)."""
        name = json.loads((out_dir / CONFIG).read_text())["onnx"]
        return onnx_session(inside(out_dir, name, "the ONNX file named in tensorrt.json"),
                            extended_only=int8_dot_saturates())

    def runner(self, out_dir: Path, options: dict | None = None) -> Runner:
        """The engine, through Polygraphy's TrtRunner (where TensorRT and a GPU are present)."""
        why = self.runs_here()
        if why:
            raise TargetUnavailable(f"target 'tensorrt': {why}")
        import numpy as np
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        settings = json.loads((out_dir / CONFIG).read_text())
        engine = inside(out_dir, settings["engine"], "the engine named in tensorrt.json")
        if not engine.is_file():
            raise TfmqError(f"{out_dir}: no TensorRT engine ({settings['engine']}): build it first with "
                            f"`tfmq-build-engine {out_dir.parent}`")
        runner = TrtRunner(EngineFromBytes(engine.read_bytes()))
        runner.activate()
        names = set(settings["inputs"])
        largest = settings["batch"][2]

        def once(sample, timestep, ehs):
            feed = {"sample": np.ascontiguousarray(sample, np.float32), "timestep": timestep.astype(np.int64)}
            if "encoder_hidden_states" in names:
                feed["encoder_hidden_states"] = np.ascontiguousarray(ehs, np.float32)
            return np.asarray(runner.infer(feed)["out_sample"], dtype=np.float32)

        chunked = in_chunks(once, largest)
        return lambda s, t, e=None: (once if len(s) <= largest else chunked)(s, t, e)


def _require_legal(path: Path, kernels: dict[str, str]) -> None:
    from tfmq.targets.tensorrt import legal

    broken = legal.check_file(path, kernels)
    if broken:
        raise ExportError(f"{path.name} for TensorRT breaks {len(broken)} explicit-quantization rules: "
                          + "; ".join(map(str, broken[:3])) + (" ..." if len(broken) > 3 else ""))


def _input_shapes(path: Path, batch: list[int]) -> dict[str, dict]:
    """Each input's min/opt/max shape for the optimization profile (batch dynamic, the rest
    fixed: the FSC fold's border terms and the tables are built for one sample size)."""
    import onnx

    shapes = {}
    for i in onnx.load(str(path), load_external_data=False).graph.input:
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if i.name == "timestep":
            shapes[i.name] = {"min": dims, "opt": dims, "max": dims}
        else:
            shapes[i.name] = {k: [b, *dims[1:]] for k, b in zip(("min", "opt", "max"), batch, strict=True)}
    return shapes


def trtexec_command(settings: dict) -> list[str]:
    """The trtexec line that builds the same engine as ``tfmq-build-engine``."""
    def shapes(which: str) -> str:
        return ",".join(f"{n}:{'x'.join(map(str, s[which]))}" for n, s in settings["inputs"].items())

    return ["trtexec", f"--onnx={settings['onnx']}", "--stronglyTyped", f"--minShapes={shapes('min')}",
            f"--optShapes={shapes('opt')}", f"--maxShapes={shapes('max')}",
            f"--memPoolSize=workspace:{settings['workspace_mb']}M",
            f"--builderOptimizationLevel={settings['opt_level']}", f"--timingCacheFile={settings['timing_cache']}",
            f"--saveEngine={settings['engine']}", "--profilingVerbosity=detailed",
            f"--exportLayerInfo={settings['device']}.layers.json"]


def build_script(settings: dict) -> str:
    return "\n".join([
        "#!/bin/sh",
        f"# Build the TensorRT engine for {settings['gpu']} ({settings['sm']}, TensorRT {settings['tensorrt']}).",
        f"# Run it on {settings['build_on']}, from the artifact's tensorrt/ folder.",
        "# tfmq-build-engine builds with TensorRT's Python API, proves INT8 per quantized layer and",
        "# re-runs the parity gates; the trtexec line below builds the same engine without tfmq.",
        "set -eu",
        'cd "$(dirname "$0")"',
        'if command -v tfmq-build-engine >/dev/null 2>&1; then',
        "    exec tfmq-build-engine ..",
        "fi",
        "exec " + " ".join(shlex.quote(a) for a in trtexec_command(settings)),
        "",
    ])


TARGET = TensorRTTarget()
