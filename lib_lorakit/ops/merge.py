"""Merge checkpoints and compare them (one request type each; methods come from the registry)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Union

from ..errors import RecipeError
from ..jobs import Job
from ..merge.registry import METHODS, REGISTRY, param_bounds, param_default
from .bake import save_dtype_of
from .context import Context, Progress
from .model import Field, Request

WEIGHT_LIMIT = 100.0


def _bounded(name: str, description: str):
    lo, hi = param_bounds(name)
    return Field(param_default(name), ge=lo, le=hi, description=description)


class MergeModelIn(Request):
    name: str = Field(
        ...,
        min_length=1,
        description="A checkpoint from the host's list, or a path inside its "
        "checkpoint folders (a file path on the command line)",
    )
    weight: float = Field(
        1.0, ge=-WEIGHT_LIMIT, le=WEIGHT_LIMIT, description="Weight (weighted sum; normalised unless normalize=false)"
    )


class MergeRequest(Request):
    LIMITS = {"models": 16}
    models: List[MergeModelIn] = Field(
        ..., description="Ingredients; the first is the primary. Add-difference: A, then B with its weight"
    )
    output: str = Field(..., description="Output file name, written into the checkpoint folder")
    method: str = Field("weighted", description="One of: " + ", ".join(METHODS))
    base: Optional[str] = Field(None, description="C for add-difference (A + w(B - C)), TIES and DARE")
    blocks: Optional[str] = Field(
        None, description="Per-block factors on the non-primary contributions (preset or vector)"
    )
    vae_from: Optional[Union[int, str]] = Field(
        None, description="Model number (1 = primary, the default) or a VAE file name"
    )
    te_from: Optional[int] = Field(
        None, ge=1, description="Copy the text encoders from this model number instead of merging"
    )
    normalize: bool = Field(param_default("normalize"), description="Weighted: scale the weights to sum 1")
    density: float = _bounded("density", "TIES: fraction of each difference kept")
    drop: float = _bounded("drop", "DARE: fraction of each difference dropped")
    seed: int = _bounded("seed", "DARE: random seed")
    scale: float = _bounded("scale", "TIES/DARE: scale of the merged difference")
    save_dtype: Optional[str] = Field(None, description="fp16, bf16 or fp32 (default: lorakit's setting, fp16)")
    overwrite: bool = Field(False, description="Replace an existing output")
    device: Optional[Literal["auto", "cpu", "cuda"]] = Field(
        None, description="Where the fp32 maths runs: auto, cpu or cuda (default: lorakit's setting, auto)"
    )


class DiffRequest(Request):
    a: str = Field(..., min_length=1, description="Reference checkpoint")
    b: str = Field(..., min_length=1, description="Checkpoint compared with it")


@dataclass
class MergePlan:
    models: list  # lib_lorakit.merge.ModelSpec
    base: str | None
    vae: Any
    output: str
    save_dtype: str


def summary(report: dict[str, Any]) -> str:
    """The merge report in words (terminal and tab)."""
    from ..merge import summary as render

    return render(report)


def model_of_text(text: str) -> dict[str, Any]:
    """``PATH[:WEIGHT]`` (the command line's form) as a :class:`MergeModelIn` dict."""
    from ..merge import parse_model_arg
    from .bake import not_a_number

    m = parse_model_arg(text)
    not_a_number(m.path, "weight", "PATH[:WEIGHT]")
    return {"name": m.path, "weight": m.weight}


def diff_table(result: dict[str, Any]) -> str:
    from ..merge.diff import table

    return table(result)


def diff_chart(result: dict[str, Any], title: str):
    """A bar chart of a diff (or of a merge ingredient's diagnostics), as a PIL image."""
    from ..merge.diff import chart

    return chart(result, title)


def prepare(ctx: Context, req: MergeRequest) -> MergePlan:
    from ..formats.safetensors_io import check_output_path
    from ..merge import ModelSpec

    if req.method not in REGISTRY:
        from ..errors import did_you_mean

        raise RecipeError(
            f"Unknown merge method {req.method!r}.{did_you_mean(req.method, METHODS)}",
            fix=f"Use one of {', '.join(METHODS)}.",
        )
    if not req.models:
        raise RecipeError("No models to merge.", fix="Add at least two checkpoints.")
    models = [ModelSpec(ctx.resolve_checkpoint(m.name), float(m.weight)) for m in req.models]
    base = ctx.resolve_checkpoint(req.base) if req.base else None
    vae: Any = req.vae_from
    if isinstance(vae, str) and vae.strip().isdigit():
        vae = int(vae)
    elif vae in ("", None):
        vae = None
    elif isinstance(vae, str):
        vae = ctx.resolve_vae(vae)
    dtype = save_dtype_of(ctx, req.save_dtype)
    out = ctx.output_path(req.output)
    if os.path.isdir(os.path.dirname(out)):
        check_output_path(out, overwrite=req.overwrite, inputs=[m.path for m in models] + ([base] if base else []))
    return MergePlan(models, base, vae, out, dtype)


def execute(
    ctx: Context, req: MergeRequest, plan: MergePlan, progress: Progress | None = None, cancel: Any = None
) -> dict[str, Any]:
    from ..merge import merge as merge_engine

    os.makedirs(os.path.dirname(plan.output), exist_ok=True)
    report = merge_engine(
        plan.models,
        plan.output,
        method=req.method,
        base=plan.base,
        blocks=req.blocks or None,
        vae_from=plan.vae,
        te_from=req.te_from,
        normalize=req.normalize,
        density=req.density,
        drop=req.drop,
        seed=req.seed,
        scale=req.scale,
        save_dtype=plan.save_dtype,
        overwrite=req.overwrite,
        progress=progress,
        cancel=cancel,
        **ctx.engine_kwargs(req.device),
    )
    from .checks import nonfinite_vae, warn_nonfinite_vae

    source = plan.vae if isinstance(plan.vae, str) else f"model {plan.vae or 1}"
    warn_nonfinite_vae(report, source, nonfinite_vae(plan.output))
    return {"report": report, "output": plan.output, "checkpoint": ctx.written(plan.output)}


def merge(
    ctx: Context, req: MergeRequest | dict, progress: Progress | None = None, cancel: Any = None
) -> dict[str, Any]:
    """Merge now (the command line). Returns ``{"report", "output", "checkpoint"}``."""
    req = MergeRequest.parse(req)
    return execute(ctx, req, prepare(ctx, req), progress, cancel)


def start(ctx: Context, req: MergeRequest | dict) -> Job:
    req = MergeRequest.parse(req)
    plan = prepare(ctx, req)
    params = {
        "models": [m.dump() for m in req.models],
        "method": req.method,
        "base": req.base,
        "blocks": req.blocks,
        "vae_from": req.vae_from,
        "te_from": req.te_from,
        "output": plan.output,
        "save_dtype": plan.save_dtype,
    }
    return ctx.submit(
        "merge", params, lambda progress, cancel: execute(ctx, req, plan, progress, cancel), title="lorakit: merge"
    )


def diff(ctx: Context, req: DiffRequest | dict, progress: Progress | None = None) -> Dict[str, Any]:
    """Where B differs from A: relative change and cosine per component and block."""
    from ..merge.diff import diff as diff_engine

    req = DiffRequest.parse(req)
    return diff_engine(ctx.resolve_checkpoint(req.a), ctx.resolve_checkpoint(req.b), progress=progress)


def build_candidate(ctx: Context, merge_spec: dict[str, Any], name: str) -> str:
    """Build a tournament's merge candidate once (kept if an earlier run built it); its name in the host's list."""
    req = MergeRequest.parse(
        {
            "models": merge_spec.get("models") or [],
            "output": name,
            "method": merge_spec.get("method", "weighted"),
            "base": merge_spec.get("base"),
            "blocks": merge_spec.get("blocks"),
            "save_dtype": merge_spec.get("save_dtype"),
        },
        what="merge candidate",
    )
    out = ctx.output_path(name)
    if os.path.exists(out):  # built by an earlier, interrupted run of this tournament
        return ctx.written(out) or os.path.splitext(os.path.basename(out))[0]
    res = merge(ctx, req)
    return res["checkpoint"] or os.path.splitext(os.path.basename(out))[0]
