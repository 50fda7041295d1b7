"""Artifact directories: written atomically, described by manifest.json.

An export writes into a temporary sibling directory and renames it into place only when
everything succeeded, so an interrupted or failed write never leaves a directory that looks
complete. An existing directory is refused unless the caller asked to overwrite it.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tfmq.errors import ParityError, TfmqError

MANIFEST = "manifest.json"


class ArtifactError(TfmqError):
    """An artifact directory that cannot be written or read."""


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False):
    """Yield a temporary directory that becomes ``out`` when the block finishes without error."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as e:
        raise ArtifactError(f"cannot create the output directory next to {out}: {e}") from e
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"writing {out} failed: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class Manifest:
    """An artifact directory and its manifest.json."""

    folder: Path
    data: dict

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        return cls(Path(folder), read_manifest(folder))

    @property
    def targets(self) -> dict[str, dict]:
        return self.data["targets"]

    def verdicts(self) -> dict[str, dict | str]:
        """Each built target's parity verdict ("skipped" where the gates were not run)."""
        return {t: e["parity"] for t, e in self.targets.items() if "parity" in e}

    @property
    def failed(self) -> list[str]:
        return [t for t, v in self.verdicts().items() if isinstance(v, dict) and not v["passed"]]

    @property
    def passed(self) -> bool:
        return not self.failed

    def require_passed(self) -> None:
        """Raise ParityError naming every failed target and gate (the artifacts stay)."""
        if self.failed:
            what = [f"{t} ({', '.join(k for k, v in self.verdicts()[t]['levels'].items() if not v['passed'])})"
                    for t in self.failed]
            raise ParityError(f"parity failed for {'; '.join(what)}; the artifacts are kept in {self.folder} "
                              "for inspection")


def versions() -> dict:
    import diffusers
    import numpy
    import torch

    from tfmq.version import __version__

    return {"tfmq": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "numpy": numpy.__version__}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json_object(path: Path, error: type[TfmqError], what: str = "") -> dict:
    """The JSON object in ``path``; a missing, unreadable or non-object file is one ``error`` line."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"cannot read {what + ' ' if what else ''}{path}: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path} holds no JSON object")
    return data


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise ArtifactError(f"{folder}: no such artifact directory")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{folder} has no {MANIFEST}: not a tfmq artifact directory") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict) or "targets" not in data:
        raise ArtifactError(f"{path} is not a tfmq manifest")
    return data


def save_tensors_and_meta(folder: Path, tensors: dict, meta: dict, tensors_name: str, meta_name: str,
                          metadata: dict | None = None) -> None:
    """Write a safetensors file and its JSON description, each atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (tensors_name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, folder / tensors_name)
    tmp = folder / (meta_name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder / meta_name)


def load_tensors_and_meta(folder: Path, tensors_name: str, meta_name: str, error: type[TfmqError], what: str,
                          version: int) -> tuple[dict, dict]:
    """Read what save_tensors_and_meta wrote (no pickle); any problem is one ``error`` line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / meta_name).read_text())
        tensors = load_file(str(folder / tensors_name))
    except FileNotFoundError as e:
        raise error(f"{folder}: not a {what} ({Path(e.filename).name} missing)") from e
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise error(f"cannot read {what} {folder}: {e}") from e
    if not isinstance(meta, dict) or meta.get("version") != version:
        raise error(f"{folder}: {what} version {meta.get('version') if isinstance(meta, dict) else None!r}, "
                    f"expected {version}")
    return meta, tensors
