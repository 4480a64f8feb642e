"""LoHa: ΔW = (alpha / rank) · (w1a @ w1b) ⊙ (w2a @ w2b), with optional Tucker cores.

Follows ``lycoris/functional/loha.py``: with ``hada_t1/t2`` each factor is rebuilt as
einsum("i j ..., j r, i p -> p r ...", t, w_b, w_a), where ``hada_w*_a`` is (rank, out)
and ``hada_w*_b`` is (rank, in).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .base import Algorithm, Delta, Shape, ShapeProblem, alpha_scale, fit

W1A, W1B, W2A, W2B, T1, T2 = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"


class LoHa(Algorithm):
    id = "loha"
    label = "LoHa"
    params = frozenset({W1A, W1B, W2A, W2B, T1, T2})
    dora_ok = True

    @classmethod
    def claims(cls, names: frozenset[str]) -> bool:
        return {W1A, W1B, W2A, W2B} <= names

    @classmethod
    def rank(cls, shapes: Mapping[str, Shape]) -> int:
        return shapes[W1B][0]

    @classmethod
    def _full_shape(cls, s: Mapping[str, Shape], w_a: str, w_b: str, t: str) -> Shape:
        a, b = s[w_a], s[w_b]
        if t in s:
            tt = s[t]
            if a[0] != tt[0] or b[0] != tt[1]:
                raise ShapeProblem(f"{t} {list(tt)} does not fit {w_a} {list(a)} / {w_b} {list(b)}")
            return (a[1], b[1]) + tuple(tt[2:])
        if a[1] != b[0]:
            raise ShapeProblem(f"{w_a} {list(a)} and {w_b} {list(b)} disagree on the rank")
        return (a[0], math.prod(b[1:]))

    @classmethod
    def check(cls, shapes: Mapping[str, Shape], target: Shape) -> None:
        if (T1 in shapes) != (T2 in shapes):
            raise ShapeProblem("hada_t1 and hada_t2 must come together")
        f1 = cls._full_shape(shapes, W1A, W1B, T1)
        f2 = cls._full_shape(shapes, W2A, W2B, T2)
        if math.prod(f1) != math.prod(f2) or math.prod(f1) != math.prod(target) or f1[0] != target[0]:
            raise ShapeProblem(f"the LoHa factors give {list(f1)} and {list(f2)}, the weight is {list(target)}")

    @classmethod
    def delta(cls, p: Mapping[str, torch.Tensor], target: Shape, weight: torch.Tensor | None) -> Delta:
        scale = alpha_scale(p, p[W1B].shape[0])

        if T1 not in p:  # kept factored: (w1a @ w1b) ⊙ (w2a @ w2b), added row-chunk by row-chunk

            def flat(n: str) -> torch.Tensor:
                return p[n].reshape(p[n].shape[0], -1)

            return Delta(
                hada=(
                    (flat(W1A) * scale).contiguous(),
                    flat(W1B).contiguous(),
                    flat(W2A).contiguous(),
                    flat(W2B).contiguous(),
                )
            )

        def factor(a: str, b: str, t: str) -> torch.Tensor:
            return torch.einsum("ij...,jr,ip->pr...", p[t], p[b].reshape(p[b].shape[0], -1), p[a])

        w = factor(W1A, W1B, T1).reshape(target) * factor(W2A, W2B, T2).reshape(target)
        return Delta(dense=fit(w * scale, target, "LoHa"))
