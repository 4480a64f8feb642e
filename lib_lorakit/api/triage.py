"""Routes: triage (create as a job, state, items, images, decisions, report, archive, restore)."""

# no "from __future__ import annotations": FastAPI reads the route annotations through guard()

from fastapi.responses import FileResponse, PlainTextResponse

from ..ops import triage
from ..ops.context import HostContext
from ..ops.triage import ArchiveRequest, DecisionsRequest, RestoreRequest, TriageRequest
from .common import GEN_RESPONSES, RESPONSES, error, feature_router, guard


def router(ctx: HostContext):
    r = feature_router()

    @r.post(
        "/triage",
        responses=GEN_RESPONSES,
        summary="Create a triage of a LoRA folder and generate its image pairs (a job)",
    )
    @guard
    def triage_create(body: TriageRequest):
        job, tid = triage.start(ctx, body)
        return {"job_id": job.id, "triage_id": tid}

    @r.get("/triage", summary="Triage sessions, newest first")
    @guard
    def triage_list():
        return triage.triages(ctx)

    @r.get("/triage/{tid}", responses=RESPONSES, summary="A triage's state and counts")
    @guard
    def triage_state(tid: str):
        return triage.get(ctx, tid).state()

    @r.get(
        "/triage/{tid}/items",
        responses=RESPONSES,
        summary="Items with decisions (filter: all, undecided, yes, maybe, no)",
    )
    @guard
    def triage_items(tid: str, filter: str = "all"):
        return triage.items(ctx, tid, filter)

    @r.get(
        "/triage/{tid}/next",
        responses=RESPONSES,
        summary="The next item (after idx, by filter) and the one after it, to preload",
    )
    @guard
    def triage_next(tid: str, after: int = -1, filter: str = "undecided"):
        return triage.next_items(ctx, tid, after, filter)

    @r.get("/triage/{tid}/image/{idx}/{which}", responses=RESPONSES, summary="An item's image (lora or baseline), PNG")
    @guard
    def triage_image(tid: str, idx: int, which: str):
        if which not in ("lora", "baseline"):
            return error(400, "BadRequest", "which must be 'lora' or 'baseline'.")
        return FileResponse(
            triage.get(ctx, tid).image_path(idx, which),
            media_type="image/png",
            headers={"Cache-Control": "private, max-age=86400, immutable"},
        )

    @r.post("/triage/{tid}/decisions", responses=RESPONSES, summary="Record decisions (replays are ignored)")
    @guard
    def triage_decide(tid: str, body: DecisionsRequest):
        return triage.decide(ctx, tid, body)

    @r.post(
        "/triage/{tid}/pass",
        responses=RESPONSES,
        summary="Start another review pass (earlier passes stay in the history)",
    )
    @guard
    def triage_new_pass(tid: str):
        return triage.new_pass(ctx, tid)

    @r.get("/triage/{tid}/history", responses=RESPONSES, summary="Every decision of every pass, in order")
    @guard
    def triage_history(tid: str):
        return triage.history(ctx, tid)

    @r.get("/triage/{tid}/report", responses=RESPONSES, summary="The report: markdown (default) or csv")
    @guard
    def triage_report(tid: str, format: str = "md"):
        text = triage.report(ctx, tid, format)
        return PlainTextResponse(text, media_type="text/csv" if format == "csv" else "text/markdown")

    @r.post(
        "/triage/{tid}/archive",
        responses=RESPONSES,
        summary="Move the NO LoRAs and their sidecars into lorakit's archive folder (reversible)",
    )
    @guard
    def triage_archive(tid: str, body: ArchiveRequest):
        return triage.archive(ctx, tid, body)

    @r.post("/triage/{tid}/restore", responses=RESPONSES, summary="Put an archive batch back, byte for byte")
    @guard
    def triage_restore(tid: str, body: RestoreRequest):
        return triage.restore(ctx, body)

    return r
