"""Routes: the bake doctor (parity check and diagnosis, each a job)."""

# no "from __future__ import annotations": FastAPI reads the route annotations through guard()

from ..ops import doctor
from ..ops.context import HostContext
from ..ops.doctor import DiagnoseRequest, ParityRequest
from .common import GEN_RESPONSES, feature_router, guard
from .schemas import JobRef


def router(ctx: HostContext):
    r = feature_router()

    @r.post(
        "/doctor/parity",
        response_model=JobRef,
        responses=GEN_RESPONSES,
        summary="Check that a baked checkpoint renders like its runtime recipe (a job: verdict, numbers, contact sheets)",
    )
    @guard
    def parity_route(body: ParityRequest):
        return {"job_id": doctor.start_parity(ctx, body).id}

    @r.post(
        "/doctor/diagnose",
        response_model=JobRef,
        responses=GEN_RESPONSES,
        summary="Run the variant bakes and name why a bake differs from its runtime recipe (a job)",
    )
    @guard
    def diagnose_route(body: DiagnoseRequest):
        return {"job_id": doctor.start_diagnose(ctx, body).id}

    return r
