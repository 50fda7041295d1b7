"""The interface every deployment target implements.

A target lives in its own folder (``targets/<folder>/``) and exposes ``TARGET``, an instance
of a ``Target`` subclass; ``tfmq.targets.registry`` finds it there, so adding a target
touches nothing outside its folder, its tests, its extra and its Dockerfile.

A target says what it consumes (the canonical QDQ ONNX graph, or the torch deploy module),
what it needs from a recipe (``requires``: refused when unmet; ``prefers``: what the presets
are adapted to beyond that), its options (a frozen dataclass whose fields the CLI turns into
flags), its own changes to what the exporter emits (``prepare`` on the deploy module,
``graph_passes`` on the canonical graph), how it compiles and runs its files, its parity
tolerances, and how it words its verdict. Runtime SDKs are imported inside the methods
that need them, so importing a target is light.
"""
from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tfmq.calibration.recipe import Recipe
from tfmq.calibration.requirements import Requirements, unmet
from tfmq.errors import RecipeError, TargetUnavailable, TfmqError
from tfmq.exporter.deploy import DeployUNet
from tfmq.exporter.qdq_onnx import GraphPass, LoweringReport, initializer_differences
from tfmq.hostcpu import int8_dot_saturates
from tfmq.runner import Runner, Tolerance

LOWERING = "lowering.json"  # the lowering report beside a target's model.onnx
SATURATION_NOTE = ("this CPU has no VNNI: its u8 x s8 integer dot products add pairs in int16 with saturation "
                   "(tfmq/hostcpu.py), so CPU INT8 runtimes lose precision here that a VNNI CPU does not "
                   "(docs/targets/openvino.md, troubleshooting)")


class TargetOptions:
    """Mixin for a target's frozen options dataclass. Each field's ``metadata`` may carry
    ``help`` and ``choices`` (the CLI's flag text and how ``--target all`` routes a value);
    ``of`` builds the options from a dict (None values dropped, unknown keys refused)."""

    label = "target"

    @classmethod
    def of(cls, options: dict | None):
        o = {k: v for k, v in (options or {}).items() if v is not None}
        unknown = set(o) - {f.name for f in fields(cls)}
        if unknown:
            raise TfmqError(f"unknown {cls.label} options: {sorted(unknown)}")
        return cls(**o)

    @classmethod
    def accepts(cls, name: str, value) -> bool:
        """Whether the field ``name`` exists and takes ``value`` (by its declared choices)."""
        f = next((f for f in fields(cls) if f.name == name), None)
        if f is None:
            return False
        choices = f.metadata.get("choices")
        return choices is None or str(value).lower() in {str(c).lower() for c in choices}

    def settings(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NoOptions(TargetOptions):
    pass


@dataclass
class Lowered:
    """What the exporter hands a target: the deploy module (after the target's ``prepare``),
    the cross-attention input shape, and for a QDQ target its graph and lowering report."""

    dep: DeployUNet
    cross: tuple[int, int] | None
    onnx: Path | None = None
    report: LoweringReport | None = None


class Target(ABC):
    name: str
    consumes: str  # "qdq-onnx" or "deploy-module"
    description: str = ""  # one line for the CLI's help
    package: str | None = None  # the Python module the runtime needs
    install_hint: str = ""
    Options: type[TargetOptions] = NoOptions
    requires: Requirements = Requirements()
    prefers: Requirements = Requirements()
    tolerance: Tolerance
    cpu_int8 = False  # runs u8 x s8 integer kernels on this CPU (then the host's saturation matters)
    # a target whose artifacts may be built where they cannot run names its pre-gate level
    # (name, what it runs) and gives its runner with ``pregate_runner(lowered, out_dir)``
    pregate: tuple[str, str] | None = None

    @property
    def needs(self) -> Requirements:
        """What presets are adapted to for this target."""
        return self.requires | self.prefers

    @property
    def conv_outputs(self) -> bool:
        """Its model runs the state's conv output quantizers (else a state's convs write float)."""
        return self.needs.conv_outputs

    def options(self, options: dict | None = None) -> TargetOptions:
        return self.Options.of(options)

    def unavailable(self) -> str | None:
        """Why this target cannot be built here (None when it can)."""
        if self.package and importlib.util.find_spec(self.package) is None:
            return f"{self.package} is not installed ({self.install_hint})"
        return None

    def runs_here(self) -> str | None:
        """Why this target's artifacts cannot be *run* here, though they can be built (None: they can)."""
        return self.unavailable()

    def require(self) -> None:
        why = self.unavailable()
        if why:
            raise TargetUnavailable(f"target {self.name!r}: {why}")

    def check(self, recipe: Recipe, options: TargetOptions) -> None:
        """Refuse a recipe (or options) this target cannot deploy, before calibration starts."""
        missing = unmet(recipe, self.requires)
        if missing:
            raise RecipeError(f"recipe {recipe.name!r} cannot run on the {self.name} target ({self.requires.why}): "
                              f"set {', '.join(missing.values())}; the presets get this variant automatically")

    def resolved(self, options: TargetOptions) -> TargetOptions:
        """``options`` with every default that depends on the machine made explicit (recorded in
        the manifest, so the artifact can be rebuilt and re-verified elsewhere)."""
        return options

    def client_folder(self, model, out_dir: Path) -> dict | None:
        """Where this target has one: write ``out_dir/pipeline``, the folder a stock client
        pipeline loads (``exporter/client_folder.py``), and return its report (which client, the
        float parts checked against torch: "passed"). None: this target has none."""
        return None

    def verify(self, lowered: Lowered, out_dir: Path, options: TargetOptions) -> dict:
        """The artifact in ``out_dir`` holds exactly the integers and scales of ``lowered``, a
        fresh lowering of its QuantState: {"passed", "checked", "differs"}. The QDQ targets'
        ``model.onnx`` is compared initializer by initializer (by value)."""
        differs = initializer_differences(out_dir / "model.onnx", lowered.onnx)
        return {"passed": not differs, "checked": "model.onnx initializers", "differs": differs[:10]}

    def prepare(self, dep: DeployUNet, options: TargetOptions) -> None:  # noqa: B027 - most change nothing
        """This target's changes to the deploy module, in place, before it is lowered."""

    def graph_passes(self, options: TargetOptions) -> list[GraphPass]:
        """This target's rewrites of the canonical QDQ graph, run by the lowering in order."""
        return []

    @abstractmethod
    def compile(self, lowered: Lowered, out_dir: Path, options: TargetOptions) -> dict:
        """Build the target's files in ``out_dir``; returns the compile report."""

    @abstractmethod
    def runner(self, out_dir: Path, options: dict | None = None) -> Runner:
        """A callable running the compiled artifact (``options``: overrides of its settings)."""

    def deployment_runner(self, out_dir: Path) -> tuple[str, Runner] | None:
        """Where the parity runner uses other settings than the artifact deploys with: what
        differs, and a runner with the deployment's settings (reported, not gated)."""
        return None

    def pregate_runner(self, lowered: Lowered, out_dir: Path) -> Runner:
        raise NotImplementedError(f"the {self.name} target has no pre-gate")

    def summary(self, entry: dict) -> dict:
        """The row of the human summary for this target's manifest entry: built (what),
        executed (where, or why not), verdict, numbers."""
        verdict = entry.get("parity")
        row = {"target": self.name, "built": self.built(entry)}
        if verdict == "skipped":
            return row | {"executed": "no (--skip-parity)", "verdict": "not checked", "numbers": ""}
        levels = verdict["levels"]
        pre = self.pregate[0] if self.pregate else None
        if pre and pre in levels:
            tr = levels[f"{pre}_trajectory"]
            return row | {"executed": "pre-gate only", "verdict": f"pre-gate {'PASSED' if verdict['passed'] else 'FAILED'}",
                          "numbers": _psnr(tr), "note": f"{verdict.get('runtime', 'runtime not run')}; the pre-gate "
                                                        f"ran {self.pregate[1]}"}
        tr = levels["trajectory"]
        failed = [k for k, v in levels.items() if not v["passed"]]
        numbers = _psnr(tr)
        if not tr.get("within_margin", True):
            numbers += f"; below the margin, {'passed on' if tr['passed'] else 'below'} the floor"
        notes = []
        if "deployment" in tr:
            d = tr["deployment"]
            notes.append(f"as deployed ({d['settings']}): image PSNR vs FP32 {d['psnr_vs_fp32_db']:.1f} dB, "
                         f"vs fake-quant {d['psnr_vs_fake_quant_db']:.1f} dB (reported, not gated)")
        if failed and self.cpu_int8 and int8_dot_saturates():
            notes.append(SATURATION_NOTE)
        return row | {"executed": "here", "verdict": "PASSED" if verdict["passed"] else
                      f"FAILED ({', '.join(failed)})", "numbers": numbers} | (
                          {"note": "; ".join(notes)} if notes else {})


    def built(self, entry: dict) -> str:
        """The summary's 'built' cell: the artifact's main file."""
        files = entry.get("compile", {}).get("files") or entry.get("files", [])
        main = [f for f in files if f.startswith("model.")]
        return f"{entry['dir']}/{main[0] if main else ''}"


def _psnr(tr: dict) -> str:
    return (f"image PSNR vs FP32 {tr['psnr_artifact_vs_fp32_db']:.1f} dB "
            f"(fake-quant {tr['psnr_fake_quant_vs_fp32_db']:.1f} dB)")
