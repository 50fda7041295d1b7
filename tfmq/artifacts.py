"""Artifact directories: written atomically, described by manifest.json.

An export writes into a temporary sibling directory and renames it into place only when
everything succeeded, so an interrupted or failed write never leaves a directory that looks
complete. An existing directory is refused unless the caller asked to overwrite it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tfmq.errors import ParityError, TfmqError

MANIFEST = "manifest.json"
log = logging.getLogger("tfmq")


class ArtifactError(TfmqError):
    """An artifact directory that cannot be written or read."""


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False, marker: str = MANIFEST):
    """Yield a temporary directory that becomes ``out`` when the block finishes without error.

    ``out`` must not exist, or (with ``overwrite``) be empty or an earlier output of ours (it
    holds ``marker``): a folder of anyone's other files is never replaced. One run at a time
    writes ``out`` (a lock file beside it), and a temporary folder a killed run left beside
    ``out`` is removed. The result is readable by other users as the umask allows."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ArtifactError(f"{out} exists and is not a directory")
        if not overwrite:
            raise ArtifactError(f"{out} exists; pass --overwrite to replace it")
        here = Path.cwd().resolve()
        if out.resolve() in (here, *here.parents):
            raise ArtifactError(f"{out} is the current directory or holds it: choose another output folder")
        if any(out.iterdir()) and not (out / marker).is_file():
            raise ArtifactError(f"{out} holds files but no {marker}: it is not a tfmq output, so --overwrite "
                                "will not replace it; choose another output folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create the folder of {out}: {e}") from e
    with _lock(out):
        _remove_stale(out)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
        except OSError as e:
            raise ArtifactError(f"cannot create the output directory next to {out}: {e}") from e
        try:
            yield tmp
            readable(tmp)
            if out.exists():
                old = out.with_name(f".{out.name}.{os.getpid()}.old")
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def _lock(out: Path):
    """``.<name>.lock`` beside ``out``, holding this process's id, for the whole write."""
    lock = out.with_name(f".{out.name}.lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise ArtifactError(f"another tfmq run (process {pid}) is writing {out}; wait for it, or remove "
                                    f"{lock} if it is gone") from None
            lock.unlink(missing_ok=True)  # left by a run that was killed
            continue
        except OSError as e:
            raise ArtifactError(f"cannot lock {out} ({lock}): {e}") from e
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    else:
        raise ArtifactError(f"cannot lock {out}: {lock} keeps coming back")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _remove_stale(out: Path) -> None:
    """The temporary folders beside ``out`` that a killed run left (their process is gone)."""
    for p in out.parent.glob(f".{out.name}.*.partial"):
        pid = p.name[len(out.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed %s, left by a run that was killed", p)


def readable(folder: Path) -> None:
    """Folders and files readable by others as the umask allows (mkdtemp makes 0700, some
    writers 0600); executables keep their x bits."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [Path(folder), *Path(folder).rglob("*")]:
        if p.is_symlink():
            continue
        if p.is_dir() or p.stat().st_mode & 0o100:
            p.chmod(0o777 & ~mask)
        else:
            p.chmod(0o666 & ~mask)


def digests(folder: Path, skip: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """sha256 of every file under ``folder`` by its path relative to it (``skip`` left out)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in skip:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(block)
            out[rel] = h.hexdigest()
    return out


def changed_files(folder: Path, recorded: dict[str, str]) -> dict[str, str]:
    """{file: "changed" | "missing"} of the files ``recorded`` that are not as they were."""
    now = digests(folder)
    return {f: "missing" if f not in now else "changed" for f, d in recorded.items() if now.get(f) != d}


def inside(folder: Path, name: str, what: str) -> Path:
    """``folder / name`` for a name read from a file: refused unless it is a relative path
    that stays inside ``folder``."""
    path = Path(name)
    if not name or path.is_absolute() or ".." in path.parts or not (Path(folder) / path).resolve().is_relative_to(
            Path(folder).resolve()):
        raise ArtifactError(f"{what} {name!r} leaves {folder}: refused")
    return Path(folder) / path


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
    if not isinstance(data, dict) or not isinstance(data.get("targets"), dict) or not data["targets"]:
        raise ArtifactError(f"{path} is not a tfmq manifest (no targets)")
    for name, entry in data["targets"].items():
        if not isinstance(entry, dict):
            raise ArtifactError(f"{path}: target {name!r} is not described by an object")
    return data


def save_tensors_and_meta(folder: Path, tensors: dict, meta: dict, tensors_name: str, meta_name: str,
                          metadata: dict | None = None) -> None:
    """Write a safetensors file and its JSON description, each atomically (temp file, then rename)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (tensors_name + ".tmp")
        # one metadata key: safetensors writes several in a random order (then equal states differ in bytes)
        header = None if metadata is None else {"tfmq": json.dumps(metadata, sort_keys=True)}
        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(tmp), metadata=header)
        os.replace(tmp, folder / tensors_name)
        tmp = folder / (meta_name + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, folder / meta_name)
    except (OSError, SafetensorError) as e:  # a full disk reaches safetensors' writer as SafetensorError
        raise ArtifactError(f"cannot write {folder}: {e}") from e


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
