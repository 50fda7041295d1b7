"""Uniform affine fake quantization, scale search and AdaRound.

Conventions (the ones the exporter and every runtime read back from QuantState):
- asymmetric b-bit: integers q in [0, 2^b - 1], x ~= s * (q - z), z an integer in that range;
- symmetric b-bit: q in [-2^(b-1), 2^(b-1) - 1], z = 0;
- weights: one (s, z) per output channel (dim 0); activations: one per tensor (per step with FSC).
The weight scale search is the official code's: 80 candidates shrinking [min, max] by 1%
each, keeping the one with the smallest Lp error (p = 2.4); here vectorised over channels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

MSE_CANDIDATES = 80
MSE_SHRINK = 0.01
LP_NORM = 2.4
EPS = 1e-8


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """(scale, zero_point) covering [lo, hi] (widened to include 0, so 0 is exact)."""
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp_min(EPS)  # -2^(b-1) stays unused, like [-127, 127]
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    qmin, qmax = qrange(bits, symmetric)
    return torch.clamp(torch.round(x / scale) + zero, qmin, qmax)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient for x (and a gradient for scale)."""
    qmin, qmax = qrange(bits, symmetric)
    v = x / scale
    q = torch.clamp(v + (torch.round(v) - v).detach() + zero, qmin, qmax)
    return scale * (q - zero)


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1)))


WEIGHT_SEARCH_CHUNK = 1 << 19  # values per block of rows the weight search scores at once (cache-sized)


def weight_params(w: torch.Tensor, bits: int, symmetric: bool, mse: bool = True):
    """Per-output-channel (scale, zero_point) for weights [C_out, ...]: min-max or the MSE search.
    The search runs over blocks of rows in one reused buffer (in-place ops, the same arithmetic
    as ``fake_quant`` in the same order, so the same picks): cache-sized work instead of
    whole-tensor temporaries per candidate."""
    flat = w.detach().flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    best_s, best_z = params_from_range(lo, hi, bits, symmetric)
    if not mse:
        return best_s, best_z
    rows = max(1, WEIGHT_SEARCH_CHUNK // max(1, flat.shape[1]))
    buf = torch.empty(min(rows, flat.shape[0]), flat.shape[1], dtype=flat.dtype)
    for i in range(0, flat.shape[0], rows):
        x, sl = flat[i:i + rows], slice(i, i + rows)
        best_s[sl], best_z[sl] = _search_rows(x, lo[sl], hi[sl], best_s[sl], best_z[sl], bits, symmetric, buf[:len(x)])
    return best_s, best_z


def _search_rows(x, lo, hi, best_s, best_z, bits: int, symmetric: bool, buf: torch.Tensor):
    qmin, qmax = qrange(bits, symmetric)
    best_err = torch.full_like(lo, float("inf"))
    for i in range(MSE_CANDIDATES):
        f = 1.0 - i * MSE_SHRINK
        s, z = params_from_range(lo * f, hi * f, bits, symmetric)
        sc, zc = s[:, None], z[:, None]
        torch.div(x, sc, out=buf)  # |s * (clamp(round(x / s) + z) - z) - x| ^ p, as fake_quant - x
        buf.round_().add_(zc).clamp_(qmin, qmax).sub_(zc).mul_(sc).sub_(x).abs_().pow_(LP_NORM)
        err = buf.mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


ACT_SEARCH_SAMPLES = 1 << 14


def search_subsample(n: int) -> torch.Tensor:
    """The ACT_SEARCH_SAMPLES evenly strided indices into n values that the MSE search scores.
    float32 holds every index exactly up to 2^24; past that it rounds (2^28 - 1 became 2^28, one
    past the end of an SD-1.5 attention-probability tensor at 512 px), so larger tensors take
    float64 and smaller ones keep their float32 picks."""
    dtype = torch.float32 if n <= 1 << 24 else torch.float64
    return torch.linspace(0, n - 1, ACT_SEARCH_SAMPLES, dtype=dtype).long()


def activation_params(x: torch.Tensor, bits: int, symmetric: bool, mse: bool = True, unsigned: bool = False):
    """Per-tensor (scale, zero_point) for an activation sample: min-max or the MSE search.
    ``unsigned``: the range starts at 0 (softmax outputs). The search scores all 80 candidates
    at once on a fixed strided subsample (at most 16,384 values) after taking the full range."""
    x = x.detach().float()
    lo, hi = x.min(), x.max()
    if unsigned:
        lo = torch.zeros_like(lo)
    if not mse:
        return params_from_range(lo, hi, bits, symmetric)
    flat = x.flatten()
    if flat.numel() > ACT_SEARCH_SAMPLES:
        flat = flat[search_subsample(flat.numel())]
    f = 1.0 - torch.arange(MSE_CANDIDATES, dtype=torch.float32) * MSE_SHRINK
    s, z = params_from_range(lo * f, hi * f, bits, symmetric)
    err = (fake_quant(flat[None], s[:, None], z[:, None], bits, symmetric) - flat).abs().pow(LP_NORM).mean(1)
    best = int(torch.argmin(err))  # the first (widest) range among equals, as the sequential search
    return s[best], z[best]


class AdaRound(nn.Module):
    """Learned rounding for one weight tensor (Nagel et al. 2020), as BRECQ / Q-Diffusion use it.

    W_q = s * (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z), h(V) the rectified sigmoid
    in [0, 1]. V starts where h(V) equals the fractional part of W / s (so the start is the
    float value), and the regulariser pushes every h(V) to 0 or 1; ``hard`` uses the final
    decision h(V) >= 0.5.
    """

    ZETA, GAMMA = 1.1, -0.1

    def __init__(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool):
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.register_buffer("scale", _bcast(scale, w).clone())
        self.register_buffer("zero", _bcast(zero, w).clone())
        self.register_buffer("w_floor", torch.floor(w.detach() / self.scale))
        rest = (w.detach() / self.scale - self.w_floor).clamp(1e-4, 1 - 1e-4)
        self.alpha = nn.Parameter(-torch.log((self.ZETA - self.GAMMA) / (rest - self.GAMMA) - 1))
        self.hard = False

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (self.ZETA - self.GAMMA) + self.GAMMA, 0, 1)

    def integers(self) -> torch.Tensor:
        """The final integer weights (hard rounding decisions)."""
        qmin, qmax = qrange(self.bits, self.symmetric)
        return torch.clamp(self.w_floor + (self.h() >= 0.5).float() + self.zero, qmin, qmax).detach()

    def forward(self) -> torch.Tensor:
        qmin, qmax = qrange(self.bits, self.symmetric)
        up = (self.h() >= 0.5).float() if self.hard else self.h()
        return self.scale * (torch.clamp(self.w_floor + up + self.zero, qmin, qmax) - self.zero)

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


@dataclass
class TemperatureSchedule:
    """AdaRound's regulariser: off during warm-up, then beta annealed linearly start -> end."""

    iters: int
    warmup: float = 0.2
    start: float = 20.0
    end: float = 2.0

    def __call__(self, it: int) -> float | None:
        w = int(self.warmup * self.iters)
        if it < w:
            return None
        p = (it - w) / max(1, self.iters - w)
        return self.end + (self.start - self.end) * (1 - p)
