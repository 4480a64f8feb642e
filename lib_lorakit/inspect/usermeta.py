"""The WebUI's per-LoRA user metadata (``<lora>.json`` beside the file): read and update.

Both WebUIs read "activation text" (added to the prompt with the LoRA) and
"preferred weight" (the strength inserted; 0 means the global default) from it, and
keep "description", "sd version", "negative text" and "notes". lorakit changes only the
fields it is asked to, keeps everything else, and replaces the file atomically.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from ..errors import OutputError, RecipeError
from ..fsutil import atomic_write

SD_VERSION = {"sd15": "SD1", "sdxl": "SDXL"}


def path_for(lora_path: str) -> str:
    return os.path.splitext(lora_path)[0] + ".json"


def read(lora_path: str) -> dict[str, Any]:
    p = path_for(lora_path)
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise OutputError(
            f"{p} exists but is not readable JSON ({e}); lorakit will not replace it.",
            fix="Fix or move the file, then try again.",
        ) from e
    if not isinstance(data, dict):
        raise OutputError(
            f"{p} does not hold a JSON object; lorakit will not replace it.",
            fix="Fix or move the file, then try again.",
        )
    return data


def write(
    lora_path: str,
    *,
    activation_text: str | None = None,
    preferred_weight: float | None = None,
    arch: str | None = None,
) -> dict[str, Any]:
    """Set "activation text" and/or "preferred weight" in the LoRA's user metadata.

    Returns:
        {"path", "before": {field: old value}, "after": {field: new value}}.
    """
    if not os.path.isfile(lora_path):
        raise RecipeError(f"{lora_path}: no such LoRA file.")
    if preferred_weight is not None:
        try:
            preferred_weight = float(preferred_weight)
        except (TypeError, ValueError):
            raise RecipeError(f"preferred weight {preferred_weight!r} is not a number.") from None
        if not math.isfinite(preferred_weight) or not -4 <= preferred_weight <= 4:
            raise RecipeError(f"preferred weight {preferred_weight!r} is outside -4..4.")
    data = read(lora_path)
    changes: dict[str, Any] = {}
    if activation_text is not None:
        changes["activation text"] = activation_text.strip()
    if preferred_weight is not None:
        changes["preferred weight"] = round(preferred_weight, 3)
    if arch in SD_VERSION and not data.get("sd version"):
        changes["sd version"] = SD_VERSION[arch]
    before = {k: data.get(k) for k in changes}
    data.update(changes)
    p = path_for(lora_path)
    atomic_write(p, json.dumps(data, indent=4, ensure_ascii=False).encode("utf-8"), keep_mode=True)
    return {"path": p, "before": before, "after": changes}
