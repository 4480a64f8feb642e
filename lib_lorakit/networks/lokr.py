"""LoKr: ΔW = scale · kron(w1, w2), each side full or factored, w2 optionally Tucker.

Follows ``lycoris/functional/lokr.py`` and the WebUI's ``network_lokr.py``:
w1 = ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``; w2 = ``lokr_w2``, ``lokr_w2_a @ lokr_w2_b``
(conv: ``lokr_w2_b`` may hold the kernel flattened), or with ``lokr_t2`` the Tucker
rebuild einsum("i j ..., j r, i p -> p r ...", t2, w2_b, w2_a). The scale is
alpha / dim, dim being the rank of the factored side; with both sides full the scale
is 1 (LyCORIS sets alpha = dim then).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .base import Algorithm, Delta, Shape, ShapeProblem, alpha_scale

W1, W1A, W1B = "lokr_w1", "lokr_w1_a", "lokr_w1_b"
W2, W2A, W2B = "lokr_w2", "lokr_w2_a", "lokr_w2_b"
T1, T2 = "lokr_t1", "lokr_t2"


class LoKr(Algorithm):
    id = "lokr"
    label = "LoKr"
    params = frozenset({W1, W1A, W1B, W2, W2A, W2B, T1, T2})
    dora_ok = True

    @classmethod
    def claims(cls, names: frozenset[str]) -> bool:
        return (W1 in names or {W1A, W1B} <= names) and (W2 in names or {W2A, W2B} <= names)

    @classmethod
    def rank(cls, shapes: Mapping[str, Shape]) -> int | None:
        if W1B in shapes:
            return shapes[W1B][0]
        if W2B in shapes:
            return shapes[W2B][0]
        return None

    @classmethod
    def _sides(cls, s: Mapping[str, Shape]) -> tuple[Shape, Shape]:
        if W1 in s:
            w1 = s[W1]
        else:
            a, b = s[W1A], s[W1B]
            if a[1] != b[0]:
                raise ShapeProblem(f"lokr_w1_a {list(a)} and lokr_w1_b {list(b)} disagree on the rank")
            w1 = (a[0], b[1])
        if W2 in s:
            w2 = s[W2]
        elif T2 in s:
            t, a, b = s[T2], s[W2A], s[W2B]
            if a[0] != t[0] or b[0] != t[1]:
                raise ShapeProblem(f"lokr_t2 {list(t)} does not fit lokr_w2_a {list(a)} / lokr_w2_b {list(b)}")
            w2 = (a[1], b[1]) + tuple(t[2:])
        else:
            a, b = s[W2A], s[W2B]
            if a[1] != b[0]:
                raise ShapeProblem(f"lokr_w2_a {list(a)} and lokr_w2_b {list(b)} disagree on the rank")
            w2 = (a[0],) + tuple(b[1:])
        return w1, w2

    @classmethod
    def check(cls, shapes: Mapping[str, Shape], target: Shape) -> None:
        w1, w2 = cls._sides(shapes)
        if len(w1) != 2:
            raise ShapeProblem(f"lokr_w1 must be 2-D, got {list(w1)}")
        out = w1[0] * w2[0]
        total = w1[0] * w1[1] * math.prod(w2)
        if out != target[0] or total != math.prod(target):
            raise ShapeProblem(
                f"kron of {list(w1)} and {list(w2)} gives {out} x {total // max(out, 1)} values, "
                f"the weight is {list(target)}"
            )

    @classmethod
    def delta(cls, p: Mapping[str, torch.Tensor], target: Shape, weight: torch.Tensor | None) -> Delta:
        scale = alpha_scale(p, cls.rank({k: tuple(v.shape) for k, v in p.items()}))
        w1 = p[W1] if W1 in p else p[W1A] @ p[W1B]
        if W2 in p:
            w2 = p[W2]
        elif T2 in p:
            w2 = torch.einsum("ij...,jr,ip->pr...", p[T2], p[W2B], p[W2A])
        else:
            b = p[W2B]
            w2 = (p[W2A] @ b.reshape(b.shape[0], -1)).reshape((p[W2A].shape[0],) + tuple(b.shape[1:]))
        # kron(w1, w2) viewed as (a·c, b·(d·k·k)) is ΔW flattened to (out, in·k·k), whether w2
        # holds the kernel as trailing dims or flattened into its columns; kept factored.
        w2 = w2.reshape(w2.shape[0], -1).contiguous()
        if w1.shape[0] * w2.shape[0] != target[0] or w1.numel() * w2.numel() != math.prod(target):
            raise ShapeProblem(f"kron of {list(w1.shape)} and {list(w2.shape)} does not fit {list(target)}")
        return Delta(kron=((w1 * scale).contiguous(), w2))
