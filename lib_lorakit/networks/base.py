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

    At most one of the weight forms is set (none, for a bias-only update). The
    factored forms let the bake add ΔW row-chunk by row-chunk without ever
    materialising it:

    Attributes:
        lowrank: (up (out, r), down (r, in_flat)), scale folded into ``up``:
            ΔW = up @ down. Several LoRAs on one weight become one GEMM.
        kron: (w1 (a, b), w2 (c, d, ...)), scale folded into ``w1``: ΔW = kron(w1, w2)
            reshaped to (a·c, b·d, ...).
        hada: (w1a (out, r), w1b (r, in_flat), w2a, w2b), scale folded into ``w1a``:
            ΔW = (w1a @ w1b) ⊙ (w2a @ w2b).
        dense: ΔW with the target's shape.
        bias: update of the layer's bias, shape (out,), or None.
    """

    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None
    dense: torch.Tensor | None = None
    kron: tuple[torch.Tensor, torch.Tensor] | None = None
    hada: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    bias: torch.Tensor | None = None

    def add_rows(self, dst: torch.Tensor, r0: int, r1: int, m: float = 1.0) -> None:
        """dst += m · ΔW[r0:r1], ΔW seen as (out, in_flat); ``dst`` is (r1 - r0, in_flat)."""
        if self.lowrank is not None:
            up, down = self.lowrank
            dst.addmm_(up[r0:r1], down, alpha=m)
        elif self.kron is not None:
            # row i = ia*c + ic of kron(w1, w2) is outer(w1[ia], w2[ic]) flattened
            w1, w2 = self.kron
            c = w2.shape[0]
            b = w1.shape[1]
            w2f = w2.reshape(c, -1)
            full0, full1 = -(-r0 // c), r1 // c  # whole blocks of c rows inside [r0, r1)
            if full0 < full1:  # all whole blocks in one broadcast: (na, c, b, d) += w1 (na,1,b,1) * w2 (1,c,1,d)
                view = dst[full0 * c - r0 : full1 * c - r0].view(full1 - full0, c, b, -1)
                view.addcmul_(w1[full0:full1].view(-1, 1, b, 1), w2f.view(1, c, 1, -1), value=m)
                edges = [(r0, full0 * c), (full1 * c, r1)]
            else:
                edges = [(r0, r1)]
            for e0, e1 in edges:  # partial blocks at the chunk's ends
                for ia in range(e0 // c, -(-e1 // c)):
                    s0, s1 = max(e0, ia * c), min(e1, (ia + 1) * c)
                    if s0 < s1:
                        view = dst[s0 - r0 : s1 - r0].view(s1 - s0, b, -1)
                        view.addcmul_(
                            w1[ia].view(1, b, 1), w2f[s0 - ia * c : s1 - ia * c].view(s1 - s0, 1, -1), value=m
                        )
        elif self.hada is not None:
            a1, b1, a2, b2 = self.hada
            dst.addcmul_(a1[r0:r1] @ b1, a2[r0:r1] @ b2, value=m)
        elif self.dense is not None:
            d = self.dense.reshape(self.dense.shape[0], -1) if self.dense.dim() > 1 else self.dense.reshape(-1, 1)
            dst.add_(d[r0:r1], alpha=m)

    def to_dense(self, shape: Shape) -> torch.Tensor:
        """Materialise ΔW with ``shape`` (zeros when there is no weight update)."""
        if self.dense is not None:
            return self.dense.reshape(shape)
        if self.lowrank is None and self.kron is None and self.hada is None:
            return torch.zeros(shape, dtype=torch.float32)
        rows = shape[0] if len(shape) else 1
        out = torch.zeros(rows, math.prod(shape) // max(rows, 1), dtype=torch.float32)
        self.add_rows(out, 0, rows)
        return out.reshape(shape)

    def norm(self) -> float:
        """Frobenius norm of the weight update, without materialising a factored ΔW."""
        if self.dense is not None:
            return float(torch.linalg.vector_norm(self.dense))
        if self.lowrank is not None:
            up, down = self.lowrank
            # ||U D||_F^2 = sum((U^T U) * (D D^T)): two r x r Gram matrices
            g = (up.T @ up) * (down @ down.T)
            return math.sqrt(max(float(g.sum()), 0.0))
        if self.kron is not None:
            return float(torch.linalg.vector_norm(self.kron[0]) * torch.linalg.vector_norm(self.kron[1]))
        if self.hada is not None:
            a1, b1, a2, b2 = self.hada
            total = 0.0
            step = max(1, (1 << 18) // max(b1.shape[1], 1))
            for r0 in range(0, a1.shape[0], step):
                blk = (a1[r0 : r0 + step] @ b1) * (a2[r0 : r0 + step] @ b2)
                total += float(torch.dot(blk.view(-1), blk.view(-1)))
            return math.sqrt(total)
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
