"""Resize a LoRA: re-factor every module's ΔW to a new rank (fixed, or a dynamic rule).

LoRA/LoCon modules are re-factored exactly from their factors (:func:`.svd.factor_product`:
QR of up and down, then an r×r SVD), keeping the module's alpha/rank ratio as kohya's
``resize_lora.py`` does; LoHa, LoKr, full diffs and DoRA go through their dense ΔW and come out
as LoRA modules with alpha = rank. The report gives, per module, the kept energy (Frobenius
norm ratio) and the relative error ‖ΔW − ΔW'‖/‖ΔW‖ — the Eckart–Young optimum at that rank.
"""

from __future__ import annotations

import json
import os
import time

from ..errors import RecipeError
from ..formats.safetensors_io import save_file
from ..streaming import engine_threads, peak_rss_mb
from . import svd
from .common import Cancel, Progress, check_cancel, check_output, check_rank, no_progress, resolve_device, save_dtype
from .deltas import LoraReader, module_tensors

STALE_METADATA = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


def resize(
    lora: str,
    output: str | None,
    *,
    rank: int | None = None,
    conv_rank: int | None = None,
    dynamic: str | None = None,
    base: str | None = None,
    device: str = "cpu",
    save: str = "fp16",
    overwrite: bool = False,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> dict:
    """Re-factor ``lora`` to ``rank`` (``conv_rank`` for 3x3 convolutions) and write ``output``.

    Args:
        rank: the new rank, or the cap of ``dynamic`` (default: each module's current rank).
        conv_rank: the new rank of 3x3 conv modules (default: ``rank``).
        dynamic: ``sv_fro:F``, ``sv_ratio:N`` or ``sv_cumulative:F`` (resize_lora.py's rules).
        base: the base checkpoint; needed for DoRA/IA3/OFT/GLoRA modules and for shapes of
            LoHa/LoKr modules whose names the architecture's layout does not resolve.
        output: None computes the report and writes nothing.

    Returns:
        The report: per module the old and new rank, kept energy and relative error.
    """
    t0 = time.perf_counter()
    say = progress or no_progress
    check_rank(rank)
    check_rank(conv_rank, "conv rank")
    dyn = svd.parse_dynamic(dynamic)
    if rank is None and dyn is None:
        raise RecipeError(
            "Resize needs a new rank or a dynamic rule.",
            fix="Give a rank (for example 32) or a dynamic rule such as sv_fro:0.9.",
        )
    dt = save_dtype(save)
    dev = resolve_device(device)
    if output is not None:
        output = check_output(output, [lora] + ([base] if base else []), overwrite)
    with engine_threads(), LoraReader(lora, base) as rd:
        tensors = {}
        layers: dict[str, dict] = {}
        copied, dropped = [], []
        total = len(rd)
        say(0, total, "resizing")
        for i, md in enumerate(rd):
            check_cancel(cancel, "Resize")
            if len(md.shape) < 2:
                for k in rd.parsed.modules[md.name].values():  # a norm layer: carried over as it is
                    tensors[k] = rd.src.read(k)
                copied.append(md.name)
                continue
            if md.dropped:
                dropped.append({"module": md.name, "params": list(md.dropped)})
            cap = (conv_rank or rank) if md.conv else rank
            old = md.down.shape[0] if md.factored else None
            if cap is None:
                cap = old if old is not None else min(md.shape[0], md.dense.shape[1])
            if md.factored:
                f = svd.factor_product(md.up.to(dev), md.down.to(dev), cap, dyn)
                up, alpha = f.up, md.scale * f.rank  # unscaled factors: alpha/rank stays the module's scale
            else:
                m = md.dense.to(dev)
                f = svd.factor(m, max(1, min(cap, *m.shape)), dyn)
                up, alpha = f.up, float(f.rank)
            tensors.update(module_tensors(md.name, up.cpu(), f.down.cpu(), alpha, md.shape, dt))
            layers[md.name] = {
                "algo": md.algo,
                "old_rank": old,
                "rank": f.rank,
                "kept": round(f.kept, 6),
                "rel_err": round(f.rel_err, 6),
                "alpha": alpha,
            }
            say(i + 1, total, f"{md.name}: rank {old or md.algo} -> {f.rank}, kept {f.kept:.1%}")
        meta = {k: v for k, v in rd.metadata.items() if k not in STALE_METADATA}
        ranks = sorted({v["rank"] for v in layers.values()})
        comment = meta.get("ss_training_comment", "")
        olds = sorted({v["old_rank"] for v in layers.values() if v["old_rank"]})
        what = dynamic if dyn else f"rank {rank}" + (f" (conv {conv_rank})" if conv_rank else "")
        meta["ss_training_comment"] = (f"resized from {olds[-1] if olds else '?'} with {what}; {comment}").strip("; ")
        if dyn:
            meta["ss_network_dim"] = meta["ss_network_alpha"] = "Dynamic"
        elif rank is not None:
            meta["ss_network_dim"] = str(rank)
            alphas = {v["alpha"] for v in layers.values()}
            if len(alphas) == 1:
                meta["ss_network_alpha"] = str(next(iter(alphas)))
        meta["lorakit.resize"] = json.dumps(
            {
                "from": os.path.basename(lora),
                "rank": rank,
                "conv_rank": conv_rank,
                "dynamic": dynamic or "",
                "layers": {n: [v["rank"], v["kept"], v["rel_err"]] for n, v in layers.items()},
            },
            separators=(",", ":"),
        )
        if output is not None:
            save_file(tensors, output, meta, overwrite=overwrite)
    errs = [v["rel_err"] for v in layers.values()]
    report = {
        "lora": os.fspath(lora),
        "output": output,
        "modules": len(layers),
        "ranks": ranks,
        "layers": layers,
        "copied": copied,
        "dropped": dropped,
        "max_rel_err": max(errs) if errs else 0.0,
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_mb": peak_rss_mb(),
    }
    say(total, total, "done")
    return report


def summary(report: dict) -> str:
    lay = list(report["layers"].values())
    kept = [v["kept"] for v in lay]
    lines = [
        f"resized {report['modules']} modules to rank {', '.join(map(str, report['ranks'][:6]))}"
        + ("…" if len(report["ranks"]) > 6 else "")
        + f" in {report['seconds']} s"
        + (f" -> {report['output']}" if report.get("output") else " (dry run)")
    ]
    if kept:
        lines.append(
            f"energy kept per layer: min {min(kept):.1%}, mean {sum(kept) / len(kept):.1%}; "
            f"max relative error {report['max_rel_err']:.4f}"
        )
    if report["dropped"]:
        lines.append(f"bias updates dropped (a LoRA cannot hold them): {len(report['dropped'])} modules")
    return "\n".join(lines)


__all__ = ["resize", "summary"]
