"""What a deployment needs from a recipe, as data, and the one way calibration meets it.

A consumer of QuantStates (a deployment target) declares ``Requirements``: settings its
integer kernels cannot do without. ``unmet`` names the recipe settings that break them (a
custom recipe is refused with those settings in the message), ``satisfy`` gives the variant
of a recipe that meets them, named by what changed (``w8a8+sym-weights+sym-attn``), and
``plan`` decides, for several consumers at once, which of them can share one calibration.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace

from tfmq.calibration.recipe import Recipe

# the name tag of each need, in the order names carry them, and the recipe setting it asks for
TAGS = {"symmetric_weights": ("sym-weights", "weights.symmetric: true"),
        "symmetric_attention": ("sym-attn", "activations.attention_symmetric: true"),
        "conv_outputs": ("conv-out", "activations.conv_outputs: true")}


@dataclass(frozen=True)
class Requirements:
    symmetric_weights: bool = False  # every weight zero-point 0
    symmetric_attention: bool = False  # zero-point 0 on both operands of each attention matmul
    conv_outputs: bool = False  # a per-step quantizer on the output of every quantized conv
    # the needs come from integer kernels that exist only where activations are quantized:
    # a recipe that keeps activations in float meets them as it is
    with_activations_only: bool = False
    why: str = field(default="", compare=False)  # one line: what in the consumer makes these needs

    def __or__(self, other: Requirements) -> Requirements:
        """Both sets of needs (conditional on activations only where every side with needs is)."""
        flags = {k: getattr(self, k) or getattr(other, k) for k in TAGS}
        sides = [r for r in (self, other) if r.tags()]
        return Requirements(**flags, with_activations_only=bool(sides) and all(r.with_activations_only for r in sides),
                            why="; ".join(w for w in (self.why, other.why) if w))

    @property
    def adds_quantizers(self) -> bool:
        """The need changes the fake-quant model itself (conv output quantizers run in it), so a
        consumer without it must not share the calibration."""
        return self.conv_outputs

    def tags(self) -> list[str]:
        return [TAGS[k][0] for k in TAGS if getattr(self, k)]


def unmet(recipe: Recipe, needs: Requirements) -> dict[str, str]:
    """{tag: the recipe setting to change} for every need ``recipe`` does not meet."""
    a = recipe.activations
    acts = a.bits is not None
    if needs.with_activations_only and not acts:
        return {}
    missing = {}
    if needs.symmetric_weights and not recipe.weights.symmetric:
        missing["symmetric_weights"] = TAGS["symmetric_weights"][1]
    if needs.symmetric_attention and acts and not (a.symmetric or a.attention_symmetric):
        missing["symmetric_attention"] = TAGS["symmetric_attention"][1]
    if needs.conv_outputs and acts and not a.conv_outputs:
        missing["conv_outputs"] = TAGS["conv_outputs"][1]
    return missing


def satisfy(recipe: Recipe, needs: Requirements) -> Recipe:
    """``recipe`` changed where it does not meet ``needs``, its name tagged with each change."""
    missing = unmet(recipe, needs)
    if not missing:
        return recipe
    w, a = recipe.weights, recipe.activations
    if "symmetric_weights" in missing:
        w = replace(w, symmetric=True)
    if "symmetric_attention" in missing:
        a = replace(a, attention_symmetric=True)
    if "conv_outputs" in missing:
        a = replace(a, conv_outputs=True)
    return replace(recipe, name=tagged(recipe.name, [TAGS[k][0] for k in missing]), weights=w, activations=a)


def tagged(name: str, tags: Iterable[str]) -> str:
    """``name`` with ``tags`` added: other modifiers first, then the need tags in TAGS order."""
    base, *have = name.split("+")
    order = [t for t, _ in TAGS.values()]
    mine = set(have) | set(tags)
    return "+".join([base, *(t for t in have if t not in order), *(t for t in order if t in mine)])


def plan(recipe: Recipe, needs: Mapping[str, Requirements]) -> dict[str, Recipe]:
    """The recipe each consumer calibrates with, when several are built from one ``recipe``.

    Those whose needs add no quantizers share one calibration: ``recipe`` satisfying all their
    needs together. One whose needs add quantizers takes that shared recipe plus its own needs
    (calibrated apart; ``api.same_weights`` says whether it can take the shared integers)."""
    shared_needs = Requirements()
    for n in needs.values():
        if not n.adds_quantizers:
            shared_needs = shared_needs | n
    shared = satisfy(recipe, shared_needs) if any(not n.adds_quantizers for n in needs.values()) else recipe
    return {c: satisfy(shared, n) if n.adds_quantizers else shared for c, n in needs.items()}


def describe(needs: Requirements) -> dict:
    """The needs as the manifest records them."""
    return {f.name: getattr(needs, f.name) for f in fields(needs) if f.name != "why"} | (
        {"why": needs.why} if needs.why else {})
