"""The merge methods, declared once: name, models taken, base needed, parameters with bounds, and the
per-chunk function. The engine dispatches through this table; the CLI's choices, the API's enum
and the tab's dropdown are read from it (in the spirit of sd-mecha's ``@merge_method``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import methods


@dataclass(frozen=True)
class Param:
    name: str
    default: float | int | bool
    lo: float | None = None
    hi: float | None = None
    help: str = ""


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    models: tuple[int, int | None]  # (fewest, most) ingredients besides the base
    needs_base: bool
    params: tuple[Param, ...] = ()
    prepass: str | None = None  # "ties" (per-model thresholds) or "slerp" (norms); None: element-wise
    # apply(ingredients, base, weights, block_factor, params, prepass_result, key, chunk_index, out)
    apply: Callable | None = None  # None: the engine's weighted sum (with its diagnostics fused in)


def _add_difference(ing, base, w, b, p, extra, key, ci, out):
    return methods.add_difference(ing[0], ing[1], base, w[1] * b, out)


def _ties(ing, base, w, b, p, extra, key, ci, out):
    return methods.ties(base, ing, w, extra, p["scale"] * b, out)


def _dare(ing, base, w, b, p, extra, key, ci, out):
    return methods.dare(base, ing, w, p["drop"], p["scale"] * b, seed=p["seed"], key=key, chunk=ci, out=out)


def _slerp(ing, base, w, b, p, extra, key, ci, out):
    t = w[1] / (w[0] + w[1]) if (w[0] + w[1]) else 0.0
    return methods.slerp(ing[0], ing[1], t * b, extra, out)


_SCALE = Param("scale", 1.0, 0.0, 10.0, "TIES/DARE: scale of the merged difference")

REGISTRY: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            "weighted",
            "Σ w_i·θ_i (weights normalised to sum 1 unless told otherwise)",
            (2, None),
            False,
            (Param("normalize", True, help="scale the weights to sum 1"),),
        ),
        MergeMethod("add-difference", "A + w·(B − C)", (2, 2), True, apply=_add_difference),
        MergeMethod(
            "ties",
            "TIES: trim, elect sign, disjoint mean of the differences from the base",
            (1, None),
            True,
            (Param("density", 0.2, 0.0, 1.0, "TIES: fraction of each difference kept"), _SCALE),
            prepass="ties",
            apply=_ties,
        ),
        MergeMethod(
            "dare",
            "DARE: drop and rescale the differences from the base",
            (1, None),
            True,
            (
                Param("drop", 0.5, 0.0, 0.99, "DARE: fraction of each difference dropped"),
                Param("seed", 0, 0, 2**63 - 1, "DARE: random seed"),
                _SCALE,
            ),
            apply=_dare,
        ),
        MergeMethod("slerp", "spherical interpolation of two models", (2, 2), False, prepass="slerp", apply=_slerp),
    )
}

METHODS = tuple(REGISTRY)
BASE_METHODS = tuple(n for n, m in REGISTRY.items() if m.needs_base)


def param_default(name: str) -> float | int | bool:
    """The default of a merge parameter (the same for every method that takes it)."""
    for m in REGISTRY.values():
        for p in m.params:
            if p.name == name:
                return p.default
    raise KeyError(name)


def param_bounds(name: str) -> tuple[float | None, float | None]:
    for m in REGISTRY.values():
        for p in m.params:
            if p.name == name:
                return p.lo, p.hi
    raise KeyError(name)
