"""Loading diffusion UNets: bundled names, diffusers folders on disk, and hub ids.

``--model`` takes, everywhere:
- a bundled name (``mnist-ddpm``, ``mnist-cond``), shipped inside the package;
- a diffusers pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``);
- a bare UNet folder (``config.json`` + safetensors), with ``scheduler_config.json`` beside
  it if present, else the standard 1000-step linear-beta DDPM schedule (said in the log);
- a hub id (``org/name``) for users with a network; never needed by the tests.

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
from tfmq.conditioning import ClassTokenEmbedder
from tfmq.errors import ModelLoadError, UnsupportedModel

log = logging.getLogger("tfmq")

ASSETS = Path(__file__).parent / "assets"
BUNDLED = {"mnist-ddpm": ASSETS / "models" / "mnist-ddpm", "mnist-cond": ASSETS / "models" / "mnist-cond"}
SUPPORTED_UNETS = ("UNet2DModel", "UNet2DConditionModel")
# The schedule every model in this project is trained with, and the fallback for a bare
# UNet folder that carries no scheduler config.
DEFAULT_SCHEDULE = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                    "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class DiffusionModel:
    """A loaded UNet with the schedule it was trained on and, for class-conditional models,
    the encoder that turns labels into ``encoder_hidden_states``."""

    name: str
    source: str
    unet: torch.nn.Module
    scheduler_config: dict
    scheduler_source: str
    class_embedder: ClassTokenEmbedder | None = None
    info: dict = field(default_factory=dict)
    spec: str = ""  # what ``load_model`` was given (a bundled name, a folder, a hub id): how to load it again

    @property
    def conditional(self) -> bool:
        return type(self.unet).__name__ == "UNet2DConditionModel"

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    def ddim_scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config)

    def schedule(self, steps: int) -> torch.Tensor:
        """The DDIM timesteps of a ``steps``-step deployment schedule, in sampling order."""
        sched = self.ddim_scheduler()
        sched.set_timesteps(steps)
        return sched.timesteps.long().clone()


def load_model(spec: str | Path) -> DiffusionModel:
    """Load ``spec`` (bundled name, folder path or hub id); raise ModelLoadError with one clear line."""
    spec = str(spec)
    if spec in BUNDLED:
        folder = BUNDLED[spec]
        if not (folder / "unet" / "config.json").is_file():
            raise ModelLoadError(f"bundled model {spec!r} is missing from the installed package ({folder})")
        return _load_folder(folder, name=spec, source=f"bundled:{spec}", spec=spec)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{spec}: expected a diffusers folder, got a file")
        return _load_folder(path, name=path.name, spec=spec)
    if _HUB_ID.match(spec) and not spec.startswith("."):
        return _load_folder(_download(spec), name=spec, source=f"hub:{spec}", spec=spec)
    raise ModelLoadError(f"no such model: {spec!r} is neither a bundled model ({', '.join(BUNDLED)}) nor an existing folder")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["model_index.json", "config.json", "scheduler_config.json", "*.safetensors",
                "*.safetensors.index.json", "unet/config.json", "unet/*.safetensors",
                "unet/*.safetensors.index.json", "scheduler/scheduler_config.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ModelLoadError(f"{repo_id!r} is not a local folder, and fetching it from the hub failed: {e}") from e


def _read_json(path: Path) -> dict:
    return read_json_object(path, ModelLoadError)


def _load_folder(folder: Path, name: str, source: str | None = None, spec: str = "") -> DiffusionModel:
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
        log.info("%s has no scheduler config; using the standard 1000-step linear-beta DDPM schedule", folder)
    embedder = _load_embedder(folder / "class_embedder") if (folder / "class_embedder").is_dir() else None
    if embedder is not None and unet.config.cross_attention_dim != embedder.dim:
        raise ModelLoadError(f"{folder}: class_embedder width {embedder.dim} does not match the UNet's "
                             f"cross_attention_dim {unet.config.cross_attention_dim}")
    info = _read_json(folder / "training.json") if (folder / "training.json").is_file() else {}
    return DiffusionModel(name=name, source=source or str(folder), unet=unet, scheduler_config=sched,
                          scheduler_source=sched_source, class_embedder=embedder, info=info, spec=spec)


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
        raise ModelLoadError(f"cannot read the UNet weights in {unet_dir}: {_first_line(e)}") from e
    except (RuntimeError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{unet_dir}: weights do not fit the config: {_first_line(e)}") from e
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
        raise ModelLoadError(f"cannot read the class embedder weights in {folder}: {_first_line(e)}") from e
    return emb.eval().requires_grad_(False)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
