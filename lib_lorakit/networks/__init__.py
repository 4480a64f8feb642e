"""Network algorithms (one module each) and the registry that picks one per key group.

The registry is an ordered tuple: the first algorithm that claims a group wins.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from .base import Algorithm, Delta, Shape, ShapeProblem
from .dora import decompose, dora_axis
from .full import Full, Norm
from .glora import GLoRA
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .oft import OFT

ALGORITHMS: tuple[type[Algorithm], ...] = (OFT, LoKr, LoHa, GLoRA, Full, Norm, IA3, LoRA)
DORA_PARAMS = ("dora_scale", "lora_magnitude_vector")

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Delta",
    "ShapeProblem",
    "identify",
    "check_group",
    "compute_delta",
    "algorithm_name",
    "needs_weight",
]


@functools.lru_cache(maxsize=1024)  # a handful of distinct parameter sets per file
def identify(names: frozenset[str]) -> tuple[type[Algorithm] | None, list[str]]:
    """Pick the algorithm for a key group. Returns (algorithm, names it does not own)."""
    for alg in ALGORITHMS:
        if alg.claims(names):
            owned = alg.params | Algorithm.SHARED | (set(DORA_PARAMS) if alg.dora_ok else set())
            return alg, sorted(names - owned)
    return None, sorted(names)


def dora_param(names: Mapping[str, object] | frozenset[str]) -> str | None:
    for p in DORA_PARAMS:
        if p in names:
            return p
    return None


def algorithm_name(alg: type[Algorithm], names: Mapping[str, object] | frozenset[str]) -> str:
    """Algorithm id as reported: 'dora' when a DoRA magnitude wraps LoRA/LoHa/LoKr."""
    if dora_param(names):
        return {"lora": "dora", "loha": "doha", "lokr": "dokr"}.get(alg.id, alg.id + "+dora")
    return alg.id


def needs_weight(alg: type[Algorithm], names: Mapping[str, object] | frozenset[str]) -> bool:
    return alg.needs_weight or dora_param(names) is not None


def check_group(alg: type[Algorithm], shapes: Mapping[str, Shape], target: Shape) -> None:
    """Raise ShapeProblem unless the group (DoRA magnitude included) fits ``target``."""
    alg.check(shapes, target)
    dp = dora_param(shapes)
    if dp:
        if len(target) < 2:
            raise ShapeProblem(f"DoRA needs a 2-D or conv weight, the target is {list(target)}")
        dora_axis(shapes[dp], target, magnitude_vector=dp == "lora_magnitude_vector")


def compute_delta(
    alg: type[Algorithm], p: Mapping[str, torch.Tensor], target: Shape, weight: torch.Tensor | None
) -> Delta:
    """ΔW at strength 1 for one group; DoRA groups come back dense (they depend on W)."""
    d = alg.delta(p, target, weight)
    dp = dora_param(p)
    if dp is None:
        return d
    assert weight is not None
    axis = dora_axis(tuple(p[dp].shape), target, magnitude_vector=dp == "lora_magnitude_vector")
    return Delta(dense=decompose(weight, d.to_dense(target), p[dp].float(), axis), bias=d.bias)
