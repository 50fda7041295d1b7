"""The Core ML target (iPhone): the torch deploy module converted to an ML Program `.mlpackage`
that carries our integers, verified on Linux, predicted on macOS.

Conversion: the deploy module runs under the op set of ``program.py`` (every quantized weight
a ``quantized_decomposed.dequantize_per_channel`` of the QuantState's integers, every
activation quantizer a ``quantize_per_tensor`` -> ``dequantize_per_tensor`` pair with its
constant parameters), is captured with ``torch.export`` and converted by coremltools' torch frontend:
weights become ``constexpr_affine_dequantize`` (iOS17) or ``constexpr_blockwise_shift_scale``
(iOS18, which stores 4-bit values as INT4/UINT4), activations ``quantize``/``dequantize``
(iOS17+). The temporal tables and the FSC fold's per-step factors are constants gathered by
the step index, as in the ONNX graph. coremltools has no ONNX frontend (since 6.0), hence the
torch module. Shapes are fixed (``batch``, default 2: a CFG pair); the runner chunks.

On Linux (no Core ML runtime) ``verify`` reads the saved package back with coremltools' own
MIL loader and checks, bit for bit, that every quantized layer's integers, scales and
zero-points are in it (matched one to one by value), that every activation quantizer's
(scale, zero-point, dtype) is one of its ``quantize`` ops, and the op census (no quantized
layer left as a float constant). The numeric pre-gate runs the exact torch program that was
converted against the fake-quant model (``linux_pregate`` in parity.json); the real Core ML
prediction is the macOS runner (``runtime_tests`` marker ``coreml``).

Deployment targets: iOS16 has int8 weight-only compression and no activation quantization,
iOS17 adds activation quantize/dequantize, iOS18 adds 4-bit weights. ``check`` refuses a
recipe the chosen target cannot express, naming the minimum that would work.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tfmq.calibration.recipe import Recipe
from tfmq.errors import ExportError, RecipeError, TargetUnavailable, TfmqError, first_line
from tfmq.exporter.deploy import FoldedAct
from tfmq.runner import FLOOR_REASON, MARGIN_REASON, TRAJECTORY_FLOOR, Runner, Tolerance, in_chunks
from tfmq.targets.base import Lowered, Target, TargetOptions
from tfmq.targets.coreml import program

DEPLOYMENT_TARGETS = ("iOS16", "iOS17", "iOS18")
COMPUTE_UNITS = ("all", "cpu_only", "cpu_and_gpu", "cpu_and_ne")
PRECISIONS = ("f16", "f32")
PACKAGE = "model.mlpackage"
CHUNKS = "chunks"  # folder of the Neural Engine chunks: chunk1.mlpackage, chunk2.mlpackage, ...
CHUNK_BYTES = 1 << 30  # the Neural Engine wants UNet chunks under about 1 GB of weights


@dataclass(frozen=True)
class CoreMLOptions(TargetOptions):
    label = "Core ML"
    deployment_target: str | None = field(default=None, metadata={
        "help": "coreml: minimum deployment target (default: the lowest that expresses the recipe)",
        "choices": DEPLOYMENT_TARGETS})
    compute_units: str = field(default="all", metadata={"help": "coreml: compute units (default all)",
                                                        "choices": COMPUTE_UNITS})
    precision: str = field(default="f16", metadata={"help": "coreml: compute precision of the float parts, f16 "
                                                            "(default) or f32", "choices": PRECISIONS})
    batch: int = field(default=2, metadata={"help": "coreml: the package's fixed batch (default 2, a CFG pair)"})
    # Neural Engine chunks (coremltools' bisect_model, halving): None = as many as keep every
    # chunk's weights under CHUNK_BYTES; 1 = one package only; 2, 4, ... that many
    chunks: int | None = field(default=None, metadata={
        "help": "coreml: split the package into this many Neural Engine chunks (power of two; default: enough to "
                "keep each under 1 GB of weights)"})

    def __post_init__(self):
        if self.deployment_target is not None and self.deployment_target not in DEPLOYMENT_TARGETS:
            raise TfmqError(f"Core ML deployment target {self.deployment_target!r}: one of "
                            f"{', '.join(DEPLOYMENT_TARGETS)}")
        if self.compute_units not in COMPUTE_UNITS:
            raise TfmqError(f"Core ML compute units {self.compute_units!r}: one of {', '.join(COMPUTE_UNITS)}")
        if self.precision not in PRECISIONS:
            raise TfmqError(f"Core ML compute precision {self.precision!r}: one of {', '.join(PRECISIONS)}")
        if self.batch < 1:
            raise TfmqError(f"Core ML batch {self.batch}: must be >= 1")
        if self.chunks is not None and (self.chunks < 1 or self.chunks & (self.chunks - 1)):
            raise TfmqError(f"Core ML chunks {self.chunks}: a power of two (bisect_model halves a package)")


def load_coremltools():
    """coremltools, imported quietly: off macOS it logs that its native runtime is missing
    (expected: predictions need macOS) and that this torch is newer than it was tested with
    (the conversions here are verified by ``verify`` instead)."""
    import logging

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    import coremltools

    return coremltools


def minimum_target(recipe: Recipe) -> str:
    """The lowest deployment target that can express ``recipe``, and why."""
    four_bit = recipe.weights.bits == 4 or any(o.weight_bits == 4 for o in recipe.overrides)
    if four_bit:
        return "iOS18"
    return "iOS17" if recipe.quantizes_activations else "iOS16"


class CoreMLTarget(Target):
    name = "coreml"
    consumes = "deploy-module"
    description = "Core ML package for iPhone with our integers, verified and pre-gated on Linux"
    package = "coremltools"
    install_hint = "pip install 'tfmq-dm[coreml]'"
    Options = CoreMLOptions
    tolerance = Tolerance(
        error_margin=0.10, error_floor=1e-3, golden_rel_l2=0.10, trajectory_db=0.5,
        reasons={
            "error_margin": MARGIN_REASON,
            "error_floor": FLOOR_REASON,
            "golden_rel_l2": "the golden outputs come from the converted program in fp32, the Core ML runtime "
                             "computes the float parts in fp16 by default (not measured: needs macOS)",
            "trajectory_db": "the product's bar: trajectory PSNR within 0.5 dB of fake-quant vs FP32",
            "trajectory_floor_db": TRAJECTORY_FLOOR,
        })

    pregate = ("linux_pregate", "the exact torch program that was converted, vs fake-quant (plus the package's "
                                "integers, scales and activation parameters checked bit for bit at compile)")

    def runs_here(self) -> str | None:
        """Why Core ML predictions cannot run here (None on macOS with coremltools)."""
        if sys.platform != "darwin":
            return "Core ML predictions run only on macOS"
        return self.unavailable()

    def check(self, recipe: Recipe, options: CoreMLOptions) -> None:
        super().check(recipe, options)
        opts = options
        need = minimum_target(recipe)
        if opts.deployment_target and DEPLOYMENT_TARGETS.index(opts.deployment_target) < DEPLOYMENT_TARGETS.index(need):
            what = "4-bit weights" if need == "iOS18" else "activation quantization"
            raise RecipeError(f"recipe {recipe.name!r} has {what}, which Core ML {opts.deployment_target} cannot "
                              f"express: use --deployment-target {need} or later")

    def compile(self, lowered: Lowered, out_dir: Path, options: CoreMLOptions) -> dict:
        import time

        self.require()
        ct = load_coremltools()
        dep, opts = lowered.dep, options
        target = opts.deployment_target or minimum_target(dep.recipe)
        t0 = time.time()
        exported = program.export_program(dep, lowered.cross, opts.batch)
        try:
            model = ct.convert(
                exported, minimum_deployment_target=getattr(ct.target, target), skip_model_load=True,
                compute_precision=ct.precision.FLOAT16 if opts.precision == "f16" else ct.precision.FLOAT32,
                compute_units=getattr(ct.ComputeUnit, opts.compute_units.upper()))
        except Exception as e:  # the converter reports model-specific failures many ways
            raise ExportError(f"Core ML conversion of the deploy module failed: {first_line(e)}") from e
        spec = model.get_spec()  # the diffusers names (torch.export numbers the *args input)
        renames = {spec.description.output[0].name: "out_sample"}
        renames |= {i.name: "encoder_hidden_states" for i in spec.description.input if i.name.startswith("encoder_")}
        renames = {k: v for k, v in renames.items() if k != v}
        for old, new in renames.items():
            ct.utils.rename_feature(spec, old, new)
        if renames:
            model = ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True)
        model.save(str(out_dir / PACKAGE))
        seconds = time.time() - t0
        scale_dtype = np.float16 if opts.precision == "f16" else np.float32
        report = verify(out_dir / PACKAGE, dep, scale_dtype)
        size = _bytes(out_dir / PACKAGE)
        n = opts.chunks or _chunks_for(size)
        if n > 1:
            report["chunks"] = make_chunks(out_dir / PACKAGE, out_dir / CHUNKS, n, dep, scale_dtype, report["ops"])
        return {"inputs": [i.name for i in spec.description.input], "runtime": f"coremltools {ct.__version__}", "package": PACKAGE, "deployment_target": target,
                "options": {**asdict(opts), "deployment_target": target}, "conversion_seconds": round(seconds, 1),
                "package_bytes": size,
                **report}

    def runner(self, out_dir: Path, options: dict | None = None) -> Runner:
        why = self.runs_here()
        if why:
            raise TargetUnavailable(f"target 'coreml': {why}")
        import torch

        ct = load_coremltools()
        opts = dict(options or {})
        chained = opts.pop("chunks", False)  # True: run the Neural Engine chunks one after the other
        opts = CoreMLOptions.of(opts)
        units = getattr(ct.ComputeUnit, opts.compute_units.upper())
        model = ct.models.MLModel(str(out_dir / PACKAGE), compute_units=units)
        shape = [d for d in model.get_spec().description.input[0].type.multiArrayType.shape]
        fixed = int(shape[0])
        parts = [model]
        if chained:
            paths = sorted((out_dir / CHUNKS).glob("chunk*.mlpackage"), key=lambda p: int(p.stem[5:]))
            if not paths:
                raise TfmqError(f"{out_dir}: no Neural Engine chunks (export with --chunks 2 or more)")
            parts = [ct.models.MLModel(str(p), compute_units=units) for p in paths]

        def once(sample, timestep, ehs):
            args = program.apple_inputs(torch.from_numpy(sample), torch.from_numpy(np.asarray(timestep)),
                                        None if ehs is None else torch.from_numpy(ehs))  # the package's layout
            env = dict(zip(("sample", "timestep", "encoder_hidden_states"), (a.numpy() for a in args), strict=False))
            for part in parts:  # each chunk reads the model inputs and earlier chunks' outputs
                names = [i.name for i in part.get_spec().description.input]
                env.update(part.predict({n: env[n] for n in names}))
            return np.asarray(env["out_sample"], dtype=np.float32)

        return in_chunks(once, fixed)

    def client_folder(self, model, out_dir: Path) -> dict:
        """ml-stable-diffusion's resource folder (``client.py``): the verified package as
        ``Unet.mlpackage`` (or its chunks as ``UnetChunk<k>``), the float text encoder and VAE
        decoder converted at f16, the tokenizer files; on macOS the float parts are predicted
        and checked against torch."""
        from tfmq.targets.coreml import client

        self.require()
        ct = load_coremltools()
        chunks = sorted((out_dir / CHUNKS).glob("chunk*.mlpackage"), key=lambda p: int(p.stem[5:]))
        report = client.write(ct, model, out_dir, out_dir / PACKAGE, chunks)
        why = self.runs_here()
        if why:
            return report | {"float_parts": f"not run here: {why}", "passed": True}
        errors = client.float_check(ct, out_dir / report["dir"], model)
        return report | {"float_parts_rel_l2": errors, "passed": all(e <= report["bound"] for e in errors.values())}

    def verify(self, lowered: Lowered, out_dir: Path, options: TargetOptions) -> dict:
        """The package's integers, scales and activation parameters against the fresh deploy module."""
        self.require()
        try:
            verify(out_dir / PACKAGE, lowered.dep, np.float16 if options.precision == "f16" else np.float32)
        except ExportError as e:
            return {"passed": False, "checked": PACKAGE, "differs": [str(e)]}
        return {"passed": True, "checked": f"{PACKAGE}: weights, scales, activation parameters", "differs": []}

    def pregate_runner(self, lowered: Lowered, out_dir: Path) -> Runner:
        """The converted torch program itself, for the Linux pre-gate."""
        return program.runner(lowered.dep)


def _bytes(package: Path) -> int:
    return sum(f.stat().st_size for f in package.rglob("*") if f.is_file())


def _chunks_for(size: int) -> int:
    n = 1
    while size / n > CHUNK_BYTES:
        n *= 2
    return n


def make_chunks(package: Path, folder: Path, n: int, dep, scale_dtype, ops: dict) -> dict:
    """Split ``package`` into ``n`` chunks with coremltools' ``bisect_model`` (halving, in
    order: chunk1 feeds chunk2, ...) and check them on Linux: together they hold every
    quantized layer's integers and every activation parameter bit for bit, exactly the
    original's compute ops (conv, matmul, quantize, ...), and each chunk's inputs come from
    the model's inputs or from earlier chunks' outputs. (That the chunks *compute* the same
    outputs is checked by the Core ML runtime: runtime_tests, macOS.)"""
    import shutil
    import tempfile

    ct = load_coremltools()
    parts = [package]
    while len(parts) < n:
        halves = []
        for p in parts:
            with tempfile.TemporaryDirectory() as tmp:
                ct.models.utils.bisect_model(str(p), tmp, check_output_correctness=False)  # predicting needs macOS
                stem = p.name.removesuffix(".mlpackage")
                for k in (1, 2):
                    dst = folder / f"{stem}_{k}.mlpackage"
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(Path(tmp) / f"{stem}_chunk{k}.mlpackage"), dst)
                    halves.append(dst)
            if p != package:
                shutil.rmtree(p)
        parts = halves
    final = []
    for k, p in enumerate(parts, 1):
        dst = folder / f"chunk{k}.mlpackage"
        p.rename(dst)
        final.append(dst)
    report = verify(final, dep, scale_dtype)
    compute = {k: v for k, v in ops.items() if not k.startswith(("const", "cast")) and k not in ("identity",)}
    got = {k: v for k, v in report["ops"].items() if k in compute}
    if got != compute:
        raise ExportError(f"{folder}: the chunks' ops differ from the model's: {got} vs {compute}")
    available = {i.name for i in ct.utils.load_spec(str(package)).description.input}
    io = []
    for p in final:
        spec = ct.utils.load_spec(str(p))
        ins, outs = [i.name for i in spec.description.input], [o.name for o in spec.description.output]
        if not set(ins) <= available:
            raise ExportError(f"{p}: inputs {sorted(set(ins) - available)} come from no earlier chunk")
        available |= set(outs)
        io.append({"package": f"{folder.name}/{p.name}", "inputs": ins, "outputs": outs,
                   "bytes": _bytes(p)})
    if "out_sample" not in io[-1]["outputs"]:
        raise ExportError(f"{folder}: the last chunk does not output out_sample")
    return {"count": len(final), "chunks": io, "verification": report["verification"]}


def read_program(package: Path):
    """The package's MIL program, decoded by coremltools' own loader (weights from its blob)."""
    ct = load_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    spec = ct.utils.load_spec(str(package))
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    return spec, milproto_load(spec, specification_version=spec.specificationVersion, file_weights_dir=str(weights))


def verify(package: Path | list[Path], dep, scale_dtype=np.float32) -> dict:
    """Our integers, scales and activation parameters are in the package, bit for bit. With
    fp16 compute the package holds every scale in fp16: then the check is against our fp32
    scales rounded to fp16 (a relative change below 2^-11, reported). Weights are matched one
    to one by value (integers, scales and zero-points of a whole layer). Activation parameters
    are matched as a multiset of (scale, zero-point) values, because coremltools merges equal
    quantize ops of one input and names ops by position: a wrong value that equals another
    quantizer's parameters would pass (more likely with fp16 scales, which collide more).
    A list of packages (the chunks of one model) is checked as one: together they must hold
    every layer's integers exactly once."""
    ops = [op for p in (package if isinstance(package, list) else [package])
           for op in read_program(p)[1].functions["main"].operations]
    census: dict[str, int] = {}
    for op in ops:
        census[op.op_type] = census.get(op.op_type, 0) + 1
    weights = []
    for op in ops:
        if op.op_type in ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"):
            data = op.quantized_data.val if op.op_type == "constexpr_affine_dequantize" else op.data.val
            scale = op.scale.val
            zero = op.zero_point if op.op_type == "constexpr_affine_dequantize" else op.offset
            zero = np.zeros(1, np.int64) if zero is None else zero.val  # absent: symmetric
            weights.append((data, np.asarray(scale).reshape(-1), np.asarray(zero).reshape(-1), op.op_type))
    unmatched = []
    for name, dl in dep.layers.items():
        ints = dl.w_int.numpy().astype(np.int64)
        s, z = dl.w_scale.numpy().astype(scale_dtype), dl.w_zero.numpy().astype(np.int64)
        hit = next((k for k, (d, sc, zp, _) in enumerate(weights)
                    if d.shape == ints.shape and np.array_equal(d.astype(np.int64), ints) and np.array_equal(sc, s)
                    and (zp.size in (1, len(z)) and np.array_equal(np.broadcast_to(zp.astype(np.int64), z.shape), z))), None)
        if hit is None:
            unmatched.append(name)
        else:
            weights.pop(hit)
    if unmatched:
        raise ExportError(f"{package}: {len(unmatched)} quantized layers' integers/scales are not in the package "
                          f"bit for bit: {', '.join(unmatched[:5])}")
    def signed(zero: int, dtype: str) -> int:  # uint8 with zero-point z == int8 with z - 128 (the converter
        return zero - 128 if dtype == "uint8" else zero  # may store either); compare in the int8 domain

    quant = [(float(np.asarray(op.scale.val).astype(scale_dtype)),
              signed(0 if op.zero_point is None else int(np.asarray(op.zero_point.val)), str(op.output_dtype.val)))
             for op in ops if op.op_type == "quantize"]
    acts = [m for m in dep.modules() if isinstance(m, FoldedAct)]
    present, missing, shared = set(quant), [], 0
    for a in acts:
        want = (float(scale_dtype(a.s)), signed(a.z, "int8" if a.symmetric else "uint8"))
        if want in quant:
            quant.remove(want)
        elif want in present:  # quantizers of one input with equal parameters (q/k/v projections)
            shared += 1      # became one op: coremltools merges identical ops
        else:
            missing.append(a.name)
    if missing:
        raise ExportError(f"{package}: {len(missing)} activation quantizers have no quantize op with their "
                          f"(scale, zero-point): {', '.join(missing[:5])}")
    return {"verification": {"weights_bit_exact": len(dep.layers), "activation_params_exact": len(acts),
                             "scale_dtype": np.dtype(scale_dtype).name,
                             "quantize_ops_merged": shared, "extra_constexpr": len(weights),
                             "extra_quantize": len(quant)},
            "ops": dict(sorted(census.items(), key=lambda kv: -kv[1]))}


TARGET = CoreMLTarget()
