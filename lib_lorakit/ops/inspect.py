"""Inspect LoRAs: what a LoRA really is, one request type for every door."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional

from ..errors import Cancelled, RecipeError
from ..jobs import Job
from .context import Context, HostContext, LocalContext, Progress
from .model import Field, Request


class InspectRequest(Request):
    LIMITS = {"loras": 10000}
    loras: List[str] = Field(
        default_factory=list, description="LoRA names from the host's list (files or folders on the command line)"
    )
    all: bool = Field(False, description="Inspect every LoRA in the host's list instead")
    checkpoint: Optional[str] = Field(
        None, description="The checkpoint they will be used with (cross-lineage ceilings)"
    )
    weights: bool = Field(False, description="Per-block weight statistics (reads the tensors; slower)")


class UserMetadataRequest(Request):
    lora: str = Field(..., min_length=1)
    activation_text: Optional[str] = Field(None, description="Written to the WebUI's 'activation text'")
    preferred_weight: Optional[float] = Field(None, description="Written to the WebUI's 'preferred weight' (-4 to 4)")


class StrengthsRequest(Request):
    max_safe_strength: Dict[str, float] = Field(default_factory=dict, description="category -> ceiling")
    cross_lineage: Dict[str, float] = Field(
        default_factory=dict, description="'LoRA lineage>checkpoint lineage' -> ceiling, '*>*' default"
    )


def render(report: dict[str, Any], tags: int = 12) -> str:
    """An inspector report in words."""
    from ..inspect import render as render_report

    return render_report(report, tags=tags)


def categories() -> tuple[str, ...]:
    from ..inspect.category import CATEGORIES

    return tuple(CATEGORIES)


def user_metadata(ctx: Context, lora: str) -> dict[str, Any]:
    """The host's per-LoRA user metadata (<lora>.json) as it is now."""
    from ..inspect import usermeta

    return usermeta.read(ctx.resolve_lora(lora))


def write_user_metadata_file(report: dict[str, Any]) -> dict[str, Any]:
    """Write an inspected file's trigger and max-safe strength into its <lora>.json (other fields kept)."""
    from ..inspect import usermeta

    return usermeta.write(
        report["file"],
        activation_text=report["trigger"] or "",
        preferred_weight=report["max_safe_strength"] or None,
        arch=report["architecture"],
    )


def _targets(ctx: Context, req: InspectRequest) -> tuple[list[str], dict[str, str]]:
    if req.all:
        if not isinstance(ctx, HostContext):
            raise RecipeError("Inspecting every LoRA needs a host's LoRA list.", fix="Give LoRA files or folders.")
        from ..safepath import inside

        roots = ctx.host.lora_dirs()
        entries = [e for e in ctx.loras() if inside(e.path, roots)]  # links that leave the folders are not read
        return [e.path for e in entries], {e.path: e.name for e in entries}
    if not req.loras:
        raise RecipeError("No LoRA to inspect.", fix="Give one or more LoRA names from the list.")
    paths, label = [], {}
    for n in req.loras:
        if isinstance(ctx, LocalContext) and os.path.isdir(n):
            path = n  # a folder: scanned recursively
        else:
            path = ctx.resolve_lora(n)
        paths.append(path)
        label[path] = n
    return paths, label


def inspect(
    ctx: Context,
    req: InspectRequest | dict,
    progress: Progress | None = None,
    cancel: Any = None,
    processes: int | None = None,
) -> list[dict[str, Any]]:
    """Inspect LoRAs (headers only unless ``weights``); one report per file, unreadable ones with ``error``."""
    from ..inspect import inspect_paths

    req = InspectRequest.parse(req)
    paths, label = _targets(ctx, req)
    ckpt = ctx.resolve_checkpoint(req.checkpoint) if req.checkpoint else None
    kw = {"processes": processes} if processes is not None else {}
    reports = inspect_paths(
        paths, checkpoint=ckpt, weights=req.weights, settings=ctx.settings(), progress=progress, cancel=cancel, **kw
    )
    if not reports and isinstance(ctx, LocalContext):
        raise RecipeError(f"No LoRA files (.safetensors, .ckpt, .pt) found in {', '.join(req.loras)}.")
    if isinstance(ctx, HostContext):
        for r in reports:
            r["lora"] = label.get(r["file"], os.path.splitext(os.path.basename(r["file"]))[0])
    return reports


def start_all(ctx: Context, req: InspectRequest | dict) -> Job:
    """Inspect every listed LoRA as a job (read-only: it does not wait for the host's queue)."""
    req = InspectRequest.parse(req).copy_with(all=True)
    if req.checkpoint:
        ctx.resolve_checkpoint(req.checkpoint)  # refuse bad names before starting

    def work(progress, cancel) -> dict[str, Any]:
        t0 = time.perf_counter()
        reps = inspect(ctx, req, progress=progress, cancel=cancel)
        if cancel.is_set():
            raise Cancelled("Inspection cancelled.")
        return {"reports": reps, "seconds": time.perf_counter() - t0}

    return ctx.submit(
        "inspect",
        {"all": True, "checkpoint": req.checkpoint, "weights": req.weights},
        work,
        exclusive=False,
        running="reading headers",
    )


def write_user_metadata(ctx: Context, req: UserMetadataRequest | dict) -> dict[str, Any]:
    """Write the trigger / strength into the host's per-LoRA user metadata, then refresh its list."""
    from ..formats.sources import open_source
    from ..inspect import usermeta
    from ..inspect.structure import read_structure

    req = UserMetadataRequest.parse(req)
    path = ctx.resolve_lora(req.lora)
    with open_source(path) as src:
        arch = read_structure(src).arch
    res = usermeta.write(path, activation_text=req.activation_text, preferred_weight=req.preferred_weight, arch=arch)
    ctx.loras_changed()
    return res


def strengths(ctx: Context) -> dict[str, Any]:
    st = ctx.settings()
    return {"max_safe_strength": st["max_safe_strength"], "cross_lineage": st["cross_lineage"]}


def set_strengths(ctx: Context, req: StrengthsRequest | dict) -> dict[str, Any]:
    req = StrengthsRequest.parse(req)
    changes = {
        k: v for k, v in (("max_safe_strength", req.max_safe_strength), ("cross_lineage", req.cross_lineage)) if v
    }
    st = ctx.update_settings(changes)
    return {"max_safe_strength": st["max_safe_strength"], "cross_lineage": st["cross_lineage"]}
