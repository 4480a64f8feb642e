"""Routes: the model workshop (extract, resize, merge LoRAs, clean a checkpoint) as jobs; hashes."""

# no "from __future__ import annotations": FastAPI reads the route annotations through guard()
from typing import Optional

from ..ops import workshop as W
from ..ops.context import HostContext
from .common import RESPONSES, feature_router, guard
from .schemas import JobRef


def router(ctx: HostContext):
    r = feature_router()

    @r.post(
        "/workshop/extract",
        response_model=JobRef,
        responses=RESPONSES,
        summary="Extract a LoRA from a fine-tune: SVD of (tuned − base) per layer (a job)",
    )
    @guard
    def extract(body: W.ExtractRequest):
        return {"job_id": W.start(ctx, "extract", body).id}

    @r.post(
        "/workshop/resize",
        response_model=JobRef,
        responses=RESPONSES,
        summary="Re-factor a LoRA to a lower or dynamic rank (a job)",
    )
    @guard
    def resize(body: W.ResizeRequest):
        return {"job_id": W.start(ctx, "resize", body).id}

    @r.post(
        "/workshop/lora-merge",
        response_model=JobRef,
        responses=RESPONSES,
        summary="Merge LoRAs into one LoRA: concat (exact) or svd to a rank (a job)",
    )
    @guard
    def lora_merge(body: W.LoraMergeRequest):
        return {"job_id": W.start(ctx, "lora-merge", body).id}

    @r.post(
        "/workshop/clean",
        response_model=JobRef,
        responses=RESPONSES,
        summary="A cleaned copy of a checkpoint: EMA/optimizer dropped, position_ids, VAE, NaN scan, hashes",
    )
    @guard
    def clean(body: W.CleanRequest):
        return {"job_id": W.start(ctx, "clean", body).id}

    @r.get(
        "/workshop/hash",
        responses=RESPONSES,
        summary="SHA-256, the WebUI's short hash, legacy and safetensors hashes of a checkpoint or LoRA",
    )
    @guard
    def hashes(checkpoint: Optional[str] = None, lora: Optional[str] = None):
        return W.hashes(ctx, checkpoint=checkpoint, lora=lora)

    return r
