"""Convs as QLinearConv with per-step parameters: the layer is the fake-quant layer with its
output quantizer (what ONNX Runtime runs of it: tests/targets/onnxruntime)."""
import pytest
import torch
from torch import nn

from tfmq.calibration.qmodel import ActQuantizer, QuantLayer, StepContext
from tfmq.errors import ExportError
from tfmq.exporter.deploy import StepIndex
from tfmq.exporter.qlinear import QLinearConvLayer


def _act(steps: int, symmetric: bool, gen, scale: float) -> ActQuantizer:
    ctx = StepContext(sets_of_steps=list(range(steps)))
    aq = ActQuantizer(8, symmetric, ctx, steps, name="x")
    aq.scale.copy_(torch.rand(steps, generator=gen) * scale + scale / 10)
    aq.zero.copy_(torch.zeros(steps) if symmetric else torch.randint(60, 200, (steps,), generator=gen).float())
    aq.initialized.fill_(True)
    aq.mode = "quant"
    return aq


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
@pytest.mark.parametrize("layer", [nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                   nn.Conv2d(8, 16, 1)], ids=["conv3x3", "conv-stride2", "conv1x1"])
def test_qlinear_layer_is_the_fake_quant_layer_with_its_output_quantizer(layer, symmetric):
    gen = torch.Generator().manual_seed(0)
    steps = 5
    aq, oq = _act(steps, symmetric, gen, 0.05), _act(steps, symmetric, gen, 0.1)
    oq.ctx = aq.ctx
    ql = QuantLayer("l", layer, 4, True, True, aq, oq)
    step = StepIndex()
    qc = QLinearConvLayer(ql, list(range(steps)), step)
    x = torch.randn(3, 8, 10, 10, generator=gen)
    for s in range(steps):
        aq.ctx.enter(s)
        step.idx = torch.tensor(s)
        want, got = ql(x), qc(x)
        codes = ((got - want) / oq.scale[s]).round()
        # the same output integers but for ties moved by the int32 bias's rounding
        assert codes.abs().max() <= 1 and (codes != 0).float().mean() < 0.01, s


def test_qlinear_needs_symmetric_weights_and_quantized_io():
    gen = torch.Generator().manual_seed(0)
    aq, oq = _act(2, False, gen, 0.05), _act(2, False, gen, 0.1)
    with pytest.raises(ExportError, match="zero-point 0"):
        QLinearConvLayer(QuantLayer("c", nn.Conv2d(4, 4, 3), 8, False, True, aq, oq), [0, 1], StepIndex())
    with pytest.raises(ExportError, match="quantized input and output"):
        QLinearConvLayer(QuantLayer("c", nn.Conv2d(4, 4, 3), 8, True, True, aq, None), [0, 1], StepIndex())
