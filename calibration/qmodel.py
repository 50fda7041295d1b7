"""The fake-quant UNet: a copy of the FP UNet whose Conv2d/Linear layers and attention
matmuls are quantized as the recipe says, with activation parameters chosen per sampling step.

- ``QuantLayer`` replaces a Conv2d/Linear: per-output-channel weight quantization (nearest
  or AdaRound) and a per-tensor quantizer on its input.
- ``QuantAttnProcessor`` quantizes the inputs of the two attention matmuls (q, k, v and the
  softmax probabilities, unsigned).
- ``ActQuantizer`` holds one (scale, zero-point) per parameter set; the model maps each
  timestep to its step in the schedule and the step to its set (one per step with FSC, one
  for all with the Q-Diffusion-style baseline, or groups of steps).
- ``TemporalTable`` replaces a ResNet's ``time_emb_proj`` by its cached outputs at every
  training timestep.

A timestep off the calibrated schedule takes the parameters of the nearest calibrated step
(``step_map``) and its own row of the temporal tables, so one calibration serves any step
count; timesteps outside the training range are refused.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tfmq.calibration.calibset import CalibrationDataError
from tfmq.calibration.quantizers import (
    EPS,
    AdaRound,
    activation_params,
    fake_quant,
    params_from_range,
    quantize,
    weight_params,
)
from tfmq.calibration.recipe import ActivationSchedule, Recipe, RecipeError, ScaleSearch
from tfmq.errors import TfmqError


class ScheduleError(TfmqError):
    """A timestep the quantized model cannot take (outside the training range, not whole, or
    mixed within one call)."""


def step_map(schedule: torch.Tensor, train_timesteps: int) -> torch.Tensor:
    """[T] int64: for every training timestep t, the calibrated step whose parameters it takes:
    the step of the nearest scheduled timestep (a tie goes to the earlier step in sampling
    order, the larger t). On the schedule itself it is the step of t."""
    t = torch.arange(train_timesteps)
    return (t[:, None] - schedule.long()[None]).abs().argmin(1)


def check_timestep(timestep, train_timesteps: int) -> int:
    """The one timestep of a call whose whole batch uses one, checked: a whole number within the
    model's training range [0, T). The host-side check a graph cannot make (an index out of
    its tables)."""
    values = torch.as_tensor(timestep).flatten().unique()
    if values.is_floating_point() and not bool((values == values.round()).all()):
        bad = float(values[values != values.round()][0])
        raise ScheduleError(f"timestep {bad:g} is not a whole number: the schedule's timesteps are")
    if len(values) != 1:
        raise ScheduleError("one call must use one timestep for the whole batch (it selects the step's "
                            "quantization parameters and temporal tables)")
    t = int(values[0])
    if not 0 <= t < train_timesteps:
        raise ScheduleError(f"timestep {t} is outside the model's training range [0, {train_timesteps})")
    return t


def schedule_step(schedule: torch.Tensor, timestep, train_timesteps: int) -> int:
    """The calibrated step whose parameters a call's timestep takes (``step_map``), after
    ``check_timestep``."""
    t = check_timestep(timestep, train_timesteps)
    return int((schedule.long() - t).abs().argmin())


@dataclass
class StepContext:
    """Shared by every quantizer of one model: which step runs now, its parameter set, and the
    timestep itself (the row of the temporal tables, which cover every training timestep)."""

    step: int = 0
    param_set: int = 0
    sets_of_steps: list[int] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)  # the calibrated schedule
    t: int = 0

    def enter(self, step: int, t: int | None = None) -> None:
        """Run step ``step`` at timestep ``t`` (default: the step's own scheduled timestep)."""
        self.step, self.param_set = step, self.sets_of_steps[step]
        self.t = t if t is not None else self.timesteps[step] if self.timesteps else 0


class ActQuantizer(nn.Module):
    """Per-tensor activation fake-quant with ``n_sets`` parameter sets.

    Modes: off (identity), observe (calibrate the current set on what flows through: MSE
    search on the first batch, then an EMA of min/max, momentum as in the official code; the
    output is quantized with the updated parameters), quant (fixed parameters)."""

    def __init__(self, bits: int, symmetric: bool, ctx: StepContext, n_sets: int, mse: bool = True,
                 unsigned: bool = False, momentum: float = 0.95, name: str = ""):
        super().__init__()
        self.name = name
        self.bits, self.symmetric, self.ctx, self.mse, self.unsigned = bits, symmetric, ctx, mse, unsigned
        self.momentum = momentum
        self.register_buffer("scale", torch.ones(n_sets))
        self.register_buffer("zero", torch.zeros(n_sets))
        self.register_buffer("lo", torch.zeros(n_sets))
        self.register_buffer("hi", torch.zeros(n_sets))
        self.register_buffer("initialized", torch.zeros(n_sets, dtype=torch.bool))
        self.mode = "off"
        self.learned: nn.Parameter | None = None  # scales being learned (LSQ-style), see start_learning

    def start_learning(self) -> nn.Parameter:
        """Make the scales trainable (the zero-points stay fixed), as Q-Diffusion's activation
        reconstruction does; ``finish_learning`` writes them back."""
        self.learned = nn.Parameter(self.scale.clone())
        return self.learned

    def finish_learning(self) -> None:
        self.scale.copy_(self.learned.detach().clamp_min(EPS))
        self.learned = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        i = self.ctx.param_set
        if self.mode == "observe":
            self._observe(x, i)
        elif not self.initialized[i]:
            raise RuntimeError(f"activation quantizer used before calibration of parameter set {i}")
        return self._fq(x)

    def _fq(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.current_scale(), self.zero[self.ctx.param_set], self.bits, self.symmetric)

    def current_scale(self) -> torch.Tensor:
        """The scale of the running step's parameter set."""
        i = self.ctx.param_set
        return self.scale[i] if self.learned is None else self.learned[i].clamp_min(EPS)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, i: int) -> None:
        if not torch.isfinite(x).all():
            raise CalibrationDataError(f"NaN or inf in the calibration activations at {self.name or 'a quantizer'} "
                                       f"(step {self.ctx.step}): the model or its calibration inputs are broken")
        lo, hi = self._range(x)
        if not self.initialized[i]:
            self.lo[i], self.hi[i] = lo, hi
            self.initialized[i] = True
            if self.mse:  # MSE search on the first batch; later batches move the range by EMA
                self.scale[i], self.zero[i] = self._search(x)
                return
        elif self.mse:
            m = self.momentum
            self.lo[i], self.hi[i] = m * self.lo[i] + (1 - m) * lo, m * self.hi[i] + (1 - m) * hi
        else:  # naive min-max: the whole observed range
            self.lo[i], self.hi[i] = torch.minimum(self.lo[i], lo), torch.maximum(self.hi[i], hi)
        self.scale[i], self.zero[i] = params_from_range(self.lo[i], self.hi[i], self.bits, self.symmetric)

    def _range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (min, max) of one batch, in the shape of one parameter set."""
        return (torch.zeros(()) if self.unsigned else x.min()), x.max()

    def _search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One parameter set's (scale, zero-point) by the MSE search on a batch."""
        return activation_params(x, self.bits, self.symmetric, unsigned=self.unsigned)


def min_noise_runs(ranges: torch.Tensor, weight: torch.Tensor, groups: int) -> list[int]:
    """Sizes of the ``groups`` non-empty consecutive runs of channels (sorted by ascending
    range) minimising sum over runs of (the run's largest range)^2 * (its channels' weight):
    dynamic programming, O(groups * C^2), vectorised over the run starts."""
    r2 = ranges.double() ** 2
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), weight.double().cumsum(0)])
    c = len(ranges)
    best = torch.full((groups + 1, c + 1), float("inf"), dtype=torch.float64)
    start = torch.zeros((groups + 1, c + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for g in range(1, groups + 1):
        for j in range(g, c + 1):  # the first j channels in g runs, the last run starting at i
            cost = best[g - 1, :j] + r2[j - 1] * (cum[j] - cum[:j])
            i = int(torch.argmin(cost))
            best[g, j], start[g, j] = cost[i], i
    sizes, j = [], c
    for g in range(groups, 0, -1):
        i = int(start[g, j])
        sizes.append(j - i)
        j = i
    return sizes[::-1]


class GroupedActQuantizer(ActQuantizer):
    """A conv input [B, C, H, W] quantized in ``groups`` channel groups, each with its own
    per-tensor parameters per set: scale/zero/lo/hi are [n_sets, G], ``channel_group`` [C]
    maps each channel to its group. Its channels' ranges differ by an order of magnitude at
    the full-resolution layers of a UNet, which one per-tensor scale cannot serve.

    Extra mode: channels (identity; accumulates each channel's mean range over the calls, from
    which ``assign`` forms the groups: runs of the channels sorted by that range)."""

    def __init__(self, channels: int, groups: int, bits: int, symmetric: bool, ctx: StepContext, n_sets: int,
                 mse: bool = True, momentum: float = 0.95, name: str = ""):
        super().__init__(bits, symmetric, ctx, n_sets, mse=mse, momentum=momentum, name=name)
        if not 1 <= groups <= channels:
            raise ValueError(f"{name}: {groups} channel groups for {channels} channels")
        self.groups = groups
        for buf in ("scale", "zero", "lo", "hi"):
            setattr(self, buf, getattr(self, buf)[:, None].repeat(1, groups))
        self.register_buffer("channel_group", torch.arange(channels) * groups // channels)
        self.register_buffer("range_sum", torch.zeros(channels))
        self.calls = 0

    def members(self, g: int) -> torch.Tensor:
        """The channels of group g, in order."""
        return (self.channel_group == g).nonzero().flatten()

    def group(self, g: int) -> ActQuantizer:
        """Group g as a per-tensor quantizer (its column of parameters) for the group's channels."""
        q = ActQuantizer(self.bits, self.symmetric, self.ctx, self.scale.shape[0], mse=self.mse,
                         momentum=self.momentum, name=f"{self.name}.groups.{g}")
        q.scale.copy_(self.scale[:, g])
        q.zero.copy_(self.zero[:, g])
        q.initialized.copy_(self.initialized)
        q.mode = self.mode
        return q

    def assign(self, importance: torch.Tensor | None = None) -> None:
        """Groups from the ranges seen in channels mode: with ``importance`` [C] (how much noise
        on each channel reaches the output: the squared norm of its conv weights), the
        partition of the channels sorted by range into G runs that minimises the output noise
        sum_c importance_c * range(group of c)^2 (quantization noise grows with the group's
        step, set by its widest channel); without it, G equal runs."""
        if not self.calls:
            raise RuntimeError(f"{self.name}: no channel ranges recorded to form groups from")
        order = torch.argsort(self.range_sum, stable=True)
        if importance is None:
            sizes = [len(run) for run in order.chunk(self.groups)]
        else:
            sizes = min_noise_runs((self.range_sum / self.calls)[order], importance.detach().double()[order],
                                   self.groups)
        group = torch.empty_like(self.channel_group)
        group[order] = torch.repeat_interleave(torch.arange(self.groups), torch.tensor(sizes))
        self.channel_group.copy_(group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "channels":
            with torch.no_grad():
                self.range_sum += (x.amax((0, 2, 3)) - x.amin((0, 2, 3))).float()
                self.calls += 1
            return x
        return super().forward(x)

    def current_scale(self) -> torch.Tensor:
        raise NotImplementedError(f"{self.name}: a grouped quantizer has no single scale (no conv output quantizer "
                                  "or learned scales with it)")

    def _per_channel(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.ctx.param_set][self.channel_group].view(1, -1, 1, 1)

    def _fq(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self._per_channel(self.scale), self._per_channel(self.zero), self.bits, self.symmetric)

    def _range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group's (min, max) [G] of one batch."""
        g = self.channel_group
        lo = torch.full((self.groups,), float("inf")).scatter_reduce(0, g, x.amin((0, 2, 3)).float(), "amin")
        hi = torch.full((self.groups,), -float("inf")).scatter_reduce(0, g, x.amax((0, 2, 3)).float(), "amax")
        return lo, hi

    def _search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group, the MSE search of a per-tensor quantizer on its channels."""
        found = [activation_params(x.index_select(1, self.members(k)), self.bits, self.symmetric)
                 for k in range(self.groups)]
        return torch.stack([s for s, _ in found]), torch.stack([z for _, z in found])


class QuantLayer(nn.Module):
    """A Conv2d or Linear with quantized weights (per output channel) and a quantized input;
    with ``out``, a quantized output too (after the bias)."""

    def __init__(self, name: str, layer: nn.Module, bits: int, symmetric: bool, mse: bool,
                 act: ActQuantizer | None, out: ActQuantizer | None = None):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"{name}: QuantLayer wraps Conv2d or Linear, not {type(layer).__name__}")
        self.name, self.layer, self.act, self.out = name, layer, act, out
        self.bits, self.symmetric = bits, symmetric
        scale, zero = weight_params(layer.weight, bits, symmetric, mse=mse)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        self.register_buffer("w_scale", scale.reshape(shape))
        self.register_buffer("w_zero", zero.reshape(shape))
        # held at their storage width (a float32 copy would be the size of the model again)
        self.register_buffer("w_int", quantize(layer.weight.detach(), self.w_scale, self.w_zero, bits,
                                               symmetric).to(self.int_dtype))
        self.adaround: AdaRound | None = None
        self.use_wq = True

    @property
    def int_dtype(self) -> torch.dtype:
        """The storage type of this layer's integers: asymmetric 8-bit values reach 255."""
        return torch.int8 if self.symmetric else torch.uint8

    def start_adaround(self) -> AdaRound:
        self.adaround = AdaRound(self.layer.weight, self.w_scale.flatten(), self.w_zero.flatten(), self.bits,
                                 self.symmetric)
        return self.adaround

    def finish_adaround(self) -> None:
        """Freeze the learned rounding into the integer weights."""
        self.w_int = self.adaround.integers().to(self.int_dtype)
        self.adaround = None

    def weight(self) -> torch.Tensor:
        if not self.use_wq:
            return self.layer.weight
        if self.adaround is not None:
            return self.adaround()
        return self.w_scale * (self.w_int - self.w_zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        w, b = self.weight(), self.layer.bias
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, b)
        c = self.layer
        if self.out is not None and self.out.mode != "off" and b is not None:
            # the integer kernel adds the bias in its int32 accumulator, at scale s_x * s_w
            unit = self.act.current_scale() * self.w_scale.flatten()
            b = torch.round(b / unit) * unit
        y = F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)
        return y if self.out is None else self.out(y)


class QuantAttnProcessor(nn.Module):
    """diffusers' AttnProcessor with quantized matmul inputs (q, k for QK^T; probs, v for PV)."""

    def __init__(self, q: ActQuantizer, k: ActQuantizer, v: ActQuantizer, probs: ActQuantizer):
        super().__init__()
        self.q, self.k, self.v, self.probs = q, k, v, probs

    def matmul(self, a: torch.Tensor, b: torch.Tensor, qa, qb, scale: float = 1.0) -> torch.Tensor:
        """scale * a @ b of two quantized operands (the deploy module folds per-step parameters here)."""
        y = torch.bmm(a, b)
        return y * scale if scale != 1.0 else y

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        # quantized right at the matmuls (after the head reshapes and the transpose: per-tensor
        # quantization commutes with them), so a runtime finds Q/DQ directly on the matmul inputs
        query = self.q(attn.head_to_batch_dim(query))
        key_t = self.k(attn.head_to_batch_dim(key).transpose(-1, -2))
        value = self.v(attn.head_to_batch_dim(value))
        scores = self.matmul(query, key_t, self.q, self.k, attn.scale)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = self.probs(scores.float().softmax(dim=-1).to(query.dtype))
        hidden_states = attn.batch_to_head_dim(self.matmul(probs, value, self.probs, self.v))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class TemporalTable(nn.Module):
    """A ResNet's temporal feature time_emb_proj(act(emb)) as a table [T, C] indexed by the
    timestep (T training timesteps): the cache-based temporal maintenance, and what the deployed
    graph gathers from."""

    def __init__(self, name: str, table: torch.Tensor, ctx: StepContext):
        super().__init__()
        self.name, self.ctx = name, ctx
        self.register_buffer("table", table.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[self.ctx.t].expand(x.shape[0], -1)


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree that shares its parameters and buffers: submodules can be
    replaced in it without touching ``module``, and no second copy of the weights is made (the
    memory of a Stable Diffusion-sized UNet). Nothing here writes into a shared tensor."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``root`` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def sets_of_steps(recipe: Recipe, steps: int) -> list[int]:
    a = recipe.activations
    if a.schedule is ActivationSchedule.PER_STEP:
        return list(range(steps))
    if a.schedule is ActivationSchedule.SHARED:
        return [0] * steps
    groups = min(a.groups, steps)
    return [i * groups // steps for i in range(steps)]


class QuantUNet(nn.Module):
    """The fake-quant model. Called like the diffusers UNet with any timestep of the training
    range: it runs with the parameters of the nearest calibrated step (``step_map``)."""

    def __init__(self, unet: nn.Module, recipe: Recipe, timesteps: torch.Tensor, *, train_timesteps: int,
                 search: bool = True, conv_outputs: bool = True):
        """``search=False`` skips the weight scale search (the parameters come from a QuantState);
        ``conv_outputs=False`` leaves out the recipe's conv output quantizers (a target that
        runs convs with float outputs uses the model without them)."""
        super().__init__()
        self.unet = shared_copy(unet).eval()
        self.recipe = recipe
        self.register_buffer("timesteps", timesteps.long().clone())
        self.train_timesteps = int(train_timesteps)
        if not (0 <= int(timesteps.min()) and int(timesteps.max()) < self.train_timesteps):
            raise ScheduleError(f"the schedule {timesteps[:3].tolist()}... leaves the training range "
                                f"[0, {self.train_timesteps})")
        self.ctx = StepContext(sets_of_steps=sets_of_steps(recipe, len(timesteps)),
                               timesteps=self.timesteps.tolist())
        self.n_sets = max(self.ctx.sets_of_steps) + 1
        self.config = self.unet.config
        self.output_bias: torch.Tensor | None = None  # [S, C_out], see set_output_bias
        a = recipe.activations
        mse = search and recipe.weights.search is ScaleSearch.MSE
        amse = a.search is ScaleSearch.MSE
        self.layers: dict[str, QuantLayer] = {}
        self.act_quantizers: dict[str, ActQuantizer] = {}

        def new_act(name: str, unsigned: bool = False, bits: int | None = None,
                    attn: bool = False, conv: nn.Module | None = None) -> ActQuantizer | None:
            if not recipe.quantizes_activations:
                return None
            symmetric = a.symmetric or (attn and a.attention_symmetric)
            groups = recipe.act_groups(name)
            if groups is not None:
                if not isinstance(conv, nn.Conv2d):
                    raise RecipeError(f"recipe {recipe.name!r}: channel groups for {name}, which is not a "
                                      "quantized Conv2d")
                q = GroupedActQuantizer(conv.in_channels, groups, a.bits, symmetric, self.ctx, self.n_sets,
                                        mse=amse, momentum=a.running_momentum, name=name)
            else:
                q = ActQuantizer(bits or a.bits, symmetric, self.ctx, self.n_sets, mse=amse, unsigned=unsigned,
                                 momentum=a.running_momentum, name=name)
            self.act_quantizers[name] = q
            return q

        for name, mod in list(self.unet.named_modules()):
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and not recipe.keeps_fp(name):
                act = new_act(name, conv=mod)
                # a grouped input lowers to a sum of G convs: no single integer output to quantize
                out = new_act(f"{name}.out") if (act is not None and conv_outputs and a.conv_outputs
                                                 and isinstance(mod, nn.Conv2d)
                                                 and not isinstance(act, GroupedActQuantizer)) else None
                ql = QuantLayer(name, mod, recipe.weight_bits(name), recipe.weights.symmetric, mse, act, out)
                replace_module(self.unet, name, ql)
                self.layers[name] = ql
        if recipe.quantizes_activations:
            for name, mod in self.unet.named_modules():
                if type(mod).__name__ == "Attention":
                    proc = QuantAttnProcessor(new_act(f"{name}.q", attn=True), new_act(f"{name}.k", attn=True),
                                              new_act(f"{name}.v", attn=True),
                                              new_act(f"{name}.probs", unsigned=True, bits=a.softmax_bits))
                    mod.add_module("quant_processor", proc)
                    mod.set_processor(proc)

    def step_of(self, timestep) -> tuple[int, int]:
        """(step, timestep) of this call: the calibrated step whose parameters it takes. A batch may
        mix timesteps only where their steps share one parameter set and no table is in use (the
        shared-parameter baselines)."""
        values = torch.as_tensor(timestep).flatten().unique().tolist()
        steps = [schedule_step(self.timesteps, v, self.train_timesteps) for v in values]
        if len(steps) > 1 and (len({self.ctx.sets_of_steps[s] for s in steps}) > 1 or self.has_tables()):
            raise ScheduleError("one call must use one timestep for the whole batch (it selects the step's "
                                "quantization parameters)")
        return steps[0], int(values[0])

    def has_tables(self) -> bool:
        return self.output_bias is not None or any(isinstance(m, TemporalTable) for m in self.unet.modules())

    def set_output_bias(self, table: torch.Tensor | None) -> None:
        """Subtract ``table[step]`` (one value per output channel, [S, C]) from every output: the
        bias correction (``calibration.correction``); None removes it."""
        if table is not None and (table.ndim != 2 or table.shape[0] != len(self.timesteps)
                                  or table.shape[1] != self.config.out_channels):
            raise ValueError(f"output bias table {tuple(table.shape)} is not [{len(self.timesteps)}, "
                             f"{self.config.out_channels}] (steps, output channels)")
        self.output_bias = None if table is None else table.detach().float().clone()

    def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        self.ctx.enter(*self.step_of(timestep))
        if encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = encoder_hidden_states
        out = self.unet(sample, timestep, **kwargs)
        if self.output_bias is None:
            return out
        row = self.output_bias[self.ctx.step].view(1, -1, 1, 1)
        if isinstance(out, tuple):  # return_dict=False
            return (out[0] - row, *out[1:])
        out.sample = out.sample - row
        return out

    def set_act_mode(self, mode: str) -> None:
        for q in self.act_quantizers.values():
            q.mode = mode

    def set_weight_quant(self, on: bool) -> None:
        for ql in self.layers.values():
            ql.use_wq = on

    def temporal_layers(self) -> list[str]:
        return [n for n, m in self.unet.named_modules() if n.endswith("time_emb_proj")]

    def cache_temporal(self, tables: dict[str, torch.Tensor]) -> None:
        """Replace each named time_emb_proj by its table [T, C], a row per training timestep."""
        for name, table in tables.items():
            if table.ndim != 2 or table.shape[0] != self.train_timesteps:
                raise ValueError(f"{name}: table has {table.shape[0]} rows for {self.train_timesteps} training "
                                 "timesteps")
            self.layers.pop(name, None)
            self.act_quantizers.pop(name, None)  # a Linear: no output quantizer
            replace_module(self.unet, name, TemporalTable(name, table, self.ctx))
