"""The scale each LoRA module's writer meant, from every place writers put it.

Sources, in the order they are consulted for one module:

1. The module's own ``alpha`` (or ``scale``) tensor: kohya, LyCORIS, diffusers' kohya
   converter. Scale = alpha / rank (``networks/base.py``). These are the only values A1111
   1.10 and Forge read.
2. PEFT adapter metadata in the safetensors header: diffusers (``save_lora_weights`` with
   ``*_lora_adapter_metadata``, diffusers >= 0.34, ``loaders/lora_base.py`` ``write_lora_layers``)
   stores ``LoraConfig.to_dict()`` as JSON under ``lora_adapter_metadata``, its keys prefixed per
   component (``unet.r``, ``text_encoder.lora_alpha``, ``text_encoder_2.rank_pattern``...). PEFT's
   scale (``tuners/lora/layer.py`` ``update_layer``) is ``lora_alpha / r``, or ``lora_alpha / sqrt(r)``
   with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``lora_alpha`` for the
   modules whose name ends with the pattern (``tuners/lora/model.py``).
3. Nothing: scale 1 (what diffusers' loader and the WebUI assume).

kohya's ``ss_network_alpha`` is a training argument, not a per-module value: it is only compared
with the alpha tensors (:func:`crosscheck_network_alpha`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ADAPTER_METADATA_KEY = "lora_adapter_metadata"
SCALE_SOURCES = ("writer", "runtime")
# diffusers' component prefixes, in the file's keys and in the metadata's keys
_COMPONENTS = {"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}
_KEY_PREFIXES = (("text_encoder_2.", "te2"), ("text_encoder.", "te1"), ("unet.", "unet"))

SRC_TENSORS = "alpha tensors"
SRC_NONE = "none in file (scale 1 assumed)"


@dataclass
class PeftConfig:
    """The scale-related fields of one component's PEFT ``LoraConfig``."""

    where: str  # e.g. "lora_adapter_metadata, unet"
    r: int | None = None
    lora_alpha: float | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> PeftConfig:
        def num(v, kind):
            try:
                return kind(v) if v is not None else None
            except (TypeError, ValueError):
                return None

        def pattern(v, kind):
            if not isinstance(v, Mapping):
                return {}
            return {str(k): x for k, x in ((k, num(x, kind)) for k, x in v.items()) if x is not None}

        return cls(
            where=where,
            r=num(d.get("r"), int),
            lora_alpha=num(d.get("lora_alpha"), float),
            rank_pattern=pattern(d.get("rank_pattern"), int),
            alpha_pattern=pattern(d.get("alpha_pattern"), float),
            use_rslora=bool(d.get("use_rslora")),
            use_dora=bool(d.get("use_dora")),
        )

    def scale(self, path: str, rank: int) -> tuple[float, int, float]:
        """Return (scale, r, lora_alpha) for the module at ``path`` (relative to its component)."""
        r = _pattern_value(self.rank_pattern, path)
        if r is None:
            r = self.r if self.r else rank
        alpha = _pattern_value(self.alpha_pattern, path)
        if alpha is None:
            alpha = self.lora_alpha if self.lora_alpha is not None else float(r)
        return (alpha / math.sqrt(r) if self.use_rslora else alpha / r), r, alpha


def _pattern_value(pattern: Mapping[str, Any], path: str):
    """PEFT's pattern lookup: an exact module name, else the first key the name ends with (after a '.')."""
    if path in pattern:
        return pattern[path]
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?(?:{key})$", path):
                return value
        except re.error:
            if path == key or path.endswith("." + key):
                return value
    return None


def read_adapter_metadata(metadata: Mapping[str, str]) -> tuple[dict[str, PeftConfig], list[str]]:
    """Parse diffusers' ``lora_adapter_metadata`` header entry.

    Returns:
        (configs by component ``unet``/``te1``/``te2``, or ``*`` for an unprefixed config; notes on
        anything that could not be used).
    """
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}, []
    try:
        data = json.loads(raw)
    except ValueError as e:
        return {}, [f"the header's {ADAPTER_METADATA_KEY} is not valid JSON ({e}); it was ignored"]
    if not isinstance(data, dict):
        return {}, [f"the header's {ADAPTER_METADATA_KEY} is not a JSON object; it was ignored"]
    groups: dict[str, dict[str, Any]] = {}
    names: dict[str, str] = {}
    for k, v in data.items():
        head, dot, rest = k.partition(".")
        if dot and head in _COMPONENTS:
            groups.setdefault(_COMPONENTS[head], {})[rest] = v
            names[_COMPONENTS[head]] = head
        elif not dot:
            groups.setdefault("*", {})[k] = v
    out = {}
    for comp, d in groups.items():
        if "lora_alpha" in d or "r" in d:
            out[comp] = PeftConfig.from_dict(d, f"{ADAPTER_METADATA_KEY}, {names.get(comp, 'all components')}")
    return out, []


def component_path(module: str) -> tuple[str | None, str]:
    """(component, path inside it) of a diffusers/PEFT module name; (None, name) for other schemes."""
    name = module[len("base_model.model.") :] if module.startswith("base_model.model.") else module
    for prefix, comp in _KEY_PREFIXES:
        if name.startswith(prefix):
            return comp, name[len(prefix) :]
    return None, name


class ScaleResolver:
    """Decides, module by module, which scale the bake applies, and keeps the account for the report.

    Args:
        metadata: the LoRA file's safetensors header metadata.
        mode: ``"writer"`` applies the scale the writer meant (alpha tensors, else PEFT adapter
            metadata, else 1); ``"runtime"`` applies what A1111 1.10 and Forge apply (alpha tensors,
            else 1), ignoring the adapter metadata.
    """

    def __init__(self, metadata: Mapping[str, str], mode: str = "writer"):
        if mode not in SCALE_SOURCES:
            raise ValueError(f"scale source {mode!r} is not one of {', '.join(SCALE_SOURCES)}")
        self.mode = mode
        self.configs, self.notes = read_adapter_metadata(metadata)
        self.sources: Counter = Counter()
        self.runtime_differs: Counter = Counter()  # writer's scale (rounded) -> modules the runtime applies at 1
        self.disagree: Counter = Counter()  # (alpha tensor scale, metadata scale) pairs

    def resolve(
        self, module: str, component: str, lora_family: bool, params: Mapping[str, str], rank: int | None
    ) -> float | None:
        """Return the scale to apply to one module, or None when its own tensors decide (or 1 applies).

        Args:
            module: the module name as in the file.
            component: the target's component (``unet``/``te1``/``te2``).
            lora_family: the group is a LoRA/LoCon (``lora_up``/``lora_down``) group.
            params: the group's parameter names.
            rank: the group's rank.
        """
        comp, path = component_path(module)
        cfg = None
        if lora_family and rank and (comp is not None or "." in module):  # diffusers/PEFT-style names only
            cfg = self.configs.get(comp or "") or self.configs.get("*")
        if "alpha" in params or "scale" in params:
            self.sources[SRC_TENSORS] += 1
            if cfg is not None:
                self.disagree[("tensor", cfg.where)] += 1
            return None
        if cfg is None:
            self.sources[SRC_NONE] += 1
            return None
        s, r, alpha = cfg.scale(path, rank)
        if r != rank:
            self.notes.append(
                f"{module}: the adapter metadata says r={r}, the tensors have rank {rank}; "
                f"scale {s:g} (from the metadata) was used"
            )
        key = f"{_fmt(s)} (lora_alpha {alpha:g} / {'sqrt(r)' if cfg.use_rslora else 'r'} {r})"
        if self.mode == "runtime":
            self.sources[f"{SRC_NONE}; the adapter metadata was ignored (scale source 'runtime')"] += 1
            if s != 1.0:
                self.runtime_differs[key] += 1
            return None
        self.sources[f"PEFT adapter metadata ({cfg.where})"] += 1
        if s != 1.0:
            self.runtime_differs[key] += 1
        return s

    def report(self) -> dict[str, Any]:
        """The account of where the scales came from, for the bake and inspect reports."""
        notes = list(self.notes)
        for (_, where), n in self.disagree.items():
            notes.append(
                f"{n} module(s) have alpha tensors and {where} also states a scale: the alpha tensors "
                f"were used (the file's own per-module values)"
            )
        runtime = None
        if self.runtime_differs:
            n = sum(self.runtime_differs.values())
            scales = ", ".join(f"{k} for {v}" for k, v in sorted(self.runtime_differs.items()))
            if self.mode == "writer":
                runtime = (
                    f"A1111 1.10 and Forge read only per-module alpha tensors, which this file lacks for {n} "
                    f"module(s): at generation time they apply those at scale 1 instead of {scales}. The bake "
                    f"applies the writer's scale, as diffusers does; choose scale source 'runtime' to bake "
                    f"what the WebUI applies."
                )
            else:
                runtime = (
                    f"Scale source 'runtime': {n} module(s) were baked at scale 1, as A1111 1.10 and Forge "
                    f"apply them, although the file's adapter metadata means {scales}."
                )
        return {"scale_source": self.mode, "sources": dict(self.sources), "runtime_differs": runtime, "notes": notes}


def crosscheck_network_alpha(metadata: Mapping[str, str], alphas: list[tuple[int, float, bool]]) -> str | None:
    """Compare kohya's ``ss_network_alpha`` with the alpha tensors of modules of rank ``ss_network_dim``.

    Args:
        alphas: (rank, alpha tensor value, is a conv module) per module with an alpha tensor.

    Returns:
        A note when they disagree (the tensors are used either way), else None.
    """
    try:
        dim = int(metadata["ss_network_dim"])
        alpha = float(metadata["ss_network_alpha"])
    except (KeyError, TypeError, ValueError):
        return None
    seen = sorted({a for r, a, conv in alphas if r == dim and not conv})
    if not seen or all(math.isclose(a, alpha, rel_tol=1e-6, abs_tol=1e-9) for a in seen):
        return None
    return (
        f"the training metadata says ss_network_alpha {alpha:g} (dim {dim}), the file's alpha tensors say "
        f"{', '.join(f'{a:g}' for a in seen[:4])}: the tensors were used (they are what the WebUI reads)"
    )


def _fmt(v: float) -> str:
    return f"{v:.6g}"


__all__ = [
    "ADAPTER_METADATA_KEY",
    "SCALE_SOURCES",
    "PeftConfig",
    "ScaleResolver",
    "component_path",
    "crosscheck_network_alpha",
    "read_adapter_metadata",
]
