"""The registered targets: every folder under ``targets/`` whose package exposes ``TARGET``.

Nothing here names a target: a new folder with a ``TARGET`` is registered by being there.
The CLI derives its target list, option flags and choices from what this returns.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil

from tfmq.errors import TfmqError
from tfmq.targets.base import Target


@functools.cache
def targets() -> dict[str, Target]:
    """name -> target, in the order of their folders."""
    import tfmq.targets as pkg

    found: dict[str, Target] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not info.ispkg:
            continue
        target = getattr(importlib.import_module(f"{pkg.__name__}.{info.name}"), "TARGET", None)
        if isinstance(target, Target):
            if target.name in found:
                raise TfmqError(f"two targets are named {target.name!r} (targets/{info.name})")
            found[target.name] = target
    return found


def get_target(name: str) -> Target:
    known = targets()
    if name not in known:
        raise TfmqError(f"unknown target {name!r}: one of {', '.join(known)}")
    return known[name]
