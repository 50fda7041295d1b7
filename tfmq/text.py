"""A text-to-image pipeline's own prompt encoder: its ``tokenizer/`` and ``text_encoder/``.

Prompts are encoded as diffusers' Stable Diffusion pipelines encode them: padded to the
tokenizer's ``model_max_length``, truncated past it, and the text encoder's last hidden
state taken as ``encoder_hidden_states`` (with the attention mask only where the encoder's
config asks for it). The text encoder stays in float: it runs once per prompt, not per step.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tfmq.errors import ModelLoadError, first_line

# The encoders Stable Diffusion 1.x/2.x pipelines carry; anything else is refused by name
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")


def load_prompt_encoder(folder: Path, index: dict) -> Callable[[list[str]], torch.Tensor]:
    """``prompts -> [P, L, D]`` from the pipeline folder ``folder`` (``index``: its model_index.json)."""
    for part in ("tokenizer", "text_encoder"):
        if not (folder / part).is_dir() or not index.get(part) or index[part][0] is None:
            raise ModelLoadError(f"{folder}: the pipeline has no {part}/ (a text-to-image pipeline needs its "
                                 "tokenizer and text encoder; for a bare UNet pass --encoder-hidden-states)")
    cls_name = index["text_encoder"][1]
    if cls_name not in TEXT_ENCODERS:
        raise ModelLoadError(f"{folder}: text encoder {cls_name} is not one tfmq reads ({', '.join(TEXT_ENCODERS)})")
    if not any((folder / "text_encoder").glob("*.safetensors")):
        raise ModelLoadError(f"{folder / 'text_encoder'}: no safetensors weights (tfmq loads safetensors only)")
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        encoder = getattr(transformers, cls_name).from_pretrained(folder / "text_encoder", use_safetensors=True,
                                                                  local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"{folder}: cannot load the tokenizer and text encoder: {first_line(e)}") from e
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    encoder = encoder.eval().requires_grad_(False)
    masked = bool(getattr(encoder.config, "use_attention_mask", False))

    @torch.no_grad()
    def encode(prompts: list[str]) -> torch.Tensor:
        tok = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        mask = tok.attention_mask if masked else None
        return encoder(tok.input_ids, attention_mask=mask)[0]

    return encode
