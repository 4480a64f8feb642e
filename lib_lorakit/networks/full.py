"""Full-weight and norm updates: the update is stored as is.

``diff``/``diff_b`` follow ``lycoris/modules/full.py`` (and the WebUI's
``network_full.py``); ``w_norm``/``b_norm`` follow ``lycoris/modules/norms.py`` (WebUI
``network_norm.py``) and target GroupNorm/LayerNorm weights and biases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .base import Algorithm, Delta, Shape, ShapeProblem, alpha_scale, fit


class Full(Algorithm):
    id = "full"
    label = "Full (diff)"
    params = frozenset({"diff", "diff_b"})

    @classmethod
    def claims(cls, names: frozenset[str]) -> bool:
        return "diff" in names

    @classmethod
    def check(cls, shapes: Mapping[str, Shape], target: Shape) -> None:
        if math.prod(shapes["diff"]) != math.prod(target):
            raise ShapeProblem(f"diff {list(shapes['diff'])} does not fit the weight {list(target)}")
        if "diff_b" in shapes and math.prod(shapes["diff_b"]) != target[0]:
            raise ShapeProblem(f"diff_b {list(shapes['diff_b'])} does not fit a bias of {target[0]}")

    @classmethod
    def delta(cls, p: Mapping[str, torch.Tensor], target: Shape, weight: torch.Tensor | None) -> Delta:
        s = alpha_scale({k: v for k, v in p.items() if k == "scale"}, None)
        b = p.get("diff_b")
        return Delta(dense=fit(p["diff"] * s, target, "diff"), bias=None if b is None else b.reshape(-1) * s)


class Norm(Algorithm):
    id = "norm"
    label = "Norm"
    params = frozenset({"w_norm", "b_norm"})

    @classmethod
    def claims(cls, names: frozenset[str]) -> bool:
        return "w_norm" in names

    @classmethod
    def check(cls, shapes: Mapping[str, Shape], target: Shape) -> None:
        if math.prod(shapes["w_norm"]) != math.prod(target):
            raise ShapeProblem(f"w_norm {list(shapes['w_norm'])} does not fit the norm weight {list(target)}")
        if "b_norm" in shapes and math.prod(shapes["b_norm"]) != math.prod(target):
            raise ShapeProblem(f"b_norm {list(shapes['b_norm'])} does not fit the norm bias {list(target)}")

    @classmethod
    def delta(cls, p: Mapping[str, torch.Tensor], target: Shape, weight: torch.Tensor | None) -> Delta:
        b = p.get("b_norm")
        return Delta(dense=fit(p["w_norm"], target, "w_norm"), bias=None if b is None else b.reshape(-1))
