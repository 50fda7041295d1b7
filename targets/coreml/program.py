"""The torch program Core ML converts: the deploy module in the op set coremltools takes.

Under ``DecomposedOps`` every quantized weight is a ``quantized_decomposed.dequantize_per_channel``
of the QuantState's integers and every activation quantizer a ``quantize_per_tensor`` ->
``dequantize_per_tensor`` pair with its constant parameters, which coremltools converts to
``constexpr`` weights and ``quantize``/``dequantize`` ops. The timestep and its step are
one-hot float rows instead of integers (the converter turns gather indices into uint16
tensors, which coremltools' ``bisect_model`` cannot pass between chunks): the step's row is
the timestep's times a constant [T, S] 0/1 map, and table rows and fold factors are dot
products with them. ``export_program`` captures it with ``torch.export``; ``runner`` runs the
same program eagerly (the Linux pre-gate).

The package takes the UNet interface of Apple's ml-stable-diffusion (its Swift pipeline feeds
a ``Unet`` model so): ``timestep`` float32 [batch], ``encoder_hidden_states`` [batch, width, 1,
tokens]; ``_Entry`` turns them into the deploy module's (integer timestep, [batch, tokens, width]).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from tfmq.calibration.quantizers import qrange
from tfmq.errors import ExportError, first_line
from tfmq.exporter.deploy import DeployOps


def _qd():
    """torch.ops.quantized_decomposed (registered by importing its definitions)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    return torch.ops.quantized_decomposed


class DecomposedOps(DeployOps):
    def at(self, timestep: torch.Tensor, count: int) -> torch.Tensor:
        return (torch.arange(count) == timestep.reshape(-1)[0]).to(torch.float32)  # one-hot [T]

    def index(self, step_map: torch.Tensor, at: torch.Tensor, steps: int) -> torch.Tensor:
        onehot = (step_map[:, None] == torch.arange(steps)[None]).to(torch.float32)  # [T, S], a constant
        return torch.matmul(at[None], onehot)[0]  # one-hot [S]

    def row(self, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.matmul(idx[None], table)

    def pick(self, values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return (values * idx).sum(0, keepdim=True)  # shape [1]: no rank-0 tensor

    def act_qdq(self, act, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = qrange(act.bits, act.symmetric)
        dtype = torch.int8 if act.symmetric else torch.uint8
        q = _qd().quantize_per_tensor(x, act.s, act.z, qmin, qmax, dtype)
        return _qd().dequantize_per_tensor(q, act.s, act.z, qmin, qmax, dtype)

    def layer_op(self, layer, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = qrange(layer.bits, layer.symmetric)
        w = _qd().dequantize_per_channel(layer.w_int, layer.w_scale, layer.w_zero.long(), 0, qmin, qmax,
                                         layer.w_int.dtype)
        return F.linear(x, w) if layer.kind == "Linear" else F.conv2d(x, w, None, **layer.conv)

    def qlinear_conv(self, layer, x: torch.Tensor) -> torch.Tensor:
        raise ExportError(f"{layer.name}: a conv output quantizer has no Core ML form (the state's recipe has "
                          "activations.conv_outputs; calibrate without them for this target)")


class _Entry(torch.nn.Module):
    """The package's interface (ml-stable-diffusion's) in front of the deploy module's."""

    def __init__(self, d):
        super().__init__()
        self.d = d

    def forward(self, sample, timestep, *encoder_hidden_states):
        states = [e.squeeze(2).transpose(1, 2) for e in encoder_hidden_states]  # [B, D, 1, S] -> [B, S, D]
        return self.d(sample, timestep[:1].to(torch.int64), *states)


def apple_inputs(sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """The deploy module's inputs in the package's layout: the timestep as float32 [batch],
    the encoder states as [batch, width, 1, tokens]."""
    args = (sample, torch.full((sample.shape[0],), float(timestep.reshape(-1)[0])))
    if encoder_hidden_states is not None:
        args += (encoder_hidden_states.transpose(1, 2).unsqueeze(2).contiguous(),)
    return args


def export_program(dep, cross, batch: int):
    """torch.export of the deploy module under ``DecomposedOps`` (ATen dialect, as coremltools
    wants), behind ``_Entry``; ``cross``: the (tokens, width) of ``encoder_hidden_states`` or None."""
    args = apple_inputs(torch.zeros(batch, *dep.sample_shape), dep.schedule[:1],
                        torch.zeros(batch, *cross) if cross else None)
    try:
        with torch.no_grad(), warnings.catch_warnings(), dep.using(DecomposedOps()):
            warnings.simplefilter("ignore")
            program = torch.export.export(_Entry(dep).eval(), args, strict=False)
            program = program.run_decompositions({})
    except ExportError:
        raise
    except Exception as e:  # torch.export reports model-specific failures many ways
        raise ExportError(f"torch.export of the deploy module failed: {first_line(e)}") from e
    return program


def runner(dep):
    """The converted program run eagerly: the Linux pre-gate's Runner."""

    entry = _Entry(dep).eval()

    def run(sample, timestep, encoder_hidden_states=None):
        ehs = None if encoder_hidden_states is None else torch.from_numpy(encoder_hidden_states)
        with torch.no_grad(), dep.using(DecomposedOps()):
            return entry(*apple_inputs(torch.from_numpy(sample), torch.from_numpy(timestep), ehs)).numpy()

    return run
