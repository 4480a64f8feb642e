"""Small pieces shared by the lorakit sub-tabs."""

from __future__ import annotations

import html
from typing import Any

POLL_S = 0.3


def progress_html(frac: float, message: str, state: str = "running") -> str:
    pct = max(0.0, min(1.0, frac)) * 100
    text = "idle" if state == "idle" else f"{state}: {pct:.0f}% {message}"
    return (
        f'<div class="lorakit-progress lorakit-{html.escape(state)}"><div class="lorakit-bar" '
        f'style="width:{pct:.1f}%"></div><span>{html.escape(text)}</span></div>'
    )


def error_md(e: Exception) -> str:
    return "**Error:** " + html.escape(str(e)).replace("\n", "  \n")


def table_rows(rows: Any) -> list[list]:
    """Dataframe value (list of lists or pandas) -> list of lists without blank first cells."""
    if hasattr(rows, "values") and hasattr(rows, "columns"):
        rows = rows.values.tolist()
    return [list(r) for r in rows or [] if str((list(r) + [""])[0] or "").strip()]


def empty_table(headers: list[str]) -> dict:
    """An empty Dataframe value that shows its headers on gradio 3.41 and 4.x alike (``[]`` shows
    ``1 2 3`` on 3.41; ``None`` adds a blank row)."""
    return {"headers": list(headers), "data": []}


def box_value(v: Any, cast: Any = int) -> Any:
    """A number box's value, None when unset (gradio shows an unset number as 0, so 0 means unset)."""
    return None if v in (None, "") or float(v) == 0 else cast(v)


def settings_boxes(**boxes: Any) -> dict[str, Any]:
    """The generation settings typed in number boxes (steps, cfg_scale, width, height), without the unset
    ones: those keep the profile's value. ``cfg_scale`` is a float, the others whole numbers."""
    out = {k: box_value(v, float if k == "cfg_scale" else int) for k, v in boxes.items()}
    return {k: v for k, v in out.items() if v is not None}


def not_saved(*components: Any) -> None:
    """Keep these out of the WebUI's ui-config.json: they hold data filled from a file or a job (a LoRA's
    preferred weight, a baked checkpoint's name), not a default the user chose. A1111 and Forge save
    every labelled component's value there and restore it over the code's default at start, so a value
    saved once (e.g. by an older version) would stay; they skip components with this attribute."""
    for c in components:
        c.do_not_save_to_config = True
