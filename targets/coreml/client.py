"""The folder Apple's ml-stable-diffusion Swift pipeline loads (``StableDiffusionPipeline``,
``--resource-path``), as Core ML packages:

    pipeline/
      Unet.mlpackage            the verified package (files hard-linked), or
      UnetChunk1.mlpackage ...  its Neural Engine chunks, where the export made them
      TextEncoder.mlpackage     float: input ids as float32 [1, tokens] -> last_hidden_state, pooled_outputs
      VAEDecoder.mlpackage      float: z [1, C, H, W] -> image
      vocab.json merges.txt     the pipeline's CLIP tokenizer (its BPETokenizer reads these)

The Swift pipeline loads *compiled* models: on a Mac, ``xcrun coremlcompiler compile
<name>.mlpackage .`` turns each package into the ``<name>.mlmodelc`` it opens. The UNet
interface is the package's own (``program.py``). The Swift decoder divides latents by 0.18215
(SD 1.x/2.x) before ``VAEDecoder``; a VAE with another scaling factor gets the correction inside
the package. Off macOS nothing here can predict, so the float parts are checked against torch
only where Core ML runs; everywhere the interfaces are checked against what the Swift code reads.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from tfmq.errors import ExportError, first_line
from tfmq.exporter import client_folder as cf

UNET, TEXT, DECODER = "Unet.mlpackage", "TextEncoder.mlpackage", "VAEDecoder.mlpackage"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
SWIFT_LATENT_SCALE = 0.18215  # what the Swift Decoder divides latents by
FLOAT_PARTS_REL_L2 = 1e-2  # a float part at f16 against torch in float32


class _Text(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):  # the Swift TextEncoder feeds the ids as float32
        out = self.encoder(input_ids.to(torch.int32))
        return out[0], out[1]


class _Decoder(torch.nn.Module):
    def __init__(self, vae, factor: float):
        super().__init__()
        self.vae, self.factor = vae, factor

    def forward(self, z):
        return self.vae.decode(z * self.factor if self.factor != 1.0 else z).sample


def latent_factor(model) -> float:
    """What ``VAEDecoder`` multiplies its input by: the Swift decoder divides latents by 0.18215,
    the VAE wants them divided by its own scaling factor."""
    return SWIFT_LATENT_SCALE / float(getattr(model.vae.config, "scaling_factor", SWIFT_LATENT_SCALE))


def link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a copy of the package folder ``src`` whose files are hard links (a copy where
    links are not possible)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)


def capture(name: str, module: torch.nn.Module, x: torch.Tensor):
    """What coremltools converts: the text encoder traced (torch.export leaves CLIP with alias
    nodes the converter rejects), the decoder exported (tracing leaves its attention's int()
    of a shape, which the converter rejects)."""
    if name == TEXT:
        return torch.jit.trace(module, (x,), strict=False)
    return torch.export.export(module, (x,), strict=False).run_decompositions({})


def write(ct, model, out_dir: Path, package: Path, chunks: list[Path]) -> dict:
    """The folder ``out_dir/pipeline``; returns its report (the interfaces checked, the float
    parts against torch where Core ML predicts)."""
    why = cf.why_not(model)
    if why:
        raise ExportError(f"{model.name}: no client folder: {why}")
    tok = model.folder / "tokenizer"
    missing = [f for f in TOKENIZER_FILES if not (tok / f).is_file()]
    if missing:
        raise ExportError(f"{tok}: no {' or '.join(missing)}, which the Swift pipeline's BPE tokenizer reads")
    folder = out_dir / cf.FOLDER
    folder.mkdir()
    if chunks:
        for k, c in enumerate(chunks, 1):
            link_tree(c, folder / f"UnetChunk{k}.mlpackage")
    else:
        link_tree(package, folder / UNET)
    for f in TOKENIZER_FILES:
        shutil.copy2(tok / f, folder / f)
    inputs = cf.sample_inputs(model)
    ids = inputs["text_encoder"]["input_ids"][:1].float()
    latent = inputs["vae_decoder"]["latent_sample"][:1]
    factor = latent_factor(model)
    parts = {TEXT: (_Text(cf.text_encoder(model)), ids, ["input_ids"], ["last_hidden_state", "pooled_outputs"]),
             DECODER: (_Decoder(model.vae, factor).eval(), latent / factor, ["z"], ["image"])}
    for name, (module, x, ins, outs) in parts.items():
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # float32 outputs: the Swift decoder reads its image as MLShapedArray<Float32>
                mlmodel = ct.convert(capture(name, module.eval(), x), minimum_deployment_target=ct.target.iOS16,
                                     compute_precision=ct.precision.FLOAT16, skip_model_load=True,
                                     outputs=[ct.TensorType(dtype=np.float32) for _ in outs],
                                     **({"inputs": [ct.TensorType(name=ins[0], shape=tuple(x.shape),
                                                                  dtype=np.float32)]} if name == TEXT else {}))
        except Exception as e:  # the exporter and converter report model-specific failures many ways
            raise ExportError(f"Core ML conversion of the {name.removesuffix('.mlpackage')} failed: "
                              f"{first_line(e)}") from e
        spec = mlmodel.get_spec()  # torch.export names the outputs by op: the names the Swift code reads
        renames = dict(zip([f.name for f in spec.description.input], ins, strict=True))
        renames |= dict(zip([f.name for f in spec.description.output], outs, strict=True))
        for old, new in renames.items():
            if old != new:
                ct.utils.rename_feature(spec, old, new)
        ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True).save(str(folder / name))
    interface = check_interface(ct, folder, model)
    if interface:
        raise ExportError(f"{folder}: not the interface the ml-stable-diffusion pipeline reads: {'; '.join(interface)}")
    return {"dir": cf.FOLDER, "client": "Apple ml-stable-diffusion (Swift StableDiffusionPipeline; compile the "
                                        "packages with xcrun coremlcompiler on a Mac)",
            "unet": [p.name for p in sorted(folder.glob("Unet*.mlpackage"))], "latent_scale_correction": factor,
            "interface": "checked", "bound": FLOAT_PARTS_REL_L2}


def io_shapes(ct, package: Path) -> tuple[dict, dict]:
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    shape = lambda f: [int(d) for d in f.type.multiArrayType.shape]  # noqa: E731
    return ({i.name: shape(i) for i in spec.description.input}, {o.name: shape(o) for o in spec.description.output})


def check_interface(ct, folder: Path, model) -> list[str]:
    """What the Swift pipeline reads and does not find: the UNet's ``sample``, ``timestep`` and
    ``encoder_hidden_states`` ([2, width, 1, tokens]), the text encoder's ``last_hidden_state``
    of that width and length, a decoder input of the UNet's latent shape. Empty: all there."""
    problems = []
    unet = sorted(folder.glob("Unet*.mlpackage"))
    u_in, _ = io_shapes(ct, unet[0])
    t_in, t_out = io_shapes(ct, folder / TEXT)
    d_in, _ = io_shapes(ct, folder / DECODER)
    for n in ("sample", "timestep", "encoder_hidden_states"):
        if n not in u_in:
            problems.append(f"{unet[0].name} has no input {n!r}")
    if "last_hidden_state" not in t_out:
        problems.append(f"{TEXT} has no output 'last_hidden_state'")
    if problems:
        return problems
    ehs, hidden = u_in["encoder_hidden_states"], t_out["last_hidden_state"]
    if len(ehs) != 4 or ehs[2] != 1 or len(hidden) != 3 or [ehs[1], ehs[3]] != [hidden[2], hidden[1]]:
        problems.append(f"encoder_hidden_states {ehs} is not [batch, width, 1, tokens] of the text encoder's "
                        f"last_hidden_state {hidden}")
    if u_in["timestep"] != [u_in["sample"][0]]:
        problems.append(f"timestep {u_in['timestep']} is not one per sample of {u_in['sample']}")
    (z,), (ids,) = d_in.values(), t_in.values()
    if z[1:] != u_in["sample"][1:]:
        problems.append(f"the decoder input {z} is not a latent of the UNet's {u_in['sample']}")
    if ids != [1, hidden[1]]:
        problems.append(f"the text encoder input {ids} is not [1, {hidden[1]}]")
    return problems


def float_check(ct, folder: Path, model) -> dict:
    """Where Core ML predicts (macOS): each float part vs torch, the worst relative L2 error."""
    text = ct.models.MLModel(str(folder / TEXT))
    decoder = ct.models.MLModel(str(folder / DECODER))
    factor = latent_factor(model)

    def run(part, feed):
        if part == "text_encoder":
            rows = [text.predict({"input_ids": ids[None].astype(np.float32)}) for ids in feed["input_ids"]]
            return [np.concatenate([r[k] for r in rows]) for k in ("last_hidden_state", "pooled_outputs")]
        z = feed["latent_sample"] / factor  # what the Swift decoder feeds for these latents
        return [np.concatenate([decoder.predict({"z": x[None]})["image"] for x in z])]

    return cf.float_check(model, run)
