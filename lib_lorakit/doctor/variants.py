"""The diagnosis's controlled variants: each isolates one cause of "baked ≠ runtime".

A variant is either a bake (made by the bake engine into a scratch folder, rendered, then removed)
compared with a runtime render of the same recipe, or a render of the baked checkpoint under other
conditions (CFG, the prompt without tags). Each names the cause it tests and the fix when it
restores parity.

| id | what it changes | compared with | cause it tests |
|---|---|---|---|
| rebake | the recipe baked again by lorakit, the bake's save dtype | runtime | the checkpoint is not this recipe (strengths, a LoRA left out, the base) |
| fp32 | saved fp32 | runtime | fp16/bf16 rounding or overflow |
| alone:NAME | one LoRA, baked | that LoRA alone at runtime | one LoRA bakes unlike it runs (DoRA, huge alpha) |
| unet / te | only the UNet / text-encoder part | the same part at runtime | which part carries the difference |
| sequential | rounded after each LoRA | runtime | layering: rounding between LoRAs |
| scaled | strengths × ``SCALE`` | runtime | the bake is stronger than the recipe |
| untagged | the baked checkpoint, the prompt without baked LoRAs' tags | runtime | double application |
| cfg | runtime and baked at ``CFGS`` | each other | CFG amplifying small weight differences |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .parity import RecipeLora

SCALE = 0.8
CFGS = (3.0, 5.0, 7.0, 9.0)
BAKE_VARIANTS = ("rebake", "fp32", "alone", "unet", "te", "sequential", "scaled")
RENDER_VARIANTS = ("untagged", "cfg")
ALL = BAKE_VARIANTS + RENDER_VARIANTS


@dataclass
class Variant:
    id: str
    label: str
    recipe: list[RecipeLora] = field(default_factory=list)  # what is baked (strengths as baked)
    runtime: list[RecipeLora] | None = None  # the runtime reference's tags (None: the full recipe)
    save_dtype: str = "fp16"
    rounding: str = "summed"
    bake: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "save_dtype": self.save_dtype if self.bake else None,
            "rounding": self.rounding if self.bake else None,
            "recipe": [r.as_dict() for r in self.recipe] if self.bake else None,
        }


def _with(r: RecipeLora, strength: float | None = None, te: float | None = None) -> RecipeLora:
    return RecipeLora(r.name, r.path, r.strength if strength is None else strength, r.te_strength if te is None else te)


def plan_variants(recipe: list[RecipeLora], save_dtype: str, wanted: list[str] | None = None) -> list[Variant]:
    """The variants to run, in order (``wanted``: ids from :data:`ALL`; default all). ``alone`` and the
    text-encoder/UNet split are skipped for a one-LoRA recipe / where they change nothing."""
    want = list(wanted or ALL)
    out: list[Variant] = []
    if "rebake" in want:
        out.append(Variant("rebake", f"re-baked by lorakit ({save_dtype})", list(recipe), save_dtype=save_dtype))
    if "fp32" in want and save_dtype != "fp32":
        out.append(Variant("fp32", "saved fp32", list(recipe), save_dtype="fp32"))
    if "alone" in want and len(recipe) > 1:
        for r in recipe:
            out.append(Variant(f"alone:{r.name}", f"{r.name} alone", [r], runtime=[r], save_dtype=save_dtype))
    if "unet" in want:
        unet = [_with(r, te=0.0) for r in recipe]
        out.append(Variant("unet", "UNet part only", unet, runtime=unet, save_dtype=save_dtype))
    if "te" in want:
        te = [_with(r, strength=0.0) for r in recipe]
        out.append(Variant("te", "text-encoder part only", te, runtime=te, save_dtype=save_dtype))
    if "sequential" in want and len(recipe) > 1 and save_dtype != "fp32":
        out.append(
            Variant("sequential", "rounded after each LoRA", list(recipe), save_dtype=save_dtype, rounding="sequential")
        )
    if "scaled" in want:
        scaled = [_with(r, r.strength * SCALE, r.te_strength * SCALE) for r in recipe]
        out.append(Variant("scaled", f"strengths × {SCALE}", scaled, save_dtype=save_dtype))
    if "untagged" in want:
        out.append(Variant("untagged", "baked, baked LoRAs' tags taken out of the prompt", bake=False))
    if "cfg" in want:
        out.append(Variant("cfg", f"CFG sweep {', '.join(f'{c:g}' for c in CFGS)}", bake=False))
    return out
