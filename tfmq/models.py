"""Loading diffusion UNets: bundled names, diffusers folders on disk, and hub ids.

``--model`` takes, everywhere:
- a bundled name (``mnist-ddpm``, ``mnist-cond``), shipped inside the package;
- a diffusers pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``; a text-to-image
  pipeline's ``tokenizer/`` and ``text_encoder/`` encode its prompts, its ``vae/`` decodes);
- a bare UNet folder (``config.json`` + safetensors), with ``scheduler_config.json`` beside
  it if present, else the standard 1000-step linear-beta DDPM schedule (said in the log);
- a hub id (``org/name``) for users with a network; never needed by the tests.

A conditional UNet needs something to condition on (``tfmq.conditioning``): the bundled
class embedder, the pipeline's text encoder on prompts, or encoder states given as a file;
without one it is refused in one line saying what to pass.

Weights are read from safetensors only; pickle checkpoints (``.bin``) are refused.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tfmq.artifacts import read_json_object
from tfmq.conditioning import CONFIG_NAME as EMBEDDER_CONFIG
from tfmq.conditioning import WEIGHTS_NAME as EMBEDDER_WEIGHTS
from tfmq.conditioning import ClassLabels, ClassTokenEmbedder, Conditioning, Prompts, load_states, read_prompts
from tfmq.errors import ModelLoadError, UnsupportedModel, first_line

log = logging.getLogger("tfmq")

ASSETS = Path(__file__).parent / "assets"
BUNDLED = {"mnist-ddpm": ASSETS / "models" / "mnist-ddpm", "mnist-cond": ASSETS / "models" / "mnist-cond"}
SUPPORTED_UNETS = ("UNet2DModel", "UNet2DConditionModel")
# The schedule every model in this project is trained with, and the fallback for a bare
# UNet folder that carries no scheduler config.
DEFAULT_SCHEDULE = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                    "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def ddim_scheduler(config: dict):
    """diffusers' DDIMScheduler from a model's scheduler config, clipping as ``DiffusionModel.ddim_scheduler`` says."""
    from diffusers import DDIMScheduler

    cfg = dict(config)
    if "clip_sample" not in cfg:
        cfg["clip_sample"] = cfg.get("_class_name", "DDPMScheduler") in ("DDPMScheduler", "DDIMScheduler")
    return DDIMScheduler.from_config(cfg)


@dataclass
class DiffusionModel:
    """A loaded UNet with the schedule it was trained on, for conditional models what its
    samples are asked for (``conditioning``), and a pipeline's VAE where it has one."""

    name: str
    source: str
    unet: torch.nn.Module
    scheduler_config: dict
    scheduler_source: str
    conditioning: Conditioning | None = None
    info: dict = field(default_factory=dict)
    spec: str = ""  # what ``load_model`` was given (a bundled name, a folder, a hub id): how to load it again
    vae: torch.nn.Module | None = None
    folder: Path | None = None  # the folder it was loaded from (a pipeline's holds its tokenizer, text encoder...)

    @property
    def conditional(self) -> bool:
        return type(self.unet).__name__ == "UNet2DConditionModel"

    @property
    def bundled(self) -> bool:
        """One of the project's own digit models: the MNIST classifier's metrics apply to it."""
        return self.source.startswith("bundled:")

    @property
    def default_guidance(self) -> float:
        return self.conditioning.default_guidance if self.conditioning is not None else 1.0

    @property
    def cross_attention_dim(self) -> int | None:
        return self.unet.config.cross_attention_dim if self.conditional else None

    @property
    def sampler_batch(self) -> int:
        """Seeds per sampler batch (``ddim_sample``'s default): 250, or fewer where the largest
        self-attention map (8 heads of tokens x tokens at the first resolution with attention,
        float32, both guidance branches) would pass 2 GiB per batch. 250 for the bundled
        models; 2 for SD-1.5 at 64x64 latents (one such map alone is 1 GiB per seed there)."""
        cfg = self.unet.config
        blocks = list(getattr(cfg, "down_block_types", ()))
        first = next((i for i, b in enumerate(blocks) if "Attn" in b), max(len(blocks) - 1, 0))
        side = self.sample_shape[1] // 2 ** first
        per_seed = (2 if self.conditional else 1) * 8 * side ** 4 * 4
        return max(1, min(250, (2 << 30) // per_seed))

    @property
    def train_timesteps(self) -> int:
        """T, the number of training timesteps: every timestep of any schedule is in [0, T)."""
        return int(self.scheduler_config["num_train_timesteps"])

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    def ddim_scheduler(self):
        """DDIM on the training schedule. x0 is clipped to [-1, 1] only where the model's own
        scheduler says so, or, unstated, where that scheduler clips by default (DDPM, DDIM: pixel
        models); a PNDM config (Stable Diffusion's) has no such key, and clipping latents to
        [-1, 1] would change every step."""
        return ddim_scheduler(self.scheduler_config)

    def schedule(self, steps: int) -> torch.Tensor:
        """The DDIM timesteps of a ``steps``-step deployment schedule, in sampling order."""
        sched = self.ddim_scheduler()
        sched.set_timesteps(steps)
        return sched.timesteps.long().clone()


@dataclass(frozen=True)
class ConditioningSource:
    """What a conditional model's samples are asked for, where the folder alone does not say:
    ``prompts`` (a file, or the prompts themselves) for a text-to-image pipeline, or
    ``encoder_states`` (a safetensors file) for a bare ``UNet2DConditionModel``; ``guidance``, where
    given, is checked against what the source can give."""

    prompts: Path | str | list[str] | None = None
    encoder_states: Path | str | None = None
    guidance: float | None = None

    @property
    def given(self) -> bool:
        return self.prompts is not None or self.encoder_states is not None


def load_model(spec: str | Path, conditioning: ConditioningSource = ConditioningSource()) -> DiffusionModel:
    """Load ``spec`` (bundled name, folder path or hub id); raise ModelLoadError with one clear line."""
    spec = str(spec)
    if spec in BUNDLED:
        folder = BUNDLED[spec]
        if not (folder / "unet" / "config.json").is_file():
            raise ModelLoadError(f"bundled model {spec!r} is missing from the installed package ({folder})")
        return _load_folder(folder, spec, conditioning, name=spec, source=f"bundled:{spec}")
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{spec}: expected a diffusers folder, got a file")
        return _load_folder(path, spec, conditioning, name=path.name)
    if _HUB_ID.match(spec) and not spec.startswith("."):
        return _load_folder(_download(spec), spec, conditioning, name=spec, source=f"hub:{spec}")
    raise ModelLoadError(f"no such model: {spec!r} is neither a bundled model ({', '.join(BUNDLED)}) nor an existing folder")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["model_index.json", "config.json", "scheduler_config.json", "*.safetensors",
                "*.safetensors.index.json", "scheduler/scheduler_config.json"]
    patterns += [f"{part}/{f}" for part in ("unet", "vae", "text_encoder")
                 for f in ("config.json", "*.safetensors", "*.safetensors.index.json")]
    patterns += ["tokenizer/*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ModelLoadError(f"{repo_id!r} is not a local folder, and fetching it from the hub failed: {e}") from e


def _read_json(path: Path) -> dict:
    return read_json_object(path, ModelLoadError)


def _load_folder(folder: Path, spec: str, given: ConditioningSource, name: str,
                 source: str | None = None) -> DiffusionModel:
    if (folder / "unet" / "config.json").is_file():
        unet_dir, sched_file = folder / "unet", folder / "scheduler" / "scheduler_config.json"
    elif (folder / "config.json").is_file():
        unet_dir, sched_file = folder, folder / "scheduler_config.json"
    else:
        raise ModelLoadError(f"{folder}: no UNet config found (expected unet/config.json or config.json)")
    unet = _load_unet(unet_dir)
    if sched_file.is_file():
        sched, sched_source = _read_json(sched_file), str(sched_file.relative_to(folder))
        if "num_train_timesteps" not in sched:
            raise ModelLoadError(f"{sched_file}: not a diffusers scheduler config (no num_train_timesteps)")
    else:
        sched, sched_source = dict(DEFAULT_SCHEDULE), "default"
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    conditioning = _conditioning(folder, index, unet, given)  # refused before anything is said
    if sched_source == "default":
        log.info("%s has no scheduler config; using the standard 1000-step linear-beta DDPM schedule", folder)
    vae = _load_vae(folder / "vae") if index.get("vae") and index["vae"][0] is not None else None
    info = _read_json(folder / "training.json") if (folder / "training.json").is_file() else {}
    return DiffusionModel(name=name, source=source or str(folder), unet=unet, scheduler_config=sched,
                          scheduler_source=sched_source, conditioning=conditioning, info=info, spec=spec, vae=vae,
                          folder=folder)


def _conditioning(folder: Path, index: dict, unet, given: ConditioningSource) -> Conditioning | None:
    conditional = type(unet).__name__ == "UNet2DConditionModel"
    if not conditional:
        if given.given:
            raise ModelLoadError(f"{folder}: an unconditional UNet takes neither prompts nor encoder states")
        return None
    width = unet.config.cross_attention_dim
    if (folder / "class_embedder").is_dir():
        if given.given:
            raise ModelLoadError(f"{folder}: a class-conditional model is asked for its labels, not for prompts "
                                 "or encoder states")
        embedder = _load_embedder(folder / "class_embedder")
        if embedder.dim != width:
            raise ModelLoadError(f"{folder}: class_embedder width {embedder.dim} does not match the UNet's "
                                 f"cross_attention_dim {width}")
        return ClassLabels(embedder)
    if given.prompts is not None and given.encoder_states is not None:
        raise ModelLoadError("give prompts or encoder states, not both")
    if given.encoder_states is not None:
        cond = load_states(given.encoder_states)
    elif index.get("text_encoder") or index.get("tokenizer"):
        from tfmq.text import load_prompt_encoder

        encode = load_prompt_encoder(folder, index)
        prompts = given.prompts if isinstance(given.prompts, list) else read_prompts(given.prompts)
        cond = Prompts(encode, prompts)
    elif given.prompts is not None:
        raise ModelLoadError(f"{folder}: prompts need a pipeline folder with its tokenizer and text encoder; "
                             "this UNet has none beside it (pass --encoder-hidden-states FILE.safetensors)")
    else:
        raise ModelLoadError(f"{folder}: a text-conditional UNet with no text encoder beside it: pass "
                             "--encoder-hidden-states FILE.safetensors (encoder_hidden_states [P, L, "
                             f"{width}]) or the pipeline folder")
    cond.check_width(width, str(folder))
    cond.check_guidance(cond.default_guidance if given.guidance is None else given.guidance)
    return cond


def _load_vae(vae_dir: Path) -> torch.nn.Module:
    import diffusers

    config = _read_json(vae_dir / "config.json")
    if config.get("_class_name") != "AutoencoderKL":
        raise ModelLoadError(f"{vae_dir} holds a {config.get('_class_name')}; tfmq decodes with AutoencoderKL")
    if not any(vae_dir.glob("*.safetensors")):
        raise ModelLoadError(f"{vae_dir}: no safetensors weights (tfmq loads safetensors only)")
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True, local_files_only=True,
                                                      low_cpu_mem_usage=False)
    except (OSError, RuntimeError, ValueError, TypeError) as e:
        raise ModelLoadError(f"cannot load the VAE in {vae_dir}: {first_line(e)}") from e
    return vae.eval().requires_grad_(False)


def _load_unet(unet_dir: Path) -> torch.nn.Module:
    import diffusers

    config = _read_json(unet_dir / "config.json")
    cls_name = config.get("_class_name")
    if cls_name is None:
        raise ModelLoadError(f"{unet_dir / 'config.json'} has no _class_name: not a diffusers model config")
    if cls_name not in SUPPORTED_UNETS:
        raise UnsupportedModel(f"{unet_dir} holds a {cls_name}; tfmq quantizes {' and '.join(SUPPORTED_UNETS)}")
    if not any(unet_dir.glob("*.safetensors")):
        if any(unet_dir.glob("*.bin")) or any(unet_dir.glob("*.pt")) or any(unet_dir.glob("*.ckpt")):
            raise ModelLoadError(f"{unet_dir} holds only pickle weights (.bin/.pt/.ckpt); tfmq loads safetensors "
                                 "only: convert them with diffusers' save_pretrained(safe_serialization=True)")
        raise ModelLoadError(f"{unet_dir}: no safetensors weights found beside config.json")
    cls = getattr(diffusers, cls_name)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        unet, info = cls.from_pretrained(unet_dir, use_safetensors=True, local_files_only=True,
                                         low_cpu_mem_usage=False, output_loading_info=True)
    except OSError as e:
        raise ModelLoadError(f"cannot read the UNet weights in {unet_dir}: {first_line(e)}") from e
    except (RuntimeError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{unet_dir}: weights do not fit the config: {first_line(e)}") from e
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    missing = info.get("missing_keys") or []
    if missing:
        raise ModelLoadError(f"{unet_dir}: the weights lack {len(missing)} tensors the config needs "
                             f"(first: {sorted(missing)[0]})")
    unused = info.get("unexpected_keys") or []
    if unused:
        raise ModelLoadError(f"{unet_dir}: the weights hold {len(unused)} tensors the config does not use "
                             f"(first: {sorted(unused)[0]}): a checkpoint of another model?")
    for name, t in unet.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelLoadError(f"{unet_dir}: weight {name} holds NaN or inf")
    return unet.eval().requires_grad_(False)


def _load_embedder(folder: Path) -> ClassTokenEmbedder:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = _read_json(folder / EMBEDDER_CONFIG)
    try:
        emb = ClassTokenEmbedder(int(cfg["num_classes"]), int(cfg["tokens"]), int(cfg["dim"]))
        emb.load_state_dict(load_file(str(folder / EMBEDDER_WEIGHTS)))
    except (KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{folder}: malformed class embedder config: {e}") from e
    except (OSError, SafetensorError, RuntimeError) as e:
        raise ModelLoadError(f"cannot read the class embedder weights in {folder}: {first_line(e)}") from e
    return emb.eval().requires_grad_(False)


def fingerprint(unet: torch.nn.Module) -> str:
    """A stable identity of a UNet's weights and config (sha256, 16 hex digits): a calibration
    set or QuantState made for another model is refused by comparing these."""
    import hashlib

    h = hashlib.sha256(type(unet).__name__.encode())
    h.update(json.dumps(dict(unet.config), sort_keys=True, default=str).encode())
    for name, t in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
