"""Lowering (tfmq.exporter): from the FP model and a QuantState to the deploy module and the
QDQ ONNX graph with per-timestep tables. Reads calibration's QuantState only."""

if __name__ != "tfmq.exporter":  # the repository root on sys.path: a second copy of every class
    raise ImportError(f"{__name__}: this folder is the package tfmq.exporter; import it as that (pip install -e .)")
