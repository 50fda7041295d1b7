"""What a conditional UNet's samples are asked for: its ``encoder_hidden_states``.

A :class:`Conditioning` gives, for the samples 0..n-1 of a sampler call, the conditional and
the unconditional (classifier-free guidance) encoder states [n, L, D]; sample i always gets
entry i (cycling), so image i asks for the same thing whatever the batch, subset or candidate.
Three sources:

- :class:`ClassLabels`: a class-token encoder (``mnist-cond``'s ``class_embedder/``), labels
  0..9 repeating, the null label for the unconditional branch;
- :class:`Prompts`: a pipeline's own tokenizer and text encoder on a list of prompts
  (``--prompts FILE``, else the shipped ``assets/prompts.txt``), the empty prompt unconditional;
- :class:`FixedStates`: embeddings given as a file (``--encoder-hidden-states``), for a bare
  ``UNet2DConditionModel`` folder that has no text encoder beside it.

The class-token encoder is the small stand-in for Stable Diffusion's text encoder. A digit label (0-9, or the null label 10 for classifier-free guidance) maps to a learned
sequence of ``tokens`` vectors of width ``dim``; the UNet attends to it through
cross-attention as ``encoder_hidden_states`` [B, tokens, dim]. Several tokens (not one) keep
the cross-attention softmax non-trivial, as it is with a real prompt.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from tfmq.errors import ModelLoadError, first_line

WEIGHTS_NAME = "embeddings.safetensors"
CONFIG_NAME = "config.json"
PROMPTS = Path(__file__).parent / "assets" / "prompts.txt"
# The guidance scale of diffusers' Stable Diffusion pipelines; the bundled class-conditional
# model is best at 1.0 (docs/results.md, "The quality harness")
TEXT_GUIDANCE = 7.5
LABEL_GUIDANCE = 1.0
STATES_KEY, NEGATIVE_KEY = "encoder_hidden_states", "negative_encoder_hidden_states"


class ClassTokenEmbedder(nn.Module):
    def __init__(self, num_classes: int = 10, tokens: int = 4, dim: int = 64):
        super().__init__()
        self.num_classes = num_classes
        self.tokens = tokens
        self.dim = dim
        self.weight = nn.Parameter(torch.randn(num_classes + 1, tokens, dim) * 0.5)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.weight[labels]

    def config(self) -> dict:
        return {"num_classes": self.num_classes, "tokens": self.tokens, "dim": self.dim,
                "null_label": self.null_label}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config(), indent=2) + "\n")
        save_file({"weight": self.weight.detach().contiguous()}, str(folder / WEIGHTS_NAME))


def labels_for(n: int) -> torch.Tensor:
    """The digit each class-conditional sample is asked for: balanced, 0..9 repeating."""
    return torch.arange(n) % 10


class Conditioning:
    """The encoder states of the samples 0..n-1 of a sampler call (see the module text)."""

    kind = ""
    default_guidance = TEXT_GUIDANCE

    def states(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) encoder states, each [n, L, D]."""
        raise NotImplementedError

    def labels(self, n: int) -> torch.Tensor | None:
        """The class each sample is asked for, where the source has classes."""
        return None

    def describe(self) -> dict:
        """JSON-ready: what the artifact records so a re-check asks for the same thing."""
        return {"kind": self.kind}

    def check_guidance(self, guidance: float) -> None:
        """Refuse a guidance scale this source cannot give (one line)."""

    def check_width(self, width: int, where: str) -> None:
        got = self.states(1)[0].shape[-1]
        if got != width:
            raise ModelLoadError(f"{where}: the encoder states are {got} wide, the UNet's cross_attention_dim is {width}")


class ClassLabels(Conditioning):
    kind = "labels"
    default_guidance = LABEL_GUIDANCE

    def __init__(self, embedder: ClassTokenEmbedder):
        self.embedder = embedder

    def labels(self, n: int) -> torch.Tensor:
        return labels_for(n)

    def states(self, n: int):
        labels = labels_for(n)
        return self.embedder(labels), self.embedder(torch.full_like(labels, self.embedder.null_label))

    def describe(self) -> dict:
        return {"kind": self.kind, "classes": self.embedder.num_classes}


class Prompts(Conditioning):
    """``encode`` (list of prompts -> [P, L, D]) is the pipeline's tokenizer and text encoder,
    run once per distinct prompt."""

    kind = "prompts"

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], prompts: Sequence[str], negative: str = ""):
        self.prompts, self.negative = list(prompts), negative
        with torch.no_grad():
            self._cond = encode(self.prompts).float()
            self._uncond = encode([negative]).float()

    def states(self, n: int):
        idx = torch.arange(n) % len(self.prompts)
        return self._cond[idx], self._uncond.expand(n, *self._uncond.shape[1:])

    def describe(self) -> dict:
        return {"kind": self.kind, "prompts": self.prompts, "negative": self.negative}


class FixedStates(Conditioning):
    """Encoder states given as tensors: [P, L, D] conditional and, optionally, [1 or P, L, D]
    unconditional. Without the unconditional ones guidance cannot run (only g = 1)."""

    kind = "states"

    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor | None = None, name: str = ""):
        self.cond, self.uncond, self.name = cond.float(), None if uncond is None else uncond.float(), name
        self.default_guidance = TEXT_GUIDANCE if uncond is not None else 1.0

    def states(self, n: int):
        idx = torch.arange(n) % len(self.cond)
        if self.uncond is None:
            return self.cond[idx], self.cond[idx]
        u = self.uncond[idx % len(self.uncond)]
        return self.cond[idx], u

    def check_guidance(self, guidance: float) -> None:
        if self.uncond is None and guidance != 1.0:
            raise ModelLoadError(f"guidance {guidance:g} needs unconditional states: the file holds no "
                                 f"{NEGATIVE_KEY!r} (give it, or --guidance 1)")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {STATES_KEY: self.cond} | ({} if self.uncond is None else {NEGATIVE_KEY: self.uncond})

    def describe(self) -> dict:
        digest = hashlib.sha256()
        for k, t in sorted(self.tensors().items()):
            digest.update(k.encode() + t.contiguous().numpy().tobytes())
        return {"kind": self.kind, "file": self.name, "entries": len(self.cond), "sha256": digest.hexdigest()}


def read_prompts(path: Path | str | None = None) -> list[str]:
    """One prompt a line (UTF-8; blank lines skipped); the shipped set without ``path``."""
    path = Path(path) if path is not None else PROMPTS
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ModelLoadError(f"cannot read the prompts file {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path} is not UTF-8 text (byte {e.start}): one prompt a line, UTF-8") from e
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ModelLoadError(f"{path} holds no prompts: one prompt a line")
    return prompts


def load_states(path: Path | str) -> FixedStates:
    """``--encoder-hidden-states FILE.safetensors``: the tensor ``encoder_hidden_states`` [P, L, D]
    and, for guidance, ``negative_encoder_hidden_states`` [1 or P, L, D]."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        t = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ModelLoadError(f"cannot read the encoder states {path}: {first_line(e, 'not safetensors')}") from e
    extra = sorted(set(t) - {STATES_KEY, NEGATIVE_KEY})
    if STATES_KEY not in t or extra:
        raise ModelLoadError(f"{path} must hold {STATES_KEY!r} [P, L, D] and optionally {NEGATIVE_KEY!r}; "
                             f"it holds {sorted(t)}")
    cond, uncond = t[STATES_KEY], t.get(NEGATIVE_KEY)
    for k, v in t.items():
        if v.dim() != 3 or not v.is_floating_point() or v.shape[0] < 1:
            raise ModelLoadError(f"{path}: {k!r} must be a float tensor [P, L, D], not {v.dtype} {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise ModelLoadError(f"{path}: {k!r} holds NaN or inf")
    if uncond is not None and (uncond.shape[1:] != cond.shape[1:] or len(uncond) not in (1, len(cond))):
        raise ModelLoadError(f"{path}: {NEGATIVE_KEY!r} {tuple(uncond.shape)} does not fit {STATES_KEY!r} "
                             f"{tuple(cond.shape)} (want [1 or {len(cond)}, {cond.shape[1]}, {cond.shape[2]}])")
    return FixedStates(cond, uncond, name=path.name)
