"""Digest of an artifact directory: what must stay the same when the code is restructured.

    python benchmarks/artifact_digest.py artifacts/mnist-ddpm [more ...] > digest.json
    python benchmarks/artifact_digest.py --compare before.json after.json

Per artifact: every QuantState's tensors (sha256 of each tensor's bytes, by name) and its
recipe without its name; per target folder, the sha256 of each model file (``model.onnx``:
the raw bytes, and a normalized digest whose initializers are sorted by name, so a graph
that only lists its constants in another order reads as the same graph); and the numbers
and verdicts of ``parity.json`` (every numeric or boolean leaf by its path). ``--compare``
prints what differs and exits 1 if anything does. Reads files only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

MODEL_FILES = ("model.onnx", "model.fp16.onnx", "model.optimized.onnx", "model.xml", "model.bin",
               "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin")
# keys whose values are names or wall times, not numbers a restructuring must keep
IGNORED = {"seconds", "conversion_seconds", "runtime", "rule", "what", "name", "recipe", "settings"}
DERIVED = "within_"  # booleans computed from the PSNRs that are compared (and renamed over time)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def state_digest(folder: Path) -> dict:
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "quant_state.safetensors"))
    meta = json.loads((folder / "quant_state.json").read_text())
    recipe = {k: v for k, v in meta["recipe"].items() if k != "name"}
    return {"tensors": {k: _sha(v.tobytes()) + f":{v.dtype}{list(v.shape)}" for k, v in sorted(tensors.items())},
            "recipe": _sha(json.dumps(recipe, sort_keys=True).encode()),
            "param_sets": meta["param_sets"], "layers": meta["layers"]}


def onnx_normalized(path: Path) -> str:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = sorted(m.graph.initializer, key=lambda t: t.name)
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    return _sha(m.SerializeToString(deterministic=True))


def leaves(obj, prefix: str = "") -> dict:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in IGNORED and not k.startswith(DERIVED):
                out |= leaves(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out |= leaves(v, f"{prefix}[{i}]")
    elif isinstance(obj, (bool, int, float)) and obj is not None:
        out[prefix] = obj
    return out


def digest(artifact: Path) -> dict:
    """States are keyed by the targets that use them (their folder names carry recipe names)."""
    d = {"states": {}, "targets": {}}
    manifest = json.loads((artifact / "manifest.json").read_text())
    users: dict[str, list[str]] = {}
    for t, e in manifest["targets"].items():
        if "quant_state" in e:
            users.setdefault(e["quant_state"], []).append(t)
    for folder, ts in users.items():
        d["states"]["+".join(sorted(ts))] = state_digest(artifact / folder)
    for folder in sorted(p for p in artifact.iterdir() if p.is_dir() and not p.name.startswith("quant_state")):
        t = {}
        for f in MODEL_FILES:
            if (folder / f).is_file():
                t[f] = _sha((folder / f).read_bytes())
                if f.endswith(".onnx"):
                    t[f + ":normalized"] = onnx_normalized(folder / f)
        if (folder / "parity.json").is_file():
            t["parity"] = leaves(json.loads((folder / "parity.json").read_text()))
        d["targets"][folder.name] = t
    return d


def compare(a: dict, b: dict, path: str = "") -> list[str]:
    diffs = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            p = f"{path}/{k}"
            if k not in a or k not in b:
                diffs.append(f"{p}: only in {'after' if k in b else 'before'}")
            else:
                diffs += compare(a[k], b[k], p)
    elif a != b:
        diffs.append(f"{path}: {a!r} -> {b!r}")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--compare", action="store_true", help="compare two digest files")
    a = ap.parse_args()
    if a.compare:
        before, after = (json.loads(p.read_text()) for p in a.paths)
        diffs = compare(before, after)
        print("\n".join(diffs) if diffs else "identical")
        return 1 if diffs else 0
    json.dump({p.name: digest(p) for p in a.paths}, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
