"""Extract a LoRA from two checkpoints: the truncated SVD of (tuned − base), layer by layer.

The output is a kohya LoRA (``lora_unet_…``/``lora_te1_…``/``lora_te2_…``, ``alpha`` = rank, so the
scale is 1) covering the modules kohya's ``networks/lora.py`` trains (see :mod:`.modules`); SDXL's
CLIP-G q/k/v are three row slices of the fused ``in_proj_weight``, each factored on its own.
Differences are taken in float32; each layer is factored by :func:`.svd.factor`
(randomized where it settles, exact otherwise). Unlike kohya's script no value is clamped, so
the error per layer is the truncated SVD's.

Memory stays flat: a reader thread reads the next layers of both files (two or three layers ahead)
while the current one is factored; only the (small) LoRA is held until it is written.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time

import torch

from ..errors import ArchitectureError, FormatError, RecipeError
from ..formats.arch import ARCHS, detect_checkpoint
from ..formats.safetensors_io import save_file
from ..formats.sources import TensorSource, open_source
from ..streaming import Hasher, engine_threads, peak_rss_mb
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
from .modules import Module, kohya_modules

AHEAD = 3


def _open_pair(tuned: str, base: str) -> tuple[TensorSource, TensorSource, str]:
    t = open_source(tuned)
    try:
        b = open_source(base)
    except BaseException:
        t.close()
        raise
    try:
        fam = detect_checkpoint(t.shapes(), t.metadata, tuned)
        famb = detect_checkpoint(b.shapes(), b.metadata, base)
        if fam.arch not in ARCHS:
            raise ArchitectureError(
                f"{tuned}: not recognised as an SD1.5 or SDXL checkpoint.",
                fix="Give a full SD1.5 or SDXL checkpoint (UNet and text encoders).",
            )
        if famb.arch != fam.arch:
            raise ArchitectureError(
                f"The tuned model is {fam.label}, the base {famb.label}: a LoRA can only be "
                f"extracted between two models of one family.",
                fix="Pick a base of the tuned model's family.",
            )
    except BaseException:
        t.close()
        b.close()
        raise
    return t, b, fam.arch


def _reader(mods: list[Module], t: TensorSource, b: TensorSource, q: queue.Queue, stop: threading.Event) -> None:
    try:
        for m in mods:
            if stop.is_set():
                return
            if m.rows is None:
                pair = (t.read(m.key), b.read(m.key))
            else:
                pair = (t.read_rows(m.key, *m.rows), b.read_rows(m.key, *m.rows))
            while not stop.is_set():
                try:
                    q.put((m, pair), timeout=0.2)
                    break
                except queue.Full:
                    continue
        q.put(None)
    except BaseException as e:  # surfaced in the main thread
        q.put(e)


def extract(
    tuned: str,
    base: str,
    output: str | None,
    *,
    rank: int = 32,
    conv_rank: int | None = None,
    dynamic: str | None = None,
    min_diff: float = 0.0,
    blocks: str | None = None,
    device: str = "auto",
    save: str = "fp16",
    method: str = "auto",
    hash_inputs: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> dict:
    """Extract a LoRA of (tuned − base) and write it to ``output`` (kohya format, safetensors).

    Args:
        rank: rank of linear and 1x1 layers (the cap with ``dynamic``).
        conv_rank: rank of 3x3 convolutions; None or 0 leaves convolutions out (as kohya without conv_dim).
        dynamic: ``sv_fro:F``, ``sv_ratio:N`` or ``sv_cumulative:F`` (resize_lora.py's rules), or None.
        min_diff: layers whose largest absolute difference is at or below this are skipped and listed.
        blocks: keep only these components/blocks (``unet``, ``te1``, ``IN04``, …), comma-separated.
        device: ``auto``, ``cpu`` or ``cuda``.
        save: dtype of the LoRA: fp16, bf16 or fp32.
        method: ``auto`` (randomized where it settles) or ``exact`` (full SVD of every layer).
        output: None runs everything but writes nothing (a dry run).

    Returns:
        The report: per module rank, kept energy and relative error; skipped layers; timings.
    """
    t0 = time.perf_counter()
    say = progress or no_progress
    check_rank(rank)
    check_rank(conv_rank, "conv rank", allow_zero=True)
    dyn = svd.parse_dynamic(dynamic)
    dt = save_dtype(save)
    if method not in ("auto", "exact"):
        raise RecipeError(f"Unknown SVD method {method!r}.", fix="Use auto or exact.")
    if not min_diff >= 0:
        raise RecipeError(f"The minimum difference {min_diff!r} must be 0 or more.", fix="Use for example 0.0001.")
    dev = resolve_device(device)
    if output is not None:
        output = check_output(output, [tuned, base], overwrite)
    with engine_threads():
        return _extract(
            tuned,
            base,
            output,
            rank,
            conv_rank,
            dynamic,
            dyn,
            min_diff,
            blocks,
            dev,
            dt,
            method,
            hash_inputs,
            overwrite,
            say,
            cancel,
            t0,
        )


def _extract(
    tuned,
    base,
    output,
    rank,
    conv_rank,
    dynamic,
    dyn,
    min_diff,
    blocks,
    dev,
    dt,
    method,
    hash_inputs,
    overwrite,
    say,
    cancel,
    t0,
) -> dict:
    t, b, arch = _open_pair(tuned, base)
    hashers: list[Hasher] = []
    stop = threading.Event()
    try:
        st, sb = t.shapes(), b.shapes()
        sel = block_filter(blocks, arch)
        mods = [
            m for m in kohya_modules(st, ARCHS[arch], conv=bool(conv_rank)) if keep_module(sel, m.component, m.block)
        ]
        for m in mods:
            if m.key not in sb:
                raise FormatError(
                    f"{base}: has no tensor {m.key!r}, which the tuned model has.",
                    fix="Give the base model the tuned model was trained from (same family, full model).",
                )
            if tuple(sb[m.key]) != tuple(st[m.key]):
                raise FormatError(
                    f"{m.key}: shape {list(st[m.key])} in the tuned model, {list(sb[m.key])} in the base.",
                    fix="Give the base model the tuned model was trained from.",
                )
        if not mods:
            raise RecipeError("No layer to extract with these blocks.", fix="Widen the block selection.")
        if hash_inputs and output is not None:
            hashers = [Hasher(os.fspath(p)) for p in (tuned, base)]
            for h in hashers:
                h.start()
        q: queue.Queue = queue.Queue(maxsize=AHEAD)
        reader = threading.Thread(target=_reader, args=(mods, t, b, q, stop), name="lorakit-extract-read", daemon=True)
        reader.start()
        tensors: dict[str, torch.Tensor] = {}
        layers: dict[str, dict] = {}
        skipped: list[dict] = []
        methods: dict[str, int] = {}
        total = len(mods)
        done = 0
        say(0, total, "extracting")
        while True:
            item = q.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            check_cancel(cancel, "Extraction")
            m, (wt, wb) = item
            diff = wt.to(dev, torch.float32) - wb.to(dev, torch.float32)
            del wt, wb
            peak = float(diff.abs().max()) if diff.numel() else 0.0
            done += 1
            if peak <= min_diff:
                skipped.append({"module": m.name, "key": m.key, "max_abs_diff": peak})
                say(done, total, f"{m.name}: unchanged, skipped")
                continue
            r = conv_rank if m.kind == "conv" else rank
            out_dim = m.shape[0]
            mat = diff.reshape(out_dim, -1)
            r = max(1, min(r, mat.shape[0], mat.shape[1]))
            f = svd.factor(mat, r, dyn, method=method)
            k = f.rank
            up, down = f.up, f.down
            if len(m.shape) == 4:
                up = up.reshape(out_dim, k, 1, 1)
                down = down.reshape(k, *m.shape[1:])
            tensors[m.name + ".lora_up.weight"] = up.to("cpu", dt).contiguous()
            tensors[m.name + ".lora_down.weight"] = down.to("cpu", dt).contiguous()
            tensors[m.name + ".alpha"] = torch.tensor(float(k), dtype=dt)
            layers[m.name] = {
                "key": m.key,
                "rows": list(m.rows) if m.rows else None,
                "rank": k,
                "kept": round(f.kept, 6),
                "rel_err": round(f.rel_err, 6),
                "method": f.method,
            }
            methods[f.method] = methods.get(f.method, 0) + 1
            say(done, total, f"{m.name}: rank {k}, kept {f.kept:.1%}")
            del diff, mat, f
        reader.join()
        if not layers:
            raise RecipeError(
                f"{tuned} and {base} do not differ on any of the {total} layers a LoRA covers "
                f"(largest difference at most {min_diff:g}).",
                fix="Check that the first model is the fine-tune and the second its base, or lower the minimum difference.",
            )
        report = {
            "tuned": os.fspath(tuned),
            "base": os.fspath(base),
            "output": output,
            "arch": arch,
            "rank": rank,
            "conv_rank": conv_rank or 0,
            "dynamic": dynamic or "",
            "min_diff": min_diff,
            "device": str(dev),
            "modules": len(layers),
            "skipped": skipped,
            "layers": layers,
            "methods": methods,
        }
        if output is not None:
            for h in hashers:
                h.join()
            title = os.path.splitext(os.path.basename(output))[0]
            meta = lora_modelspec(arch, title)
            net_args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))} if conv_rank else {}
            meta.update(
                {
                    "ss_network_dim": "Dynamic" if dyn else str(rank),
                    "ss_network_alpha": "Dynamic" if dyn else str(float(rank)),
                    "ss_network_args": json.dumps(net_args),
                    "ss_training_comment": f"extracted from {os.path.basename(tuned)} - {os.path.basename(base)}",
                    "lorakit.extract": json.dumps(
                        {
                            "tuned": os.path.basename(tuned),
                            "base": os.path.basename(base),
                            "tuned_sha256": hashers[0].digest if hashers else "",
                            "base_sha256": hashers[1].digest if hashers else "",
                            "rank": rank,
                            "conv_rank": conv_rank or 0,
                            "dynamic": dynamic or "",
                            "min_diff": min_diff,
                            "skipped": [s["module"] for s in skipped],
                            "layers": {n: [v["rank"], v["kept"], v["rel_err"]] for n, v in layers.items()},
                        },
                        separators=(",", ":"),
                    ),
                }
            )
            save_file(tensors, output, meta, overwrite=overwrite)
            report["tuned_sha256"] = hashers[0].digest if hashers else ""
            report["base_sha256"] = hashers[1].digest if hashers else ""
        report["seconds"] = round(time.perf_counter() - t0, 2)
        report["peak_rss_mb"] = peak_rss_mb()
        say(total, total, "done")
        return report
    finally:
        stop.set()
        for h in hashers:
            h.stop.set()
            h.join(timeout=30)
        t.close()
        b.close()


def summary(report: dict) -> str:
    """A few lines for the terminal."""
    lay = report["layers"].values()
    kept = [v["kept"] for v in lay]
    lines = [
        f"extracted {report['modules']} modules ({report['arch']}, rank {report['rank']}"
        + (f", conv rank {report['conv_rank']}" if report["conv_rank"] else "")
        + (f", {report['dynamic']}" if report["dynamic"] else "")
        + f") in {report['seconds']} s"
        + (f" -> {report['output']}" if report.get("output") else " (dry run)")
    ]
    if kept:
        lines.append(f"energy kept per layer: min {min(kept):.1%}, mean {sum(kept) / len(kept):.1%}")
    if report["skipped"]:
        lines.append(
            f"skipped {len(report['skipped'])} unchanged layers: "
            + ", ".join(s["module"] for s in report["skipped"][:8])
            + (" …" if len(report["skipped"]) > 8 else "")
        )
    return "\n".join(lines)
