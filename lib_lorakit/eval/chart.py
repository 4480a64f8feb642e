"""The tournament score chart: points per scheme as bars, Bradley–Terry strengths with 90 % intervals."""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw, ImageFont

COLOURS = [
    (37, 99, 235),
    (22, 163, 74),
    (234, 88, 12),
    (147, 51, 234),
    (219, 39, 119),
    (13, 148, 136),
    (202, 138, 4),
    (71, 85, 105),
]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def score_chart(sc: dict[str, Any], width: int = 900) -> Image.Image:
    cands = sc["candidates"]
    schemes = [s for s in sc["schemes"] if s != "Bradley-Terry"]
    row_h, pad, left = 16, 10, 170
    if not sc.get("enough_votes", True):  # no scores yet: say so instead of drawing zeros
        img = Image.new("RGB", (width, 60), (255, 255, 255))
        ImageDraw.Draw(img).text((10, 20), sc["separability"]["text"][:120], fill=(0, 0, 0), font=_font(14))
        return img
    block = len(cands) * row_h + 28
    height = pad + (len(schemes) + 1) * (block + pad) + 10
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    f, small = _font(14), _font(12)
    y = pad
    for s in schemes:
        vals = sc["schemes"][s]
        d.text((10, y), s + (" (lower is better)" if s == "average rank" else ""), fill=(0, 0, 0), font=f)
        y += 22
        lo, hi = min(0.0, *vals.values()), max(0.0, *vals.values())
        span = (hi - lo) or 1.0
        x0 = left + int((0 - lo) / span * (width - left - 80))
        for i, c in enumerate(cands):
            v = vals[c]
            x1 = left + int((v - lo) / span * (width - left - 80))
            d.text((10, y + i * row_h), str(c)[:24], fill=(40, 40, 40), font=small)
            d.rectangle(
                [min(x0, x1), y + i * row_h + 2, max(x0, x1) + 1, y + i * row_h + row_h - 3],
                fill=COLOURS[i % len(COLOURS)],
            )
            d.text((max(x0, x1) + 6, y + i * row_h), f"{v:.2f}", fill=(40, 40, 40), font=small)
        y += len(cands) * row_h + pad + 6
    bt = sc["bradley_terry"]
    if not bt["interval90"]:  # too few prompts ranked for an interval
        d.text((10, y), sc["separability"]["text"][:120], fill=(0, 0, 0), font=f)
        return img
    d.text((10, y), "Bradley-Terry log-strength, 90% bootstrap interval, P(best)", fill=(0, 0, 0), font=f)
    y += 22
    lo = min(v[0] for v in bt["interval90"].values())
    hi = max(v[1] for v in bt["interval90"].values())
    span = (hi - lo) or 1.0

    def X(v: float) -> int:
        return left + int((v - lo) / span * (width - left - 120))

    d.line([X(0), y - 4, X(0), y + len(cands) * row_h], fill=(180, 180, 180))
    for i, c in enumerate(cands):
        a, b = bt["interval90"][c]
        yy = y + i * row_h + row_h // 2
        d.text((10, y + i * row_h), str(c)[:24], fill=(40, 40, 40), font=small)
        d.line([X(a), yy, X(b), yy], fill=COLOURS[i % len(COLOURS)], width=3)
        p = X(bt["log_strength"][c])
        d.ellipse([p - 4, yy - 4, p + 4, yy + 4], fill=COLOURS[i % len(COLOURS)])
        d.text((X(hi) + 10, y + i * row_h), f"P(best) {bt['p_best'][c]:.0%}", fill=(40, 40, 40), font=small)
    return img
