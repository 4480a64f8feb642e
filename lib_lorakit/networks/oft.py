"""Orthogonal fine-tuning: OFT (kohya and LyCORIS diag-OFT) and BOFT (LyCORIS butterfly).

The rotation acts on the output channels: W' = R^T W block by block (kohya
``networks/oft.py`` multiplies outputs by R; LyCORIS ``functional/diag_oft.py`` uses
einsum("k n m, k n ... -> k m ...", R, W)). ΔW = W' - W, times the optional LyCORIS
``rescale``. Strength scales ΔW linearly, as the WebUI does.

- ``oft_blocks`` (blocks, b, b): a skew-symmetric parameter Q; R = (I+Q)(I-Q)^-1
  (Cayley), with ||Q|| clamped to alpha·out when alpha > 0 (kohya and LyCORIS).
- ``oft_blocks`` (m, blocks, b, b): BOFT, m butterfly stages of such rotations
  (``lycoris/functional/boft.py``).
- ``oft_diag``: the older LyCORIS layout that stores R itself (WebUI ``network_oft.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .base import Algorithm, Delta, Shape, ShapeProblem, scalar


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R = (I + Q)(I - Q)^-1 with Q = B - B^T, ||Q|| clamped to ``constraint`` when > 0."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        n = torch.linalg.vector_norm(q) + 1e-8
        if n > constraint:
            q = q * (constraint / n)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


class OFT(Algorithm):
    id = "oft"
    label = "OFT/BOFT"
    params = frozenset({"oft_blocks", "oft_diag", "rescale"})
    needs_weight = True

    @classmethod
    def claims(cls, names: frozenset[str]) -> bool:
        return "oft_blocks" in names or "oft_diag" in names

    @classmethod
    def _blocks(cls, shapes: Mapping[str, Shape]) -> Shape:
        return shapes["oft_blocks"] if "oft_blocks" in shapes else shapes["oft_diag"]

    @classmethod
    def rank(cls, shapes: Mapping[str, Shape]) -> int:
        return cls._blocks(shapes)[-3]

    @classmethod
    def check(cls, shapes: Mapping[str, Shape], target: Shape) -> None:
        b = cls._blocks(shapes)
        if len(b) not in (3, 4) or b[-1] != b[-2]:
            raise ShapeProblem(f"OFT blocks {list(b)} are not square blocks")
        n, size = b[-3], b[-1]
        if n * size != target[0]:
            raise ShapeProblem(f"{n} OFT blocks of {size} cover {n * size} outputs, the weight has {target[0]}")
        if len(b) == 4 and size % 2:
            raise ShapeProblem(f"BOFT block size {size} must be even")
        if "rescale" in shapes and math.prod(shapes["rescale"]) != target[0]:
            raise ShapeProblem(f"OFT rescale {list(shapes['rescale'])} does not fit {target[0]} outputs")

    @classmethod
    def delta(cls, p: Mapping[str, torch.Tensor], target: Shape, weight: torch.Tensor | None) -> Delta:
        assert weight is not None
        out = target[0]
        alpha = scalar(p, "alpha") or 0.0
        if "oft_blocks" in p:
            r = cayley(p["oft_blocks"], alpha * out)
        else:
            r = p["oft_diag"]
        w = weight
        if r.dim() == 3:
            nb, b, _ = r.shape
            new = torch.einsum("knm,kn...->km...", r, w.reshape(nb, b, *w.shape[1:])).reshape(w.shape)
        else:  # BOFT butterfly (lycoris/functional/boft.py, _diff_weight at scale 1)
            m, _, b, _ = r.shape
            half = b // 2
            new = w
            for i in range(m):
                k = 2**i * half
                new = new.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
                new = torch.einsum("bij,bj...->bi...", r[i], new)
                new = new.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
        if "rescale" in p:
            new = new * p["rescale"].reshape((-1,) + (1,) * (w.dim() - 1))
        return Delta(dense=new - w)
