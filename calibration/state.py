"""QuantState: every number calibration decided, and the only source of scales downstream.

``quant_state.safetensors`` holds, per quantized layer, its integer weights (int8 when
symmetric, uint8 when asymmetric; 4-bit values within [-8, 7] or [0, 15]), per-output-channel
scales and zero-points; per activation
quantizer, one scale and zero-point per parameter set ([sets, G] for a conv input in G channel
groups, with ``a_groups`` [C], each channel's group); per cached temporal feature, its table
[T, C] (a row per training timestep); with bias correction, ``output_bias`` [S, C_out].
``quant_state.json`` holds the recipe, the schedule and the training range T, the step ->
parameter-set map,
the model's fingerprint and the tool versions. Loading reads no pickle and re-derives nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tfmq.artifacts import load_tensors_and_meta, save_tensors_and_meta
from tfmq.calibration.qmodel import GroupedActQuantizer, QuantUNet, TemporalTable
from tfmq.calibration.quantizers import qrange
from tfmq.calibration.recipe import Recipe
from tfmq.errors import TfmqError
from tfmq.models import DiffusionModel, fingerprint

STATE_VERSION = 2  # 2: temporal tables cover every training timestep [T, C]
TENSORS, META = "quant_state.safetensors", "quant_state.json"
OUTPUT_BIAS = "output_bias"  # [S, C_out]: the bias correction (calibration.correction)


class QuantStateError(TfmqError):
    """A QuantState that is broken or made for another model."""


@dataclass
class QuantState:
    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def recipe(self) -> Recipe:
        return Recipe.from_dict(self.meta["recipe"])

    @property
    def timesteps(self) -> torch.Tensor:
        return torch.tensor(self.meta["schedule"]["timesteps"], dtype=torch.long)

    @property
    def train_timesteps(self) -> int:
        return int(self.meta["schedule"]["train_timesteps"])

    @classmethod
    def from_model(cls, qunet: QuantUNet, model: DiffusionModel, extra: dict | None = None) -> QuantState:
        from tfmq.artifacts import versions

        t = {}
        for name, ql in qunet.layers.items():
            t[f"{name}.w_int"] = ql.w_int.to(ql.int_dtype).contiguous()
            t[f"{name}.w_scale"] = ql.w_scale.flatten().float().contiguous()
            t[f"{name}.w_zero"] = ql.w_zero.flatten().to(ql.int_dtype).contiguous()
        for name, aq in qunet.act_quantizers.items():
            if not bool(aq.initialized.all()):
                raise QuantStateError(f"activation quantizer {name} was never calibrated")
            t[f"{name}.a_scale"] = aq.scale.float().contiguous()
            t[f"{name}.a_zero"] = aq.zero.to(torch.int16).contiguous()
            if isinstance(aq, GroupedActQuantizer):
                t[f"{name}.a_groups"] = aq.channel_group.to(torch.int16).contiguous()
        tables = {n: m for n, m in qunet.unet.named_modules() if isinstance(m, TemporalTable)}
        for name, m in tables.items():
            t[f"{name}.table"] = m.table.float().contiguous()
        if qunet.output_bias is not None:
            t[OUTPUT_BIAS] = qunet.output_bias.float().contiguous()
        meta = {
            "version": STATE_VERSION, "recipe": qunet.recipe.to_dict(),
            "model": {"name": model.name, "fingerprint": fingerprint(model.unet), "class": type(model.unet).__name__},
            "schedule": {"sampler": "DDIM", "timesteps": qunet.timesteps.tolist(),
                         "train_timesteps": qunet.train_timesteps},
            "param_sets": qunet.ctx.sets_of_steps,
            "layers": {n: {"bits": ql.bits, "symmetric": ql.symmetric, "kind": type(ql.layer).__name__}
                       for n, ql in qunet.layers.items()},
            "activations": {n: {"bits": q.bits, "symmetric": q.symmetric, "unsigned": q.unsigned}
                            | ({"groups": q.groups} if isinstance(q, GroupedActQuantizer) else {})
                            for n, q in qunet.act_quantizers.items()},
            "temporal_tables": sorted(tables), "versions": versions(), **(extra or {}),
        }
        return cls(meta, t)

    def without_bias_correction(self) -> QuantState:
        """The same state with its bias correction left out (the correction is calibration's last
        step and changes nothing before it, so this is what calibrating without it gives)."""
        meta = {**self.meta, "recipe": {**self.meta["recipe"], "bias_correction": False}}
        return QuantState(meta, {k: v for k, v in self.tensors.items() if k != OUTPUT_BIAS})

    def save(self, folder: Path) -> None:
        save_tensors_and_meta(folder, self.tensors, self.meta, TENSORS, META,
                              metadata={"format": "tfmq-quant-state", "version": str(STATE_VERSION)})

    @classmethod
    def load(cls, folder: Path) -> QuantState:
        """Read a saved state and validate it (``validate``): a broken one is one error line."""
        state = cls(*load_tensors_and_meta(folder, TENSORS, META, QuantStateError, "QuantState", STATE_VERSION))
        try:
            state.validate()
        except QuantStateError as e:
            raise QuantStateError(f"{folder}: {e}") from None
        return state

    def validate(self) -> None:
        """Every number in its range, or QuantStateError naming the first bad tensor: integer
        weights within their bits, scales finite and > 0, zero-points integers within the range
        (0 where symmetric), tables finite, the schedule and parameter sets consistent."""
        meta, t = self.meta, self.tensors
        for key in ("recipe", "model", "schedule", "param_sets", "layers", "activations"):
            if key not in meta:
                raise QuantStateError(f"{META} has no {key!r}")
        recipe = Recipe.from_dict(meta["recipe"])  # its own validation
        steps = meta["schedule"].get("timesteps") if isinstance(meta["schedule"], dict) else None
        if not isinstance(steps, list) or not steps or len(meta["param_sets"]) != len(steps):
            raise QuantStateError("the schedule and its step -> parameter-set map do not match")
        train = meta["schedule"].get("train_timesteps")
        if not isinstance(train, int) or not all(isinstance(v, int) and 0 <= v < train for v in steps):
            raise QuantStateError(f"the schedule's timesteps are not all within its training range {train!r}")
        for name, v in t.items():
            if name.endswith(".table") and (v.ndim != 2 or v.shape[0] != train):
                raise QuantStateError(f"table {name} has {v.shape[0]} rows, not one per training timestep ({train})")
        for name, info in meta["layers"].items():
            bits, sym = info.get("bits"), info.get("symmetric")
            if bits not in (4, 8) or not isinstance(sym, bool):
                raise QuantStateError(f"layer {name}: bits {bits!r} / symmetric {sym!r}")
            lo, hi = qrange(bits, sym)
            w, scale, zero = (t.get(f"{name}.{k}") for k in ("w_int", "w_scale", "w_zero"))
            if w is None or scale is None or zero is None:
                raise QuantStateError(f"layer {name} lacks its integers, scales or zero-points")
            _ints(f"{name}.w_int", w, lo, hi)
            _scales(f"{name}.w_scale", scale)
            _ints(f"{name}.w_zero", zero, 0 if sym else lo, 0 if sym else hi)
            if scale.numel() != w.shape[0] or zero.numel() != w.shape[0]:
                raise QuantStateError(f"layer {name}: {scale.numel()} scales for {w.shape[0]} output channels")
        sets = max(meta["param_sets"]) + 1
        for name, info in meta["activations"].items():
            scale, zero = t.get(f"{name}.a_scale"), t.get(f"{name}.a_zero")
            if scale is None or zero is None or scale.shape != zero.shape or scale.shape[0] != sets:
                raise QuantStateError(f"activation {name} lacks its {sets} parameter sets")
            lo, hi = qrange(info.get("bits", 8), bool(info.get("symmetric")))
            _scales(f"{name}.a_scale", scale)
            _ints(f"{name}.a_zero", zero, 0 if info.get("symmetric") else lo, 0 if info.get("symmetric") else hi)
        for name, v in t.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise QuantStateError(f"tensor {name} holds NaN or inf")
        if recipe.bias_correction != (OUTPUT_BIAS in t):
            raise QuantStateError(f"recipe says bias_correction={recipe.bias_correction} but its {OUTPUT_BIAS} "
                                  f"table is {'missing' if recipe.bias_correction else 'there'}")

    def check_for(self, model: DiffusionModel) -> None:
        fp = fingerprint(model.unet)
        if self.meta["model"]["fingerprint"] != fp:
            raise QuantStateError(f"QuantState was calibrated for model {self.meta['model']['name']!r} "
                                  f"(fingerprint {self.meta['model']['fingerprint']}), not {model.name!r} ({fp})")
        if self.train_timesteps != model.train_timesteps:
            raise QuantStateError(f"QuantState covers {self.train_timesteps} training timesteps; {model.name!r}'s "
                                  f"scheduler has {model.train_timesteps}")

    def apply(self, model: DiffusionModel, conv_outputs: bool = True) -> QuantUNet:
        """The fake-quant model with exactly these integers and parameters (``conv_outputs=False``:
        without the conv output quantizers, as a target whose convs write float runs it)."""
        self.check_for(model)
        qunet = QuantUNet(model.unet, self.recipe, self.timesteps, train_timesteps=self.train_timesteps, search=False,
                          conv_outputs=conv_outputs)
        if qunet.ctx.sets_of_steps != self.meta["param_sets"]:
            raise QuantStateError("QuantState parameter sets do not match its recipe")
        tables = {n[: -len(".table")]: v for n, v in self.tensors.items() if n.endswith(".table")}
        qunet.cache_temporal(tables)
        if set(qunet.layers) != set(self.meta["layers"]):
            raise QuantStateError("QuantState layers do not match the model and recipe")
        self.load_weights(qunet)
        if self.recipe.bias_correction != (OUTPUT_BIAS in self.tensors):
            raise QuantStateError(f"QuantState recipe says bias_correction={self.recipe.bias_correction} "
                                  f"but its {OUTPUT_BIAS} table is {'missing' if self.recipe.bias_correction else 'there'}")
        try:
            qunet.set_output_bias(self.tensors.get(OUTPUT_BIAS))
        except ValueError as e:
            raise QuantStateError(f"QuantState {e}") from None
        for name, aq in qunet.act_quantizers.items():
            scale, zero = self.tensors.get(f"{name}.a_scale"), self.tensors.get(f"{name}.a_zero")
            if scale is None or zero is None or scale.shape != aq.scale.shape or zero.shape != aq.zero.shape:
                raise QuantStateError(f"QuantState has no {tuple(aq.scale.shape)} activation parameters for {name}")
            aq.scale.copy_(scale)
            aq.zero.copy_(zero.float())
            if isinstance(aq, GroupedActQuantizer):
                g = self.tensors.get(f"{name}.a_groups")
                if g is None or g.shape != aq.channel_group.shape or set(g.tolist()) != set(range(aq.groups)):
                    raise QuantStateError(f"QuantState's channel groups of {name} are missing or do not cover "
                                          f"{aq.groups} groups of {len(aq.channel_group)} channels")
                aq.channel_group.copy_(g.long())
            aq.initialized.fill_(True)
        qunet.set_act_mode("quant")
        return qunet

    def load_weights(self, qunet: QuantUNet) -> None:
        """Every quantized layer of ``qunet`` takes this state's integers, scales and zero-points."""
        for name, ql in qunet.layers.items():
            if f"{name}.w_int" not in self.tensors or self.meta["layers"][name]["bits"] != ql.bits:
                raise QuantStateError(f"QuantState has no {ql.bits}-bit weights for layer {name}")
            ql.w_int = self.tensors[f"{name}.w_int"].to(ql.int_dtype).reshape(ql.w_int.shape)
            ql.w_scale = self.tensors[f"{name}.w_scale"].reshape(ql.w_scale.shape)
            ql.w_zero = self.tensors[f"{name}.w_zero"].float().reshape(ql.w_zero.shape)


def _ints(name: str, v: torch.Tensor, lo: int, hi: int) -> None:
    if v.is_floating_point() or v.numel() and (int(v.min()) < lo or int(v.max()) > hi):
        raise QuantStateError(f"tensor {name} holds values outside the integers [{lo}, {hi}]")


def _scales(name: str, v: torch.Tensor) -> None:
    if not v.is_floating_point() or not torch.isfinite(v).all() or (v <= 0).any():
        raise QuantStateError(f"tensor {name} holds a scale that is not finite and > 0")
