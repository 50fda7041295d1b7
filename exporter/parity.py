"""Parity: the three gates every artifact passes (docs/design.md, "Parity"), each a level dict
with ``"passed"``, gathered in a ``Verdict``.

A quantized network is chaotic under rounding: a different float order flips a few integers
by one and the flips move single outputs far more than they move the error level. So the
gates compare *error vs FP32* of the artifact with *error vs FP32* of the fake-quant model,
within the target's declared margins, never output against output at float precision. The
integers and scales themselves are checked exactly when the graph is lowered.

1. export: the artifact vs fake-quant on calibration inputs at several steps;
2. target: golden inputs and outputs stored in the artifact (``golden.npz``), re-checked on
   any machine by ``tfmq-parity`` without calibrating;
3. trajectory: whole DDIM runs through the artifact vs FP32 and vs fake-quant, same seeds:
   per-step latent error (PNG) and final-image PSNR.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tfmq.artifacts import ArtifactError
from tfmq.calibration.calibset import CalibrationSet
from tfmq.calibration.qmodel import check_timestep
from tfmq.hostcpu import signature
from tfmq.models import DiffusionModel
from tfmq.quality.harness import decoded
from tfmq.quality.metrics import mean_psnr
from tfmq.quality.plots import save_pairs
from tfmq.runner import Runner, Tolerance
from tfmq.sampling import ddim_sample, initial_noise, unet_denoiser

LEVEL1_STEPS = 5  # steps spread over the schedule, first and last included
LEVEL1_SAMPLES = 8
TRAJECTORY_SEEDS = 16
BAR_DB = 0.5  # the product's bar for trajectory PSNR vs fake-quant, reported for every target
TRAJECTORY_SEED0 = 500_000  # far from evaluation (0+) and calibration (10,000+) seeds
# floors of final-image PSNR vs FP32 for the bundled models, by weight bits, well below the lowest
# measured (docs/design.md, "Parity"): a state far below what its recipe family measures is
# broken, however well its artifact agrees with it
FLOORS_DB = {8: 30.0, 4: 18.0}


@dataclass
class Verdict:
    """A target's parity verdict: its levels by name, and, where only a pre-gate ran here, why
    the runtime itself did not (``runtime``)."""

    passed: bool
    levels: dict[str, dict]
    runtime: str | None = None

    @classmethod
    def of(cls, levels: dict[str, dict], runtime: str | None = None, gating: tuple[str, ...] | None = None):
        """All ``gating`` levels (default: every level) must pass."""
        gate = levels if gating is None else {k: levels[k] for k in gating}
        return cls(all(v["passed"] for v in gate.values()), levels, runtime)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "levels": self.levels} | ({"runtime": self.runtime} if self.runtime else {})


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def runner_denoiser(run: Runner, train_timesteps: int):
    """A sampler Denoiser on the artifact; the host-side check the graph cannot make: one
    whole-number timestep per call, in the training range [0, T)."""

    def denoise(sample, timestep, encoder_hidden_states=None):
        t = check_timestep(timestep, train_timesteps)
        ehs = None if encoder_hidden_states is None else encoder_hidden_states.numpy()
        out = run(sample.numpy(), np.array([t], dtype=np.int64), ehs)
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    return denoise


def _inputs(calib: CalibrationSet):
    """(name, step, inputs) at steps spread over the schedule, and for each but the last the
    same inputs at a timestep off the schedule (halfway to the next step's, so it takes this
    step's parameters): the artifact must follow the fake-quant model there too."""
    steps = np.unique(np.linspace(0, calib.steps - 1, min(LEVEL1_STEPS, calib.steps)).round().astype(int))
    idx = torch.arange(min(LEVEL1_SAMPLES, calib.samples))
    ts = calib.timesteps.tolist()
    for s in steps.tolist():
        x, t, c = calib.inputs(torch.full_like(idx, s), idx)
        yield f"step{s}", s, (x, t, c)
        off = (ts[s] + ts[s + 1] + 1) // 2 if s + 1 < len(ts) else ts[s]
        if off != ts[s]:
            yield f"off{s}", s, (x, torch.full_like(t, off), c)


def export_level(model: DiffusionModel, fake_quant, run: Runner, calib: CalibrationSet, tol: Tolerance,
                 golden: Path | None = None) -> dict:
    """Level 1 on calibration inputs; also writes the level-2 golden file when asked."""
    fp, fq = unet_denoiser(model.unet.eval()), unet_denoiser(fake_quant)
    art = runner_denoiser(run, model.train_timesteps)
    rows, store = [], {}
    with torch.no_grad():
        for name, s, (x, t, c) in _inputs(calib):
            ref, want, got = fp(x, t, c), fq(x, t, c), art(x, t, c)
            e_fq, e_art = _rel(want, ref), _rel(got, ref)
            ok = abs(e_art - e_fq) <= tol.error_margin * e_fq + tol.error_floor
            rows.append({"step": s, "timestep": int(t[0]), "on_schedule": name.startswith("step"),
                         "fake_quant_vs_fp32": e_fq, "artifact_vs_fp32": e_art,
                         "artifact_vs_fake_quant": _rel(got, want), "passed": bool(ok)})
            store[name] = (x, t[:1], c, ref, want, got)
    if golden is not None:
        arrays = {}
        for k, (x, t, c, ref, want, got) in store.items():
            arrays |= {f"{k}.sample": x.numpy(), f"{k}.timestep": t.numpy(), f"{k}.fp32": ref.numpy(),
                       f"{k}.fake_quant": want.numpy(), f"{k}.artifact": got.numpy()}
            if c is not None:
                arrays[f"{k}.encoder_hidden_states"] = c.numpy()
        np.savez_compressed(golden, **arrays)
    return {"level": "export", "rule": f"|err(artifact) - err(fake-quant)| <= {tol.error_margin} * err(fake-quant) "
            f"+ {tol.error_floor}, errors relative L2 vs FP32 on {LEVEL1_SAMPLES} calibration inputs per step, "
            "at scheduled timesteps and at timesteps between them",
            "steps": rows, "passed": all(r["passed"] for r in rows), "golden_host": signature()}


GOLDEN_FIELDS = ("sample", "timestep", "fp32", "fake_quant", "artifact")
GOLDEN_KINDS = ("step", "off")  # step<N>: a scheduled timestep; off<N>: one between step N's and the next


def read_golden(path: Path) -> list[dict]:
    """The golden entries of ``golden.npz`` (``step<N>.<field>`` / ``off<N>.<field>`` arrays), checked: a damaged file
    (truncated, keys missing or extra, an object array, shapes that disagree) is one error line."""
    try:
        with np.load(path, allow_pickle=False) as g:
            arrays = {k: g[k] for k in g.files}
    except FileNotFoundError as e:
        raise ArtifactError(f"{path} is missing: the artifact is incomplete") from e
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ArtifactError(f"{path} is damaged: {e}") from e
    steps: dict[str, dict] = {}
    for key, value in arrays.items():
        step, _, field_name = key.partition(".")
        if _golden_order(step) is None or field_name not in (*GOLDEN_FIELDS, "encoder_hidden_states"):
            raise ArtifactError(f"{path} is damaged: unexpected array {key!r}")
        steps.setdefault(step, {})[field_name] = value
    if not steps:
        raise ArtifactError(f"{path} holds no golden inputs")
    for step, d in steps.items():
        missing = [f for f in GOLDEN_FIELDS if f not in d]
        if missing:
            raise ArtifactError(f"{path} is damaged: {step} lacks {', '.join(missing)}")
        shapes = {d[f].shape for f in ("sample", "fp32", "fake_quant", "artifact")}
        if len(shapes) != 1 or d["timestep"].shape != (1,) or d["timestep"].dtype != np.int64:
            raise ArtifactError(f"{path} is damaged: {step}'s arrays disagree in shape or type")
    return [steps[k] | {"name": k} for k in sorted(steps, key=_golden_order)]


def _golden_order(name: str) -> tuple[int, int] | None:
    """(step, kind) of a golden entry's name, None for a name that is not one."""
    kind = next((k for k in GOLDEN_KINDS if name.startswith(k)), None)
    rest = name[len(kind):] if kind else ""
    return (int(rest), GOLDEN_KINDS.index(kind)) if rest.isdigit() else None


def target_level(run: Runner, golden: Path, tol: Tolerance, recorded_host: dict | None = None) -> dict:
    """Level 2: the stored golden inputs through the artifact here. ``recorded_host``: the
    signature of the machine the golden outputs were made on; on that same machine and runtime
    builds the outputs must match them to ``golden_same_host_rel_l2``, elsewhere to
    ``golden_rel_l2`` (another CPU reorders the sums)."""
    same = recorded_host is not None and recorded_host == signature()
    bound = tol.golden_same_host_rel_l2 if same else tol.golden_rel_l2
    rows = []
    for g in read_golden(golden):
        ehs = g.get("encoder_hidden_states")
        got = torch.from_numpy(np.asarray(run(g["sample"], g["timestep"], ehs), dtype=np.float32))
        ref, want, stored = (torch.from_numpy(g[n]) for n in ("fp32", "fake_quant", "artifact"))
        e_fq, e_art = _rel(want, ref), _rel(got, ref)
        vs_stored = _rel(got, stored)
        ok = abs(e_art - e_fq) <= tol.error_margin * e_fq + tol.error_floor and vs_stored <= bound
        rows.append({"golden": g["name"], "artifact_vs_fp32": e_art, "fake_quant_vs_fp32": e_fq,
                     "artifact_vs_stored": vs_stored, "passed": bool(ok)})
    return {"level": "target", "rule": f"the export rule, and relative L2 vs the stored outputs <= {bound} "
            f"({'the machine and runtime builds that stored them' if same else 'another machine or runtime build'})",
            "same_host": same, "golden": rows, "passed": all(r["passed"] for r in rows)}


def trajectory_level(model: DiffusionModel, fake_quant, run: Runner, steps: int, guidance: float, tol: Tolerance,
                     out: Path | None = None, seeds: int = TRAJECTORY_SEEDS,
                     deployment: tuple[str, Runner] | None = None, title: str = "artifact",
                     progress: bool = False) -> dict:
    """Level 3: DDIM runs through FP32, fake-quant and the artifact on the same seeds.
    ``out``: a folder for ``trajectory_error.png`` (per-step latent error, labelled with
    ``title``, the rule and the verdict) and ``fp32_vs_artifact.png`` (rows of FP32 images,
    each above the artifact's from the same seed). ``deployment`` (what differs, runner): the
    artifact also run with its deployment settings where parity uses others
    (``Target.deployment_runner``); reported, not gating."""
    seed_list = list(range(TRAJECTORY_SEED0, TRAJECTORY_SEED0 + seeds))
    noise = initial_noise(seed_list, model.sample_shape)
    runs = {}
    with torch.no_grad():
        for name, den in (("fp32", unet_denoiser(model.unet.eval())), ("fake_quant", unet_denoiser(fake_quant)),
                          ("artifact", runner_denoiser(run, model.train_timesteps))):
            runs[name] = ddim_sample(model, den, noise, steps=steps, guidance=guidance, record=True,
                                     progress=progress, desc=f"parity: {name}")
    ref = runs["fp32"]
    per_step = {n: [_rel(a, b) for a, b in zip(runs[n].latents[1:], ref.latents[1:], strict=True)]
                for n in ("fake_quant", "artifact")}
    with torch.no_grad():  # a latent model's images are what its VAE decodes
        images = {n: decoded(model, r.images) for n, r in runs.items()}
    psnr_fq = mean_psnr(images["fp32"], images["fake_quant"])
    psnr_art = mean_psnr(images["fp32"], images["artifact"])
    psnr_art_fq = mean_psnr(images["fake_quant"], images["artifact"])
    rule = (f"PSNR(artifact vs FP32) >= PSNR(fake-quant vs FP32) - {tol.trajectory_db} dB, or "
            f"PSNR(artifact vs FP32) or PSNR(artifact vs fake-quant) >= {tol.trajectory_floor_db} dB")
    passed = bool(psnr_art >= psnr_fq - tol.trajectory_db or max(psnr_art, psnr_art_fq) >= tol.trajectory_floor_db)
    if out is not None:
        _plot(per_step, out / "trajectory_error.png",
              f"{title}: {'PASSED' if passed else 'FAILED'}, image PSNR vs FP32 {psnr_art:.1f} dB "
              f"(fake-quant {psnr_fq:.1f} dB)\nrule: >= fake-quant - {tol.trajectory_db} dB, or >= "
              f"{tol.trajectory_floor_db} dB; {seeds} seeds x {steps} steps")
        save_pairs(images["fp32"], images["artifact"], out / "fp32_vs_artifact.png", n=seeds)
    extra = {}
    if deployment is not None:
        what, dep_run = deployment
        with torch.no_grad():
            deployed = decoded(model, ddim_sample(model, runner_denoiser(dep_run, model.train_timesteps), noise,
                                                  steps=steps, guidance=guidance).images)
        extra["deployment"] = {"settings": what, "psnr_vs_fp32_db": mean_psnr(images["fp32"], deployed),
                               "psnr_vs_fake_quant_db": mean_psnr(images["fake_quant"], deployed),
                               "gates": False}
    return {"level": "trajectory", "seeds": seeds, "steps": steps, "guidance": guidance, **extra,
            "psnr_fake_quant_vs_fp32_db": psnr_fq, "psnr_artifact_vs_fp32_db": psnr_art,
            "psnr_artifact_vs_fake_quant_db": psnr_art_fq,
            "final_latent_rel_err": {n: v[-1] for n, v in per_step.items()},
            "rule": rule,
            "within_margin": bool(psnr_art >= psnr_fq - tol.trajectory_db),
            "within_bar": bool(psnr_art >= psnr_fq - BAR_DB),
            "passed": passed}


def floor_level(trajectory: dict, floor_db: float, family: str) -> dict:
    """The artifact and its fake-quant model within ``floor_db`` of FP32 (trajectory PSNR): a
    self-consistent but broken state fails here, not only a runtime that disagrees with it."""
    fq, art = trajectory["psnr_fake_quant_vs_fp32_db"], trajectory["psnr_artifact_vs_fp32_db"]
    return {"level": "floor", "rule": f"PSNR vs FP32 of fake-quant and of the artifact >= {floor_db} dB ({family})",
            "floor_db": floor_db, "passed": bool(fq >= floor_db and art >= floor_db)}


def floor_for(model: DiffusionModel, recipe) -> tuple[float, str] | None:
    """(floor, family) where one is measured: the bundled models, by the recipe's weight bits."""
    if not model.bundled or recipe.weights.bits not in FLOORS_DB:
        return None
    return FLOORS_DB[recipe.weights.bits], f"{model.name}, {recipe.weights.bits}-bit weights"


def _plot(per_step: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, v in per_step.items():
        ax.plot(range(len(v)), v, label=name)
    ax.set_xlabel("DDIM step")
    ax.set_ylabel("latent rel. L2 vs FP32")
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
