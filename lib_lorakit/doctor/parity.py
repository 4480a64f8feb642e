"""Parity: does a baked checkpoint render like its runtime recipe?

The same prompts and seeds are rendered three ways — the base with the recipe's ``<lora:…>`` tags
(*runtime*), the baked checkpoint without them (*baked*), and the base alone (*base*) — and compared:

- the baked-vs-runtime difference: mean and largest pixel difference (0–255 levels) and SSIM;
- the LoRA effect: the mean difference of runtime against base, in levels;
- the *effect ratio*: how much of the runtime effect the baked render carries, the projection of
  (baked − base) on (runtime − base) over all pixels: 1 = the same effect, 0.5 = half, 2 = double;
- the *residual*: the part of (baked − base) off that direction, as a fraction of the effect.

Verdict thresholds (module constants, stated in the README):

- identical: mean difference ≤ ``IDENTICAL_MEAN`` levels;
- equivalent: mean difference ≤ max(``EQUIVALENT_FLOOR`` levels, ``EQUIVALENT_SHARE`` × effect);
- weaker: effect ratio < 1 − ``STRENGTH_BAND`` and residual ≤ ``RESIDUAL_MAX``;
- stronger: effect ratio > 1 + ``STRENGTH_BAND`` and residual ≤ ``RESIDUAL_MAX``;
- diverged: anything else (the baked render differs, and not along the LoRAs' effect).

An effect below ``SMALL_EFFECT`` levels is flagged: the recipe barely changes these renders, so the
verdict rests on little (raise CFG, or use prompts the LoRAs respond to).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..gen.image import ssim, to_array
from ..prompt import parse_tags, strip_tags

IDENTICAL_MEAN = 0.5  # levels (of 255)
EQUIVALENT_FLOOR = 1.0  # levels
EQUIVALENT_SHARE = 0.1  # of the effect
STRENGTH_BAND = 0.15  # effect ratio outside 1 ± this: weaker / stronger
RESIDUAL_MAX = 0.6  # ... when the difference lies mostly along the effect
SMALL_EFFECT = 2.0  # levels: below this the recipe barely moves the renders
VERDICTS = ("identical", "equivalent", "weaker", "stronger", "diverged")
PASSING = ("identical", "equivalent")

DEFAULT_PROMPTS = (
    "a portrait photo of a woman in a red coat, city street",
    "a mountain lake at sunrise, wide landscape",
    "a bowl of fruit on a wooden table, still life",
)
DEFAULT_SEEDS = (1, 2)


@dataclass
class RecipeLora:
    """One LoRA of the runtime recipe: its tag name (as the WebUI finds it), file, strengths."""

    name: str
    path: str
    strength: float  # UNet
    te_strength: float

    def tag(self, strength: float | None = None, te_strength: float | None = None) -> str:
        """The WebUI tag: ``<lora:name:w>`` or ``<lora:name:te:unet>`` (text encoder first)."""
        u = self.strength if strength is None else strength
        t = self.te_strength if te_strength is None else te_strength
        return f"<lora:{self.name}:{_num(u)}>" if u == t else f"<lora:{self.name}:{_num(t)}:{_num(u)}>"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "strength": self.strength, "te_strength": self.te_strength}


def _num(x: float) -> str:
    return f"{x:.6g}"


def tags_of(recipe: list[RecipeLora]) -> str:
    return " ".join(r.tag() for r in recipe)


def prompts_for(prompt: str, recipe: list[RecipeLora], tags: str | None = None) -> dict[str, str]:
    """The three prompts of a parity check for one user prompt.

    ``runtime``: the prompt without the recipe's tags, then the recipe's tags (``tags``: other ones);
    ``baked``: the prompt as given — a tag of a baked LoRA left in it applies that LoRA twice, which is
    what the user would see; ``base``: the prompt without the recipe's tags. Tags of LoRAs outside the
    recipe stay in all three."""
    names = [r.name for r in recipe]
    plain = strip_tags(prompt, names).strip()
    t = tags_of(recipe) if tags is None else tags
    return {"runtime": f"{plain} {t}".strip(), "baked": prompt, "base": plain}


def double_application(prompts: list[str], recipe: list[RecipeLora]) -> list[str]:
    """Warnings for prompts that still hold tags of LoRAs baked into the checkpoint."""
    names = {r.name.lower(): r for r in recipe}
    out = []
    for i, p in enumerate(prompts):
        hit = [t for t in parse_tags(p) if t.name.lower() in names]
        if hit:
            out.append(
                f"prompt {i + 1} still holds {', '.join(t.tag for t in hit)}: "
                f"{'that LoRA is' if len(hit) == 1 else 'those LoRAs are'} baked into the checkpoint, so it "
                "applies twice (double application). Remove the tag when you use the baked checkpoint."
            )
    return out


# --- measures -----------------------------------------------------------------------------------


def compare_sets(images: list, refs: list, bases: list | None = None) -> dict[str, Any]:
    """``images`` against ``refs`` (same order: one pair per seed), with ``bases`` for the effect.

    Returns mean_diff / max_diff (levels), ssim (mean), and with bases: effect (levels), effect_ratio,
    residual, diff_share (mean_diff / effect) and the verdict."""
    a = np.stack([to_array(x) for x in images]) * 255.0
    r = np.stack([to_array(x) for x in refs]) * 255.0
    if a.shape != r.shape:
        raise ValueError(f"image sets differ in shape: {a.shape} vs {r.shape}")
    d = np.abs(a - r)
    out: dict[str, Any] = {
        "images": len(images),
        "mean_diff": round(float(d.mean()), 4),
        "max_diff": round(float(d.max()), 4),
        "ssim": round(float(np.mean([ssim(x, y) for x, y in zip(images, refs)])), 5),
    }
    if bases is not None:
        b = np.stack([to_array(x) for x in bases]) * 255.0
        e = (r - b).ravel()
        v = (a - b).ravel()
        ee = float(e @ e)
        effect = float(np.abs(r - b).mean())
        t = float(v @ e) / ee if ee > 0 else (1.0 if float(v @ v) == 0 else float("inf"))
        res = float(np.linalg.norm(v - t * e) / np.sqrt(ee)) if ee > 0 else 0.0
        out.update(
            effect=round(effect, 4),
            effect_ratio=round(t, 4) if np.isfinite(t) else None,
            residual=round(res, 4),
            diff_share=round(out["mean_diff"] / effect, 4) if effect > 0 else None,
        )
        out["verdict"] = verdict(out)
    return out


def verdict(m: dict[str, Any]) -> str:
    """identical / equivalent / weaker / stronger / diverged from :func:`compare_sets`' numbers."""
    if m["mean_diff"] <= IDENTICAL_MEAN:
        return "identical"
    effect = m.get("effect") or 0.0
    if m["mean_diff"] <= max(EQUIVALENT_FLOOR, EQUIVALENT_SHARE * effect):
        return "equivalent"
    t, res = m.get("effect_ratio"), m.get("residual")
    if t is not None and res is not None and res <= RESIDUAL_MAX:
        if t < 1 - STRENGTH_BAND:
            return "weaker"
        if t > 1 + STRENGTH_BAND:
            return "stronger"
    return "diverged"


def thresholds() -> dict[str, float]:
    return {
        "identical_mean_diff": IDENTICAL_MEAN,
        "equivalent_mean_diff_floor": EQUIVALENT_FLOOR,
        "equivalent_share_of_effect": EQUIVALENT_SHARE,
        "strength_band": STRENGTH_BAND,
        "residual_max": RESIDUAL_MAX,
        "small_effect": SMALL_EFFECT,
    }


def small_effect_warning(m: dict[str, Any], what: str = "the recipe") -> str | None:
    if m.get("effect") is not None and m["effect"] < SMALL_EFFECT:
        return (
            f"{what} changes the renders by only {m['effect']:.2f} levels on average (runtime against base), "
            f"below {SMALL_EFFECT}: the verdict rests on little. Raise the CFG scale or use prompts the LoRAs respond to."
        )
    return None


# --- the recipe in the baked file ---------------------------------------------------------------


def baked_recipe(path: str) -> dict[str, Any] | None:
    """The recipe lorakit wrote into a baked checkpoint's metadata (None: none there)."""
    import json

    from ..formats.safetensors_io import read_header

    try:
        meta = read_header(path)[1] or {}
    except Exception:  # noqa: BLE001 - a file we cannot read has no recipe; rendering says why
        return None
    raw = meta.get("lorakit.recipe")
    if not raw:
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and rec.get("operation") == "bake" else None


def recipe_mismatches(recipe: list[RecipeLora], baked: dict[str, Any] | None, base_path: str) -> list[dict[str, Any]]:
    """Where the baked checkpoint's recorded recipe differs from the runtime recipe (each a finding)."""
    if not baked:
        return []
    out: list[dict[str, Any]] = []
    stem = lambda f: os.path.splitext(os.path.basename(f or ""))[0].lower()  # noqa: E731
    in_bake = {stem(x.get("file")): x for x in baked.get("loras") or []}
    at_runtime = {stem(r.path) or r.name.lower(): r for r in recipe}
    for k, r in at_runtime.items():
        b = in_bake.get(k)
        if b is None:
            out.append(
                {
                    "cause": "lora-left-out",
                    "lora": r.name,
                    "text": f"LoRA {r.name} is in the runtime recipe but not in the bake (its recorded recipe lists "
                    f"{', '.join(x.get('name', '?') for x in baked.get('loras') or []) or 'no LoRA'}).",
                    "fix": f"Bake again with {r.name} at {_num(r.strength)}, or keep it at runtime: {r.tag()}.",
                }
            )
            continue
        for field, what in (("strength", "UNet strength"), ("te_strength", "text-encoder strength")):
            want, got = getattr(r, field), float(b.get(field, b.get("strength", 0.0)))
            if abs(want - got) > 1e-6:
                out.append(
                    {
                        "cause": "te-strength" if field == "te_strength" else "unet-strength",
                        "lora": r.name,
                        "text": f"LoRA {r.name}: {what} {_num(got)} in the bake, {_num(want)} at runtime.",
                        "fix": f"Bake again with {r.name}'s {what} at {_num(want)}.",
                    }
                )
    for k, b in in_bake.items():
        if k not in at_runtime:
            out.append(
                {
                    "cause": "lora-extra",
                    "lora": b.get("name"),
                    "text": f"LoRA {b.get('name')} is baked in but not in the runtime recipe.",
                    "fix": "Bake without it, or add it to the runtime recipe you compare with.",
                }
            )
    want_base = (baked.get("base") or {}).get("file")
    if want_base and os.path.basename(want_base) != os.path.basename(base_path):
        out.append(
            {
                "cause": "lineage",
                "text": f"The bake was made on {want_base}; the runtime renders use {os.path.basename(base_path)}.",
                "fix": "Compare with the base the checkpoint was baked on, or bake again on this base.",
            }
        )
    return out
