"""(IA)³: ΔW = W ⊙ w, with w per output channel, or per input channel when ``on_input``.

Follows ``lycoris/modules/ia3.py`` (``_ia3_weight`` with diff=True) and the WebUI's
``network_ia3.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import Algorithm, Delta, Shape, ShapeProblem


class IA3(Algorithm):
    id = "ia3"
    label = "(IA)³"
    params = frozenset({"weight", "on_input"})
    needs_weight = True

    @classmethod
    def claims(cls, names: frozenset[str]) -> bool:
        return "weight" in names and "on_input" in names

    @staticmethod
    def _on_input(p: Mapping) -> bool:
        v = p["on_input"]
        return bool(v.reshape(-1)[0]) if isinstance(v, torch.Tensor) else bool(v)

    @classmethod
    def check(cls, shapes: Mapping[str, Shape], target: Shape) -> None:
        n = 1
        for s in shapes["weight"]:
            n *= s
        if n not in (target[0], target[1] if len(target) > 1 else -1):
            raise ShapeProblem(
                f"(IA)³ weight {list(shapes['weight'])} fits neither {target[0]} outputs nor the inputs of {list(target)}"
            )

    @classmethod
    def delta(cls, p: Mapping[str, torch.Tensor], target: Shape, weight: torch.Tensor | None) -> Delta:
        assert weight is not None
        w = p["weight"].reshape(-1)
        if cls._on_input(p):
            if w.numel() != target[1]:
                raise ValueError(f"(IA)³ on_input weight has {w.numel()} values, the layer has {target[1]} inputs")
            view = (1, -1) + (1,) * (len(target) - 2)
        else:
            if w.numel() != target[0]:
                raise ValueError(f"(IA)³ weight has {w.numel()} values, the layer has {target[0]} outputs")
            view = (-1,) + (1,) * (len(target) - 1)
        return Delta(dense=weight * w.reshape(view))
