"""The export pipeline: ``export(model, recipe_or_state, targets, out, ...) -> Manifest``.

One call runs what ``tfmq-export`` runs: the FP32 reference stage, the calibration set, one
calibration per recipe the targets need (``calibration.requirements.plan``), and per target
its deploy module, its lowering, its compile and its parity gates, all written atomically
into ``out``. The CLI, the benchmarks and the drop-in call this; nothing here names a target.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tfmq.artifacts import Manifest, atomic_dir, changed_files, digests, inside, versions, write_json
from tfmq.calibration import calibset
from tfmq.calibration.api import calibrate, check, same_weights
from tfmq.calibration.recipe import PRESETS, Recipe, get_recipe
from tfmq.calibration.requirements import describe, plan
from tfmq.calibration.spec import load_recipe
from tfmq.calibration.state import QuantState, QuantStateError
from tfmq.compute import Compute
from tfmq.conditioning import FixedStates
from tfmq.errors import ExportError, TfmqError
from tfmq.exporter import client_folder, parity
from tfmq.exporter.deploy import deploy_of
from tfmq.exporter.qdq_onnx import OPSET, lower
from tfmq.models import ConditioningSource, DiffusionModel, load_model
from tfmq.quality.harness import EvalConfig
from tfmq.reference import write_reference
from tfmq.targets.base import LOWERING, Lowered, Target
from tfmq.targets.registry import get_target, targets

log = logging.getLogger("tfmq")
PARITY_INPUT_SEEDS = 8  # a loaded QuantState brings no calibration set: these trajectories feed the gates
STATES_FILE = "conditioning.safetensors"  # encoder states given as a file travel with the artifact


@dataclass(frozen=True)
class ExportOptions:
    n: int = 200  # images of the FP32 reference metrics
    steps: int = 50  # DDIM steps of the deployment schedule
    seed: int = 0  # image i is drawn from seed + i
    guidance: float | None = None  # classifier-free guidance (conditional models); None: the default
    calib_seeds: int | None = None  # calibration trajectories (None: the recipe's)
    iters: int | None = None  # reconstruction iterations per block (None: the recipe's)
    skip_parity: bool = False
    parity_seeds: int = parity.TRAJECTORY_SEEDS  # DDIM runs of each trajectory gate
    overwrite: bool = False
    progress: bool = True
    target_options: dict[str, dict] = field(default_factory=dict)  # target -> its options
    compute: Compute = field(default_factory=Compute)  # where the FP model records the calibration set

    def __post_init__(self):
        if self.n < 2:
            raise TfmqError(f"--n {self.n}: need at least 2 images for the feature statistics")
        if not 1 <= self.steps <= 1000:
            raise TfmqError(f"--steps {self.steps}: DDIM steps must be between 1 and 1000")
        if self.iters is not None and self.iters < 0:
            raise TfmqError(f"--iters {self.iters}: must be >= 0")
        if self.calib_seeds is not None and self.calib_seeds < 1:
            raise TfmqError(f"--calib-seeds {self.calib_seeds}: at least 1 calibration trajectory")
        if self.parity_seeds < 1:
            raise TfmqError(f"--parity-seeds {self.parity_seeds}: the trajectory gate needs at least 1 seed")
        if self.seed < 0:
            raise TfmqError(f"--seed {self.seed}: seeds are >= 0")
        if self.guidance is not None and not math.isfinite(self.guidance):
            raise TfmqError(f"--guidance {self.guidance}: must be a finite number")


def resolve_targets(spec: str | Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(targets to build, {skipped target: why}) for "fp32", "all", one name or a list. A
    target asked for by name must be buildable here; ``all`` skips those that are not."""
    if isinstance(spec, str):
        spec = [] if spec == "fp32" else list(targets()) if spec == "all" else [spec]
        every = spec == list(targets())
    else:
        spec, every = list(spec), False
    build, skipped = [], {}
    for name in spec:
        t = get_target(name)
        why = t.unavailable()
        if why and not every:
            t.require()
        if why:
            skipped[name] = why
        else:
            build.append(name)
    return build, skipped


def recipes_for(recipe: Recipe, build: list[str], adapt: bool) -> dict[str, Recipe]:
    """The recipe each target calibrates with: a preset is adapted to what the targets need
    (``plan``: those that add no quantizers share one recipe meeting all their needs); a custom
    recipe or a loaded state is taken as it is (each target's ``check`` refuses what it cannot run)."""
    if not adapt:
        return dict.fromkeys(build, recipe)
    return plan(recipe, {t: get_target(t).needs for t in build})


def is_preset(recipe: Recipe) -> bool:
    """``recipe`` is a preset (its reconstruction iterations aside)."""
    p = PRESETS.get(recipe.name)
    return p is not None and p.with_iters(recipe.reconstruction.iters) == recipe


def export(model: DiffusionModel | str, recipe_or_state: Recipe | QuantState | str | None = None,
           targets: str | Sequence[str] = "fp32", out: Path | str | None = None,
           options: ExportOptions | None = None, adapt: bool | None = None) -> Manifest:
    """Build the artifact directory ``out`` (default ``artifacts/<model name>``) and return its
    manifest. ``recipe_or_state``: a Recipe, a recipe spec (a preset name with modifiers,
    ``calibration.spec``), or a QuantState to lower as it is (None: the ``w8a8`` preset).
    ``adapt``: meet what the targets need by changing the recipe (default: for presets; a
    custom recipe is checked, never changed). A failed parity gate does not raise: the manifest
    says so (``Manifest.failed``) and the artifacts stay for inspection."""
    opts = options or ExportOptions()
    build, skipped = resolve_targets(targets)
    model = load_model(model) if isinstance(model, (str, Path)) else model
    loaded = recipe_or_state if isinstance(recipe_or_state, QuantState) else None
    recipe = None
    if build:
        recipe = loaded.recipe if loaded is not None else _recipe(recipe_or_state, opts)
    recipes: dict[str, Recipe] = {}
    target_opts = {t: get_target(t).options(opts.target_options.get(t)) for t in build}
    if recipe is not None:
        if loaded is not None:
            loaded.validate()
            _check_state(loaded, model, opts.steps)
        adapt = is_preset(recipe) if adapt is None else adapt
        recipes = recipes_for(recipe, build, adapt=loaded is None and adapt)
        for r in dict.fromkeys(recipes.values()):
            check(r, model)
        for t in build:
            get_target(t).check(recipes[t], target_opts[t])
        _say_plan(recipes)
    out = Path(out) if out is not None else Path("artifacts") / Path(model.name).name
    cfg = EvalConfig(n=opts.n, seed=opts.seed, steps=opts.steps,
                     guidance=model.default_guidance if opts.guidance is None else opts.guidance)
    if model.conditioning is not None:
        model.conditioning.check_guidance(cfg.guidance)
    with atomic_dir(out, overwrite=opts.overwrite) as tmp:
        t0 = time.time()
        log.info("FP32 reference: %d images x %d DDIM steps", cfg.n, cfg.steps)
        report = write_reference(model, tmp / "reference", cfg, progress=opts.progress)
        write_json(tmp / "reference" / "metrics.json", report)
        log.info("FP32 reference done (%.0f s)", time.time() - t0)
        manifest = _manifest(model, cfg, report, tmp)
        if isinstance(model.conditioning, FixedStates):  # a re-check asks for the same thing
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in sorted(model.conditioning.tensors().items())},
                      str(tmp / STATES_FILE))
        if build:
            calib = _calibration_set(model, recipes[build[0]], loaded, cfg, opts)
            states = _states(model, recipes, build, loaded, calib, tmp, opts)
            (state, folder), *more = states.values()
            manifest["quant_state"] = {"dir": folder, "recipe": state.meta["recipe"]["name"],
                                       "calibration": state.meta.get("calibration", {})}
            if more:
                manifest["quant_states"] = [{"dir": f, "recipe": st.meta["recipe"]["name"]} for st, f in states.values()]
            manifest["recipes"] = {t: recipes[t].name for t in build}
            for t in build:
                state, folder = states[recipes[t].name]
                entry = build_target(get_target(t), model, state, calib, tmp, cfg, opts.skip_parity, target_opts[t],
                                     progress=opts.progress, parity_seeds=opts.parity_seeds)
                manifest["targets"][t] = entry | {"quant_state": folder, "recipe": recipes[t].name,
                                                  "needs": describe(get_target(t).needs)}
        if skipped:
            manifest["skipped"] = skipped
        manifest["digests"] = digests(tmp)  # what tfmq-parity checks first: the files that were verified
        write_json(tmp / "manifest.json", manifest)
    return Manifest(out, manifest)


def _recipe(spec, opts: ExportOptions) -> Recipe:
    recipe = get_recipe("w8a8") if spec is None else load_recipe(spec) if isinstance(spec, str) else spec
    return recipe if opts.iters is None else recipe.with_iters(opts.iters)


def _check_state(state: QuantState, model: DiffusionModel, steps: int) -> None:
    state.check_for(model)
    if state.timesteps.tolist() != model.schedule(steps).tolist():
        raise QuantStateError(f"the QuantState was calibrated for a {len(state.timesteps)}-step schedule, "
                              f"not the {steps}-step one asked for (--steps)")


def _say_plan(recipes: dict[str, Recipe]) -> None:
    by: dict[str, list[str]] = {}
    for t, r in recipes.items():
        by.setdefault(r.name, []).append(t)
    for name, ts in by.items():
        log.info("recipe %s for %s", name, ", ".join(ts))


def _manifest(model: DiffusionModel, cfg: EvalConfig, report: dict, tmp: Path) -> dict:
    return {
        "tool": "tfmq-dm", "versions": versions(),
        "model": {"spec": model.spec, "name": model.name, "source": model.source,
                  "class": type(model.unet).__name__, "conditional": model.conditional,
                  "scheduler": model.scheduler_source,
                  "unet_config": {k: v for k, v in model.unet.config.items() if k != "_name_or_path"},
                  "conditioning": model.conditioning.describe() if model.conditioning is not None else None,
                  "vae": model.vae is not None,
                  "scheduler_config": dict(model.scheduler_config)},
        "schedule": {"sampler": "DDIM", "steps": cfg.steps, "eta": 0.0, "guidance": cfg.guidance,
                     "timesteps": model.schedule(cfg.steps).tolist(),
                     # any whole timestep in [0, train_timesteps) runs: off the schedule with the nearest
                     # calibrated step's quantization parameters
                     "train_timesteps": model.train_timesteps},
        "targets": {"fp32": {"dir": "reference", "metrics": report["fp32"],
                             "files": sorted(p.name for p in (tmp / "reference").iterdir())}},
    }


def _calibration_set(model, recipe: Recipe, loaded, cfg: EvalConfig, opts: ExportOptions):
    if loaded is not None:
        return calibset.record(model, seeds=PARITY_INPUT_SEEDS, steps=cfg.steps, guidance=cfg.guidance)
    seeds = recipe.data.seeds if opts.calib_seeds is None else opts.calib_seeds
    log.info("recording the calibration set: %d %s trajectories x %d steps on %s", seeds, opts.compute.dtype,
             cfg.steps, opts.compute.device)
    return calibset.record(model, seeds=seeds, steps=cfg.steps, guidance=cfg.guidance, progress=opts.progress,
                           compute=opts.compute)


def _states(model, recipes: dict[str, Recipe], build: list[str], loaded, calib, tmp: Path,
            opts: ExportOptions) -> dict[str, tuple[QuantState, str]]:
    """recipe name -> (QuantState, its folder): the shared one is ``quant_state``. Recipes that
    add no quantizers come first; a later one takes the integers of an earlier state whose
    weights it quantizes the same way."""
    states: dict[str, tuple[QuantState, str]] = {}
    for t in sorted(build, key=lambda t: get_target(t).needs.adds_quantizers):
        r = recipes[t]
        if r.name in states:
            continue
        folder = "quant_state" if not states else f"quant_state_{r.name}"
        if loaded is not None:
            state = loaded
        else:
            shared = next((st for st, _ in states.values() if same_weights(r, st.recipe)), None)
            if shared is not None:
                log.info("%s: the weights of %s, activations calibrated anew", r.name, shared.recipe.name)
            else:
                log.info("calibrating %s", r.name)
            res = calibrate(model, r, calib, progress=opts.progress, weights_from=shared)
            state = res.state
            log.info("calibrated %s in %.0f s", r.name, res.report["seconds"])
        state.save(tmp / folder)
        states[r.name] = (state, folder)
    return states


def lowered_for(target: Target, model: DiffusionModel, fq, cross, options, folder: Path) -> Lowered:
    """The deploy module of the fake-quant model ``fq`` as ``target`` takes it (its ``prepare``),
    and for a QDQ target the canonical graph with its passes, written to ``folder/model.onnx``."""
    dep = deploy_of(fq, model)
    target.prepare(dep, options)
    lowered = Lowered(dep, cross)
    if target.consumes == "qdq-onnx":
        lowered.onnx = folder / "model.onnx"
        lowered.report = lower(dep, lowered.onnx, cross, target.graph_passes(options))
    return lowered


def build_target(target: Target, model: DiffusionModel, state: QuantState, calib, tmp: Path, cfg: EvalConfig | None,
                 skip_parity: bool, options, progress: bool = False,
                 parity_seeds: int = parity.TRAJECTORY_SEEDS) -> dict:
    """Deploy module, lowering, compile and parity of one target into ``tmp/<name>``; returns
    its manifest entry."""
    folder = tmp / target.name
    folder.mkdir()
    t0 = time.time()
    options = target.resolved(options)
    fq = state.apply(model, conv_outputs=target.conv_outputs)  # the fake-quant model this target's parity is against
    cross = tuple(calib.cond.shape[1:]) if calib.cond is not None else None
    log.info("%s: deploy module%s", target.name, " and QDQ ONNX" if target.consumes == "qdq-onnx" else "")
    lowered = lowered_for(target, model, fq, cross, options, folder)
    entry = {"dir": target.name, "consumes": target.consumes, "options": options.settings(),
             "cross": list(cross) if cross else None}
    if lowered.report is not None:
        write_json(folder / LOWERING, lowered.report.to_dict())
        entry |= {"opset": OPSET, "lowering": lowered.report.to_dict()}
    log.info("%s: compiling", target.name)
    compiled = target.compile(lowered, folder, options)
    if "engine" in compiled:  # an engine, or why it was not built here
        entry["engine"] = compiled["engine"]
    entry |= {"compile": compiled, "tolerance": target.tolerance.to_dict()}
    if client_folder.why_not(model) is None:
        client = target.client_folder(model, folder)
        if client is not None:
            log.info("%s: %s/ for %s", target.name, client["dir"], client["client"])
            if not client["passed"]:
                raise ExportError(f"{target.name}: the float parts of {client['dir']}/ disagree with torch: "
                                  f"{client['float_parts_rel_l2']} (bound {client['bound']})")
            entry["client_folder"] = client
    if skip_parity:
        entry["parity"] = "skipped"
        entry["files"] = sorted(p.name for p in folder.iterdir())
        return entry
    why = target.runs_here()
    if why:  # built here, runs elsewhere (Core ML off macOS, TensorRT off its GPUs): the target's pre-gate
        name, what = target.pregate
        pre = target.pregate_runner(lowered, folder)
        log.info("%s: parity, %s", target.name, name)
        level = parity.export_level(model, fq, pre, calib, target.tolerance, golden=folder / "golden.npz")
        level["level"], level["what"] = name, what
        traj = parity.trajectory_level(model, fq, pre, cfg.steps, cfg.guidance, target.tolerance, out=folder,
                                       title=f"{target.name} {name}", progress=progress, seeds=parity_seeds)
        # reported, not gating: the runtime's own trajectory gate runs where the runtime does
        # (tfmq-parity --trajectory); rounding-order flips move a short run by up to ~1.5 dB
        traj["what"] = f"level 3 through the same {name} program (reported; the export level gates)"
        traj["gates"] = False
        levels = {name: level, f"{name}_trajectory": traj} | _floor(model, state, traj)
        verdict = parity.Verdict.of(levels, runtime=f"not run: {why}; tfmq-parity where it runs checks it against "
                                                    "golden.npz", gating=tuple(k for k in levels if k != f"{name}_trajectory"))
    else:
        run = target.runner(folder)
        log.info("%s: parity, export and target levels", target.name)
        levels = {"export": parity.export_level(model, fq, run, calib, target.tolerance, golden=folder / "golden.npz")}
        levels["target"] = parity.target_level(run, folder / "golden.npz", target.tolerance,
                                               recorded_host=levels["export"]["golden_host"])
        log.info("%s: parity, trajectory level", target.name)
        levels["trajectory"] = parity.trajectory_level(model, fq, run, cfg.steps, cfg.guidance, target.tolerance,
                                                       out=folder, deployment=target.deployment_runner(folder),
                                                       title=target.name, progress=progress, seeds=parity_seeds)
        levels |= _floor(model, state, levels["trajectory"])
        verdict = parity.Verdict.of(levels)
    write_json(folder / "parity.json", verdict.to_dict())
    log.info("%s: parity %s (%.0f s)", target.name, "PASSED" if verdict.passed else "FAILED", time.time() - t0)
    entry["parity"] = verdict.to_dict()
    entry["files"] = sorted(p.name for p in folder.iterdir())
    return entry


def _floor(model: DiffusionModel, state: QuantState, trajectory: dict) -> dict:
    floor = parity.floor_for(model, state.recipe)
    return {"floor": parity.floor_level(trajectory, *floor)} if floor else {}


def _verify(target: Target, model: DiffusionModel, fq, entry: dict, folder: Path) -> dict:
    """The artifact in ``folder``: its integers and scales against a fresh lowering of its own
    QuantState, with the options it was built with."""
    import tempfile

    options = target.options(entry.get("options"))
    cross = tuple(entry["cross"]) if entry.get("cross") else None
    with tempfile.TemporaryDirectory(prefix="tfmq-verify-") as tmp:
        result = target.verify(lowered_for(target, model, fq, cross, options, Path(tmp)), folder, options)
    return {"level": "integers", **result}


def _levels(entry: dict) -> dict:
    """The parity levels a target's manifest entry records ({} where its parity was skipped)."""
    return entry.get("parity", {}).get("levels", {}) if isinstance(entry.get("parity"), dict) else {}


def _trajectory_seeds(entry: dict) -> int:
    """The seeds of the trajectory gate the export ran (``--parity-seeds``)."""
    seeds = _levels(entry).get("trajectory", {}).get("seeds")
    return seeds if isinstance(seeds, int) and seeds >= 1 else parity.TRAJECTORY_SEEDS


def _golden_host(entry: dict) -> dict | None:
    """The signature of the machine that stored a target's golden outputs (its export level)."""
    levels = _levels(entry)
    return next((lv.get("golden_host") for lv in levels.values() if lv.get("golden_host")), None)


def recheck(folder: Path | str, model: DiffusionModel | str | None = None, trajectory: bool = False) -> dict[str, dict]:
    """Re-run the parity checks of an artifact directory here, without calibrating again:
    {"files": the digest check, target: verdict}. Every target's integers and scales are
    compared with a fresh lowering of its QuantState; a target whose runtime cannot run here
    says ``runtime_checked: False`` and why (``runtime``): its runtime is not checked, never passed."""
    from tfmq.reference import check_reference

    manifest = Manifest.read(folder)
    folder = manifest.folder
    verdicts: dict[str, dict] = {}
    recorded = manifest.data.get("digests")
    changed = changed_files(folder, recorded) if recorded else {}
    verdicts["files"] = {"level": "files", "passed": bool(recorded) and not changed,
                         "files": len(recorded or {}), "changed": changed,
                         **({} if recorded else {"error": "the manifest records no file digests"})}
    loaded = None

    def the_model():
        nonlocal loaded
        if loaded is None:
            spec = model if model is not None else manifest.data["model"]["spec"]
            loaded = load_model(spec, _conditioning_of(manifest)) if isinstance(spec, (str, Path)) else spec
        return loaded

    for name, entry in manifest.targets.items():
        sub = inside(folder, entry.get("dir", name), f"target {name}'s folder")
        if not (sub / "golden.npz").is_file():
            raise TfmqError(f"{sub} has no golden.npz: the artifact is incomplete")
        if name == "fp32":
            verdicts[name] = check_reference(the_model(), sub)
            continue
        try:
            target = get_target(name)
        except TfmqError as e:
            raise TfmqError(f"{folder}: target {name!r} cannot be checked by this release of tfmq") from e
        target.require()
        try:
            verdicts[name] = _recheck_target(target, the_model, folder, manifest.data, entry, sub, trajectory)
        except TfmqError as e:  # a file the runtime or the verification cannot read: this target fails
            verdicts[name] = {"passed": False, "levels": {}, "runtime_checked": False, "error": str(e)}
    return verdicts


def _conditioning_of(manifest: Manifest) -> ConditioningSource:
    """What the artifact's samples were asked for, as ``load_model`` takes it."""
    c = manifest.data["model"].get("conditioning") or {}
    if c.get("kind") == "prompts":
        return ConditioningSource(prompts=list(c["prompts"]))
    if c.get("kind") == "states":
        return ConditioningSource(encoder_states=inside(manifest.folder, STATES_FILE, "the encoder states"))
    return ConditioningSource()


def _recheck_target(target: Target, the_model, folder: Path, manifest: dict, entry: dict, sub: Path,
                    trajectory: bool) -> dict:
    state = QuantState.load(inside(folder, entry.get("quant_state", manifest["quant_state"]["dir"]),
                                   "the QuantState folder"))
    fq = state.apply(the_model(), conv_outputs=target.conv_outputs)
    levels = {"integers": _verify(target, the_model(), fq, entry, sub)}  # wherever it can be read back
    why = target.runs_here()
    if why:  # e.g. Core ML off macOS: the integers are checked, the runtime waits for its machine
        return parity.Verdict.of(levels, runtime=f"not checked here: {why}").to_dict() | {"runtime_checked": False}
    run = target.runner(sub)
    levels["target"] = parity.target_level(run, sub / "golden.npz", target.tolerance,
                                           recorded_host=_golden_host(entry))
    if trajectory:
        sched = manifest["schedule"]
        levels["trajectory"] = parity.trajectory_level(
            the_model(), fq, run, sched["steps"], sched.get("guidance", 1.0), target.tolerance,
            deployment=target.deployment_runner(sub), title=target.name, seeds=_trajectory_seeds(entry))
        levels |= _floor(the_model(), state, levels["trajectory"])
    return parity.Verdict.of(levels).to_dict() | {"runtime_checked": True}
