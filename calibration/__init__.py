"""TFMQ calibration in PyTorch (tfmq.calibration): recipes, calibration sets, quantizers,
temporal-block reconstruction and per-step activation calibration, producing a QuantState.

It knows nothing of ONNX or any runtime.
"""
