import copy

import pytest
import torch

from tfmq.calibration.calibset import CalibrationDataError, load, record
from tfmq.conditioning import labels_for
from tfmq.sampling import ddim_sample, initial_noise, unet_denoiser


def test_one_pass_records_every_step_of_the_trajectory(ddpm):
    cs = record(ddpm, seeds=3, steps=6)
    assert cs.x.shape == (6, 3, 1, 32, 32) and cs.steps == 6 and cs.cond is None
    # the recorded inputs are exactly the sampler's trajectory for those seeds
    traj = ddim_sample(ddpm, unet_denoiser(ddpm.unet), initial_noise(range(10_000, 10_003), (1, 32, 32)),
                       steps=6, record=True)
    assert torch.equal(cs.x, traj.latents[:-1]) and torch.equal(cs.timesteps, traj.timesteps)


def test_conditional_records_both_cfg_branches(cond, tmp_path):
    cs = record(cond, seeds=4, steps=3)
    emb = cond.conditioning.embedder
    assert torch.equal(cs.cond, emb(labels_for(4))) and torch.equal(cs.uncond[0], emb(torch.tensor([10]))[0])
    x, t, c = cs.step_inputs(1)
    assert x.shape[0] == t.shape[0] == c.shape[0] == 8
    cs.save(tmp_path / "cs")
    back = load(tmp_path / "cs")
    assert torch.equal(back.x, cs.x) and torch.equal(back.uncond, cs.uncond) and back.meta == cs.meta
    back.check_for(cond, cs.timesteps)


def test_calibration_weights_the_cfg_branches_as_the_guided_prediction(cond):
    """The sampler integrates eps_u + g (eps_c - eps_u): reconstruction inputs take the null
    label by its weight |1 - g| / (|1 - g| + |g|), none at the bundled g = 1, where the
    unconditional branch cancels; ``guide`` turns stacked branch outputs into that prediction."""
    from tfmq.calibration.reconstruct import calibration_batches

    for g, share in ((1.0, 0.0), (2.0, 1 / 3), (0.0, 1.0)):
        cs = record(cond, seeds=4, steps=3, guidance=g)
        assert cs.guidance == g and cs.uncond_share() == pytest.approx(share)
        out = torch.randn(8, 1, 4, 4)
        assert torch.allclose(cs.guide(out), out[:4] + g * (out[4:] - out[:4]))
        c = torch.cat([b[2] for b in calibration_batches(cs, 12, 4)])
        null = (c == cs.uncond[0]).flatten(1).all(1)
        assert len(c) == 12 and (null.all() if share == 1 else not null.any() if share == 0 else 0 < null.sum() < 12)


def test_refuses_other_model_and_other_schedule(ddpm, tmp_path):
    cs = record(ddpm, seeds=2, steps=4)
    with pytest.raises(CalibrationDataError, match="4-step schedule"):
        cs.check_for(ddpm, torch.arange(10))
    other = copy.copy(ddpm)
    other.unet = copy.deepcopy(ddpm.unet)
    with torch.no_grad():
        next(other.unet.parameters()).add_(1e-3)
    with pytest.raises(CalibrationDataError, match="recorded for model"):
        cs.check_for(other, cs.timesteps)


def test_refuses_nan_and_broken_files(ddpm, tmp_path):
    cs = record(ddpm, seeds=2, steps=2)
    cs.x[0, 0, 0, 0, 0] = float("nan")
    cs.save(tmp_path / "nan")
    with pytest.raises(CalibrationDataError, match="NaN"):
        load(tmp_path / "nan")
    with pytest.raises(CalibrationDataError, match="not a calibration set"):
        load(tmp_path / "missing")
    (tmp_path / "nan" / "calib.safetensors").write_bytes(b"junk")
    with pytest.raises(CalibrationDataError, match="cannot read"):
        load(tmp_path / "nan")


def test_recording_in_bfloat16_keeps_the_set_float32_on_the_cpu_and_repeats_exactly(cond):
    """The FP model recorded in another dtype: the sampler and the set stay float32 on the CPU,
    the caller's model is not moved, the set is near the float32 one and the same on a rerun;
    a calibration runs from it."""
    from tfmq.calibration.api import calibrate
    from tfmq.calibration.recipe import get_recipe
    from tfmq.compute import Compute

    bf16 = Compute(dtype="bfloat16")
    a, b = (record(cond, seeds=3, steps=4, compute=bf16) for _ in range(2))
    ref = record(cond, seeds=3, steps=4)
    assert a.x.dtype == torch.float32 and a.x.device.type == "cpu" and torch.equal(a.x, b.x)
    assert next(cond.unet.parameters()).dtype == torch.float32
    rel = float((a.x - ref.x).norm() / ref.x.norm())
    assert 0 < rel < 0.05, rel
    assert a.meta["compute"]["dtype"] == "bfloat16" and ref.meta["compute"]["dtype"] == "float32"
    recipe = get_recipe("w8a8").with_iters(0)
    state = calibrate(cond, recipe, a, progress=False).state
    assert state.meta["calibration"]["calibration_set"]["compute"]["dtype"] == "bfloat16"


def test_a_device_this_torch_cannot_reach_is_one_line_before_any_work(tmp_path):
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    for args, says in ((["--torch-device", "cuda"], "sees no CUDA device"),
                       (["--torch-device", "tpu"], "use cpu, cuda, cuda:N or mps")):
        p = subprocess.run([sys.executable, "-m", "tfmq.cli.calibrate", *args, "--out", str(tmp_path / "q")],
                           capture_output=True, text=True)
        assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not (tmp_path / "q").exists()
