"""The quantization recipe: one frozen, typed object made of small frozen parts.

Quantization numbers live here; lowering options (deployment targets, compute units,
workspaces) belong to each target's options. Presets are typed constants; ``get_recipe``
resolves a preset name, and ``Recipe.to_dict`` / ``Recipe.from_dict`` round-trip through
JSON (QuantState stores the recipe that made it).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum

from tfmq.errors import RecipeError

RECIPE_VERSION = 1
SUPPORTED_BITS = (4, 8)
MAX_CHANNEL_GROUPS = 64  # each group is one conv kernel in the deployed graph


class Granularity(str, Enum):
    PER_CHANNEL = "per_channel"  # one scale per output channel (weights)
    PER_TENSOR = "per_tensor"  # one scale for the tensor (activations)


class ScaleSearch(str, Enum):
    MINMAX = "minmax"  # the observed range
    MSE = "mse"  # 80 candidates shrinking [min, max] by 1%, Lp (p = 2.4) error, as the official code


class Rounding(str, Enum):
    NEAREST = "nearest"
    ADAROUND = "adaround"  # learned up/down rounding, reconstructed block by block


class TemporalStrategy(str, Enum):
    NONE = "none"  # the temporal block is quantized like any other layer (the baselines)
    TIAR = "tiar"  # temporal-information-aware reconstruction of the temporal block
    CACHE = "cache"  # FP temporal features precomputed per step and cached (exact at deploy)
    SELECT = "select"  # per temporal feature, the strategy with the smaller measured error


class ActivationSchedule(str, Enum):
    SHARED = "shared"  # one (scale, zero-point) for all steps (Q-Diffusion)
    PER_STEP = "per_step"  # finite set calibration: one set per sampling step (TFMQ FSC)
    GROUPED = "grouped"  # groups of consecutive steps share one set (multi-timestep quantization)


@dataclass(frozen=True)
class WeightQuant:
    bits: int = 8
    granularity: Granularity = Granularity.PER_CHANNEL
    symmetric: bool = False
    search: ScaleSearch = ScaleSearch.MSE
    rounding: Rounding = Rounding.ADAROUND
    bit_budget: float | None = None  # average weight bits: the most sensitive layers go to 8 bit within it


@dataclass(frozen=True)
class ActivationQuant:
    bits: int | None = 8  # None: activations stay in float (W4A16)
    symmetric: bool = False  # zero-point 0
    search: ScaleSearch = ScaleSearch.MSE
    schedule: ActivationSchedule = ActivationSchedule.PER_STEP
    groups: int | None = None  # with GROUPED: how many groups of steps
    softmax_bits: int = 8  # attention probabilities, unsigned
    # the attention matmuls' operands q, k, v symmetric (zero-point 0; the softmax output is
    # unsigned with zero-point 0 anyway): some integer matmuls of two activations take no zero-point
    attention_symmetric: bool = False
    running_momentum: float = 0.95  # EMA of min/max after the MSE init, as the official code
    init_samples: int = 16  # samples per step for the MSE init
    learn_steps: bool = False  # then learn the scales block by block (LSQ-style, Q-Diffusion's second pass)
    # a per-step quantizer on every quantized conv's output too (after its bias), for integer
    # convs whose output is 8-bit
    conv_outputs: bool = False
    # the input of every quantized conv at the sample's full resolution in this many channel
    # groups, each with its own per-tensor (per-step) parameters: calibration resolves it into
    # ``act_groups`` overrides (``calibration.groups``); such a conv lowers to one integer conv
    # per group on its slice of the input channels, summed
    channel_groups: int | None = None


@dataclass(frozen=True)
class Reconstruction:
    iters: int = 0  # AdaRound iterations per block (official scripts: 20,000); 0 = no reconstruction
    samples: int = 256  # (step, seed) pairs of the calibration set whose block inputs/outputs it fits
    batch: int = 32
    lr: float = 1e-3
    act_lr: float = 1e-4  # Adam on activation scales, relative to each initial scale (when a recipe learns them)
    reg_weight: float = 0.01  # AdaRound rounding regulariser
    b_start: float = 20.0  # regulariser temperature, annealed to b_end
    b_end: float = 2.0
    warmup: float = 0.2  # fraction of iterations before the regulariser starts


@dataclass(frozen=True)
class CalibrationData:
    seeds: int = 32  # sampler trajectories recorded (one pass each)
    steps_used: int | None = None  # None: every step of the schedule; else this many, uniform


@dataclass(frozen=True)
class LayerOverride:
    """Layers matched by ``pattern`` (an exact module name, or a regex when ``regex``) stay FP
    (``keep_fp``), get their own weight bits, or (a conv) have their input quantized in
    ``act_groups`` channel groups."""

    pattern: str
    regex: bool = False
    keep_fp: bool = False
    weight_bits: int | None = None
    act_groups: int | None = None

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None if self.regex else name == self.pattern


# Kept in float by default, as the official code: conv_in, conv_out, the first time-embedding
# Linear, and the ResNet shortcut and downsample convolutions.
DEFAULT_KEEP_FP = (
    LayerOverride("conv_in", keep_fp=True),
    LayerOverride("conv_out", keep_fp=True),
    LayerOverride("time_embedding.linear_1", keep_fp=True),
    LayerOverride(r".*\.conv_shortcut", regex=True, keep_fp=True),
    LayerOverride(r".*\.downsamplers\.\d+\.conv", regex=True, keep_fp=True),
)


@dataclass(frozen=True)
class Recipe:
    name: str
    weights: WeightQuant = WeightQuant()
    activations: ActivationQuant = ActivationQuant()
    temporal: TemporalStrategy = TemporalStrategy.CACHE
    reconstruction: Reconstruction = Reconstruction(iters=1000)
    data: CalibrationData = CalibrationData()
    overrides: tuple[LayerOverride, ...] = DEFAULT_KEEP_FP
    # subtract the quantized model's mean noise-prediction error, per step and output channel,
    # measured on the calibration set (``calibration.correction``); the baselines leave it off
    bias_correction: bool = True
    version: int = RECIPE_VERSION

    def __post_init__(self):
        if self.weights.bits not in SUPPORTED_BITS:
            raise RecipeError(f"recipe {self.name!r}: weight bits {self.weights.bits} not in {SUPPORTED_BITS}")
        b = self.weights.bit_budget
        if b is not None and not self.weights.bits < b <= 8:
            raise RecipeError(f"recipe {self.name!r}: bit budget {b} must lie in ({self.weights.bits}, 8]")
        a = self.activations
        if a.bits is not None and a.bits not in SUPPORTED_BITS:
            raise RecipeError(f"recipe {self.name!r}: activation bits {a.bits} not in {SUPPORTED_BITS} (or none)")
        if a.softmax_bits not in SUPPORTED_BITS:
            raise RecipeError(f"recipe {self.name!r}: softmax bits {a.softmax_bits} not in {SUPPORTED_BITS}")
        if a.schedule is ActivationSchedule.GROUPED and not (a.groups and a.groups >= 1):
            raise RecipeError(f"recipe {self.name!r}: a grouped activation schedule needs groups >= 1")
        self._check_numbers()
        if a.conv_outputs and a.bits is None:
            raise RecipeError(f"recipe {self.name!r}: conv output quantizers need quantized activations")
        if a.learn_steps and (a.bits is None or a.schedule is not ActivationSchedule.SHARED
                              or not self.reconstruction.iters):
            raise RecipeError(f"recipe {self.name!r}: learning activation scales needs quantized activations, "
                              "a shared activation schedule and reconstruction iterations")
        grouped = a.channel_groups is not None or any(o.act_groups is not None for o in self.overrides)
        if grouped and (a.bits is None or a.learn_steps):
            raise RecipeError(f"recipe {self.name!r}: channel groups need quantized activations calibrated per "
                              "set (not learned)")
        if any(g is not None and not 1 <= g <= MAX_CHANNEL_GROUPS
               for g in (a.channel_groups, *(o.act_groups for o in self.overrides))):
            raise RecipeError(f"recipe {self.name!r}: channel groups must lie in [1, {MAX_CHANNEL_GROUPS}]")
        for o in self.overrides:
            if o.weight_bits is not None and o.weight_bits not in SUPPORTED_BITS:
                raise RecipeError(f"recipe {self.name!r}: override {o.pattern!r} bits {o.weight_bits} "
                                  f"not in {SUPPORTED_BITS}")
            if o.regex:
                try:
                    re.compile(o.pattern)
                except re.error as e:
                    raise RecipeError(f"recipe {self.name!r}: bad override regex {o.pattern!r}: {e}") from e

    def _check_numbers(self) -> None:
        """Every count and rate in its range, every float finite: the first one that is not, named."""
        r, a, d = self.reconstruction, self.activations, self.data
        checks = [
            ("reconstruction.iters", r.iters, r.iters >= 0), ("reconstruction.samples", r.samples, r.samples >= 1),
            ("reconstruction.batch", r.batch, r.batch >= 1), ("reconstruction.lr", r.lr, r.lr > 0),
            ("reconstruction.act_lr", r.act_lr, r.act_lr > 0),
            ("reconstruction.reg_weight", r.reg_weight, r.reg_weight >= 0),
            ("reconstruction.b_end", r.b_end, 0 < r.b_end <= r.b_start),
            ("reconstruction.warmup", r.warmup, 0 <= r.warmup < 1),
            ("activations.running_momentum", a.running_momentum, 0 <= a.running_momentum <= 1),
            ("activations.init_samples", a.init_samples, a.init_samples >= 1),
            ("data.seeds", d.seeds, d.seeds >= 1),
            ("data.steps_used", d.steps_used, d.steps_used is None or d.steps_used >= 1),
        ]
        for name, value, ok in checks:
            if isinstance(value, float) and not math.isfinite(value) or not ok:
                raise RecipeError(f"recipe {self.name!r}: {name} = {value!r} is out of range")

    @property
    def quantizes_activations(self) -> bool:
        return self.activations.bits is not None

    def keeps_fp(self, layer: str) -> bool:
        return any(o.keep_fp and o.matches(layer) for o in self.overrides)

    def weight_bits(self, layer: str) -> int:
        for o in self.overrides:
            if o.weight_bits is not None and o.matches(layer):
                return o.weight_bits
        return self.weights.bits

    def act_groups(self, layer: str) -> int | None:
        """The channel groups of this layer's input quantizer (None: per tensor)."""
        for o in self.overrides:
            if o.act_groups is not None and o.matches(layer):
                return o.act_groups
        return None

    def with_iters(self, iters: int) -> Recipe:
        """The same recipe with ``iters`` reconstruction iterations per block."""
        return replace(self, reconstruction=replace(self.reconstruction, iters=iters))

    def symmetric(self) -> Recipe:
        """The same recipe with symmetric (zero-point 0) weights and activations."""
        if self.weights.symmetric and (self.activations.bits is None or self.activations.symmetric):
            return self
        return replace(self, name=f"{self.name}-sym", weights=replace(self.weights, symmetric=True),
                       activations=replace(self.activations, symmetric=True))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["overrides"] = [asdict(o) for o in self.overrides]
        return _plain(d)

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        try:
            if not isinstance(d, dict):
                raise RecipeError(f"a recipe is a JSON object, not {type(d).__name__}")
            if d.get("version") != RECIPE_VERSION:
                raise RecipeError(f"recipe version {d.get('version')!r} is not {RECIPE_VERSION}")
            if not isinstance(d["overrides"], list):
                raise RecipeError(f"recipe overrides are a list, not {type(d['overrides']).__name__}")
            return cls(
                name=_typed(cls, "name", "str", d["name"]),
                weights=_build(WeightQuant, d["weights"]),
                activations=_build(ActivationQuant, d["activations"]),
                temporal=TemporalStrategy(d["temporal"]),
                reconstruction=_build(Reconstruction, d["reconstruction"]),
                data=_build(CalibrationData, d["data"]),
                overrides=tuple(_build(LayerOverride, o) for o in d["overrides"]),
                # states saved before bias correction existed have none
                bias_correction=_typed(cls, "bias_correction", "bool", d.get("bias_correction", False)),
                version=d["version"],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RecipeError(f"malformed recipe: {e!r}") from e


def _build(cls, d: dict):
    if not isinstance(d, dict):
        raise RecipeError(f"recipe part {cls.__name__} is a JSON object, not {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise RecipeError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**{k: _typed(cls, k, str(known[k].type), v) for k, v in d.items()})


def _typed(cls, name: str, ftype: str, v):
    """``v`` as the field's declared type (an enum by value, a float from an int), or one RecipeError."""
    if v is None:
        if "None" in ftype:
            return None
        raise RecipeError(f"{cls.__name__}.{name} must not be null")
    enum = next((e for e in (Granularity, ScaleSearch, Rounding, ActivationSchedule) if e.__name__ in ftype), None)
    if enum is not None:
        return enum(v)
    base = ftype.split("|")[0].strip()
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    ok = {"bool": isinstance(v, bool), "int": number and isinstance(v, int), "str": isinstance(v, str),
          "float": number and math.isfinite(v)}.get(base, True)
    if not ok:
        kind = {"float": "a finite float", "int": "an integer", "bool": "true or false", "str": "a string"}[base]
        raise RecipeError(f"{cls.__name__}.{name} = {v!r} is not {kind}")
    return float(v) if base == "float" else v


def _plain(obj):
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


_NAIVE_W = WeightQuant(search=ScaleSearch.MINMAX, rounding=Rounding.NEAREST)
_NAIVE_A = ActivationQuant(search=ScaleSearch.MINMAX, schedule=ActivationSchedule.SHARED)
_QDIFF_A = ActivationQuant(schedule=ActivationSchedule.SHARED, learn_steps=True)

W8A8 = Recipe("w8a8")
W4A8 = Recipe("w4a8", weights=WeightQuant(bits=4))
W4A8_MP = Recipe("w4a8-mp", weights=WeightQuant(bits=4, bit_budget=4.5))
# + 16 channel groups for the full-resolution conv inputs (whose channels' ranges differ most)
W4A8_MP_G16 = Recipe("w4a8-mp-g16", weights=WeightQuant(bits=4, bit_budget=4.5),
                     activations=ActivationQuant(channel_groups=16))
W4A16 = Recipe("w4a16", weights=WeightQuant(bits=4), activations=ActivationQuant(bits=None))
MINMAX_W8A8 = Recipe("minmax-w8a8", weights=_NAIVE_W, activations=_NAIVE_A, temporal=TemporalStrategy.NONE,
                     reconstruction=Reconstruction(iters=0), bias_correction=False)
MINMAX_W4A8 = replace(MINMAX_W8A8, name="minmax-w4a8", weights=replace(_NAIVE_W, bits=4))
QDIFF_W8A8 = Recipe("qdiff-w8a8", activations=_QDIFF_A, temporal=TemporalStrategy.NONE, bias_correction=False)
QDIFF_W4A8 = replace(QDIFF_W8A8, name="qdiff-w4a8", weights=WeightQuant(bits=4))

PRESETS = {r.name: r for r in (W8A8, W4A8, W4A8_MP, W4A8_MP_G16, W4A16, MINMAX_W8A8, MINMAX_W4A8, QDIFF_W8A8, QDIFF_W4A8)}
PRESET_NOTES = {
    "w8a8": "TFMQ, 8-bit weights and activations: the default",
    "w4a8": "TFMQ, 4-bit weights",
    "w4a8-mp": "TFMQ, 4-bit weights, the most sensitive layers at 8 bit within 4.5 bits on average",
    "w4a8-mp-g16": "w4a8-mp with the full-resolution conv inputs in 16 channel groups (quality, not speed)",
    "w4a16": "TFMQ, 4-bit weights, activations in float",
    "minmax-w8a8": "baseline: min-max scales, nearest rounding, one activation set",
    "minmax-w4a8": "baseline: the same at 4-bit weights",
    "qdiff-w8a8": "baseline, Q-Diffusion style: BRECQ, one learned activation set, temporal block quantized",
    "qdiff-w4a8": "baseline: the same at 4-bit weights",
}


def get_recipe(name: str) -> Recipe:
    try:
        return PRESETS[name]
    except KeyError:
        raise RecipeError(f"unknown recipe {name!r}: one of {', '.join(PRESETS)}") from None
