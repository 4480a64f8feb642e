"""The model workshop: extract a LoRA from two checkpoints, resize a LoRA, merge LoRAs into one LoRA,
clean a checkpoint, and the hashes people look models up by. Long ones run as jobs with progress
and cancel; LoRA outputs go to the LoRA folder, checkpoint outputs to the checkpoint folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, List, Literal, Optional

from ..errors import RecipeError
from ..jobs import Job
from .context import Context, HostContext, Progress
from .model import Field, Request

Work = Callable[[Any, Any], dict]  # work(progress, cancel): the checked, resolved operation

DEVICE = Field("auto", description="Where the SVD runs: auto (the GPU when torch sees one), cpu or cuda")
SAVE = Field("fp16", description="The output's dtype: fp16, bf16 or fp32")
DYNAMIC = Field(None, description="Rank per layer: sv_fro:0.9, sv_ratio:8 or sv_cumulative:0.9 (the rank caps it)")


class ExtractRequest(Request):
    tuned: str = Field(..., min_length=1, description="The fine-tuned checkpoint")
    base: str = Field(..., min_length=1, description="The checkpoint it was tuned from")
    output: str = Field(..., min_length=1, description="Output LoRA name (into the LoRA folder)")
    rank: int = Field(32, ge=1, le=1024, description="Rank of linear layers (the cap with dynamic)")
    conv_rank: Optional[int] = Field(None, ge=0, le=1024, description="Rank of 3x3 convolutions (none: left out)")
    dynamic: Optional[str] = DYNAMIC
    min_diff: float = Field(
        0.0, ge=0, le=1, description="Skip layers whose largest absolute difference is at most this"
    )
    blocks: Optional[str] = Field(None, description="Only these components/blocks, e.g. unet or te1,te2 or IN04,OUT05")
    device: Literal["auto", "cpu", "cuda"] = DEVICE
    method: Literal["auto", "exact"] = Field("auto", description="auto: randomized SVD where it settles; exact: full")
    save: Literal["fp16", "bf16", "fp32"] = SAVE
    hash_inputs: bool = Field(True, description="Record the inputs' SHA-256 in the LoRA's metadata")
    overwrite: bool = False


class ResizeRequest(Request):
    lora: str = Field(..., min_length=1)
    output: str = Field(..., min_length=1, description="Output LoRA name (into the LoRA folder)")
    rank: Optional[int] = Field(None, ge=1, le=1024, description="New rank (the cap with dynamic)")
    conv_rank: Optional[int] = Field(None, ge=1, le=1024, description="New rank of 3x3 conv modules (default: rank)")
    dynamic: Optional[str] = DYNAMIC
    base: Optional[str] = Field(None, description="Base checkpoint (needed for DoRA; gives LoHa/LoKr shapes)")
    device: Literal["auto", "cpu", "cuda"] = Field("cpu", description="auto, cpu or cuda")
    save: Literal["fp16", "bf16", "fp32"] = SAVE
    overwrite: bool = False


class MergeInput(Request):
    name: str = Field(..., min_length=1)
    weight: float = Field(1.0, ge=-20, le=20)
    te_weight: Optional[float] = Field(None, ge=-20, le=20, description="Text-encoder weight (default: weight)")


class LoraMergeRequest(Request):
    loras: List[MergeInput] = Field(..., description="The LoRAs to merge, with their weights")
    output: str = Field(..., min_length=1, description="Output LoRA name (into the LoRA folder)")
    mode: Literal["concat", "svd"] = Field("concat", description="concat (exact, ranks add up) or svd to a rank")
    rank: Optional[int] = Field(None, ge=1, le=1024, description="Target rank (svd mode)")
    conv_rank: Optional[int] = Field(None, ge=1, le=1024)
    dynamic: Optional[str] = DYNAMIC
    blocks: Optional[str] = None
    base: Optional[str] = Field(None, description="Base checkpoint (needed for DoRA inputs)")
    device: Literal["auto", "cpu", "cuda"] = Field("cpu")
    save: Literal["fp16", "bf16", "fp32"] = SAVE
    overwrite: bool = False


class CleanRequest(Request):
    checkpoint: str = Field(..., min_length=1)
    output: str = Field(..., min_length=1, description="Output checkpoint name (into the checkpoint folder)")
    drop_ema: bool = Field(True, description="Drop model_ema.* copies")
    drop_other: bool = Field(True, description="Drop keys that are not model weights (optimizer state, stray keys)")
    repair_position_ids: bool = Field(True, description="Write CLIP position_ids as the integer arange")
    save: Literal["keep", "fp16", "bf16", "fp32"] = Field("keep")
    vae: Optional[str] = Field(None, description="Replace the VAE from this VAE file or checkpoint")
    title: Optional[str] = None
    author: Optional[str] = None
    description: Optional[str] = None
    trigger_words: Optional[str] = None
    preferred_weight: Optional[float] = Field(None, ge=-4, le=4)
    strip_training: bool = Field(False, description="Remove ss_*/sshs_* training metadata")
    scan: bool = Field(True, description="Scan every tensor for NaN/Inf")
    overwrite: bool = False


def _adapt(progress: Progress | None):
    if progress is None:
        return None
    return lambda done, total, text: progress(done / max(total, 1), text)


def _cancel(cancel: Any):
    return None if cancel is None else (cancel.is_set if hasattr(cancel, "is_set") else cancel)


def _lora_out(ctx: Context, name: str) -> str:
    if isinstance(ctx, HostContext):
        from ..safepath import output_path

        return output_path(name, ctx.host.lora_dirs()[0])
    return ctx.output_path(name)


def _written_lora(ctx: Context, path: str) -> str | None:
    ctx.loras_changed()
    if isinstance(ctx, HostContext):
        for e in ctx.loras():
            if os.path.realpath(e.path) == os.path.realpath(path):
                return e.name
    return None


def _check_dynamic(value: str | None) -> None:
    if value:
        from ..workshop import parse_dynamic

        parse_dynamic(value)


def _extract(ctx: Context, req: ExtractRequest) -> Work:
    from ..workshop import extract as run

    _check_dynamic(req.dynamic)
    tuned, base, out = ctx.resolve_checkpoint(req.tuned), ctx.resolve_checkpoint(req.base), _lora_out(ctx, req.output)

    def work(progress: Progress | None, cancel: Any) -> dict:
        rep = run(
            tuned,
            base,
            out,
            rank=req.rank,
            conv_rank=req.conv_rank,
            dynamic=req.dynamic,
            min_diff=req.min_diff,
            blocks=req.blocks,
            device=req.device,
            save=req.save,
            method=req.method,
            hash_inputs=req.hash_inputs,
            overwrite=req.overwrite,
            progress=_adapt(progress),
            cancel=_cancel(cancel),
        )
        return {"report": rep, "output": out, "lora": _written_lora(ctx, out)}

    return work


def _resize(ctx: Context, req: ResizeRequest) -> Work:
    from ..workshop import resize as run

    _check_dynamic(req.dynamic)
    if req.rank is None and not req.dynamic:
        raise RecipeError("No target rank.", fix="Give a rank, or a dynamic rule such as sv_fro:0.9.")
    lora, out = ctx.resolve_lora(req.lora), _lora_out(ctx, req.output)
    base = ctx.resolve_checkpoint(req.base) if req.base else None

    def work(progress: Progress | None, cancel: Any) -> dict:
        rep = run(
            lora,
            out,
            rank=req.rank,
            conv_rank=req.conv_rank,
            dynamic=req.dynamic,
            base=base,
            device=req.device,
            save=req.save,
            overwrite=req.overwrite,
            progress=_adapt(progress),
            cancel=_cancel(cancel),
        )
        return {"report": rep, "output": out, "lora": _written_lora(ctx, out)}

    return work


def _lora_merge(ctx: Context, req: LoraMergeRequest) -> Work:
    from ..workshop import lora_merge as run

    if not req.loras:
        raise RecipeError("No LoRA to merge (loras is empty).", fix="Give at least one LoRA with its weight.")
    _check_dynamic(req.dynamic)
    if req.mode == "svd" and req.rank is None and not req.dynamic:
        raise RecipeError("The svd mode needs a target rank.", fix="Give a rank, or use the concat mode (exact).")
    inputs = [(ctx.resolve_lora(x.name), x.weight, x.te_weight) for x in req.loras]
    out = _lora_out(ctx, req.output)
    base = ctx.resolve_checkpoint(req.base) if req.base else None

    def work(progress: Progress | None, cancel: Any) -> dict:
        rep = run(
            inputs,
            out,
            mode=req.mode,
            rank=req.rank,
            conv_rank=req.conv_rank,
            dynamic=req.dynamic,
            blocks=req.blocks,
            base=base,
            device=req.device,
            save=req.save,
            overwrite=req.overwrite,
            progress=_adapt(progress),
            cancel=_cancel(cancel),
        )
        return {"report": rep, "output": out, "lora": _written_lora(ctx, out)}

    return work


def _clean(ctx: Context, req: CleanRequest) -> Work:
    from ..workshop import clean as run

    ckpt, out = ctx.resolve_checkpoint(req.checkpoint), ctx.output_path(req.output)
    vae = ctx.resolve_vae(req.vae) if req.vae else None

    def work(progress: Progress | None, cancel: Any) -> dict:
        rep = run(
            ckpt,
            out,
            drop_ema=req.drop_ema,
            drop_other=req.drop_other,
            repair_position_ids=req.repair_position_ids,
            save=req.save,
            vae=vae,
            title=req.title,
            author=req.author,
            description=req.description,
            trigger_words=req.trigger_words,
            preferred_weight=req.preferred_weight,
            strip_training=req.strip_training,
            scan=req.scan,
            overwrite=req.overwrite,
            progress=_adapt(progress),
            cancel=_cancel(cancel),
        )
        return {"report": rep, "output": out, "checkpoint": ctx.written(out)}

    return work


def extract(ctx: Context, req: ExtractRequest | dict, progress: Progress | None = None, cancel: Any = None) -> dict:
    """A kohya-format LoRA of (tuned − base), per layer by SVD."""
    return _extract(ctx, ExtractRequest.parse(req))(progress, cancel)


def resize(ctx: Context, req: ResizeRequest | dict, progress: Progress | None = None, cancel: Any = None) -> dict:
    """A LoRA re-factored to a lower (or per-layer dynamic) rank."""
    return _resize(ctx, ResizeRequest.parse(req))(progress, cancel)


def lora_merge(
    ctx: Context, req: LoraMergeRequest | dict, progress: Progress | None = None, cancel: Any = None
) -> dict:
    """Several LoRAs as one LoRA: concat (exact) or re-factored to a rank."""
    return _lora_merge(ctx, LoraMergeRequest.parse(req))(progress, cancel)


def clean(ctx: Context, req: CleanRequest | dict, progress: Progress | None = None, cancel: Any = None) -> dict:
    """A cleaned copy of a checkpoint (safe .ckpt conversion, EMA/optimizer dropped, position_ids repaired,
    VAE swapped, NaN scan, hashes, metadata)."""
    return _clean(ctx, CleanRequest.parse(req))(progress, cancel)


def hashes(ctx: Context, checkpoint: str | None = None, lora: str | None = None) -> dict[str, str]:
    """SHA-256, the WebUI's short hash, the legacy hash and the safetensors (addnet) hash of one model file."""
    from ..workshop import file_hashes

    if bool(checkpoint) == bool(lora):
        raise RecipeError("Name one model: a checkpoint or a LoRA.")
    path = ctx.resolve_checkpoint(checkpoint) if checkpoint else ctx.resolve_lora(lora)
    return {"file": os.path.basename(path), **file_hashes(path)}


def summary(kind: str, report: dict) -> str:
    """The report of a workshop operation in words."""
    import importlib

    mod = importlib.import_module(f"lib_lorakit.workshop.{ {'lora-merge': 'lora_merge'}.get(kind, kind) }")
    return mod.summary(report)


_OPS = {
    "extract": (_extract, ExtractRequest),
    "resize": (_resize, ResizeRequest),
    "lora-merge": (_lora_merge, LoraMergeRequest),
    "clean": (_clean, CleanRequest),
}


def start(ctx: Context, kind: str, req: Request | dict) -> Job:
    """A workshop operation as a job: checked and its names resolved now (a bad field or name answers at once),
    run under the host's queue."""
    if kind not in _OPS:
        raise RecipeError(f"Unknown workshop operation {kind!r}.", fix=f"Use one of {', '.join(_OPS)}.")
    plan, typ = _OPS[kind]
    req = typ.parse(req)
    work = plan(ctx, req)
    return ctx.submit(f"workshop-{kind}", req.dump(), work, title=f"lorakit: {kind}")
