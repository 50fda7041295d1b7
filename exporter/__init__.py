"""Lowering (tfmq.exporter): from the FP model and a QuantState to the deploy module and the
QDQ ONNX graph with per-timestep tables. Reads calibration's QuantState only."""
