"""Ablations of a calibrated model: which activation quantizers cost the quality, and where.

``float_activations`` leaves the activation quantizers whose names match a regex in float, at
every step or only at some steps of the schedule (0 = the first, noisiest); everything else,
the bias correction included, stays as calibrated. ``state_candidate`` is the quality
benchmark's ``state:DIR[@float=REGEX[@steps=A-B]]``.
"""
from __future__ import annotations

import re
from pathlib import Path

from tfmq.calibration.qmodel import QuantUNet
from tfmq.calibration.state import QuantState
from tfmq.errors import TfmqError
from tfmq.quality.harness import Candidate
from tfmq.sampling import Denoiser, unet_denoiser

USAGE = "state:FOLDER, state:FOLDER@float=REGEX or state:FOLDER@float=REGEX@steps=A-B"


class AblationError(TfmqError):
    """An ablation that names nothing, or steps the schedule does not have."""


def matching(q: QuantUNet, regex: str) -> list[str]:
    """The activation quantizers of ``q`` whose names ``regex`` finds."""
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise AblationError(f"bad float= regex {regex!r}: {e}") from None
    hit = [n for n in q.act_quantizers if pattern.search(n)]
    if not hit:
        raise AblationError(f"float={regex!r} matches none of the {len(q.act_quantizers)} activation quantizers")
    return hit


def float_activations(q: QuantUNet, regex: str, steps: range | None = None) -> tuple[list[str], Denoiser]:
    """(the quantizers left in float, a denoiser on ``q`` with them in float at ``steps``, or at
    every step when None, and quantized elsewhere)."""
    names = matching(q, regex)
    hit = [q.act_quantizers[n] for n in names]
    denoise = unet_denoiser(q)
    if steps is None:
        for aq in hit:
            aq.mode = "off"
        return names, denoise
    if steps.stop > len(q.timesteps):
        raise AblationError(f"steps={steps.start}-{steps.stop - 1}: the state has {len(q.timesteps)} steps")

    def at_step(sample, timestep, encoder_hidden_states=None):
        mode = "off" if q.step_of(timestep)[0] in steps else "quant"
        for aq in hit:
            aq.mode = mode
        return denoise(sample, timestep, encoder_hidden_states)

    return names, at_step


def state_candidate(spec: str, model) -> Candidate:
    """``state:FOLDER[@float=REGEX[@steps=A-B]]``: a saved QuantState as a quality candidate."""
    folder, *opts = spec.removeprefix("state:").split("@")
    kv = dict(o.partition("=")[::2] for o in opts)
    if len(kv) != len(opts) or not set(kv) <= {"float", "steps"} or ("steps" in kv and "float" not in kv):
        raise AblationError(f"unknown options in {spec!r}: {USAGE}")
    steps = None
    if "steps" in kv:
        m = re.fullmatch(r"(\d+)-(\d+)", kv["steps"])
        if m is None or int(m[1]) > int(m[2]):
            raise AblationError(f"steps={kv['steps']!r} in {spec!r} is not A-B with A <= B (schedule step indices)")
        steps = range(int(m[1]), int(m[2]) + 1)
    q = QuantState.load(Path(folder)).apply(model)
    name = Path(folder).name
    if "float" not in kv:
        return Candidate(name, unet_denoiser(q), q)
    names, denoise = float_activations(q, kv["float"], steps)
    name += f"@float={kv['float']}" + (f"@steps={steps.start}-{steps.stop - 1}" if steps else "")
    return Candidate(name, denoise, q)
