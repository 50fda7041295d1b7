"""Run an exported client folder in optimum's own pipeline (in an environment with optimum).

    python tests/clients/optimum_sd.py {onnxruntime|openvino} SOURCE_PIPELINE CLIENT_FOLDER STEPS...

Prints one JSON line: for each step count, the PSNR (dB) of the optimum pipeline's images vs
diffusers' StableDiffusionPipeline from SOURCE_PIPELINE with its UNet replaced by the same
quantized UNet file run by the same runtime (so only the client's own plumbing, its float text
encoder and VAE decoder differ), and vs the FP32 pipeline; plus the image shape. Kept free of
tfmq imports: this environment has optimum's pins, not tfmq's.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch


def psnr(a, b):
    return float(10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-20)))


class RuntimeUNet(torch.nn.Module):
    """The client folder's UNet file, run by the runtime, called as diffusers calls a UNet."""

    def __init__(self, runtime, folder, unet):
        super().__init__()
        self.config, self.dtype_, self.unet = unet.config, unet.dtype, unet
        if runtime == "onnxruntime":
            import onnxruntime as ort

            sess = ort.InferenceSession(str(folder / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
            self.run = lambda feed: sess.run(["out_sample"], feed)[0]
        else:
            import openvino as ov

            compiled = ov.Core().compile_model(str(folder / "unet" / "openvino_model.xml"), "CPU")
            self.run = lambda feed: next(iter(compiled(feed).values()))

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True, **kw):
        t = np.array([int(torch.as_tensor(timestep).reshape(-1)[0])], dtype=np.int64)
        out = torch.from_numpy(self.run({"sample": sample.numpy(), "timestep": t,
                                         "encoder_hidden_states": encoder_hidden_states.numpy()}))
        return (out,) if not return_dict else type("Out", (), {"sample": out})()


def text_encoder(source: Path):
    """The source pipeline's CLIP text encoder. A checkpoint saved by transformers 5 names its
    weights without the ``text_model.`` prefix that the transformers 4 of optimum's pins expects
    (it would load random weights and only warn), so the names are read either way."""
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig.from_pretrained(source / "text_encoder")).eval()
    weights = load_file(str(next((source / "text_encoder").glob("*.safetensors"))))
    if not any(k.startswith("text_model.") for k in weights):
        weights = {f"text_model.{k}": v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any("position_ids" not in k for k in missing):
        raise SystemExit(f"text encoder weights do not fit: missing {missing}, unexpected {unexpected}")
    return model


def main():
    runtime, source, folder, *steps = sys.argv[1:]
    from diffusers import StableDiffusionPipeline

    folder, source = Path(folder), Path(source)
    if runtime == "onnxruntime":
        from optimum.onnxruntime import ORTStableDiffusionPipeline as Client
    else:
        from optimum.intel import OVStableDiffusionPipeline as Client
    client = Client.from_pretrained(folder)
    te = text_encoder(source)
    fp32 = StableDiffusionPipeline.from_pretrained(source, text_encoder=te, safety_checker=None)
    same_unet = StableDiffusionPipeline.from_pretrained(source, text_encoder=te, safety_checker=None)
    same_unet.unet = RuntimeUNet(runtime, folder, fp32.unet)
    prompt = ["a red square on a white wall", "two birds over the sea"]
    out = {}
    for n in map(int, steps):
        kw = {"num_inference_steps": n, "guidance_scale": 7.5, "output_type": "np"}
        got = client(prompt, generator=torch.Generator().manual_seed(0), **kw).images
        ref = same_unet(prompt, generator=torch.Generator().manual_seed(0), **kw).images
        fp = fp32(prompt, generator=torch.Generator().manual_seed(0), **kw).images
        out[n] = {"vs_same_unet_db": psnr(got, ref), "vs_fp32_db": psnr(got, fp), "shape": list(got.shape),
                  "finite": bool(np.isfinite(got).all())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
