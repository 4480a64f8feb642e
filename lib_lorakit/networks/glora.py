"""GLoRA: ΔW = (alpha / rank) · (W·A + B), A and B low rank.

Follows ``lycoris/modules/glora.py``: ``a1.weight`` (in, r), ``a2.weight`` (r, in),
``b1.weight`` (out, r), ``b2.weight`` (r, in[·k·k]); ΔW = scale·(W @ a1 @ a2 + b1 @ b2),
with W @ a1 contracting the input channels. Files in the older layout (a1 (r, in),
a2 (in, r), b1 (r, in), b2 (out, r)), as read by the WebUI's ``network_glora.py``,
are recognised by their shapes and give ΔW = W @ a2 @ a1 + b2 @ b1.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import Algorithm, Delta, Shape, ShapeProblem, alpha_scale, fit

A1, A2, B1, B2 = "a1.weight", "a2.weight", "b1.weight", "b2.weight"


def _2d(s: Shape) -> tuple[int, int]:
    n = 1
    for x in s[1:]:
        n *= x
    return s[0], n


class GLoRA(Algorithm):
    id = "glora"
    label = "GLoRA"
    params = frozenset({A1, A2, B1, B2})
    needs_weight = True

    @classmethod
    def claims(cls, names: frozenset[str]) -> bool:
        return {A1, A2, B1, B2} <= names

    @classmethod
    def layout(cls, shapes: Mapping[str, Shape], target: Shape) -> str:
        out = target[0]
        a1, a2, b1, b2 = (_2d(shapes[k]) for k in (A1, A2, B1, B2))
        inp = target[1] if len(target) > 1 else 1
        if a1[0] == inp and a1[1] == a2[0] and a2[1] == inp and b1[0] == out and b1[1] == b2[0]:
            return "new"
        if a2[0] == inp and a2[1] == a1[0] and a1[1] == inp and b2[0] == out and b2[1] == b1[0]:
            return "old"
        raise ShapeProblem(
            f"GLoRA a1 {list(a1)}, a2 {list(a2)}, b1 {list(b1)}, b2 {list(b2)} do not fit the weight {list(target)}"
        )

    @classmethod
    def rank(cls, shapes: Mapping[str, Shape]) -> int:
        return min(_2d(shapes[A1]))

    @classmethod
    def check(cls, shapes: Mapping[str, Shape], target: Shape) -> None:
        cls.layout(shapes, target)

    @classmethod
    def delta(cls, p: Mapping[str, torch.Tensor], target: Shape, weight: torch.Tensor | None) -> Delta:
        assert weight is not None
        shapes = {k: tuple(v.shape) for k, v in p.items()}
        new = cls.layout(shapes, target) == "new"
        a1, a2, b1, b2 = (p[k].reshape(p[k].shape[0], -1) for k in (A1, A2, B1, B2))
        if not new:  # old layout: roles swapped
            a1, a2, b1, b2 = a2, a1, b2, b1
        r = a2.shape[0]
        scale = alpha_scale(p, r)
        wa = torch.einsum("oi...,ij->oj...", weight, a1)
        wa = torch.einsum("oj...,ji->oi...", wa, a2)
        wb = (b1 @ b2).reshape(target)
        return Delta(dense=fit((wa + wb) * scale, target, "GLoRA"))
