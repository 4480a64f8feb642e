"""LoRA and LoCon: ΔW = (alpha / rank) · up @ down, optionally through a Tucker ``mid``.

Covers kohya ``networks/lora.py`` (linear, conv 1x1, conv 3x3 with ``conv_dim``),
LyCORIS LoCon with ``use_tucker`` (``lora_mid``, ``lycoris/functional/locon.py``),
DyLoRA files (saved in the same layout by kohya ``networks/dylora.py``) and the
diffusers/PEFT spellings (``lora_A``/``lora_B``, ``lora.up``/``lora.down``), which the
key parser renames to ``lora_up.weight``/``lora_down.weight`` before they get here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .base import Algorithm, Delta, Shape, ShapeProblem, alpha_scale

UP, DOWN, MID = "lora_up.weight", "lora_down.weight", "lora_mid.weight"


class LoRA(Algorithm):
    id = "lora"
    label = "LoRA/LoCon"
    params = frozenset({UP, DOWN, MID})
    dora_ok = True

    @classmethod
    def claims(cls, names: frozenset[str]) -> bool:
        return UP in names and DOWN in names

    @classmethod
    def rank(cls, shapes: Mapping[str, Shape]) -> int:
        return shapes[DOWN][0]

    @classmethod
    def kind(cls, shapes: Mapping[str, Shape]) -> str:
        """'linear', 'conv1x1', 'conv3x3' or 'tucker' (LoCon with mid)."""
        if MID in shapes:
            return "tucker"
        d = shapes[DOWN]
        if len(d) == 4 and d[2:] != (1, 1):
            return "conv3x3" if d[2:] == (3, 3) else f"conv{d[2]}x{d[3]}"
        return "conv1x1" if len(d) == 4 else "linear"

    @classmethod
    def check(cls, shapes: Mapping[str, Shape], target: Shape) -> None:
        up, down = shapes[UP], shapes[DOWN]
        r = down[0]
        if len(up) < 2 or up[1] != r:
            raise ShapeProblem(f"lora_up {list(up)} and lora_down {list(down)} disagree on the rank")
        if any(s != 1 for s in up[2:]):
            raise ShapeProblem(f"lora_up {list(up)} has a kernel; only lora_down/lora_mid may")
        out = up[0]
        if MID in shapes:
            mid = shapes[MID]
            if len(mid) < 3 or mid[0] != r or mid[1] != r:
                raise ShapeProblem(f"lora_mid {list(mid)} does not fit rank {r}")
            full = (out, math.prod(down[1:])) + tuple(mid[2:])
        else:
            full = (out,) + tuple(down[1:])
        if math.prod(full) != math.prod(target) or full[0] != target[0]:
            raise ShapeProblem(
                f"lora_up {list(up)} x lora_down {list(down)} gives {list(full)}, the weight is {list(target)}"
            )

    @classmethod
    def delta(cls, p: Mapping[str, torch.Tensor], target: Shape, weight: torch.Tensor | None) -> Delta:
        up, down = p[UP], p[DOWN]
        r = down.shape[0]
        scale = alpha_scale(p, r)
        u = up.reshape(up.shape[0], r)
        d = down.reshape(r, -1)
        mid = p.get(MID)
        if mid is not None:
            # ΔW[o,i,k,l] = Σ_ab up[o,a] mid[a,b,k,l] down[b,i]; fold mid into down
            d = torch.einsum("abkl,bi->aikl", mid, d).reshape(r, -1)
        return Delta(lowrank=(u * scale, d))
