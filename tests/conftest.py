import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tfmq.hostcpu import keep_freed_memory  # noqa: E402

keep_freed_memory()  # the suite samples and calibrates like the console scripts: the same memory handling


@pytest.fixture(scope="session")
def ddpm():
    from tfmq.models import load_model

    return load_model("mnist-ddpm")


@pytest.fixture(scope="session")
def cond():
    from tfmq.models import load_model

    return load_model("mnist-cond")


@pytest.fixture(scope="module")
def small_set(ddpm):
    """The bundled DDPM and a tiny calibration set of it: 4 trajectories x 6 steps."""
    from tfmq.calibration.calibset import record

    return ddpm, record(ddpm, seeds=4, steps=6)


@pytest.fixture(scope="module")
def g4(small_set):
    """w8a8 with symmetric weights and attention operands, 4 channel groups at the full
    resolution, no reconstruction."""
    from dataclasses import replace

    from tfmq.calibration.api import calibrate
    from tfmq.calibration.recipe import Reconstruction, get_recipe
    from tfmq.calibration.requirements import Requirements, satisfy

    model, cs = small_set
    base = satisfy(get_recipe("w8a8"), Requirements(symmetric_weights=True, symmetric_attention=True))
    recipe = replace(base, reconstruction=Reconstruction(iters=0),
                     activations=replace(base.activations, channel_groups=4))
    return model, cs, calibrate(model, recipe, cs, progress=False)


@pytest.fixture(scope="session")
def sd_pipe(tmp_path_factory):
    """A tiny StableDiffusionPipeline folder (epsilon), built in code with random weights."""
    import tiny_sd

    return tiny_sd.pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="session")
def sd_bare(tmp_path_factory):
    """(a bare UNet2DConditionModel folder, an encoder-states file for it)."""
    import tiny_sd

    root = tmp_path_factory.mktemp("bare")
    return tiny_sd.bare_unet(root / "unet"), tiny_sd.encoder_states(root / "states.safetensors")
