"""The HTTP API, ``/lorakit/v1``: the same operations as the CLI; long ones as jobs.

Mounted on the WebUI's FastAPI app by ``scripts/lorakit.py`` (and on the standalone
launcher's). Models are documented, so the routes appear in the host's ``/docs``.
Errors are JSON ``{"error": kind, "message": text}`` with 400/401/403/404/409/500,
never a stack trace. With ``--api-auth`` the host's credentials are required.
"""

from __future__ import annotations

import functools
import logging
import secrets
import traceback
from typing import Any, Dict, List, Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, Field

from .errors import LorakitError
from .service import BakeLora, BakeRequest, Lorakit

log = logging.getLogger("lorakit.api")
PREFIX = "/lorakit/v1"


class LoraIn(BaseModel):
    name: str = Field(..., description="A LoRA from the host's list (as in <lora:NAME:w>), or a path inside the LoRA folders")
    strength: float = Field(1.0, description="UNet strength")
    te_strength: Optional[float] = Field(None, description="Text-encoder strength (default: strength)")
    blocks: Optional[str] = Field(None, description="LoRA Block Weight preset or vector, e.g. INALL or 17/26 (SD1.5), 12/20 (SDXL) values")


class BakeIn(BaseModel):
    base: str = Field(..., description="Base checkpoint: a name from the host's list or a path inside its checkpoint folders")
    output: str = Field("", description="Output file name, written into the checkpoint folder (.safetensors added)")
    loras: List[LoraIn] = Field(default_factory=list, description="The recipe")
    prompt: Optional[str] = Field(None, description="Alternatively (or additionally): prompt text whose <lora:name:w> tags become the recipe")
    save_dtype: Optional[str] = Field(None, description="fp16, bf16 or fp32 (default: lorakit's setting, fp16)")
    overwrite: bool = Field(False, description="Replace an existing output")
    allow_unmatched: bool = Field(False, description="Bake what matches and report the rest instead of failing")
    dry_run: bool = Field(False, description="Check and plan only; write nothing")
    device: Optional[str] = Field(None, description="Where the fp32 maths runs: auto, cpu or cuda (default: lorakit's setting, auto)")


class MergeModelIn(BaseModel):
    name: str = Field(..., description="A checkpoint from the host's list, or a path inside its checkpoint folders")
    weight: float = Field(1.0, description="Weight (weighted sum; normalised unless normalize=false)")


class MergeIn(BaseModel):
    models: List[MergeModelIn] = Field(..., description="Ingredients; the first is the primary. Add-difference: A, then B with its weight")
    output: str = Field(..., description="Output file name, written into the checkpoint folder")
    method: str = Field("weighted", description="weighted, add-difference, ties, dare or slerp")
    base: Optional[str] = Field(None, description="C for add-difference (A + w(B - C)), TIES and DARE")
    blocks: Optional[str] = Field(None, description="Per-block factors on the non-primary contributions (preset or vector)")
    vae_from: Optional[str] = Field(None, description="Model number (1 = primary, the default) or a VAE file name")
    te_from: Optional[int] = Field(None, description="Copy the text encoders from this model number instead of merging")
    normalize: bool = True
    density: float = Field(0.2, description="TIES: fraction of each difference kept")
    drop: float = Field(0.5, description="DARE: fraction of each difference dropped")
    seed: int = Field(0, description="DARE: random seed")
    scale: float = Field(1.0, description="TIES/DARE: scale of the merged difference")
    save_dtype: Optional[str] = None
    overwrite: bool = False
    device: Optional[str] = Field(None, description="Where the fp32 maths runs: auto, cpu or cuda (default: lorakit's setting, auto)")


class GridIn(BaseModel):
    loras: List[str] = Field(default_factory=list, description="LoRAs from the host's list (rows); empty: those tagged in the prompt")
    prompt: str = Field(..., description="The prompt; the tested LoRAs' tags are taken out and set per cell")
    negative_prompt: str = ""
    strengths: Optional[str] = Field(None, description="'0, 0.25, 0.5' or '0-1.5:0.25'; empty: 0 up to each LoRA's max-safe strength. 0 (the baseline) is always in")
    epochs: bool = Field(False, description="Rows are the epoch files of each LoRA's training run")
    seeds: Optional[str] = Field(None, description="'1, 2, 3' or '3x' (default 1)")
    checkpoint: Optional[str] = Field(None, description="A checkpoint from the host's list (default: the loaded one; restored afterwards)")
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler_name: str = "Euler a"
    scheduler: Optional[str] = None


class TriageIn(BaseModel):
    folder: Optional[str] = Field(None, description="A folder inside the LoRA folders (recursive); empty: every LoRA")
    checkpoint: Optional[str] = Field(None, description="Checkpoint (default: the loaded one)")
    arch: Optional[str] = Field(None, description="Only sd15 or sdxl LoRAs")
    category: Optional[str] = Field(None, description="Only this inspector category")
    name_filter: Optional[str] = Field(None, description="Only names matching this (substring or regular expression)")
    prompts: Optional[Dict[str, str]] = Field(None, description="Prompt per category (defaults built in)")
    seeds: Optional[str] = Field(None, description="'1, 2' or '2x' (default 1)")
    strength: Optional[float] = Field(None, description="Override every LoRA's max-safe strength")
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler_name: str = "Euler a"
    scheduler: Optional[str] = None
    name: str = ""


class DecisionIn(BaseModel):
    idx: int
    decision: str = Field(..., description="yes, maybe, no, or clear (undo)")
    client: Optional[str] = Field(None, description="The deciding client (a browser tab)")
    seq: Optional[int] = Field(None, description="The client's sequence number: a replay of (client, seq) is ignored")


class DecisionsIn(BaseModel):
    decisions: List[DecisionIn]


class ArchiveIn(BaseModel):
    decision: str = Field("no", description="Archive the LoRAs with this decision")


class RestoreIn(BaseModel):
    batch: str = Field(..., description="An archive batch folder (its name, or its path in lorakit's archive folder)")


class CandidateIn(BaseModel):
    id: str = Field(..., description="A short unique id (hidden from evaluators until Reveal)")
    checkpoint: Optional[str] = Field(None, description="A checkpoint from the host's list")
    loras: List[Dict[str, Any]] = Field(default_factory=list, description="[{name, strength}] added to every prompt")
    merge: Optional[Dict[str, Any]] = Field(None, description="{models: [{name, weight}], method, base, blocks}: built first")
    control: bool = Field(False, description="The previous version (exactly one, unless first_version)")
    note: str = ""


class PromptIn(BaseModel):
    prompt: str
    negative_prompt: str = ""
    seed: Optional[int] = None


class TournamentIn(BaseModel):
    name: str = "tournament"
    candidates: List[CandidateIn]
    prompts: List[PromptIn] = Field(..., description="At least 5")
    settings: Dict[str, Any] = Field(default_factory=dict, description="steps, cfg_scale, width, height, sampler_name, scheduler")
    first_version: bool = Field(False, description="No control: the report says so")


class VoteIn(BaseModel):
    prompt: int
    ranks: List[str] = Field(default_factory=list, description="Letters, best first (at most 3)")
    bombs: List[str] = Field(default_factory=list, description="Letters of unusable images")
    all_bad: bool = False
    no_preference: bool = False
    client: Optional[str] = None
    seq: Optional[int] = None


class VotesIn(BaseModel):
    evaluator: str
    votes: List[VoteIn]


class NextRoundIn(BaseModel):
    mode: str = Field("narrow", description="narrow or dial-in")
    step: float = 0.1
    axis: Optional[int] = None
    values: Optional[List[float]] = None
    create: bool = Field(False, description="Create the next round's tournament from the proposal")


class DiffIn(BaseModel):
    a: str = Field(..., description="Reference checkpoint")
    b: str = Field(..., description="Checkpoint compared with it")


class DiffOut(BaseModel):
    a: str
    b: str
    arch: str
    by_component: Dict[str, Dict[str, float]] = Field(..., description="Relative change |B-A|/|A| and cosine per component")
    by_block: Dict[str, Dict[str, Dict[str, float]]] = Field(..., description="The same per component and block")
    only_in_a: List[str]
    only_in_b: List[str]
    shape_mismatch: List[str]


class TriggerCandidateOut(BaseModel):
    tag: str
    share: float = Field(..., description="Share of the training images whose captions carry the tag")
    count: int
    score: float
    evidence: List[str]


class InspectOut(BaseModel):
    lora: str = Field(..., description="The name asked for (or the host's list name)")
    file: str
    architecture: Optional[str] = Field(None, description="sd15, sdxl, or null when undetermined")
    algorithms: List[str] = Field(default_factory=list, description="LoRA, LoCon, LoHa, LoKr, DoRA, ...")
    rank: Optional[int] = None
    alpha: Optional[float] = None
    components: List[str] = Field(default_factory=list, description="unet, te1, te2")
    trigger: Optional[str] = Field(None, description="The real trigger, or null when there is none")
    trigger_reason: str = ""
    trigger_candidates: List[TriggerCandidateOut] = Field(default_factory=list)
    most_frequent_tags: List[str] = Field(default_factory=list, description="What the images share; not the trigger")
    kind: str = Field("", description="passive or trigger-dependent")
    kind_evidence: List[str] = Field(default_factory=list)
    baking: str = ""
    category: str = ""
    category_detail: Dict[str, Any] = Field(default_factory=dict)
    max_safe_strength: Optional[float] = None
    max_safe_reason: str = ""
    family: Dict[str, Any] = Field(default_factory=dict)
    structure: Dict[str, Any] = Field(default_factory=dict, description="Modules, ranks/alphas and their spread, blocks")
    training: Dict[str, Any] = Field(default_factory=dict, description="kohya/modelspec metadata, folders, tag counts")
    weight_stats: Optional[Dict[str, Any]] = Field(None, description="Per-block |dW| (relative with a checkpoint)")
    warnings: List[str] = Field(default_factory=list)
    error: Optional[str] = Field(None, description="Set (and little else) when the file could not be read")


class InspectIn(BaseModel):
    loras: List[str] = Field(default_factory=list, description="LoRA names from the host's list")
    all: bool = Field(False, description="Inspect every LoRA in the host's list instead")
    checkpoint: Optional[str] = Field(None, description="The checkpoint they will be used with (cross-lineage ceilings)")
    weights: bool = Field(False, description="Per-block weight statistics (reads the tensors; slower)")


class InspectManyOut(BaseModel):
    reports: List[InspectOut]


class UserMetadataIn(BaseModel):
    lora: str
    activation_text: Optional[str] = Field(None, description="Written to the WebUI's 'activation text'")
    preferred_weight: Optional[float] = Field(None, description="Written to the WebUI's 'preferred weight'")


class UserMetadataOut(BaseModel):
    path: str
    before: Dict[str, Any]
    after: Dict[str, Any]


class StrengthsIO(BaseModel):
    max_safe_strength: Dict[str, float] = Field(default_factory=dict, description="category -> ceiling")
    cross_lineage: Dict[str, float] = Field(default_factory=dict,
                                            description="'LoRA lineage>checkpoint lineage' -> ceiling, '*>*' default")


class JobRef(BaseModel):
    job_id: str


class JobOut(BaseModel):
    id: str
    kind: str
    state: str = Field(..., description="queued, running, done, error or cancelled")
    progress: float = Field(..., description="0 to 1")
    message: str
    result: Optional[Dict[str, Any]] = Field(None, description="When done: the report and the output")
    error: Optional[str] = Field(None, description="When failed or cancelled: what happened and what to do")
    params: Dict[str, Any] = Field(default_factory=dict)
    created: float
    started: Optional[float] = None
    finished: Optional[float] = None


class Txt2ImgIn(BaseModel):
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str = "Euler a"
    scheduler: Optional[str] = Field(None, description="A1111 1.10 / Forge schedule type, e.g. Karras")
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    checkpoint: Optional[str] = Field(None, description="Checkpoint for this image only; the previous one is restored")


class Txt2ImgOut(BaseModel):
    images: List[str] = Field(..., description="PNG images, base64")
    infotexts: List[str]
    seed: int


class ModelOut(BaseModel):
    name: str
    file: str


class ErrorOut(BaseModel):
    error: str
    message: str


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": kind, "message": message})


def _guard(fn):
    """Turn lorakit errors into JSON answers, and anything else into a 500 without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LorakitError as e:
            return _error(getattr(e, "http_status", 400), type(e).__name__, str(e))
        except Exception as e:  # logged in full, answered without internals
            log.error("lorakit API error:\n%s", traceback.format_exc())
            return _error(500, "internal", f"Unexpected failure ({type(e).__name__}); the details are in the server log.")

    return wrapper


def parse_credentials(api_auth: str | None) -> dict[str, str]:
    """``user:pass,user2:pass2`` (the WebUI's --api-auth) -> {user: pass}."""
    out: dict[str, str] = {}
    for item in (api_auth or "").split(","):
        if ":" in item:
            user, _, pw = item.strip().partition(":")
            out[user] = pw
    return out


def build_router(service: Lorakit, credentials: dict[str, str] | None = None) -> APIRouter:
    deps = []
    if credentials:
        basic = HTTPBasic(auto_error=False)

        def check(request: Request, cred: Optional[HTTPBasicCredentials] = Depends(basic)) -> None:
            ok = cred is not None and cred.username in credentials and secrets.compare_digest(
                cred.password.encode(), credentials[cred.username].encode())
            if not ok:
                from fastapi import HTTPException

                raise HTTPException(status_code=401, detail="Incorrect username or password",
                                    headers={"WWW-Authenticate": "Basic"})

        deps.append(Depends(check))
    r = APIRouter(prefix=PREFIX, tags=["lorakit"], dependencies=deps)
    responses = {400: {"model": ErrorOut}, 403: {"model": ErrorOut}, 404: {"model": ErrorOut}}

    @r.post("/bake", response_model=JobRef, responses=responses, summary="Bake a LoRA recipe into a checkpoint")
    @_guard
    def bake(body: BakeIn):
        req = BakeRequest(base=body.base, output=body.output,
                          loras=[BakeLora(x.name, x.strength, x.te_strength, x.blocks) for x in body.loras],
                          prompt=body.prompt, save_dtype=body.save_dtype, overwrite=body.overwrite,
                          allow_unmatched=body.allow_unmatched, dry_run=body.dry_run, device=body.device)
        job = service.start_bake(req)
        return {"job_id": job.id}

    @r.post("/grid", response_model=JobRef, responses={**responses, 501: {"model": ErrorOut}},
            summary="LoRA strength grid (a job): images, grid, verdicts in a run folder")
    @_guard
    def grid(body: GridIn):
        from .service import GridRequest

        req = GridRequest(**(body.model_dump() if hasattr(body, "model_dump") else body.dict()))
        return {"job_id": service.start_grid(req).id}

    @r.post("/merge", response_model=JobRef, responses=responses, summary="Merge checkpoints (a job)")
    @_guard
    def merge(body: MergeIn):
        from .service import MergeModel, MergeRequest

        req = MergeRequest(models=[MergeModel(m.name, m.weight) for m in body.models], output=body.output,
                           method=body.method, base=body.base, blocks=body.blocks, vae_from=body.vae_from,
                           te_from=body.te_from, normalize=body.normalize, density=body.density, drop=body.drop,
                           seed=body.seed, scale=body.scale, save_dtype=body.save_dtype, overwrite=body.overwrite,
                           device=body.device)
        return {"job_id": service.start_merge(req).id}

    @r.post("/diff", response_model=DiffOut, responses=responses,
            summary="Where B differs from A: relative change and cosine per component and block")
    @_guard
    def diff(body: DiffIn):
        return service.diff(body.a, body.b)

    @r.get("/inspect", response_model=InspectOut, responses=responses,
           summary="What a LoRA really is: family, network, real trigger, kind, category, max-safe strength")
    @_guard
    def inspect_one(lora: str, checkpoint: Optional[str] = None, weights: bool = False):
        rep = service.inspect([lora], checkpoint=checkpoint, weights=weights)[0]
        if "error" in rep:
            return _error(400, "FormatError", rep["error"])
        return rep

    @r.post("/inspect", response_model=InspectManyOut, responses=responses, summary="Inspect several LoRAs (or all)")
    @_guard
    def inspect_many(body: InspectIn):
        reps = service.inspect(body.loras, all_loras=body.all, checkpoint=body.checkpoint, weights=body.weights)
        return {"reports": reps}

    @r.post("/inspect/user-metadata", response_model=UserMetadataOut, responses=responses,
            summary="Write a trigger and strength into the WebUI's per-LoRA user metadata (<lora>.json)")
    @_guard
    def user_metadata(body: UserMetadataIn):
        return service.write_user_metadata(body.lora, body.activation_text, body.preferred_weight)

    @r.get("/inspect/strengths", response_model=StrengthsIO, summary="The max-safe strength tables in use")
    @_guard
    def strengths():
        st = service.settings()
        return {"max_safe_strength": st["max_safe_strength"], "cross_lineage": st["cross_lineage"]}

    @r.put("/inspect/strengths", response_model=StrengthsIO, responses=responses,
           summary="Change entries of the max-safe strength tables (merged key by key)")
    @_guard
    def set_strengths(body: StrengthsIO):
        changes = {k: v for k, v in (("max_safe_strength", body.max_safe_strength),
                                     ("cross_lineage", body.cross_lineage)) if v}
        st = service.update_settings(changes)
        return {"max_safe_strength": st["max_safe_strength"], "cross_lineage": st["cross_lineage"]}

    @r.post("/triage", responses={**responses, 501: {"model": ErrorOut}},
            summary="Create a triage of a LoRA folder and generate its image pairs (a job)")
    @_guard
    def triage_create(body: TriageIn):
        from .service import TriageRequest

        job, tid = service.start_triage(TriageRequest(**(body.model_dump() if hasattr(body, "model_dump")
                                                          else body.dict())))
        return {"job_id": job.id, "triage_id": tid}

    @r.get("/triage", summary="Triage sessions, newest first")
    @_guard
    def triage_list():
        return service.triage_store().triages()

    @r.get("/triage/{tid}", responses=responses, summary="A triage's state and counts")
    @_guard
    def triage_state(tid: str):
        return service.triage(tid).state()

    @r.get("/triage/{tid}/items", responses=responses, summary="Items with decisions (filter: all, undecided, yes, maybe, no)")
    @_guard
    def triage_items(tid: str, filter: str = "all"):
        return service.triage(tid).views(filter)

    @r.get("/triage/{tid}/next", responses=responses,
           summary="The next item (after idx, by filter) and the one after it, to preload")
    @_guard
    def triage_next(tid: str, after: int = -1, filter: str = "undecided"):
        views = service.triage(tid).views(filter)
        rest = [v for v in views if v["idx"] > after] or views
        return {"item": rest[0] if rest else None, "next": rest[1] if len(rest) > 1 else None,
                "remaining": len(views)}

    @r.get("/triage/{tid}/image/{idx}/{which}", responses=responses, summary="An item's image (lora or baseline), PNG")
    @_guard
    def triage_image(tid: str, idx: int, which: str):
        from fastapi.responses import FileResponse

        if which not in ("lora", "baseline"):
            return _error(400, "BadRequest", "which must be 'lora' or 'baseline'.")
        return FileResponse(service.triage(tid).image_path(idx, which), media_type="image/png",
                            headers={"Cache-Control": "private, max-age=86400, immutable"})

    @r.post("/triage/{tid}/decisions", responses=responses, summary="Record decisions (replays are ignored)")
    @_guard
    def triage_decide(tid: str, body: DecisionsIn):
        t = service.triage(tid)
        try:
            n = t.store.decide(tid, [d.model_dump() if hasattr(d, "model_dump") else d.dict() for d in body.decisions])
        except ValueError as e:
            return _error(400, "BadRequest", str(e))
        return {"recorded": n, "state": t.state()}

    @r.post("/triage/{tid}/pass", responses=responses,
            summary="Start another review pass (earlier passes stay in the history)")
    @_guard
    def triage_new_pass(tid: str):
        t = service.triage(tid)
        n = t.store.new_pass(tid)
        return {"pass": n, "state": t.state()}

    @r.get("/triage/{tid}/history", responses=responses, summary="Every decision of every pass, in order")
    @_guard
    def triage_history(tid: str):
        return service.triage(tid).store.history(tid)

    @r.get("/triage/{tid}/report", responses=responses, summary="The report: markdown (default) or csv")
    @_guard
    def triage_report(tid: str, format: str = "md"):
        from fastapi.responses import PlainTextResponse

        from .eval.triage import report_csv, report_markdown

        t = service.triage(tid)
        if format == "csv":
            return PlainTextResponse(report_csv(t), media_type="text/csv")
        return PlainTextResponse(report_markdown(t), media_type="text/markdown")

    @r.post("/triage/{tid}/archive", responses=responses,
            summary="Move the NO LoRAs and their sidecars into lorakit's archive folder (reversible)")
    @_guard
    def triage_archive(tid: str, body: ArchiveIn):
        return service.triage_archive(tid, body.decision)

    @r.post("/triage/{tid}/restore", responses=responses, summary="Put an archive batch back, byte for byte")
    @_guard
    def triage_restore(tid: str, body: RestoreIn):
        return service.triage_restore(body.batch)

    def dump(m):
        return m.model_dump() if hasattr(m, "model_dump") else m.dict()

    @r.post("/tournaments", responses=responses, summary="Create a blind tournament (≥ 5 prompts, one control)")
    @_guard
    def tournament_create(body: TournamentIn):
        data = dump(body)
        for i, p in enumerate(data["prompts"]):
            if p.get("seed") is None:
                p["seed"] = 1000 + i
        tid = service.create_tournament(data)
        return {"id": tid}

    @r.get("/tournaments", summary="Tournaments, newest first")
    @_guard
    def tournament_list():
        return service.tournaments().list()

    @r.get("/tournaments/{tid}", responses=responses, summary="A tournament: state, round, lineage (recipes after Reveal)")
    @_guard
    def tournament_get(tid: str):
        from .eval.tournament import lineage

        rec = service.tournaments().get(tid)
        out = {k: v for k, v in rec.items() if k != "spec"}
        out["prompts"] = len(rec["spec"]["prompts"])
        out["candidates"] = len(rec["spec"]["candidates"])
        if rec["revealed"]:
            out["spec"] = rec["spec"]
            out["lineage"] = lineage(service.tournaments(), tid)
        return out

    @r.post("/tournaments/{tid}/generate", responses={**responses, 501: {"model": ErrorOut}},
            summary="Build merge candidates and generate the images (a job)")
    @_guard
    def tournament_generate(tid: str):
        return {"job_id": service.start_tournament(tid).id}

    @r.get("/tournaments/{tid}/ballot", responses=responses, summary="An evaluator's blind ballot")
    @_guard
    def tournament_ballot(tid: str, evaluator: str):
        from .eval.tournament import ballot

        return ballot(service.tournaments(), tid, evaluator)

    @r.get("/tournaments/{tid}/image/{evaluator}/{prompt}/{letter}", responses=responses,
           summary="An image of a ballot, by its letter (PNG)")
    @_guard
    def tournament_image(tid: str, evaluator: str, prompt: int, letter: str):
        from fastapi.responses import FileResponse

        from .eval.tournament import image_path

        return FileResponse(image_path(service.tournaments(), tid, evaluator, prompt, letter), media_type="image/png",
                            headers={"Cache-Control": "private, max-age=86400"})

    @r.post("/tournaments/{tid}/votes", responses=responses, summary="Cast votes (a replayed client/seq is ignored)")
    @_guard
    def tournament_votes(tid: str, body: VotesIn):
        try:
            n = service.tournaments().vote(tid, body.evaluator, [dump(v) for v in body.votes])
        except ValueError as e:
            return _error(400, "BadRequest", str(e))
        return {"recorded": n}

    @r.get("/tournaments/{tid}/scores", responses=responses, summary="Scores under every scheme, with uncertainty")
    @_guard
    def tournament_scores(tid: str, resamples: int = 1000):
        from .eval.tournament import scores

        return scores(service.tournaments(), tid, resamples=max(100, min(resamples, 20000)))

    @r.get("/tournaments/{tid}/chart", responses=responses, summary="The score chart (PNG)")
    @_guard
    def tournament_chart(tid: str):
        import io

        from fastapi.responses import Response

        from .eval.chart import score_chart
        from .eval.tournament import scores

        buf = io.BytesIO()
        score_chart(scores(service.tournaments(), tid)).save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    @r.post("/tournaments/{tid}/reveal", responses=responses, summary="Reveal who is who")
    @_guard
    def tournament_reveal(tid: str):
        service.tournaments().update(tid, revealed=1)
        return {"id": tid, "revealed": True}

    @r.get("/tournaments/{tid}/report", responses=responses, summary="Report after Reveal: markdown (default) or csv")
    @_guard
    def tournament_report(tid: str, format: str = "md"):
        from fastapi.responses import PlainTextResponse

        from .eval.tournament import report_csv, report_markdown

        if format == "csv":
            return PlainTextResponse(report_csv(service.tournaments(), tid), media_type="text/csv")
        return PlainTextResponse(report_markdown(service.tournaments(), tid), media_type="text/markdown")

    @r.get("/tournaments/{tid}/contact/{prompt}", responses=responses,
           summary="Contact sheet of one prompt, candidates named (after Reveal), PNG")
    @_guard
    def tournament_contact(tid: str, prompt: int):
        import io

        from fastapi.responses import Response

        from .eval.tournament import contact_sheet

        buf = io.BytesIO()
        contact_sheet(service.tournaments(), tid, prompt).save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    @r.get("/tournaments/{tid}/winner", responses=responses,
           summary="The winner's recipe as a body for POST /merge and/or /bake (after Reveal)")
    @_guard
    def tournament_winner(tid: str):
        from .eval.tournament import winner_recipe

        return winner_recipe(service.tournaments(), tid)

    @r.post("/tournaments/{tid}/next-round", responses=responses,
            summary="Propose (and optionally create) the next round from the winner")
    @_guard
    def tournament_next(tid: str, body: NextRoundIn):
        from .eval.tournament import propose_next

        prop = propose_next(service.tournaments(), tid, body.mode, step=body.step, axis=body.axis, values=body.values)
        if body.create:
            prop["id"] = service.create_tournament({"name": f"{service.tournaments().get(tid)['name']} r{prop['round']}",
                                                     **prop}, parent=tid, round_no=prop["round"])
        return prop

    @r.get("/jobs", response_model=List[JobOut], summary="All recent jobs, newest first")
    @_guard
    def jobs():
        return [j.as_dict() for j in service.jobs.list()]

    @r.get("/jobs/{job_id}", response_model=JobOut, responses=responses, summary="A job's state, progress and result")
    @_guard
    def job(job_id: str):
        j = service.jobs.get(job_id)
        if j is None:
            return _error(404, "NotFound", f"No job {job_id!r}.")
        return j.as_dict()

    @r.delete("/jobs/{job_id}", response_model=JobOut, responses=responses,
              summary="Cancel a job (its partial output is removed)")
    @_guard
    def cancel(job_id: str, wait: float = 10.0):
        j = service.jobs.cancel(job_id)
        if j is None:
            return _error(404, "NotFound", f"No job {job_id!r}.")
        j.wait(max(0.0, min(wait, 60.0)))
        return j.as_dict()

    @r.post("/txt2img", response_model=Txt2ImgOut, responses={**responses, 501: {"model": ErrorOut}},
            summary="Generate with the host's own processing (in-process; under its queue lock)")
    @_guard
    def txt2img(body: Txt2ImgIn):
        import base64
        import io

        from .hosts import NotSupported

        req = body.model_dump() if hasattr(body, "model_dump") else body.dict()
        if req.get("checkpoint"):
            service.resolve_checkpoint(req["checkpoint"])  # 400/403/404 before generating
        try:
            out = service.host.txt2img(req)
        except NotSupported as e:
            return _error(501, "NotSupported", str(e))
        pngs = []
        for im in out["images"]:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            pngs.append(base64.b64encode(buf.getvalue()).decode())
        return {"images": pngs, "infotexts": out["infotexts"], "seed": int(out["seed"])}

    @r.get("/checkpoints", response_model=List[ModelOut], summary="The host's checkpoints (refreshed)")
    @_guard
    def checkpoints():
        return [{"name": e.name, "file": e.as_dict()["file"]} for e in service.checkpoints()]

    @r.get("/loras", response_model=List[ModelOut], summary="The host's LoRAs (refreshed)")
    @_guard
    def loras():
        return [{"name": e.name, "file": e.as_dict()["file"]} for e in service.loras()]

    return r
