"""TFMQ-DM quantization and deployment of diffusion UNets.

Importing ``tfmq`` is light: no runtime SDK (onnxruntime, openvino, coremltools, tensorrt)
is imported until a function that needs it runs.
"""

__version__ = "0.1.0"
