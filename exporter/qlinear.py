"""A quantized conv as ONE integer kernel with per-step parameters: ONNX's QLinearConv.

ONNX Runtime runs a conv in integers only as QLinearConv (u8 x s8 -> u8, MLAS): its Q/DQ
fusion needs DQ -> Conv -> Q with constant scales, which FSC's fold (exporter/deploy.py) can
never give, and ConvInteger with a float epilogue measured 6.5x slower than float. But
QLinearConv reads its scales and zero-points as *inputs* at every call, so the per-step
parameters need no fold at all: each step's row is gathered from a table, exactly like the
temporal features. For a conv whose recipe quantizes the output too (``conv_outputs``):

    x_q = QuantizeLinear(x, s_x[t], z_x[t])
    y_q = QLinearConv(x_q, s_x[t], z_x[t], W_q, s_w, 0, s_y[t], z_y[t], b_q[t])
    y   = DequantizeLinear(y_q, s_y[t], z_y[t])

with b_q[t] = round(b / (s_x[t] s_w)) int32 (QLinearConv's bias type). The padding is
z_x[t], the quantized zero, as fake-quant pads the float input with 0 before quantizing. The
same integers as the fake-quant model up to the rounding of the bias (below half a unit of
s_x s_w, far under the output step s_y) and ties of the requantization. Standard ai.onnx ops
only (QLinearConv is in the default domain since opset 10).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tfmq.calibration.quantizers import qrange
from tfmq.errors import ExportError

INT32_MAX = 2 ** 31 - 1


def _zero_dtype(symmetric: bool) -> torch.dtype:
    return torch.int8 if symmetric else torch.uint8


def qlinear_conv_reference(x, sx, zx, x_range, w_int, sw, sy, zy, y_range, b_q, conv: dict) -> torch.Tensor:
    """What the three nodes compute, in float64 (exact for the integer accumulation): the
    eager forward of the layer and the values the tracer records."""
    xq = torch.clamp(torch.round(x.double() / sx) + zx, *x_range)
    acc = F.conv2d(xq - zx, w_int.double(), None, **conv) + b_q.double()[:, None, None]
    yq = torch.clamp(torch.round(acc * (sx * sw.double() / sy)[:, None, None]) + zy, *y_range)
    return ((yq - zy) * sy).to(x.dtype)


class _QLinearConvFn(torch.autograd.Function):
    """Traced by the TorchScript exporter as QuantizeLinear -> QLinearConv -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, sx, zx, w_int, sw, zw, sy, zy, b_q, x_range, y_range, stride, padding, dilation, groups):
        conv = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
        return qlinear_conv_reference(x, sx.double(), zx.double(), x_range, w_int, sw, sy.double(), zy.double(),
                                      y_range, b_q, conv)

    @staticmethod
    def symbolic(g, x, sx, zx, w_int, sw, zw, sy, zy, b_q, x_range, y_range, stride, padding, dilation, groups):
        xq = g.op("QuantizeLinear", x, sx, zx)
        yq = g.op("QLinearConv", xq, sx, zx, w_int, sw, zw, sy, zy, b_q, strides_i=list(stride),
                  pads_i=list(padding) * 2, dilations_i=list(dilation), group_i=groups)
        return g.op("DequantizeLinear", yq, sy, zy)


class QLinearConvLayer(nn.Module):
    """A QuantLayer (Conv2d with input and output quantizers, symmetric weights) with its
    per-step parameters as tables [S] and its bias as int32 per step [S, O]."""

    def __init__(self, ql, sets_of_steps: list[int], step):
        super().__init__()
        conv = ql.layer
        if not isinstance(conv, nn.Conv2d) or ql.act is None or ql.out is None:
            raise ExportError(f"{ql.name}: a QLinearConv needs a Conv2d with quantized input and output")
        if not ql.symmetric:
            raise ExportError(f"{ql.name}: QLinearConv takes int8 weights with zero-point 0; the recipe's weights "
                              "are asymmetric (weights.symmetric: true)")
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ExportError(f"{ql.name}: padding {conv.padding!r} / {conv.padding_mode!r} has no QLinearConv form")
        self.name, self.kind, self.step, self.bits, self.symmetric = ql.name, "Conv2d", step, ql.bits, True
        self.conv = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups}
        idx = torch.tensor(sets_of_steps)
        a, o = ql.act, ql.out
        self.x_range, self.y_range = qrange(a.bits, a.symmetric), qrange(o.bits, o.symmetric)
        if a.bits != 8 or o.bits != 8:
            raise ExportError(f"{ql.name}: QLinearConv quantizes to 8 bits, not {a.bits}/{o.bits}")
        self.register_buffer("sx", a.scale[idx].float().contiguous())
        self.register_buffer("zx", a.zero[idx].to(_zero_dtype(a.symmetric)).contiguous())
        self.register_buffer("sy", o.scale[idx].float().contiguous())
        self.register_buffer("zy", o.zero[idx].to(_zero_dtype(o.symmetric)).contiguous())
        self.register_buffer("w_int", ql.w_int.to(torch.int8).contiguous())
        self.register_buffer("w_scale", ql.w_scale.flatten().float().contiguous())
        self.register_buffer("w_zero", torch.zeros_like(self.w_scale, dtype=torch.int8))
        bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(len(self.w_scale)).double()
        b_q = torch.round(bias[None] / (self.sx.double()[:, None] * self.w_scale.double()[None]))
        if b_q.abs().max() > INT32_MAX:
            raise ExportError(f"{ql.name}: the bias does not fit int32 at scale s_x * s_w")
        self.register_buffer("b_q", b_q.to(torch.int32).contiguous())

    def fix_shape(self, x: torch.Tensor) -> None:
        """Nothing depends on the input size (no fold)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step.ops.qlinear_conv(self, x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """What the three nodes compute, at the current step (eager)."""
        i = self.step.idx
        return qlinear_conv_reference(x, self.sx[i].double(), self.zx[i].double(), self.x_range, self.w_int,
                                      self.w_scale, self.sy[i].double(), self.zy[i].double(), self.y_range,
                                      self.b_q[i], self.conv)

    def symbolic(self, x: torch.Tensor) -> torch.Tensor:
        """The same, as the function the TorchScript exporter traces into the three ONNX nodes."""
        i, c = self.step.idx, self.conv
        return _QLinearConvFn.apply(x, self.sx[i], self.zx[i], self.w_int, self.w_scale, self.w_zero, self.sy[i],
                                    self.zy[i], self.b_q[i], self.x_range, self.y_range, tuple(c["stride"]),
                                    tuple(c["padding"]), tuple(c["dilation"]), c["groups"])
