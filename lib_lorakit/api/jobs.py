"""Routes: jobs, the host's model lists, in-process txt2img."""

# no "from __future__ import annotations": FastAPI reads the route annotations through guard()

from typing import List

from ..ops import jobs, models
from ..ops.context import HostContext
from ..ops.models import Txt2ImgRequest
from .common import GEN_RESPONSES, RESPONSES, feature_router, guard
from .schemas import JobOut, ModelOut, Txt2ImgOut


def router(ctx: HostContext):
    r = feature_router()

    @r.get("/jobs", response_model=List[JobOut], summary="All recent jobs, newest first")
    @guard
    def jobs_route():
        return jobs.jobs(ctx)

    @r.get("/jobs/{job_id}", response_model=JobOut, responses=RESPONSES, summary="A job's state, progress and result")
    @guard
    def job(job_id: str):
        return jobs.job(ctx, job_id)

    @r.delete(
        "/jobs/{job_id}",
        response_model=JobOut,
        responses=RESPONSES,
        summary="Cancel a job (its partial output is removed)",
    )
    @guard
    def cancel(job_id: str, wait: float = 10.0):
        return jobs.cancel(ctx, job_id, wait)

    @r.post(
        "/txt2img",
        response_model=Txt2ImgOut,
        responses=GEN_RESPONSES,
        summary="Generate with the host's own processing (in-process; under its queue lock)",
    )
    @guard
    def txt2img(body: Txt2ImgRequest):
        return models.txt2img(ctx, body)

    @r.get("/checkpoints", response_model=List[ModelOut], summary="The host's checkpoints (refreshed)")
    @guard
    def checkpoints():
        return models.checkpoints(ctx)

    @r.get("/loras", response_model=List[ModelOut], summary="The host's LoRAs (refreshed)")
    @guard
    def loras():
        return models.loras(ctx)

    return r
