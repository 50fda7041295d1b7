"""TFMQ-DM quantization and deployment of diffusion UNets.

``tfmq.export(model, recipe_or_state, targets, out, options)`` runs the whole pipeline
(``tfmq.pipeline``). Importing ``tfmq`` is light: no runtime SDK (onnxruntime, openvino,
coremltools, tensorrt) is imported until a function that needs it runs.
"""

from tfmq.version import __version__  # noqa: F401 - the package's version, here as usual


def export(model, recipe_or_state=None, targets="fp32", out=None, options=None, adapt=None):
    """The export pipeline (``tfmq.pipeline.export``): build the artifact directory ``out``
    and return its ``Manifest``."""
    from tfmq.pipeline import export as run

    return run(model, recipe_or_state, targets, out, options, adapt)
