"""Read a LoRA file module by module as ΔW, factored where the network allows it (resize, lora-merge).

LoRA/LoCon (Tucker ``mid`` folded into ``down``) come back factored, ``up (out, r)`` and
``down (r, in, *kernel)`` with the scale kept apart; everything else (LoHa, LoKr, full diffs,
DoRA, …) comes back as a dense float32 ΔW computed by :mod:`lib_lorakit.networks`, on the
target's shape. Target shapes and the original weights (DoRA, IA3, OFT, GLoRA) come from a base
checkpoint when one is given, else the shapes from the architecture's key layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import MatchError, RecipeError
from ..formats.arch import ARCHS, detect_checkpoint, detect_lora, load_layout
from ..formats.sources import LayoutSource, TensorSource, open_source
from ..networks import compute_delta, identify, needs_weight
from ..networks.base import alpha_scale
from ..networks.lora import LoRA
from ..networks.resolve import TargetIndex, explain_unknown, parse_keys


@dataclass
class ModuleDelta:
    """One module's update.

    Attributes:
        name: module name as in the file.
        algo: the network id (lora, loha, lokr, dora, …).
        shape: the target weight's shape (out, in, *kernel).
        up, down: the factored form (LoRA/LoCon): ΔW = scale · up (out, r) @ down (r, in·k·k).
        scale: alpha / rank of the factored form.
        dense: ΔW (out, in·k·k) float32, for every other network.
        component, block: where it lands (None when the name could not be resolved).
        dropped: parameters that cannot be carried into a LoRA (bias updates).
    """

    name: str
    algo: str
    shape: tuple[int, ...]
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    scale: float = 1.0
    dense: torch.Tensor | None = None
    component: str | None = None
    block: str | None = None
    dropped: tuple[str, ...] = ()

    @property
    def factored(self) -> bool:
        return self.up is not None

    @property
    def conv(self) -> bool:
        return len(self.shape) == 4 and tuple(self.shape[2:]) != (1, 1)

    def matrix(self) -> torch.Tensor:
        """ΔW as (out, in·k·k) float32."""
        if self.dense is not None:
            return self.dense
        return (self.up * self.scale) @ self.down


class LoraReader:
    """Open a LoRA (and optionally its base checkpoint) and yield :class:`ModuleDelta` per module."""

    def __init__(self, path: str, base: str | None = None):
        self.path = path
        self.src: TensorSource = open_source(path)
        self.base: TensorSource | None = None
        try:
            fam = detect_lora(self.src.shapes(), self.src.metadata, path)
            self.arch = fam.arch
            if base:
                self.base = open_source(base)
                bfam = detect_checkpoint(self.base.shapes(), self.base.metadata, base)
                if self.arch in ARCHS and bfam.arch != self.arch:
                    raise MatchError(
                        f"{path} looks {fam.label}, the base {base} is {bfam.label}.",
                        fix="Give the base checkpoint of the LoRA's family.",
                    )
                self.arch = bfam.arch
            shapes = (
                self.base.shapes()
                if self.base is not None
                else ({k: v[0] for k, v in load_layout(ARCHS[self.arch].layout).items()} if self.arch in ARCHS else {})
            )
            self.index = TargetIndex(shapes, ARCHS[self.arch]) if self.arch in ARCHS else None
            self.parsed = parse_keys(self.src.keys())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.src.close()
        if self.base is not None:
            self.base.close()

    def __enter__(self) -> LoraReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.src.metadata)

    def names(self) -> list[str]:
        return list(self.parsed.modules)

    def unknown(self) -> list[str]:
        return list(self.parsed.unknown)

    def __iter__(self) -> Iterator[ModuleDelta]:
        for name in self.parsed.modules:
            yield self.read(name)

    def __len__(self) -> int:
        return len(self.parsed.modules)

    def read(self, name: str) -> ModuleDelta:
        group = self.parsed.modules[name]
        names = frozenset(group)
        alg, extra = identify(names)
        if alg is None:
            raise MatchError(
                f"{self.path}: module {name!r} ({', '.join(sorted(names))}): "
                f"{explain_unknown(next(iter(group.values())))}.",
                fix="Only LoRA/LyCORIS networks can be resized or merged.",
            )
        target = self.index.find(name)[0] if self.index is not None else None
        comp = target.component if target is not None else None
        block = target.block if target is not None else None
        p = {}
        for k, v in group.items():
            t = self.src.read(v)
            p[k] = t.float() if t.is_floating_point() else t
        dropped = tuple(k for k in ("diff_b", "b_norm") if k in p)
        plain = alg is LoRA and not needs_weight(alg, names)
        if plain:
            up, down = p["lora_up.weight"], p["lora_down.weight"]
            r = down.shape[0]
            scale = alpha_scale(p, r)
            u = up.reshape(up.shape[0], r)
            if "lora_mid.weight" in p:  # Tucker: fold mid into down (exact)
                d = torch.einsum("abkl,bi->aikl", p["lora_mid.weight"], down.reshape(r, -1))
            else:
                d = down
            shape = (u.shape[0],) + tuple(d.shape[1:])
            if len(shape) == 4 and shape[2:] == (1, 1) and target is not None and len(target.shape) == 2:
                shape = shape[:2]
            return ModuleDelta(
                name,
                "lora",
                shape,
                up=u,
                down=d.reshape(r, -1),
                scale=scale,
                component=comp,
                block=block,
                dropped=dropped,
            )
        if target is None:
            raise MatchError(
                f"{self.path}: module {name!r} ({alg.id}) needs the target layer's shape, and the name "
                f"matches no layer of the {ARCHS[self.arch].label if self.arch in ARCHS else 'unknown'} "
                f"layout.",
                fix="Give the base checkpoint the LoRA was made for.",
            )
        weight = None
        if needs_weight(alg, names):
            if self.base is None:
                raise RecipeError(
                    f"{self.path}: module {name!r} is {alg.id}{' + DoRA' if 'dora_scale' in p else ''}, "
                    f"whose update depends on the base weights.",
                    fix="Give the base checkpoint the LoRA was made for.",
                )
            w = self.base.read(target.weight_key).float()
            if target.rows is not None:
                w = w[target.rows[0] : target.rows[1]]
            weight = w.T if target.transpose else w
        shape = tuple(target.shape)
        d = compute_delta(alg, p, shape, weight)
        if len(shape) < 2:  # norm layers: a vector, nothing to factor
            return ModuleDelta(
                name,
                alg.id,
                shape,
                dense=d.to_dense(shape).reshape(shape[0], -1),
                component=comp,
                block=block,
                dropped=dropped,
            )
        if d.lowrank is not None:
            u, dd = d.lowrank
            return ModuleDelta(
                name, alg.id, shape, up=u, down=dd, scale=1.0, component=comp, block=block, dropped=dropped
            )
        dense = d.to_dense(shape).reshape(shape[0], -1)
        if not torch.isfinite(dense).all():
            raise RecipeError(
                f"{self.path}: module {name!r} has NaN/inf values.", fix="Use a healthy copy of the LoRA."
            )
        return ModuleDelta(name, alg.id, shape, dense=dense, component=comp, block=block, dropped=dropped)


def module_tensors(
    name: str, up: torch.Tensor, down: torch.Tensor, alpha: float, shape: tuple[int, ...], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """kohya LoRA tensors for one module: up (out, k[,1,1]), down (k, in[, kh, kw]), alpha."""
    k = down.shape[0]
    if len(shape) == 4:
        up = up.reshape(shape[0], k, 1, 1)
        down = down.reshape(k, *shape[1:])
    else:
        down = down.reshape(k, math.prod(shape[1:]))
    return {
        name + ".lora_up.weight": up.to(dtype).contiguous(),
        name + ".lora_down.weight": down.to(dtype).contiguous(),
        name + ".alpha": torch.tensor(float(alpha), dtype=dtype),
    }


__all__ = ["LayoutSource", "LoraReader", "ModuleDelta", "module_tensors"]
