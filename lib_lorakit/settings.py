"""lorakit's own settings, one JSON file in its data folder (``settings.json``).

Read fresh on every use (the file is small), written atomically. Unknown keys are kept,
bad values are refused with the key named.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .errors import RecipeError
from .fsutil import atomic_write
from .inspect.category import CATEGORIES, DEFAULT_CROSS_LINEAGE, DEFAULT_MAX_SAFE

FILE = "settings.json"


def path_in(data_dir: str) -> str:
    return os.path.join(data_dir, FILE)


def load(data_dir: str | None) -> dict[str, Any]:
    """The stored settings merged over the defaults; a damaged file is named in the error."""
    out: dict[str, Any] = {"max_safe_strength": dict(DEFAULT_MAX_SAFE), "cross_lineage": dict(DEFAULT_CROSS_LINEAGE)}
    if not data_dir:
        return out
    p = path_in(data_dir)
    try:
        with open(p, encoding="utf-8") as f:
            stored = json.load(f)
    except FileNotFoundError:
        return out
    except (OSError, ValueError) as e:
        raise RecipeError(
            f"lorakit's settings file {p} cannot be read: {e}.",
            fix="Fix or delete the file; lorakit then uses its defaults.",
        ) from e
    if not isinstance(stored, dict):
        raise RecipeError(f"lorakit's settings file {p} does not hold an object.", fix="Delete it to use the defaults.")
    for k, v in stored.items():
        if k in ("max_safe_strength", "cross_lineage") and isinstance(v, dict):
            out[k].update(v)
        else:
            out[k] = v
    return out


def _check_table(name: str, table: Any, keys: tuple[str, ...] | None) -> dict[str, float]:
    if not isinstance(table, dict):
        raise RecipeError(f"Setting {name} must be an object of name -> strength, got {type(table).__name__}.")
    out = {}
    for k, v in table.items():
        if keys is not None and k not in keys:
            raise RecipeError(f"Setting {name}: unknown category {k!r}.", fix=f"Use one of {', '.join(keys)}.")
        if keys is None and (not isinstance(k, str) or k.count(">") != 1):
            raise RecipeError(
                f"Setting {name}: key {k!r} must be 'LoRA lineage>checkpoint lineage' (e.g. 'Pony>Illustrious', '*>*')."
            )
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RecipeError(f"Setting {name}[{k!r}] = {v!r} is not a number.") from None
        if not math.isfinite(f) or not 0 < f <= 4:
            raise RecipeError(f"Setting {name}[{k!r}] = {v!r} is outside 0 < strength <= 4.")
        out[k] = f
    return out


def update(data_dir: str, changes: dict[str, Any], replace: tuple[str, ...] = ()) -> dict[str, Any]:
    """Validate and store ``changes`` (tables are merged key by key; the keys named in ``replace`` are
    replaced whole, so an entry left out goes back to the shipped value); returns the new settings."""
    p = path_in(data_dir)
    try:
        with open(p, encoding="utf-8") as f:
            stored = json.load(f)
        if not isinstance(stored, dict):
            stored = {}
    except FileNotFoundError:
        stored = {}
    except (OSError, ValueError) as e:
        raise RecipeError(
            f"lorakit's settings file {p} cannot be read: {e}.",
            fix="Fix or delete the file; lorakit then uses its defaults.",
        ) from e
    for k, v in changes.items():
        if k == "max_safe_strength":
            stored.setdefault(k, {}).update(_check_table(k, v, CATEGORIES))
        elif k == "cross_lineage":
            stored.setdefault(k, {}).update(_check_table(k, v, None))
        elif k == "generation_profiles":  # {profile: {field: value}}, merged field by field, checked whole
            from .gen.profiles import load_profiles

            old = stored.get(k) if k not in replace else None
            merged = {n: dict(f) for n, f in old.items()} if isinstance(old, dict) else {}
            for name, fields in (v or {}).items() if isinstance(v, dict) else [(None, v)]:
                if not isinstance(fields, dict):
                    raise RecipeError(f"Setting generation_profiles[{name!r}] must be an object of field -> value.")
                merged.setdefault(name, {}).update(fields)
            load_profiles(merged)
            if merged:
                stored[k] = merged
            else:
                stored.pop(k, None)
        else:
            stored[k] = v
    os.makedirs(data_dir, exist_ok=True)
    atomic_write(p, json.dumps(stored, indent=2, sort_keys=True).encode("utf-8"))
    return load(data_dir)
