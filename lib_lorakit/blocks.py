"""Per-block weights: LoRA Block Weight presets and vectors.

Vectors use LoRA Block Weight's block lists, so users' presets carry over:

- SD1.5: 17 values (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03..OUT11)
  or 26 values (BASE, IN00..IN11, M00, OUT00..OUT11).
- SDXL: 12 values (BASE, IN04, IN05, IN07, IN08, M00, OUT00..OUT05)
  or 20 values (BASE, IN00..IN08, M00, OUT00..OUT08).

As in LoRA Block Weight, blocks a short vector does not list get weight 0; the bake
report says when a LoRA has layers there. The uniform presets (ALL, NONE, ALL0.5)
cover every block. BASE weights the text encoders.
"""

from __future__ import annotations

import re

from .errors import RecipeError
from .formats.arch import ARCHS

BLOCKS_17 = (
    "BASE",
    "IN01",
    "IN02",
    "IN04",
    "IN05",
    "IN07",
    "IN08",
    "M00",
    "OUT03",
    "OUT04",
    "OUT05",
    "OUT06",
    "OUT07",
    "OUT08",
    "OUT09",
    "OUT10",
    "OUT11",
)
BLOCKS_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")
VECTOR_LISTS: dict[str, dict[int, tuple[str, ...]]] = {
    "sd15": {17: BLOCKS_17, 26: ARCHS["sd15"].blocks},
    "sdxl": {12: BLOCKS_12, 20: ARCHS["sdxl"].blocks},
}

# LoRA Block Weight's default presets (17 values, SD1.5).
PRESETS_17: dict[str, str] = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}
PRESETS_12: dict[str, str] = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,1,1,1,1,1,1,0,0,0",
    "OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}
PRESETS: dict[str, dict[str, str]] = {"sd15": PRESETS_17, "sdxl": PRESETS_12}


def _extra_presets(arch: str) -> dict[str, list[float]]:
    """Presets over every block of the architecture (uniform ones never leave a block out)."""
    n = len(ARCHS[arch].blocks)
    return {
        "NONE": [0.0] * n,
        "ALL": [1.0] * n,
        "ALL0.5": [0.5] * n,
        "UNETONLY": [0.0] + [1.0] * (n - 1),
        "TEONLY": [1.0] + [0.0] * (n - 1),
    }


def preset_names(arch: str) -> list[str]:
    return list(dict.fromkeys(list(PRESETS[arch]) + list(_extra_presets(arch))))


def parse_block_weights(text: str, arch: str, implicit: set[str] | None = None) -> dict[str, float]:
    """Turn a preset name or a vector into a weight for every block id of ``arch``.

    Accepts a preset (``INALL``), a comma-separated vector of the lengths above, or named
    weights (``IN04=0.5,OUT05=0``; unnamed blocks keep 1).

    Args:
        implicit: if given, receives the blocks a short vector leaves at 0 without listing them.

    Raises:
        RecipeError: unknown preset, wrong length, or a value that is not a number.
    """
    arch_blocks = ARCHS[arch].blocks
    label = ARCHS[arch].label
    t = text.strip()
    if not t:
        raise RecipeError("Empty block weights.", fix="Give a preset name or a comma-separated vector.")
    presets = PRESETS[arch]
    extra = _extra_presets(arch)
    if t.upper() in extra:
        return dict(zip(arch_blocks, extra[t.upper()]))
    if re.fullmatch(r"[A-Za-z][\w.]*", t):
        key = t.upper()
        if key not in presets:
            from .errors import did_you_mean

            raise RecipeError(
                f"Unknown block-weight preset {t!r} for {label}.{did_you_mean(key, preset_names(arch))}",
                fix=f"Presets for {label}: {', '.join(preset_names(arch))}; or give a vector.",
            )
        t = presets[key]
    if "=" in t:
        weights = dict.fromkeys(arch_blocks, 1.0)
        for part in t.split(","):
            name, _, val = part.partition("=")
            name = name.strip().upper()
            if name == "MID":
                name = "M00"
            if name not in weights:
                raise RecipeError(
                    f"Unknown block {name!r} in {text!r} for {label}.", fix=f"Blocks are {', '.join(arch_blocks)}."
                )
            weights[name] = _num(val, text)
        return weights
    values = [_num(v, text) for v in t.split(",")]
    lists = VECTOR_LISTS[arch]
    if len(values) not in lists:
        lengths = " or ".join(str(n) for n in lists)
        raise RecipeError(
            f"Block-weight vector {text!r} has {len(values)} values; {label} takes {lengths}.",
            fix=f"{label} blocks: {', '.join(arch_blocks)}.",
        )
    weights = dict.fromkeys(arch_blocks, 0.0)
    weights.update(zip(lists[len(values)], values))
    if implicit is not None:
        implicit.update(set(arch_blocks) - set(lists[len(values)]))
    return weights


def _num(v: str, text: str) -> float:
    try:
        return float(v.strip())
    except ValueError:
        raise RecipeError(f"{v.strip()!r} in block weights {text!r} is not a number.") from None


def format_weights(weights: dict[str, float], arch: str) -> str:
    """The full-length vector, as text (for reports and metadata)."""
    return ",".join(f"{weights[b]:g}" for b in ARCHS[arch].blocks)
