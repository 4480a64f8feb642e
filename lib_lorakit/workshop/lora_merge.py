"""Merge several LoRAs into one LoRA.

- ``concat`` (exact): for each module, the weighted factors side by side,
  up = [w₁·s₁·up₁ | w₂·s₂·up₂ | …], down = [down₁; down₂; …], alpha = total rank, so
  up @ down = Σ wᵢ ΔWᵢ exactly and baking the merge equals baking the inputs together. Ranks add
  up. LoRA/LoCon (Tucker folded) only: LoHa/LoKr have no exact LoRA form at a finite rank.
- ``svd``: the weighted sum Σ wᵢ ΔWᵢ re-factored to ``rank`` (or a dynamic rule): exactly from the
  stacked factors when every input is LoRA/LoCon, through the dense sum otherwise.

Modules are matched by name (inputs in one naming scheme, e.g. kohya's). ``blocks`` keeps only
modules of the given components/blocks; per-input weights for the text encoders follow ``A:0.7:0.5``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import torch

from ..errors import RecipeError
from ..formats.safetensors_io import save_file
from ..streaming import engine_threads, peak_rss_mb
from . import svd
from .common import (
    Cancel,
    Progress,
    block_filter,
    check_cancel,
    check_output,
    check_rank,
    keep_module,
    lora_modelspec,
    no_progress,
    resolve_device,
    save_dtype,
)
from .deltas import LoraReader, ModuleDelta, module_tensors

MODES = ("concat", "svd")


def parse_input(text: str) -> tuple[str, float, float | None]:
    """``path[:weight[:te_weight]]`` → (path, weight, te weight or None)."""
    parts = str(text).rsplit(":", 2)
    nums: list[float] = []
    while len(parts) > 1:
        try:
            nums.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    if not nums:
        return path, 1.0, None
    if len(nums) > 2:
        raise RecipeError(f"{text!r}: too many numbers.", fix="Write LORA:WEIGHT or LORA:WEIGHT:TE_WEIGHT.")
    return path, nums[0], (nums[1] if len(nums) == 2 else None)


def lora_merge(
    inputs: Sequence[str | tuple[str, float] | tuple[str, float, float | None]],
    output: str | None,
    *,
    mode: str = "concat",
    rank: int | None = None,
    conv_rank: int | None = None,
    dynamic: str | None = None,
    blocks: str | None = None,
    base: str | None = None,
    device: str = "cpu",
    save: str = "fp16",
    overwrite: bool = False,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> dict:
    """Merge LoRAs into one and write ``output``.

    Args:
        inputs: ``"path:weight"`` strings or (path, weight[, te_weight]) tuples.
        mode: ``concat`` (exact, ranks add up) or ``svd`` (re-factored to ``rank``/``dynamic``).
        rank, conv_rank, dynamic: the target rank in ``svd`` mode (conv_rank for 3x3 convs).
        blocks: keep only modules of these components/blocks (``unet``, ``te``, ``IN04``, …).
        base: base checkpoint (DoRA inputs, LoHa/LoKr shapes outside the layout).
    """
    t0 = time.perf_counter()
    say = progress or no_progress
    if mode not in MODES:
        raise RecipeError(f"Unknown LoRA merge mode {mode!r}.", fix="Use concat (exact) or svd.")
    specs = [
        parse_input(x) if isinstance(x, str) else (x[0], float(x[1]), x[2] if len(x) > 2 else None) for x in inputs
    ]
    if len(specs) < 1:
        raise RecipeError("No LoRA to merge.", fix="Give at least one LoRA (two or more to merge).")
    check_rank(rank)
    check_rank(conv_rank, "conv rank")
    dyn = svd.parse_dynamic(dynamic)
    if mode == "svd" and rank is None and dyn is None:
        raise RecipeError("The svd merge needs a rank or a dynamic rule.", fix="Give a rank, e.g. 32.")
    dt = save_dtype(save)
    dev = resolve_device(device)
    if output is not None:
        output = check_output(output, [s[0] for s in specs] + ([base] if base else []), overwrite)
    readers: list[LoraReader] = []
    try:
        for path, _, _ in specs:
            readers.append(LoraReader(path, base))
        archs = {r.arch for r in readers}
        if len(archs) > 1:
            raise RecipeError(
                f"The LoRAs are of different families ({', '.join(sorted(str(a) for a in archs))}).",
                fix="Merge LoRAs of one family (all SD1.5 or all SDXL).",
            )
        arch = readers[0].arch
        sel = block_filter(blocks, arch) if arch else None
        order: list[str] = []
        for r in readers:
            order += [n for n in r.names() if n not in order]
        tensors: dict[str, torch.Tensor] = {}
        layers: dict[str, dict] = {}
        skipped: list[str] = []
        with engine_threads():
            for i, name in enumerate(order):
                check_cancel(cancel, "LoRA merge")
                parts: list[tuple[ModuleDelta, float]] = []
                for r, (_, w, wte) in zip(readers, specs):
                    if name in r.parsed.modules:
                        md = r.read(name)
                        if not keep_module(sel, md.component or "", md.block):
                            continue
                        weight = wte if (wte is not None and md.component in ("te1", "te2")) else w
                        if weight != 0:
                            parts.append((md, weight))
                if not parts:
                    skipped.append(name)
                    continue
                shapes = {tuple(md.shape) for md, _ in parts}
                if len(shapes) > 1:
                    raise RecipeError(
                        f"Module {name!r} has different shapes in the inputs: "
                        f"{', '.join(str(list(s)) for s in shapes)}.",
                        fix="Merge LoRAs made for one model family.",
                    )
                shape = parts[0][0].shape
                if len(shape) < 2:
                    skipped.append(name)
                    continue
                all_factored = all(md.factored for md, _ in parts)
                if mode == "concat":
                    if not all_factored:
                        bad = next(md for md, _ in parts if not md.factored)
                        raise RecipeError(
                            f"Module {name!r} is {bad.algo}, which has no exact LoRA form for concat.",
                            fix="Use the svd mode with a rank for LoHa/LoKr/DoRA inputs.",
                        )
                    up = torch.cat([md.up * (md.scale * w) for md, w in parts], dim=1)
                    down = torch.cat([md.down for md, _ in parts], dim=0)
                    k = down.shape[0]
                    tensors.update(module_tensors(name, up, down, float(k), shape, dt))
                    layers[name] = {"rank": k, "inputs": len(parts), "rel_err": 0.0}
                else:
                    conv = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
                    cap = (conv_rank or rank) if conv else rank
                    if all_factored:
                        a = torch.cat([md.up * (md.scale * w) for md, w in parts], dim=1).to(dev)
                        b = torch.cat([md.down for md, _ in parts], dim=0).to(dev)
                        if cap is None:
                            cap = a.shape[1]
                        f = svd.factor_product(a, b, cap, dyn)
                    else:
                        m = sum(md.matrix() * w for md, w in parts).to(dev)
                        if cap is None:
                            cap = min(m.shape)
                        f = svd.factor(m, max(1, min(cap, *m.shape)), dyn)
                    tensors.update(module_tensors(name, f.up.cpu(), f.down.cpu(), float(f.rank), shape, dt))
                    layers[name] = {
                        "rank": f.rank,
                        "inputs": len(parts),
                        "kept": round(f.kept, 6),
                        "rel_err": round(f.rel_err, 6),
                    }
                say(i + 1, len(order), f"{name}: rank {layers[name]['rank']}")
        if not layers:
            raise RecipeError(
                "Nothing to merge: no module is left with these weights and blocks.",
                fix="Check the weights (not all 0) and the block selection.",
            )
        title = os.path.splitext(os.path.basename(output))[0] if output else "merge"
        meta = lora_modelspec(arch, title) if arch else {}
        ranks = sorted({v["rank"] for v in layers.values()})
        meta.update(
            {
                "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "Dynamic",
                "ss_network_alpha": str(float(ranks[0])) if len(ranks) == 1 else "Dynamic",
                "lorakit.lora_merge": json.dumps(
                    {
                        "mode": mode,
                        "rank": rank,
                        "conv_rank": conv_rank,
                        "dynamic": dynamic or "",
                        "blocks": blocks or "",
                        "inputs": [{"file": os.path.basename(p), "weight": w, "te_weight": wte} for p, w, wte in specs],
                    },
                    separators=(",", ":"),
                ),
            }
        )
        if output is not None:
            save_file(tensors, output, meta, overwrite=overwrite)
    finally:
        for r in readers:
            r.close()
    errs = [v["rel_err"] for v in layers.values()]
    report = {
        "inputs": [{"path": p, "weight": w, "te_weight": wte} for p, w, wte in specs],
        "mode": mode,
        "output": output,
        "modules": len(layers),
        "ranks": ranks,
        "layers": layers,
        "skipped": skipped,
        "max_rel_err": max(errs),
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_mb": peak_rss_mb(),
    }
    say(len(order), len(order), "done")
    return report


def summary(report: dict) -> str:
    return (
        f"merged {len(report['inputs'])} LoRAs ({report['mode']}) into {report['modules']} modules, rank "
        f"{', '.join(map(str, report['ranks'][:6]))}{'…' if len(report['ranks']) > 6 else ''}; "
        f"max relative error {report['max_rel_err']:.4g}; {report['seconds']} s"
        + (f" -> {report['output']}" if report.get("output") else " (dry run)")
    )
