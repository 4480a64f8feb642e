"""Read ``<lora:name:...>`` / ``<lyco:name:...>`` tags from prompt text into a recipe.

The WebUI's syntax: ``<lora:name>`` (strength 1), ``<lora:name:W>`` (text encoder and
UNet both W), ``<lora:name:TE:UNET>`` (text encoder first, then UNet), and named
arguments ``te=``, ``unet=``, ``lbw=`` (LoRA Block Weight) and ``dyn=``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import RecipeError

TAG = re.compile(r"<(lora|lyco):([^>]+)>", re.I)
# a tag with the separator around it, for taking tags out of a prompt
_SPAN = re.compile(r"\s*,?\s*" + TAG.pattern + r"\s*,?\s*", re.I)


def tag_name(match: re.Match) -> str:
    """The LoRA name of a :data:`TAG` match (what stands before the first ':')."""
    return match.group(2).split(":", 1)[0].strip()


def tag_names(text: str) -> list[str]:
    """The LoRA names tagged in ``text``, in order (no checks: see :func:`parse_tags` for the recipe)."""
    return [tag_name(m) for m in TAG.finditer(text or "")]


def strip_tags(prompt: str, names: Sequence[str]) -> str:
    """``prompt`` without the tags of the named LoRAs (and the separator next to each); every other
    character stays as it was."""
    want = {n.lower() for n in names}

    def sub(m: re.Match) -> str:
        if tag_name(m).lower() not in want:
            return m.group(0)
        if m.start() == 0 or m.end() == len(m.string):
            return ""
        return ", " if "," in m.group(0).replace(m.group(0).strip(" ,"), "") else " "

    return _SPAN.sub(sub, prompt)


@dataclass
class TagEntry:
    name: str
    strength: float  # UNet strength
    te_strength: float
    blocks: str | None = None
    tag: str = ""


def _num(v: str, tag: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise RecipeError(
            f"{tag}: {v!r} is not a number.", fix="Write <lora:name:0.8> or <lora:name:te=0.5:unet=0.8>."
        ) from None


def parse_tags(text: str) -> list[TagEntry]:
    """All LoRA tags in ``text``, in order.

    Raises:
        RecipeError: a tag with no name, a strength that is not a number, an unknown named argument.
    """
    out: list[TagEntry] = []
    for m in TAG.finditer(text or ""):
        tag = m.group(0)
        parts = [p.strip() for p in m.group(2).split(":")]
        name = parts[0]
        if not name:
            raise RecipeError(f"{tag} has no LoRA name.")
        positional: list[str] = []
        named: dict[str, str] = {}
        for p in parts[1:]:
            if "=" in p:
                k, _, v = p.partition("=")
                named[k.strip().lower()] = v.strip()
            elif p:
                positional.append(p)
        for k in named:
            if k not in ("te", "unet", "lbw", "dyn", "start", "stop", "step"):
                raise RecipeError(f"{tag}: unknown argument {k!r}.", fix="Known: te=, unet=, lbw=.")
        blocks = named.get("lbw")
        nums = []
        for p in positional:
            if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", p):
                nums.append(float(p))
            elif blocks is None and len(nums) >= 1:
                blocks = p  # LoRA Block Weight's positional preset: <lora:name:1:INALL>
            else:
                _num(p, tag)  # raises with the message
        te = nums[0] if nums else 1.0
        unet = nums[1] if len(nums) > 1 else te
        if "te" in named:
            te = _num(named["te"], tag)
        if "unet" in named:
            unet = _num(named["unet"], tag)
        out.append(TagEntry(name=name, strength=unet, te_strength=te, blocks=blocks, tag=tag))
    return out
