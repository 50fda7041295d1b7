"""Target option flags, derived from the registered targets' options dataclasses.

Each field of a target's options is a flag ``--field-name``; fields of the same name in
several targets share one flag. With ``--target all`` a value goes to every target that has
the option and takes that value (by the field's declared choices: ``--device CPU`` is
OpenVINO's, ``--device orin-nano`` TensorRT's); a value no target takes goes to every target
that has the option, whose own check then says why it is refused.
"""
from __future__ import annotations

import argparse
from dataclasses import fields

from tfmq.errors import TfmqError


def _yes_no(text: str) -> bool:
    if text.lower() in ("yes", "true", "1"):
        return True
    if text.lower() in ("no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: yes or no")


def _owners() -> dict[str, list]:
    """option name -> [(target, field)] over the registered targets."""
    from tfmq.targets.registry import targets

    owners: dict[str, list] = {}
    for t in targets().values():
        for f in fields(t.Options):
            owners.setdefault(f.name, []).append((t, f))
    return owners


def add_target_options(ap: argparse.ArgumentParser) -> None:
    group = ap.add_argument_group("target options (each names the targets it belongs to)")
    for name, owners in _owners().items():
        kind = str(owners[0][1].type)
        text = "; ".join(f.metadata.get("help", f"{t.name}: {name}") for t, f in owners)
        flag = f"--{name.replace('_', '-')}"
        if "bool" in kind:
            group.add_argument(flag, type=_yes_no, metavar="yes|no", help=text)
        elif "int" in kind:
            group.add_argument(flag, type=int, help=text)
        else:
            group.add_argument(flag, help=text)


def target_options(args: argparse.Namespace, target: str) -> dict[str, dict]:
    """{target: {option: value}} of the flags given, for ``target`` (a name or "all")."""
    from tfmq.targets.registry import targets

    chosen = list(targets()) if target == "all" else [] if target == "fp32" else [target]
    out: dict[str, dict] = {t: {} for t in chosen}
    for name, owners in _owners().items():
        value = getattr(args, name, None)
        if value is None:
            continue
        mine = [t for t, _ in owners if t.name in chosen]
        if not mine:
            raise TfmqError(f"--{name.replace('_', '-')} is an option of the "
                            f"{' and '.join(t.name for t, _ in owners)} target, not of {target!r}")
        takers = [t for t in mine if t.Options.accepts(name, value)] or mine
        for t in takers:
            out[t.name][name] = value
    return out
