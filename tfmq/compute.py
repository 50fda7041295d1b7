"""Where the FP model runs while the calibration set is recorded: a torch device and dtype.

Recording is the FP model's heaviest use in calibration (seeds x steps sampler passes, both
guidance branches), and the one users move to a GPU in half precision. The sampler's own
arithmetic (the DDIM update, the guidance sum) and the recorded set stay float32 on the
CPU: each call moves its inputs to the device and dtype and its output back, so the set never
has to fit in device memory and the quantizer arithmetic that reads it later is float32.
Refused in one line before any work: a device this torch cannot reach, an unknown dtype.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tfmq.errors import TfmqError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICES = ("cpu", "cuda", "mps")


class ComputeError(TfmqError):
    """A device or dtype this torch cannot run."""


@dataclass(frozen=True)
class Compute:
    device: str = "cpu"  # cpu, cuda, cuda:N, mps
    dtype: str = "float32"

    def __post_init__(self):
        kind, _, index = self.device.partition(":")
        if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
            raise ComputeError(f"--torch-device {self.device!r}: use cpu, cuda, cuda:N or mps")
        if self.dtype not in DTYPES:
            raise ComputeError(f"--torch-dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise ComputeError(f"--torch-device {self.device}: this torch ({torch.__version__}) sees no CUDA "
                                   "device")
            if index and int(index) >= torch.cuda.device_count():
                raise ComputeError(f"--torch-device {self.device}: only {torch.cuda.device_count()} CUDA "
                                   "device(s) here")
        if kind == "mps" and not torch.backends.mps.is_available():
            raise ComputeError(f"--torch-device mps: this torch ({torch.__version__}) has no MPS device here")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_default(self) -> bool:
        return self.device == "cpu" and self.dtype == "float32"

    def describe(self) -> dict:
        """What the calibration set's metadata records."""
        out = {"device": self.device, "dtype": self.dtype, "torch": torch.__version__}
        if self.device.startswith("cuda"):
            out["device_name"] = torch.cuda.get_device_name(torch.device(self.device))
        return out

    def module(self, unet: torch.nn.Module) -> torch.nn.Module:
        """``unet`` itself where it already runs here (CPU float32), else a copy on the device and
        in the dtype (the caller's model is never moved)."""
        if self.is_default:
            return unet
        import copy

        return copy.deepcopy(unet).to(device=self.device, dtype=self.torch_dtype).eval()

    @contextmanager
    def deterministic(self):
        """cuDNN's deterministic kernels while recording on CUDA (the same set on a rerun on the
        same device and build; another GPU or dtype gives another set)."""
        if not self.device.startswith("cuda"):
            yield
            return
        before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        try:
            yield
        finally:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before

    def call(self, unet: torch.nn.Module):
        """A (sample, timestep, encoder_hidden_states) -> eps function running ``unet`` here:
        inputs moved to the device and dtype, the output returned as float32 on the CPU."""
        dev, dtype = torch.device(self.device), self.torch_dtype

        def denoise(sample, timestep, encoder_hidden_states=None):
            kw = {}
            if encoder_hidden_states is not None:
                kw["encoder_hidden_states"] = encoder_hidden_states.to(dev, dtype)
            out = unet(sample.to(dev, dtype), timestep.to(dev), **kw).sample
            return out.to("cpu", torch.float32)

        return denoise
