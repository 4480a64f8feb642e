"""The doctor's outputs: contact sheets (runtime | baked | base per prompt, one row per seed) and the
report in words."""

from __future__ import annotations

import io
import os
from typing import Any

from PIL import Image, ImageDraw

from ..fsutil import atomic_write

COLUMNS = ("runtime", "baked", "base")
LABEL_H = 14


def contact_sheet(rows: list[list[Image.Image]], columns: tuple[str, ...] = COLUMNS, min_cell: int = 96) -> Image.Image:
    """A grid image: one row per seed, one column per render, each column labelled. Small renders are
    scaled up (nearest) to ``min_cell`` pixels so 64×64 tests stay readable."""
    w, h = rows[0][0].size
    k = max(1, -(-min_cell // max(w, h)))
    cw, ch = w * k, h * k
    sheet = Image.new("RGB", (cw * len(columns), LABEL_H + ch * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(columns):
        draw.text((j * cw + 3, 1), name, fill="black")
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            sheet.paste(img.convert("RGB").resize((cw, ch), Image.NEAREST), (j * cw, LABEL_H + i * ch))
    return sheet


def save_png(img: Image.Image, path: str) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())
    return path


def _m(m: dict[str, Any]) -> str:
    parts = [f"mean diff {m['mean_diff']:.2f}", f"max {m['max_diff']:.0f}", f"SSIM {m['ssim']:.3f}"]
    if m.get("effect") is not None:
        parts.append(f"effect {m['effect']:.2f}")
        if m.get("effect_ratio") is not None:
            parts.append(f"effect ratio {m['effect_ratio']:.2f}")
    return ", ".join(parts)


def summary(report: dict[str, Any]) -> str:
    """The report in words (terminal and tab)."""
    p = report["parity"]
    lines = [f"Verdict: {p['overall']['verdict'].upper()} — baked vs runtime: {_m(p['overall'])} (levels of 255)"]
    for i, pp in enumerate(p["prompts"]):
        lines.append(f"  prompt {i + 1}: {pp['verdict']}: {_m(pp)}")
    for w in report.get("warnings") or []:
        lines.append(f"  ! {w}")
    for f in report.get("recipe_findings") or []:
        lines.append(f"  recipe: {f['text']}")
    if report.get("variants"):
        lines.append("Variants (each against its runtime render):")
        for v in report["variants"]:
            if v["id"] == "cfg":
                sweep = ", ".join(f"CFG {c['cfg']:g}: {c['mean_diff']:.2f}" for c in v["sweep"])
                lines.append(f"  cfg sweep: mean diff {sweep}; amplification ×{v['amplification']:.2f}")
            else:
                t = f" ({v['seconds_bake']:.1f} s bake)" if v.get("seconds_bake") else ""
                lines.append(f"  {v['label']}: {v['metrics']['verdict']}: {_m(v['metrics'])}{t}")
    if report.get("causes") is not None:
        if report["causes"]:
            lines.append("Cause(s):")
            for c in report["causes"]:
                lines.append(f"  - {c['text']}")
                lines.append(f"    evidence: {c['evidence']}")
                lines.append(f"    fix: {c['fix']}")
        else:
            lines.append("Cause: none found. " + (report.get("no_cause") or ""))
    t = report.get("timing") or {}
    if t:
        lines.append(
            f"Time: {t.get('seconds', 0):.1f} s (renders {t.get('seconds_rendering', 0):.1f} s, "
            f"bakes {t.get('seconds_baking', 0):.1f} s)"
        )
    lines.append(f"Run folder: {report.get('dir')}")
    if report.get("sheets"):
        lines.append("Contact sheets: " + ", ".join(os.path.basename(s) for s in report["sheets"]))
    return "\n".join(lines)
