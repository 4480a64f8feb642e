"""Routes: bake, merge, diff, strength grid."""

# no "from __future__ import annotations": FastAPI reads the route annotations through guard()

from ..ops import bake, grid, merge
from ..ops.bake import BakeRequest
from ..ops.context import HostContext
from ..ops.grid import GridRequest
from ..ops.merge import DiffRequest, MergeRequest
from .common import GEN_RESPONSES, RESPONSES, feature_router, guard
from .schemas import DiffOut, JobRef


def router(ctx: HostContext):
    r = feature_router()

    @r.post("/bake", response_model=JobRef, responses=RESPONSES, summary="Bake a LoRA recipe into a checkpoint")
    @guard
    def bake_route(body: BakeRequest):
        return {"job_id": bake.start(ctx, body).id}

    @r.post("/merge", response_model=JobRef, responses=RESPONSES, summary="Merge checkpoints (a job)")
    @guard
    def merge_route(body: MergeRequest):
        return {"job_id": merge.start(ctx, body).id}

    @r.post(
        "/diff",
        response_model=DiffOut,
        responses=RESPONSES,
        summary="Where B differs from A: relative change and cosine per component and block",
    )
    @guard
    def diff_route(body: DiffRequest):
        return merge.diff(ctx, body)

    @r.post(
        "/grid",
        response_model=JobRef,
        responses=GEN_RESPONSES,
        summary="LoRA strength grid (a job): images, grid, verdicts in a run folder",
    )
    @guard
    def grid_route(body: GridRequest):
        return {"job_id": grid.start(ctx, body).id}

    return r
