"""Pre-flight checks for bake and merge: warnings before the work, never errors.

Bake: a LoRA asked for above its max-safe strength (the inspector's ceiling for its
category and, against this checkpoint, its cross-lineage ceiling), more than two style
LoRAs stacked (styles fight each other and burn the image), and a LoRA trained on another
lineage than the checkpoint's (Pony on Illustrious, ...).

Merge: CLIP ``position_ids`` that are not a clean integer arange in the inputs (a float copy
with entries such as 2.9999 that the text encoder truncates to the wrong position, or an
out-of-order one). Averaging would keep the damage; the merge writes the integer arange
instead and its report says so (see :mod:`lib_lorakit.formats.position_ids`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .formats.position_ids import check_position_ids, is_position_ids_key

MAX_STYLES = 2


def bake_warnings(
    base: str,
    loras: Sequence[tuple[str, float]],
    *,
    settings: Mapping[str, Any] | None = None,
    reports: Sequence[Mapping[str, Any]] | None = None,
) -> list[str]:
    """Warnings for baking ``loras`` (path, strength) into the checkpoint ``base``.

    Args:
        base: the checkpoint file (its header is read for the lineage checks).
        loras: (LoRA path, UNet strength) in recipe order.
        settings: lorakit's settings (the max-safe and cross-lineage tables).
        reports: inspector reports already made against ``base`` (same order); read here otherwise.
    """
    from .errors import LorakitError
    from .inspect import checkpoint_family, inspect_paths

    if reports is None:
        try:
            reports = inspect_paths([p for p, _ in loras], checkpoint=base, settings=dict(settings or {}))
        except LorakitError as e:
            return [f"pre-flight skipped: {str(e).splitlines()[0]}"]
    try:
        ck_lineages = {n for n, _ in checkpoint_family(base).lineage}
    except LorakitError:
        ck_lineages = set()
    out: list[str] = []
    styles: list[str] = []
    for (path, strength), rep in zip(loras, reports):
        if "error" in rep or rep.get("file_type") == "checkpoint":
            continue
        name = rep.get("name") or path
        cap = rep.get("max_safe_strength")
        if cap and abs(float(strength)) > float(cap) + 1e-9:
            out.append(
                f"{name} is baked at {float(strength):g}, above its max-safe strength {float(cap):g} "
                f"({rep.get('max_safe_reason', '')}): expect burned or distorted images; bake it at {float(cap):g} "
                "or less."
            )
        if rep.get("category") == "style" and strength:
            styles.append(f"{name} @ {float(strength):g}")
        lin = {x["lineage"] for x in (rep.get("family") or {}).get("lineage") or []}
        if lin and ck_lineages and not lin & ck_lineages:
            out.append(
                f"{name} was trained on {', '.join(sorted(lin))}; the checkpoint is "
                f"{', '.join(sorted(ck_lineages))}: a LoRA carries its lineage's look and quality tags, and "
                "usually needs a lower strength there."
            )
    if len(styles) > MAX_STYLES:
        out.append(
            f"{len(styles)} style LoRAs are stacked ({', '.join(styles)}): more than {MAX_STYLES} styles fight "
            "each other and burn the image; keep the two that matter or lower their strengths."
        )
    return out


def bake_preflight(base: Any, specs: Sequence[Any], settings: Mapping[str, Any] | None = None) -> list[str]:
    """:func:`bake_warnings` for a bake's own arguments (a base path and its LoraSpecs) and the user's
    ``settings`` (their max-safe tables); nothing when the inputs are not plain files (pre-opened sources)."""
    import os

    if not isinstance(base, (str, os.PathLike)) or not all(
        isinstance(s.path, (str, os.PathLike)) and os.path.isfile(s.path) for s in specs
    ):
        return []
    return bake_warnings(os.fspath(base), [(os.fspath(s.path), s.strength) for s in specs], settings=settings)


def position_ids_repairs(sources: Sequence[tuple[str, Any]], keys: Sequence[str]) -> dict[str, str]:
    """``position_ids`` keys to write as the integer arange, each with why.

    Args:
        sources: (label, TensorSource) of every input whose values could reach the output.
        keys: the output's keys.
    Returns:
        key -> the problem found (which input, what is wrong); healthy keys are absent.
    """
    out: dict[str, str] = {}
    for k in keys:
        if not is_position_ids_key(k):
            continue
        found = []
        for label, src in sources:
            if k in src.keys():
                problem = check_position_ids(src.read(k))
                if problem:
                    found.append(f"in {label} it {problem}")
        if found:
            out[k] = "; ".join(found)
    return out


def repair_message(key: str, why: str) -> str:
    """The report's line for a repaired ``position_ids``."""
    return f"{key}: {why}; written as the integer arange 0..n-1 (int64) instead of merging it."
