"""The folder a stock text-to-image client loads: the layout optimum's pipelines read.

    pipeline/
      model_index.json          the source pipeline's, as it was
      scheduler/ tokenizer/     copied from the source pipeline
      unet/                     the target's quantized UNet (linked to the verified file) + config.json
      text_encoder/             float, from the pipeline's CLIP text encoder + config.json
      vae_decoder/              float, the VAE's decoder (latent_sample -> sample) + config.json

Input and output names are the ones optimum's exporter writes (``input_ids`` ->
``last_hidden_state``, ``pooler_output``; ``latent_sample`` -> ``sample``; the UNet's
``sample``, ``timestep``, ``encoder_hidden_states`` -> ``out_sample``). The text encoder and
the decoder run once per image, not per step, so they stay in float; each target converts the
float ONNX written here to its own format and checks it against torch (``float_check``).
There is no VAE encoder: the folder serves text-to-image. The UNet takes any whole timestep in
the training range, so the client's own scheduler and step count drive it.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from tfmq.errors import ExportError, first_line
from tfmq.models import DiffusionModel

FOLDER = "pipeline"
PARTS = ("text_encoder", "vae_decoder")


def why_not(model: DiffusionModel) -> str | None:
    """Why ``model`` gets no client folder (None: it does): only a text-to-image pipeline has the
    tokenizer, text encoder and VAE a client needs."""
    f = model.folder
    if f is None or not (f / "model_index.json").is_file():
        return "not loaded from a diffusers pipeline folder"
    missing = [p for p in ("tokenizer", "text_encoder", "vae", "scheduler") if not (f / p).is_dir()]
    if missing or model.vae is None or getattr(model.conditioning, "kind", None) != "prompts":
        return f"not a text-to-image pipeline (no {', '.join(missing) or 'prompt encoder or VAE'})"
    return None


class _TextEncoder(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        out = self.encoder(input_ids)
        return out[0], out[1]  # last_hidden_state and the pooled (or projected) output


class _Decoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample).sample


def text_encoder(model: DiffusionModel):
    """The pipeline's text encoder in float, as its own folder holds it."""
    import transformers

    cls = json.loads((model.folder / "model_index.json").read_text())["text_encoder"][1]
    return getattr(transformers, cls).from_pretrained(model.folder / "text_encoder", use_safetensors=True,
                                                      local_files_only=True).eval()


def sample_inputs(model: DiffusionModel) -> dict[str, dict[str, torch.Tensor]]:
    """One input per float part, to export with and to check a converted part on: the shipped
    prompts' first two, tokenized as the pipeline does, and two seeded latents."""
    from transformers import AutoTokenizer

    from tfmq.conditioning import read_prompts

    tok = AutoTokenizer.from_pretrained(model.folder / "tokenizer", local_files_only=True)
    prompts = read_prompts(None)[:2]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    c, size = model.sample_shape[0], model.sample_shape[1]
    latents = torch.randn(2, c, size, size, generator=torch.Generator().manual_seed(0))
    return {"text_encoder": {"input_ids": ids}, "vae_decoder": {"latent_sample": latents}}


def float_modules(model: DiffusionModel) -> dict[str, torch.nn.Module]:
    return {"text_encoder": _TextEncoder(text_encoder(model)), "vae_decoder": _Decoder(model.vae).eval()}


NAMES = {"text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output"],
                          {"input_ids": {0: "batch_size", 1: "sequence_length"},
                           "last_hidden_state": {0: "batch_size", 1: "sequence_length"},
                           "pooler_output": {0: "batch_size"}}),
         "vae_decoder": (["latent_sample"], ["sample"],
                         {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
                          "sample": {0: "batch_size", 2: "height", 3: "width"}})}


def write(model: DiffusionModel, out: Path, unet_files: dict[str, Path]) -> dict[str, Path]:
    """The client folder ``out`` with the float parts as ONNX (``<part>/model.onnx``) and the
    UNet as ``unet_files`` ({name in unet/: file}); returns {part: its ONNX file}."""
    why = why_not(model)
    if why:
        raise ExportError(f"{model.name}: no client folder: {why}")
    src = model.folder
    out.mkdir(parents=True)
    shutil.copy2(src / "model_index.json", out / "model_index.json")
    for part in ("scheduler", "tokenizer"):
        shutil.copytree(src / part, out / part)
    (out / "unet").mkdir()
    for name, f in unet_files.items():
        link(f, out / "unet" / name)
    shutil.copy2(src / "unet" / "config.json", out / "unet" / "config.json")
    inputs, files = sample_inputs(model), {}
    for part, module in float_modules(model).items():
        (out / part).mkdir()
        shutil.copy2(src / ("vae" if part == "vae_decoder" else part) / "config.json", out / part / "config.json")
        names_in, names_out, dynamic = NAMES[part]
        files[part] = out / part / "model.onnx"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, tuple(inputs[part].values()), str(files[part]), dynamo=False,
                                  opset_version=17, input_names=names_in, output_names=names_out,
                                  dynamic_axes=dynamic, do_constant_folding=True)
        except Exception as e:  # the tracer reports model-specific failures many ways
            raise ExportError(f"ONNX export of the {part} failed: {first_line(e)}") from e
    return files


def float_check(model: DiffusionModel, run) -> dict:
    """Every float part through ``run(part, inputs) -> [outputs]`` (a target's runtime on its
    converted file) vs torch: the worst relative L2 error of each output."""
    inputs, rows = sample_inputs(model), {}
    for part, module in float_modules(model).items():
        with torch.no_grad():
            want = module(*inputs[part].values())
        want = want if isinstance(want, tuple) else (want,)
        got = run(part, {k: v.numpy() for k, v in inputs[part].items()})
        rows[part] = max(float((torch.as_tensor(g).float() - w).norm() / w.norm().clamp_min(1e-12))
                         for g, w in zip(got, want, strict=True))
    return rows


def link(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (no second copy of a large UNet), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
