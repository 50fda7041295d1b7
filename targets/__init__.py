"""Per-device targets (tfmq.targets): each reads the exporter's artifacts and targets/base.py
only, and imports its runtime SDK inside the functions that need it."""

if __name__ != "tfmq.targets":  # the repository root on sys.path: a second copy of every class
    raise ImportError(f"{__name__}: this folder is the package tfmq.targets; import it as that (pip install -e .)")
