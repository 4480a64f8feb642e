"""Ingredient diagnostics: where in the model does B differ from A?

Per component and per UNet block: the relative change |B - A| / |A| and the cosine
similarity of the flattened weights, as a table and a bar chart, so a dual-purpose
ingredient shows which blocks it moves most (and which block weights to lower).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ArchitectureError, Cancelled
from ..formats.arch import ARCHS, Arch, block_of, component_of, detect_checkpoint
from ..formats.dtypes import FLOAT_CODES
from ..formats.sources import TensorSource, open_source


@dataclass
class Diag:
    """Sums over tensors of |B - A|^2, |A|^2, |B|^2 and A·B."""

    d2: float = 0.0
    a2: float = 0.0
    b2: float = 0.0
    ab: float = 0.0

    def add(
        self, a: torch.Tensor, b: torch.Tensor, a2: float | None = None, scratch: torch.Tensor | None = None
    ) -> None:
        """Add one pair of tensors. ``a2`` (|a|^2, when the caller has it) and ``scratch`` save work.

        |B - A|^2 is summed directly (a2 + b2 - 2ab would cancel for similar models); a·b and
        |b|^2 follow from a·d with d = b - a.
        """
        fa, fb = a.reshape(-1), b.reshape(-1)
        d = torch.sub(fb, fa, out=scratch.reshape(-1)[: fa.numel()]) if scratch is not None else fb - fa
        if a2 is None:
            a2 = float(torch.dot(fa, fa))
        d2 = float(torch.dot(d, d))
        ad = float(torch.dot(fa, d))
        self.add_sums(a2, d2, ad)

    def add_sums(self, a2: float, d2: float, ad: float) -> None:
        """Add |a|^2, |b - a|^2 and a·(b - a) of one pair of tensors."""
        self.d2 += d2
        self.a2 += a2
        self.ab += a2 + ad
        self.b2 += a2 + 2 * ad + d2

    def merge(self, other: Diag) -> None:
        self.d2 += other.d2
        self.a2 += other.a2
        self.b2 += other.b2
        self.ab += other.ab

    def as_dict(self) -> dict:
        rel = math.sqrt(self.d2 / self.a2) if self.a2 > 0 else (0.0 if self.d2 == 0 else math.inf)
        cos = self.ab / math.sqrt(self.a2 * self.b2) if self.a2 > 0 and self.b2 > 0 else 1.0
        return {"rel_change": float(f"{rel:.6g}"), "cosine": float(f"{cos:.8g}")}


def block_key(key: str, arch: Arch) -> tuple[str, str]:
    """(component, block) of a key for diagnostics; keys outside blocks use their component."""
    comp = component_of(key, arch)
    return comp, block_of(key, arch) or comp


def tabulate(diags: dict[tuple[str, str], Diag], arch: Arch) -> dict:
    """{"by_component": {comp: stats}, "by_block": {comp: {block: stats}}} in block order."""
    order = {b: i for i, b in enumerate(arch.blocks)}
    by_block: dict[str, dict[str, dict]] = {}
    totals: dict[str, Diag] = {}
    for (comp, blk), d in sorted(diags.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99), kv[0][1])):
        by_block.setdefault(comp, {})[blk] = d.as_dict()
        totals.setdefault(comp, Diag()).merge(d)
    return {"by_component": {c: d.as_dict() for c, d in totals.items()}, "by_block": by_block}


def diff(
    a: str | TensorSource,
    b: str | TensorSource,
    *,
    progress: Callable[[float, str], None] | None = None,
    cancel: threading.Event | None = None,
) -> dict:
    """Compare two checkpoints of one architecture, tensor by tensor (streaming)."""
    say = progress or (lambda f, m: None)
    sa = open_source(a) if isinstance(a, str) else a
    try:
        sb = open_source(b) if isinstance(b, str) else b
    except BaseException:
        sa.close()
        raise
    try:
        fa = detect_checkpoint(sa.shapes(), sa.metadata, sa.path)
        fb = detect_checkpoint(sb.shapes(), sb.metadata, sb.path)
        if fa.arch != fb.arch:
            raise ArchitectureError(
                f"Cannot compare {sa.path} ({fa.label}) with {sb.path} ({fb.label}): different architectures."
            )
        arch = ARCHS[fa.arch]
        kb = set(sb.keys())
        keys = [k for k in sa.keys() if k in kb]
        diags: dict[tuple[str, str], Diag] = {}
        mismatch = []
        for i, k in enumerate(keys):
            if cancel is not None and cancel.is_set():
                raise Cancelled("Comparison cancelled.")
            if sa.dtype(k) not in FLOAT_CODES or sb.dtype(k) not in FLOAT_CODES:
                continue
            if tuple(sa.shape(k)) != tuple(sb.shape(k)):
                mismatch.append(k)
                continue
            diags.setdefault(block_key(k, arch), Diag()).add(sa.read(k).float(), sb.read(k).float())
            if i % 64 == 0:
                say(i / max(len(keys), 1), f"comparing {k}")
        out = {
            "a": sa.path,
            "b": sb.path,
            "arch": arch.id,
            **tabulate(diags, arch),
            "only_in_a": sorted(set(sa.keys()) - kb),
            "only_in_b": sorted(kb - set(sa.keys())),
            "shape_mismatch": mismatch,
        }
        say(1.0, "done")
        return out
    finally:
        sa.close()
        sb.close()


def table(result: dict) -> str:
    """A markdown table: component totals, then the UNet blocks."""
    lines = ["| part | relative change | cosine |", "|---|---:|---:|"]
    for comp, v in result["by_component"].items():
        lines.append(f"| {comp} (all) | {v['rel_change']:.4g} | {v['cosine']:.6f} |")
    for blk, v in result["by_block"].get("unet", {}).items():
        lines.append(f"| unet {blk} | {v['rel_change']:.4g} | {v['cosine']:.6f} |")
    return "\n".join(lines)


def chart(result: dict, title: str = ""):
    """A bar chart (PIL image) of the relative change per UNet block and per text encoder."""
    from PIL import Image, ImageDraw

    rows = [(f"{c}", v["rel_change"]) for c, v in result["by_component"].items() if c in ("te1", "te2")]
    rows += [(b, v["rel_change"]) for b, v in result["by_block"].get("unet", {}).items()]
    width, bar_h, left, top = 720, 18, 70, 34
    height = top + bar_h * len(rows) + 16
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title or "relative change |B - A| / |A| per block", fill="black")
    vmax = max([v for _, v in rows if math.isfinite(v)] + [1e-12])
    for i, (label, v) in enumerate(rows):
        y = top + i * bar_h
        draw.text((10, y + 3), label, fill="black")
        w = 0 if not math.isfinite(v) else int((width - left - 90) * v / vmax)
        colour = (37, 99, 235) if not label.startswith("te") else (22, 163, 74)
        draw.rectangle([left, y + 2, left + w, y + bar_h - 3], fill=colour)
        draw.text((left + w + 6, y + 3), f"{v:.3g}", fill="black")
    return img
