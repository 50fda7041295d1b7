"""TFMQ calibration in PyTorch (tfmq.calibration): recipes, calibration sets, quantizers,
temporal-block reconstruction and per-step activation calibration, producing a QuantState.

It knows nothing of graph formats or runtimes: what a deployment needs from a recipe reaches
it as data (``requirements``).
"""

if __name__ != "tfmq.calibration":  # the repository root on sys.path: a second copy of every class
    raise ImportError(f"{__name__}: this folder is the package tfmq.calibration; import it as that (pip install -e .)")
