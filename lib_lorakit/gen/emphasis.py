"""Effective prompt emphasis, as the WebUI computes it.

``(text)`` multiplies the attention of ``text`` by 1.1, ``[text]`` divides it by 1.1,
``(text:1.3)`` sets a factor, and nesting multiplies: ``(((x)))`` is 1.331. ``\\(`` is a
literal bracket. Extra-network tags (``<lora:...>``) are not attention syntax. Some
checkpoints turn heavy emphasis into black or burnt images, so pre-flight warns above
:data:`WARN_ABOVE`.
"""

from __future__ import annotations

import re

WARN_ABOVE = 1.5

_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_EXTRA = re.compile(r"<[^>]+>")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Text fragments with their effective weights (the WebUI's prompt_parser rules)."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= factor

    for m in _ATTENTION.finditer(_EXTRA.sub(" ", text)):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:
                multiply(round_open.pop(), float(weight))
            except ValueError:
                res.append([tok, 1.0])
        elif tok == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            res.append([tok, 1.0])
    for pos in round_open:  # unclosed brackets still count, as in the WebUI
        multiply(pos, 1.1)
    for pos in square_open:
        multiply(pos, 1 / 1.1)
    return [(t, w) for t, w in res if t.strip(" ,")]


def max_emphasis(text: str) -> tuple[float, str]:
    """The strongest effective emphasis in ``text`` and the fragment that has it (1.0, "" if none)."""
    best = (1.0, "")
    for t, w in parse_attention(text):
        if w > best[0] + 1e-9:
            best = (w, t.strip(" ,"))
    return best


def emphasis_warning(text: str, where: str = "prompt") -> str | None:
    """A warning when the effective emphasis of any fragment exceeds :data:`WARN_ABOVE`."""
    w, frag = max_emphasis(text)
    if w > WARN_ABOVE:
        return (
            f"{where}: {frag!r} has an effective emphasis of {w:.2f} (> {WARN_ABOVE}); some checkpoints turn "
            "that into black or burnt images. Lower the brackets or the weight."
        )
    return None
