"""The Temporal Information Block (TIB): everything in a diffusers UNet that depends on t only.

time_proj (sinusoid) -> time_embedding (linear_1, act, linear_2) [-> time_embed_act] -> emb,
then in every ResNet block nonlinearity(emb) -> time_emb_proj: one temporal feature g_i(t)
per ResNet. Over a finite schedule these are constants, so they can be reconstructed on their
own outputs (TIAR), calibrated per step (FSC), or cached as tables.

Anything else feeding ``emb`` (class_embedding, SDXL's add_embedding, LCM's cond_proj) makes
the block depend on more than t; ``find_tib`` says so and refuses, never assuming silently.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tfmq.errors import RecipeError


class TemporalBlockError(RecipeError):
    """The model's temporal block is missing or not a function of t alone."""


@dataclass
class TemporalBlock:
    unet: nn.Module
    resnets: list[tuple[str, nn.Module]]  # (name, ResnetBlock2D) of every ResNet that takes emb

    @property
    def feature_names(self) -> list[str]:
        return [f"{name}.time_emb_proj" for name, _ in self.resnets]

    def embedding(self, timesteps: torch.Tensor) -> torch.Tensor:
        u = self.unet
        t_emb = u.time_proj(timesteps.long()).to(next(u.parameters()).dtype)
        emb = u.time_embedding(t_emb)
        act = getattr(u, "time_embed_act", None)
        return act(emb) if act is not None else emb

    def features(self, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
        """g_i(t) for every ResNet: {"<resnet>.time_emb_proj": [T, C_i]}, with whatever modules
        (float or quantized) the UNet holds now."""
        emb = self.embedding(timesteps)
        return {f"{name}.time_emb_proj": r.time_emb_proj(r.nonlinearity(emb)) for name, r in self.resnets}

    def on(self, unet: nn.Module) -> TemporalBlock:
        """The same block in another copy of the UNet (the fake-quant one)."""
        return TemporalBlock(unet, [(name, unet.get_submodule(name)) for name, _ in self.resnets])

    def layer_names(self) -> list[str]:
        """The Linear layers inside the block (the ones TIAR reconstructs)."""
        return ["time_embedding.linear_1", "time_embedding.linear_2", *self.feature_names]


def not_t_only(unet: nn.Module) -> list[str]:
    """Why the embedding depends on more than t (empty when it is t-only)."""
    why = []
    if getattr(unet, "class_embedding", None) is not None:
        why.append("class_embedding (class labels are added to the time embedding)")
    if getattr(unet, "add_embedding", None) is not None:
        why.append("add_embedding (SDXL-style text/size conditioning is added to the time embedding)")
    te = getattr(unet, "time_embedding", None)
    if te is not None and getattr(te, "cond_proj", None) is not None:
        why.append("time_embedding.cond_proj (an LCM-style guidance embedding is added)")
    return why


def find_tib(unet: nn.Module) -> TemporalBlock:
    if getattr(unet, "time_proj", None) is None or getattr(unet, "time_embedding", None) is None:
        raise TemporalBlockError(f"{type(unet).__name__} has no time embedding (time_proj / time_embedding): "
                                 "not a timestep-conditioned diffusion UNet")
    why = not_t_only(unet)
    if why:
        raise TemporalBlockError("the temporal block is not a function of t alone, so per-timestep tables "
                                 f"would be wrong: {'; '.join(why)}. Use a recipe with temporal strategy "
                                 "'none' (the block is then quantized like any other layer)")
    resnets = [(n, m) for n, m in unet.named_modules()
               if type(m).__name__ == "ResnetBlock2D" and getattr(m, "time_emb_proj", None) is not None]
    if not resnets:
        raise TemporalBlockError(f"{type(unet).__name__}: no ResNet block takes the time embedding")
    return TemporalBlock(unet, resnets)
