"""What every network algorithm provides, and the update it returns.

An algorithm claims one layer's key group (``lora_up.weight``, ``hada_w1_a``, ...),
checks the group's shapes against the target weight without reading values, and
turns the tensors into the float32 update ΔW at strength 1 (alpha/rank applied).
Strength, block weights and devices stay with the caller.

Runtime semantics follow the WebUI (A1111 1.10 ``extensions-builtin/Lora``, Forge):
every update is computed against the *original* weight, updates of several networks
are summed, and strength scales each update linearly (for DoRA: the decomposed
weight minus the original, times strength).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

Shape = tuple[int, ...]


@dataclass
class Delta:
    """One module's update in weight space, float32, at strength 1.

    Exactly one of ``lowrank`` / ``dense`` is set (or neither, for a bias-only update).

    Attributes:
        lowrank: (up (out, r), down (r, in_flat)) with the scale folded into ``up``;
            ΔW = up @ down reshaped to the target shape. Kept factored so several
            LoRAs on one weight become one GEMM and ΔW is never materialised.
        dense: ΔW with the target's shape.
        bias: update of the layer's bias, shape (out,), or None.
    """

    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def to_dense(self, shape: Shape) -> torch.Tensor:
        """Materialise ΔW with ``shape`` (zeros when there is no weight update)."""
        if self.dense is not None:
            return self.dense.reshape(shape)
        if self.lowrank is not None:
            up, down = self.lowrank
            return (up @ down).reshape(shape)
        return torch.zeros(shape, dtype=torch.float32)

    def scaled(self, m: float) -> Delta:
        """Return this update times ``m``."""
        return Delta(
            lowrank=(self.lowrank[0] * m, self.lowrank[1]) if self.lowrank is not None else None,
            dense=self.dense * m if self.dense is not None else None,
            bias=self.bias * m if self.bias is not None else None,
        )

    def norm(self) -> float:
        """Frobenius norm of the weight update, without materialising a low-rank ΔW."""
        if self.dense is not None:
            return float(torch.linalg.vector_norm(self.dense))
        if self.lowrank is not None:
            up, down = self.lowrank
            # ||U D||_F^2 = sum((U^T U) * (D D^T)): two r x r Gram matrices
            g = (up.T @ up) * (down @ down.T)
            return math.sqrt(max(float(g.sum()), 0.0))
        return 0.0


class ShapeProblem(ValueError):
    """A key group whose shapes do not fit the target weight (message says how)."""


class Algorithm:
    """Base class of one network algorithm (LyCORIS naming)."""

    id: ClassVar[str] = ""
    label: ClassVar[str] = ""
    # parameter names this algorithm may own (besides the shared ones below)
    params: ClassVar[frozenset[str]] = frozenset()
    # the update depends on the original weight (IA3, OFT, GLoRA)
    needs_weight: ClassVar[bool] = False
    # DoRA (weight decomposition) can wrap this algorithm
    dora_ok: ClassVar[bool] = False

    SHARED: ClassVar[frozenset[str]] = frozenset({"alpha", "scale", "dora_scale"})

    @classmethod
    def claims(cls, names: frozenset[str]) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    @classmethod
    def check(cls, shapes: Mapping[str, Shape], target: Shape) -> None:
        """Raise :class:`ShapeProblem` unless the group fits a weight of shape ``target``."""
        raise NotImplementedError  # pragma: no cover

    @classmethod
    def rank(cls, shapes: Mapping[str, Shape]) -> int | None:
        """The group's rank (dimension), or None when the notion does not apply."""
        return None

    @classmethod
    def delta(cls, p: Mapping[str, torch.Tensor], target: Shape, weight: torch.Tensor | None) -> Delta:
        """Return ΔW at strength 1 for a target of shape ``target``.

        Args:
            p: the group's tensors, float32, by parameter name.
            target: the target weight's shape (a row slice for CLIP-G q/k/v).
            weight: the original weight (float32, ``target`` shape) when ``needs_weight``.
        """
        raise NotImplementedError  # pragma: no cover


def scalar(p: Mapping[str, torch.Tensor], name: str) -> float | None:
    t = p.get(name)
    return None if t is None else float(t.reshape(-1)[0])


def alpha_scale(p: Mapping[str, torch.Tensor], dim: int | None) -> float:
    """Scale = ``scale`` if given, else alpha/dim; 1 when alpha or dim is absent (as the WebUI)."""
    s = scalar(p, "scale")
    if s is not None:
        return s
    alpha = scalar(p, "alpha")
    if alpha is None or not dim:
        return 1.0
    return alpha / dim


def fit(delta: torch.Tensor, target: Shape, what: str) -> torch.Tensor:
    """Reshape ΔW to the target shape; a 1x1 conv and a linear layer are interchangeable."""
    if tuple(delta.shape) == tuple(target):
        return delta
    if delta.numel() == math.prod(target):
        return delta.reshape(target)
    raise ShapeProblem(f"{what} gives an update of shape {list(delta.shape)}, the weight is {list(target)}")


def same_numel(shape: Shape, target: Shape) -> bool:
    return math.prod(shape) == math.prod(target)
