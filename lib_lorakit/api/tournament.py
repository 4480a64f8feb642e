"""Routes: blind tournaments."""

# no "from __future__ import annotations": FastAPI reads the route annotations through guard()

from fastapi.responses import PlainTextResponse, Response

from ..ops import tournament as T
from ..ops.context import HostContext
from ..ops.tournament import NextRoundRequest, TournamentRequest, VotesRequest
from .common import GEN_RESPONSES, RESPONSES, feature_router, guard


def router(ctx: HostContext):
    r = feature_router()

    @r.post("/tournaments", responses=RESPONSES, summary="Create a blind tournament (≥ 5 prompts, one control)")
    @guard
    def tournament_create(body: TournamentRequest):
        return {"id": T.create(ctx, body)}

    @r.get("/tournaments", summary="Tournaments, newest first")
    @guard
    def tournament_list():
        return T.tournaments(ctx)

    @r.get(
        "/tournaments/{tid}", responses=RESPONSES, summary="A tournament: state, round, lineage (recipes after Reveal)"
    )
    @guard
    def tournament_get(tid: str):
        return T.summary(ctx, tid)

    @r.post(
        "/tournaments/{tid}/generate",
        responses=GEN_RESPONSES,
        summary="Build merge candidates and generate the images (a job)",
    )
    @guard
    def tournament_generate(tid: str):
        return {"job_id": T.start_generate(ctx, tid).id}

    @r.get("/tournaments/{tid}/ballot", responses=RESPONSES, summary="An evaluator's blind ballot")
    @guard
    def tournament_ballot(tid: str, evaluator: str):
        return T.ballot(ctx, tid, evaluator)

    @r.get(
        "/tournaments/{tid}/image/{evaluator}/{prompt}/{letter}",
        responses=RESPONSES,
        summary="An image of a ballot, by its letter (PNG)",
    )
    @guard
    def tournament_image(tid: str, evaluator: str, prompt: int, letter: str):
        return Response(
            T.image_png(ctx, tid, evaluator, prompt, letter),
            media_type="image/png",
            headers={"Cache-Control": "private, no-store"},
        )  # blind: no infotext, no stale copy

    @r.post("/tournaments/{tid}/votes", responses=RESPONSES, summary="Cast votes (a replayed client/seq is ignored)")
    @guard
    def tournament_votes(tid: str, body: VotesRequest):
        return T.vote(ctx, tid, body)

    @r.get("/tournaments/{tid}/scores", responses=RESPONSES, summary="Scores under every scheme, with uncertainty")
    @guard
    def tournament_scores(tid: str, resamples: int = 1000):
        return T.scores(ctx, tid, resamples)

    @r.get("/tournaments/{tid}/chart", responses=RESPONSES, summary="The score chart (PNG)")
    @guard
    def tournament_chart(tid: str):
        return Response(T.chart_png(ctx, tid), media_type="image/png")

    @r.post("/tournaments/{tid}/reveal", responses=RESPONSES, summary="Reveal who is who")
    @guard
    def tournament_reveal(tid: str):
        return T.reveal(ctx, tid)

    @r.get("/tournaments/{tid}/report", responses=RESPONSES, summary="Report after Reveal: markdown (default) or csv")
    @guard
    def tournament_report(tid: str, format: str = "md"):
        text = T.report(ctx, tid, format)
        return PlainTextResponse(text, media_type="text/csv" if format == "csv" else "text/markdown")

    @r.get(
        "/tournaments/{tid}/contact/{prompt}",
        responses=RESPONSES,
        summary="Contact sheet of one prompt, candidates named (after Reveal), PNG",
    )
    @guard
    def tournament_contact(tid: str, prompt: int):
        return Response(T.contact_png(ctx, tid, prompt), media_type="image/png")

    @r.get(
        "/tournaments/{tid}/winner",
        responses=RESPONSES,
        summary="The winner's recipe as a body for POST /merge and/or /bake (after Reveal)",
    )
    @guard
    def tournament_winner(tid: str):
        return T.winner(ctx, tid)

    @r.post(
        "/tournaments/{tid}/next-round",
        responses=RESPONSES,
        summary="Propose (and optionally create) the next round from the winner",
    )
    @guard
    def tournament_next(tid: str, body: NextRoundRequest):
        return T.next_round(ctx, tid, body)

    return r
