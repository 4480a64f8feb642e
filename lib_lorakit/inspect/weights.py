"""Per-block size of a LoRA's update: ‖ΔW‖ at strength 1, relative to the base weights when given.

A LoRA that changes some block by a large fraction of its weights at strength 1 is
over-trained there (or meant for low strengths); one that changes almost nothing is
probably undertrained. Norms of factored updates are computed without building ΔW:
‖U·D‖² = Σ (UᵀU) ⊙ (D·Dᵀ), ‖kron(a, b)‖ = ‖a‖·‖b‖.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

from ..bake import LoraSpec, plan_bake
from ..errors import ValueProblem
from ..formats.arch import ARCHS, load_layout
from ..formats.sources import LayoutSource
from ..networks import compute_delta, needs_weight
from ..networks.base import Delta
from ..streaming import all_finite

OVERTRAINED = 0.25  # ‖ΔW‖/‖W‖ of a block at strength 1
NEGLIGIBLE = 0.002


def delta_norm_sq(d: Delta, shape: tuple[int, ...]) -> float:
    """‖ΔW‖_F² of one update, float64 accumulation."""
    if d.lowrank is not None:
        up, down = (t.double() for t in d.lowrank)
        return float(((up.T @ up) * (down @ down.T)).sum())
    if d.kron is not None:
        a, b = d.kron
        return float(a.double().pow(2).sum() * b.double().pow(2).sum())
    if d.hada is not None or d.dense is not None:
        return float(d.to_dense(shape).double().pow(2).sum())
    return 0.0


@dataclass
class BlockStat:
    block: str
    modules: int = 0
    delta_sq: float = 0.0
    weight_sq: float = 0.0

    def as_dict(self, relative: bool) -> dict[str, Any]:
        out = {"block": self.block, "modules": self.modules, "delta_norm": math.sqrt(self.delta_sq)}
        if relative:
            out["weight_norm"] = math.sqrt(self.weight_sq)
            out["relative"] = math.sqrt(self.delta_sq / self.weight_sq) if self.weight_sq else None
        return out


@dataclass
class WeightStats:
    relative: bool  # against a real checkpoint
    checkpoint: str | None
    blocks: list[BlockStat] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "relative": self.relative,
            "checkpoint": self.checkpoint,
            "blocks": [b.as_dict(self.relative) for b in self.blocks],
            "skipped": self.skipped[:20],
            "skipped_count": len(self.skipped),
            "hints": self.hints,
        }


def weight_stats(
    lora_path: str, arch: str, checkpoint: str | None = None, cancel: threading.Event | None = None
) -> WeightStats:
    """Per-block ‖ΔW‖ of ``lora_path`` at strength 1 (and ‖W‖ of the same layers with ``checkpoint``).

    Raises:
        ArchitectureError/MatchError: the checkpoint is another architecture (as the bake would).
    """
    base = checkpoint if checkpoint else LayoutSource(load_layout(ARCHS[arch].layout), path="<layout>")
    plan = plan_bake(base, [LoraSpec(path=lora_path)], allow_unmatched=True)
    ws = WeightStats(relative=checkpoint is not None, checkpoint=checkpoint)
    stats: dict[str, BlockStat] = {}
    src = plan.loras[0].source
    try:
        for key, contribs in plan.weights.items():
            if cancel is not None and cancel.is_set():
                break
            wfull = plan.base.read(key).float() if checkpoint else None
            for c in contribs:
                t = c.target
                w = None
                if wfull is not None:
                    w = wfull[t.rows[0] : t.rows[1]] if t.rows else wfull
                    w = w.T if t.transpose else w
                    w = w.reshape(t.shape)
                if needs_weight(c.alg, c.params) and w is None:
                    ws.skipped.append(f"{c.module}: DoRA/weight-dependent update needs the checkpoint it is used with")
                    continue
                p = {name: src.read(k) for name, k in c.params.items()}
                for name, k in c.params.items():
                    if not all_finite(p[name]):
                        raise ValueProblem(
                            f"{lora_path}: {k} holds NaN/inf values; its weight statistics cannot be "
                            "computed and a bake would refuse it.",
                            fix="The LoRA is broken (training diverged or the file is damaged). Use "
                            "another epoch or re-export it.",
                        )
                d = compute_delta(
                    c.alg, {k: v.float() if v.is_floating_point() else v for k, v in p.items()}, t.shape, w
                )
                bs = stats.setdefault(t.block or t.component, BlockStat(block=t.block or t.component))
                bs.modules += 1
                bs.delta_sq += delta_norm_sq(d, t.shape)
                if w is not None:
                    bs.weight_sq += float(w.double().pow(2).sum())
    finally:
        plan.base.close()
        src.close()
    order = {b: i for i, b in enumerate(ARCHS[plan.arch.id].blocks)}
    ws.blocks = sorted(stats.values(), key=lambda b: order.get(b.block, 99))
    if ws.relative:
        rel = [(b.block, math.sqrt(b.delta_sq / b.weight_sq)) for b in ws.blocks if b.weight_sq]
        hot = [(b, r) for b, r in rel if r > OVERTRAINED]
        if hot:
            shown = ", ".join(f"{b} {r:.0%}" for b, r in sorted(hot, key=lambda x: -x[1])[:5])
            ws.hints.append(
                f"large changes at strength 1 ({shown} of the weights' norm): over-trained there, "
                f"or meant for low strengths."
            )
        if rel and max(r for _, r in rel) < NEGLIGIBLE:
            ws.hints.append(
                f"every block changes by less than {NEGLIGIBLE:.1%} at strength 1: the LoRA may be "
                "under-trained or need high strengths."
            )
    return ws
