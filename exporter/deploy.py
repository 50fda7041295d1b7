"""The deploy module: the model a QuantState describes, in the form every lowering consumes.

Built from the FP model and a QuantState only (never re-derived): every quantized Conv2d /
Linear holds the state's integer weights, per-output-channel scales and zero-points; its
input goes through one Q/DQ pair with *constant* parameters; the temporal features are
tables with a row per training timestep, gathered by the call's timestep ('cache' and 'select'
store them; for 'tiar' they are the reconstructed block's outputs at each timestep, computed
here; the baselines' 'none' keeps the quantized block in the graph); and FSC's per-step activation parameters are
folded so that the integer kernels keep constant scales (docs/design.md, "The FSC fold"):

    reference (s, z), step t with (s_t, z_t):  r_t = s / s_t,  c_t = (z_t - z) * s
    Q(x * r_t + c_t; s, z) = Q(x; s_t, z_t)            (same integers)
    s_t * (q - z_t) = (DQ(q; s, z) - c_t) / r_t          (same values)
    a linear op after it:  y = (op_nobias(DQ(q)) - c_t * M) / r_t + b,  M = op_nobias(ones)

M is the sum of each output channel's weights for a Linear, and for a zero-padded conv the
map of those sums over the valid window (smaller at the borders), fixed by the sample size.
The two attention matmuls have a quantized input on each side; the same substitution in a
bilinear product gives
    A B^T = (A^ B^T^ - c_a (1 B^T^) - c_b (A^ 1) + c_a c_b d) / (r_a r_b)
with row sums of the dequantized operands. With one parameter set (the baselines) r = 1 and
c = 0 and no folding op is emitted, unless a consumer rebases the reference zero-point
(``FoldedAct.rebase``: onto the signed type's zero, the quantizer's own zero-points become c_t
even then). A conv whose input is quantized in channel groups (``activations.channel_groups``) becomes
one such layer per group, on a Gather of its channels and its slice of the weights, summed
before the bias (``GroupedDeployLayer``): every group an ordinary integer conv with constant
parameters. The bias correction (``calibration.correction``) is one more table, its step's row
subtracted from the output. The step index is ``step_map[t]`` inside the module (a
constant [T] table: each training timestep's nearest calibrated step), so the module takes
any timestep of the training range; the host wrapper must check t is a whole number in
[0, T) (``step_of``), because a graph cannot raise (a negative index would wrap around). How all of this is expressed (fake-quant ops and gathered rows, the traced
Q/DQ form, or a consumer's own op set) is the ``DeployOps`` the module runs under.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tfmq.calibration.qmodel import (
    ActQuantizer,
    GroupedActQuantizer,
    QuantAttnProcessor,
    QuantLayer,
    QuantUNet,
    TemporalTable,
    replace_module,
    schedule_step,
    shared_copy,
    step_map,
)
from tfmq.calibration.quantizers import qrange
from tfmq.calibration.recipe import TemporalStrategy
from tfmq.calibration.state import QuantState
from tfmq.calibration.temporal import reconstructed_features
from tfmq.calibration.tib import find_tib
from tfmq.exporter.qlinear import QLinearConvLayer
from tfmq.models import DiffusionModel


class DeployOps:
    """How the deploy module expresses its quantization and its per-step selection.

    This one is the eager reference: fake-quant ops on float tensors, rows of the per-step
    tables gathered by an integer step index. ``TraceOps`` is the form the QDQ ONNX lowering
    traces. A consumer that needs another form (the op set its converter takes) subclasses
    this in its own folder and runs the module under it with ``DeployUNet.using``."""

    float_weights = False  # hold every layer's float weights while the module runs under this op set

    def at(self, timestep: torch.Tensor, count: int) -> torch.Tensor:
        """The handle of the call's timestep (``timestep`` [1] integer) that rows of a table with
        a row per training timestep [T = count, C] are taken with; a tensor, so tracing exporters
        see it as data flow."""
        return timestep.reshape(-1)[0].long()

    def index(self, step_map: torch.Tensor, at: torch.Tensor, steps: int) -> torch.Tensor:
        """The step handle (rows of per-step tables [S = steps, C]) of the timestep ``at``:
        its entry of ``step_map`` [T]."""
        return step_map[at]

    def row(self, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The row of a table [S, C] or [T, C] a handle selects."""
        return table[idx]

    def pick(self, values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The step's entry of a per-step vector [S] (the fold's r_t, c_t)."""
        return values[idx]

    def act_qdq(self, act: FoldedAct, x: torch.Tensor) -> torch.Tensor:
        """Q then DQ of an activation with the quantizer's constant parameters."""
        qmin, qmax = qrange(act.bits, act.symmetric)
        return torch.fake_quantize_per_tensor_affine(x, act.s, act.z, qmin, qmax)

    def layer_op(self, layer: DeployLayer, x: torch.Tensor) -> torch.Tensor:
        """The bias-free Conv2d/Linear of a quantized layer on its (dequantized) input."""
        linear = layer.kind == "Linear"
        w = layer.weight.t() if linear else layer.weight  # a Linear runs as MatMul on W^T [in, out]
        return torch.matmul(x, w) if linear else F.conv2d(x, w, None, **layer.conv)

    def qlinear_conv(self, layer, x: torch.Tensor) -> torch.Tensor:
        """A conv with quantized input and output as one integer kernel (exporter/qlinear.py)."""
        return layer.reference(x)


class TraceOps(DeployOps):
    """What the TorchScript exporter traces into the QDQ graph: every weight as Q/DQ of its
    values per output channel (the lowering swaps in the state's integers at their width), and
    QLinearConv layers as their ONNX nodes."""

    float_weights = True  # the tracer takes the weights as constants, not as ops on the integers

    def layer_op(self, layer: DeployLayer, x: torch.Tensor) -> torch.Tensor:
        # in an 8-bit container: the exporter takes no 4-bit range. The values are unchanged:
        # w is exactly s * (q - z), so Q(w) gives back q; the DQ then feeds the MatMul/Conv
        # directly, as the runtimes' fusion patterns want
        linear = layer.kind == "Linear"
        w = layer.weight.t() if linear else layer.weight
        qmin, qmax = (-128, 127) if layer.symmetric else (0, 255)
        w = torch.fake_quantize_per_channel_affine(w.contiguous(), layer.w_scale, layer.w_zero, 1 if linear else 0,
                                                   qmin, qmax)
        return torch.matmul(x, w) if linear else F.conv2d(x, w, None, **layer.conv)

    def qlinear_conv(self, layer, x: torch.Tensor) -> torch.Tensor:
        return layer.symbolic(x)


class StepIndex:
    """Shared by every module of one deploy model: the current call's timestep and step
    handles and batch size, and the op set the modules express themselves in (``DeployOps``)."""

    def __init__(self):
        self.at: torch.Tensor | None = None  # the timestep (rows of the temporal tables)
        self.idx: torch.Tensor | None = None  # its calibrated step (rows of the per-step tables)
        self.batch: torch.Tensor | int = 1  # the sample's batch size (tables expand to it)
        self.ops: DeployOps = DeployOps()

    def row(self, table: torch.Tensor) -> torch.Tensor:
        """The current step's row of a per-step table [S, C]."""
        return self.ops.row(table, self.idx)

    def row_at(self, table: torch.Tensor) -> torch.Tensor:
        """The current timestep's row of a per-timestep table [T, C]."""
        return self.ops.row(table, self.at)

    def pick(self, values: torch.Tensor) -> torch.Tensor:
        return self.ops.pick(values, self.idx)


class FoldedAct(nn.Module):
    """An activation quantizer with constant (s, z) and per-step fold factors r_t, c_t.

    The reference (s, z) is the median step's; ``rebase`` takes another reference zero-point
    (the same integers and values; every step's own zero-point moves into c_t)."""

    def __init__(self, aq: ActQuantizer, steps_to_set: list[int], step: StepIndex):
        super().__init__()
        self.name, self.bits, self.symmetric, self.step = aq.name, aq.bits, aq.symmetric, step
        self._s_t = aq.scale[steps_to_set].double()  # [S]: each step's parameters
        self._z_t = aq.zero[steps_to_set].double()
        ref = int(torch.argsort(self._s_t)[len(self._s_t) // 2])  # the median step's parameters
        self.s = float(self._s_t[ref])
        self.register_buffer("r", None)
        self.register_buffer("c", None)
        self.rebase(int(self._z_t[ref]))

    def rebase(self, zero: int) -> None:
        """Fold onto reference zero-point ``zero``: for an asymmetric b-bit quantizer,
        2^(b-1) is zero-point 0 of the signed type, which runtimes that quantize with
        zero-point 0 only can take, with the shift carried by the float ops around."""
        self.z = int(zero)
        self.per_step = bool((self._s_t != self.s).any() or (self._z_t != self.z).any())  # anything to fold
        self.r = (self.s / self._s_t).float()
        self.c = ((self._z_t - self.z) * self.s).float()
        # any zero-point moves (else c_t = 0 at every step: symmetric quantizers, and unsigned
        # ones whose zero-point stays 0 like the softmax output's), so no shift terms are emitted
        self.shifts = bool((self.c != 0).any())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step.pick(self.r), self.step.pick(self.c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x -> the reference-domain dequantized value DQ(Q(x * r_t + c_t; s, z))."""
        if self.per_step:
            r, c = self.factors()
            x = x * r + c if self.shifts else x * r
        return self.step.ops.act_qdq(self, x)


class DeployLayer(nn.Module):
    """A quantized Conv2d/Linear: constant-parameter input Q/DQ, the state's integer weights,
    and the FSC fold around the bias-free op."""

    def __init__(self, ql: QuantLayer, act: FoldedAct | None, step: StepIndex,
                 group: tuple[int, torch.Tensor] | None = None):
        """``group`` (g, input channels): the conv of one channel group of a grouped input, on
        its slice of the weights and without the bias (``GroupedDeployLayer`` adds it once)."""
        super().__init__()
        self.name, self.act, self.kind, self.step = ql.name, act, type(ql.layer).__name__, step
        self.bits, self.symmetric = ql.bits, ql.symmetric
        w_int, bias = ql.w_int, ql.layer.bias
        if group is not None:
            self.name, w_int, bias = f"{ql.name}.groups.{group[0]}", w_int[:, group[1]], None
        self.register_buffer("w_int", w_int.to(ql.int_dtype).contiguous())
        self.register_buffer("w_scale", ql.w_scale.flatten().float())
        self.register_buffer("w_zero", ql.w_zero.flatten().to(torch.int32))
        # the float weights s * (q - z): computed per use, held only while an op set asks for
        # them as constants (``DeployOps.float_weights``), so the module is its integers' size
        self.register_buffer("held_weight", None)
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)
        self.conv: dict = {}
        if isinstance(ql.layer, nn.Conv2d):
            c = ql.layer
            self.conv = {"stride": c.stride, "padding": c.padding, "dilation": c.dilation, "groups": c.groups}
        # M = op_nobias(ones), set by ``fix_shape`` when folding: dense for a Linear (a vector),
        # factored for a conv (tap_sums, rows, cols; see ``shift``)
        self.register_buffer("m", None)
        self.register_buffer("tap_sums", None)
        self.register_buffer("rows", None)
        self.register_buffer("cols", None)

    @property
    def weight(self) -> torch.Tensor:
        """The float weights s * (q - z) (exactly the fake-quant model's)."""
        if self.held_weight is not None:
            return self.held_weight
        shape = (-1,) + (1,) * (self.w_int.dim() - 1)
        return (self.w_scale.reshape(shape) * (self.w_int - self.w_zero.reshape(shape))).contiguous()

    def hold_weight(self, hold: bool) -> None:
        self.held_weight = None
        if hold:
            self.held_weight = self.weight

    def op(self, x: torch.Tensor) -> torch.Tensor:
        return self.step.ops.layer_op(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        folded = self.act is not None and self.act.per_step
        if self.act is not None:
            x = self.act(x)
        y = self.op(x)
        if folded:
            r, c = self.act.factors()
            y = (y - self.shift(c) if self.act.shifts else y) / r
        if self.bias is not None:
            y = y + (self.bias if self.kind == "Linear" else self.bias[:, None, None])
        return y

    def shift(self, c: torch.Tensor) -> torch.Tensor:
        """c * M. For a conv, M[o, h, w] sums the weights of the taps that fall inside the input
        at (h, w): M[o] = R @ S[o] @ C^T with S the per-tap sums over input channels [O, kh, kw]
        and R [H, kh], C [W, kw] the 0/1 validity of each tap row / column. Stored that way
        (not as the dense [O, H, W] map, which outweighed the integer weights) and computed
        per call from c, so no runtime folds it back into a dense constant."""
        if self.m is not None:
            return c * self.m
        return torch.matmul(torch.matmul(self.rows, c * self.tap_sums), self.cols.t())

    def fix_shape(self, x: torch.Tensor) -> None:
        """M for this layer's input shape (a conv's border terms depend on H, W)."""
        self.m = self.tap_sums = self.rows = self.cols = None
        if self.act is None or not self.act.per_step or not self.act.shifts:
            return
        w = self.weight  # dequantized once for this call
        if self.kind == "Linear":
            self.m = w.sum(1)  # W @ ones
            return
        cfg = self.conv
        if cfg["groups"] != 1 or isinstance(cfg["padding"], str):  # the dense map, computed
            self.m = self.op(torch.ones((1, *x.shape[1:]), dtype=w.dtype))[0]
            return

        def valid(n: int, k: int, axis: int) -> torch.Tensor:  # [n_out, k]: tap inside the input?
            s, p, d = cfg["stride"][axis], cfg["padding"][axis], cfg["dilation"][axis]
            n_out = (n + 2 * p - d * (k - 1) - 1) // s + 1
            at = torch.arange(n_out)[:, None] * s - p + torch.arange(k)[None] * d
            return ((at >= 0) & (at < n)).to(w.dtype)

        kh, kw = w.shape[-2:]
        self.tap_sums = w.sum(1)
        self.rows, self.cols = valid(x.shape[-2], kh, 0), valid(x.shape[-1], kw, 1)


class GroupedDeployLayer(nn.Module):
    """A conv whose input is quantized in channel groups (``GroupedActQuantizer``): per group,
    a Gather of its input channels (constant indices) and a DeployLayer on its weight slice,
    each an ordinary integer conv with its own constant-parameter Q/DQ and FSC fold; their sum,
    then the bias once. The same sum the fake-quant conv computes, in another order."""

    def __init__(self, ql: QuantLayer, fold, step: StepIndex):
        super().__init__()
        aq = ql.act
        self.groups = nn.ModuleList()
        for g in range(aq.groups):
            channels = aq.members(g)
            self.register_buffer(f"channels_{g}", channels)
            self.groups.append(DeployLayer(ql, fold(aq.group(g)), step, group=(g, channels)))
        self.register_buffer("bias", ql.layer.bias.detach().clone() if ql.layer.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        for g, layer in enumerate(self.groups):
            part = layer(x.index_select(1, getattr(self, f"channels_{g}")))
            y = part if y is None else y + part
        return y if self.bias is None else y + self.bias[:, None, None]


def folded_matmul(a: torch.Tensor, b_t: torch.Tensor, qa: FoldedAct, qb: FoldedAct, scale: float = 1.0) -> torch.Tensor:
    """scale * a @ b_t (b_t already transposed: [.., d, m]) where a and b_t are reference-domain
    dequantized values of per-step quantizers: the bilinear fold, with ``scale`` (attention's
    1/sqrt(d)) joined to 1/(r_a r_b) so the score tensor sees one multiplication."""
    y = torch.bmm(a, b_t)
    if not (qa.per_step or qb.per_step):
        return y * scale if scale != 1.0 else y
    ra, ca = qa.factors()
    rb, cb = qb.factors()
    if qa.per_step and qa.shifts:  # only the terms of a zero-point that moves (c_t = 0 otherwise)
        y = y - ca * b_t.sum(1, keepdim=True)
    if qb.per_step and qb.shifts:
        y = y - cb * a.sum(-1, keepdim=True)
    if qa.per_step and qa.shifts and qb.per_step and qb.shifts:
        y = y + ca * cb * a.shape[-1]
    return y * (scale / (ra * rb))


class DeployAttnProcessor(QuantAttnProcessor):
    """QuantAttnProcessor with constant-parameter quantizers and the bilinear fold in both matmuls."""

    def __init__(self, proc: QuantAttnProcessor, fold):
        super().__init__(*(fold(p) for p in (proc.q, proc.k, proc.v, proc.probs)))

    def matmul(self, a: torch.Tensor, b: torch.Tensor, qa, qb, scale: float = 1.0) -> torch.Tensor:
        return folded_matmul(a, b, qa, qb, scale)


class DeployTable(nn.Module):
    """A temporal feature as a constant table [T, C], the row of the current timestep."""

    def __init__(self, table: TemporalTable, step: StepIndex):
        super().__init__()
        self.step = step
        self.register_buffer("table", table.table.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (the time MLP's output) is ignored, so the exported graph holds no time MLP at all
        return self.step.row_at(self.table).expand(self.step.batch, -1)


class NoTimeMLP(nn.Module):
    """Stands in for ``time_embedding`` when every temporal feature is a table: an empty
    embedding, so neither the sinusoid nor the MLP is computed or exported."""

    def forward(self, t_emb: torch.Tensor, condition=None) -> torch.Tensor:
        return torch.zeros(1, 0, dtype=t_emb.dtype)


def _only_resnets_take_emb(unet: nn.Module) -> bool:
    """True when the time embedding goes only to ResnetBlock2D's time_emb_proj (then tables
    replace all of its uses; a block normalizing with it, e.g. ResnetBlockCondNorm2D, keeps it)."""
    return all(type(m).__name__ == "ResnetBlock2D" for m in unet.modules() if "Resnet" in type(m).__name__)


class DeployUNet(nn.Module):
    """Called like the diffusers UNet (sample, timestep[, encoder_hidden_states]) -> tensor."""

    def __init__(self, qunet: QuantUNet, sample_shape: tuple[int, ...], cross_attention_dim: int | None):
        """A conv with an output quantizer (``activations.conv_outputs``) becomes a QLinearConv
        with per-step parameters (exporter/qlinear.py) instead of a folded layer."""
        super().__init__()
        self.step = StepIndex()
        self.unet = shared_copy(qunet.unet)  # its layers are replaced below; the rest is shared
        self.register_buffer("schedule", qunet.timesteps.clone())
        self.train_timesteps = qunet.train_timesteps
        self.register_buffer("step_map", step_map(qunet.timesteps, qunet.train_timesteps))
        self.register_buffer("output_bias", None if qunet.output_bias is None else qunet.output_bias.clone())
        self.recipe = qunet.recipe
        self.sample_shape, self.cross_attention_dim = tuple(sample_shape), cross_attention_dim
        sets = qunet.ctx.sets_of_steps

        def fold(aq: ActQuantizer | None) -> FoldedAct | None:
            return None if aq is None else FoldedAct(aq, sets, self.step)

        tables = any(isinstance(m, TemporalTable) for m in self.unet.modules())
        if tables and _only_resnets_take_emb(self.unet):  # every temporal feature is a table: the MLP is dead
            replace_module(self.unet, "time_embedding", NoTimeMLP())
        self.layers: dict[str, DeployLayer | QLinearConvLayer] = {}
        for name, mod in list(self.unet.named_modules()):
            if isinstance(mod, QuantLayer) and isinstance(mod.act, GroupedActQuantizer):
                grouped = GroupedDeployLayer(mod, fold, self.step)
                replace_module(self.unet, name, grouped)
                self.layers.update({dl.name: dl for dl in grouped.groups})  # each group is a kernel
            elif isinstance(mod, QuantLayer):
                dl = QLinearConvLayer(mod, sets, self.step) if mod.out is not None else \
                    DeployLayer(mod, fold(mod.act), self.step)
                replace_module(self.unet, name, dl)
                self.layers[name] = dl
            elif isinstance(mod, TemporalTable):
                replace_module(self.unet, name, DeployTable(mod, self.step))
        for mod in self.unet.modules():
            if type(mod).__name__ == "Attention" and hasattr(mod, "quant_processor"):
                proc = DeployAttnProcessor(mod.quant_processor, fold)
                del mod.quant_processor
                mod.add_module("deploy_processor", proc)
                mod.set_processor(proc)
        self.fix_shapes()

    def activations(self) -> list[FoldedAct]:
        """Every folded activation quantizer, in module order."""
        return [m for m in self.modules() if isinstance(m, FoldedAct)]

    @torch.no_grad()
    def fix_shapes(self) -> None:
        """Each layer's M for the sample size, from one pass on a dummy input (a layer's
        pre-hook sets it before the layer runs); again after any ``FoldedAct.rebase``."""
        hooks = [dl.register_forward_pre_hook(lambda m, a: m.fix_shape(a[0])) for dl in self.layers.values()]
        try:
            ehs = None if self.cross_attention_dim is None else torch.zeros(1, 1, self.cross_attention_dim)
            self(torch.zeros(1, *self.sample_shape), self.schedule[:1], ehs)
        finally:
            for h in hooks:
                h.remove()

    @contextmanager
    def using(self, ops: DeployOps):
        """Run the module expressed in ``ops`` (e.g. ``TraceOps`` while the lowering traces it)."""
        before, self.step.ops = self.step.ops, ops
        held = [m for m in self.modules() if isinstance(m, DeployLayer)] if ops.float_weights else []
        try:
            for m in held:
                m.hold_weight(True)
            yield self
        finally:
            self.step.ops = before
            for m in held:
                m.hold_weight(False)

    def forward(self, sample, timestep, encoder_hidden_states=None):
        timestep = torch.as_tensor(timestep).reshape(-1)
        ops = self.step.ops
        self.step.at = ops.at(timestep, self.train_timesteps)
        self.step.idx = ops.index(self.step_map, self.step.at, len(self.schedule))
        self.step.batch = sample.shape[0]
        t = timestep.expand(sample.shape[0])
        if encoder_hidden_states is None:
            out = self.unet(sample, t).sample
        else:
            out = self.unet(sample, t, encoder_hidden_states=encoder_hidden_states).sample
        if self.output_bias is None:
            return out
        return out - self.step.row(self.output_bias).reshape(1, -1, 1, 1)  # the bias correction

    def step_of(self, timestep) -> int:
        """The host-side check a graph cannot make (t a whole number in [0, T), one per call):
        the calibrated step whose parameters t takes."""
        return schedule_step(self.schedule, timestep, self.train_timesteps)


def build(model: DiffusionModel, state: QuantState, conv_outputs: bool = False) -> DeployUNet:
    """The deploy module of ``model`` quantized as ``state`` says (checked against the model);
    ``conv_outputs``: with the state's conv output quantizers (convs as QLinearConv)."""
    return deploy_of(state.apply(model, conv_outputs=conv_outputs), model)


def deploy_of(qunet: QuantUNet, model: DiffusionModel) -> DeployUNet:
    """The deploy module of a fake-quant model made by ``QuantState.apply`` (whose outputs it
    keeps: TIAR's block is replaced in it by its exact per-step outputs)."""
    if qunet.recipe.temporal is TemporalStrategy.TIAR:  # the reconstructed block's outputs, per step, as tables
        with torch.no_grad():
            qunet.cache_temporal(reconstructed_features(qunet, find_tib(model.unet).on(qunet.unet)))
    cfg = model.unet.config
    cross = getattr(cfg, "cross_attention_dim", None) if model.conditional else None
    return DeployUNet(qunet, tuple(model.sample_shape), cross).eval()
