"""Blind tournaments: one spec parser, creation, generation, ballots, votes, scores, reveal, report, rounds."""

from __future__ import annotations

import io
import re
from typing import Any, Dict, List, Optional, Union

from ..errors import RecipeError
from ..jobs import Job
from .context import Context, LocalContext
from .gen import SETTING_FIELDS, GenSettings
from .model import Field, Request

FIRST_SEED = 1000  # prompt i without a seed gets FIRST_SEED + i


class CandidateLora(Request):
    name: str = Field(..., min_length=1)
    strength: float = Field(1.0, ge=-20, le=20)


class CandidateIn(Request):
    LIMITS = {"loras": 64}
    id: Optional[str] = Field(
        None,
        max_length=80,
        description="A short unique id (hidden from evaluators until Reveal); default: from the checkpoint's name",
    )
    checkpoint: Optional[str] = Field(None, description="A checkpoint from the host's list")
    loras: List[CandidateLora] = Field(default_factory=list, description="[{name, strength}] added to every prompt")
    merge: Optional[Dict[str, Any]] = Field(
        None, description="{models: [{name, weight}], method, base, blocks}: built first"
    )
    control: bool = Field(False, description="The previous version (exactly one, unless first_version)")
    note: str = ""


class PromptIn(Request):
    prompt: str = Field(..., min_length=1)
    negative_prompt: str = ""
    seed: Optional[int] = Field(None, ge=0, le=2**32 - 1)


class TournamentRequest(Request):
    LIMITS = {"candidates": 26, "prompts": 500}
    name: str = Field("tournament", max_length=200)
    candidates: List[CandidateIn]
    prompts: List[Union[PromptIn, str]] = Field(
        ..., description="At least 5 (text, or {prompt, negative_prompt, seed})"
    )
    settings: GenSettings = Field(
        default_factory=GenSettings,
        description="Overrides of the generation profile: "
        "steps, cfg_scale, width, height, "
        "sampler_name, scheduler, clip_skip",
    )
    first_version: bool = Field(False, description="No control: the report says so")
    profile: Optional[Union[str, Dict[str, Any]]] = Field(
        None,
        description="A generation profile by name (default: the control's checkpoint's), or the profile record "
        "a form or an earlier round wrote",
    )

    @classmethod
    def fix_hint(cls) -> str:
        return (
            'A spec is {"name", "candidates": [{"checkpoint", "control"}, ...], "prompts": [≥ 5 texts], '
            '"settings": {...}}.'
        )


class VoteIn(Request):
    LIMITS = {"ranks": 26, "bombs": 26}
    prompt: int = Field(..., ge=0)
    ranks: List[str] = Field(default_factory=list, description="Letters, best first (at most 3)")
    bombs: List[str] = Field(default_factory=list, description="Letters of unusable images")
    all_bad: bool = False
    no_preference: bool = False
    client: Optional[str] = None
    seq: Optional[int] = Field(None, ge=0)


class VotesRequest(Request):
    LIMITS = {"votes": 5000}
    evaluator: str = Field(..., min_length=1, max_length=100)
    votes: List[VoteIn]


class NextRoundRequest(Request):
    mode: str = Field("narrow", description="narrow or dial-in")
    step: float = Field(0.1, gt=0, le=1)
    axis: Optional[int] = Field(None, ge=0)
    values: Optional[List[float]] = None
    create: bool = Field(False, description="Create the next round's tournament from the proposal")


def _auto_id(c: CandidateIn, i: int) -> str:
    base = c.checkpoint or ("merge" if c.merge else "")
    base = re.sub(r"\.(safetensors|ckpt|pt|pth)$", "", base.split("/")[-1].split("\\")[-1], flags=re.I)
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-")[:40]
    return base or f"candidate-{i + 1}"


def spec_of(req: TournamentRequest | dict, ctx: Context | None = None):
    """The one parser of a tournament spec (JSON file, HTTP body, form or next-round proposal). With a
    context, the settings come from the control checkpoint's generation profile, the spec's own on top."""
    from ..eval.tournament import Candidate, TournamentSpec

    req = TournamentRequest.parse(req, what="tournament spec")
    cands, seen = [], set()
    for i, c in enumerate(req.candidates):
        cid = (c.id or "").strip() or _auto_id(c, i)
        while cid in seen and not c.id:
            cid = f"{cid}-{i + 1}"
        seen.add(cid)
        cands.append(
            Candidate(
                id=cid,
                checkpoint=c.checkpoint,
                loras=[x.dump() for x in c.loras],
                merge=c.merge,
                control=c.control,
                note=c.note,
            )
        )
    prompts = []
    for i, p in enumerate(req.prompts):
        p = PromptIn(prompt=p) if isinstance(p, str) else p
        prompts.append(
            {
                "prompt": p.prompt,
                "negative_prompt": p.negative_prompt,
                "seed": FIRST_SEED + i if p.seed is None else p.seed,
            }
        )
    settings = {k: v for k, v in req.settings.dump().items() if k in SETTING_FIELDS and v not in (None, "")}
    record = req.profile if isinstance(req.profile, dict) else None
    if record is None and ctx is not None:  # the profile decides what the spec leaves out
        from dataclasses import asdict

        from ..eval.forms import spec_with_profile

        d = spec_with_profile(
            {
                "name": req.name,
                "candidates": [asdict(c) for c in cands],
                "first_version": req.first_version,
                "prompts": prompts,
                "settings": settings,
            },
            checkpoint_path=_checkpoint_lookup(ctx),
            profile=req.profile or None,
            lorakit_settings=ctx.settings(),
        )
        settings, prompts, record = d["settings"], d["prompts"], d["profile"]
    spec = TournamentSpec(
        name=req.name,
        candidates=cands,
        prompts=prompts,
        settings=settings,
        first_version=req.first_version,
        profile=dict(record or {}),
    )
    spec.validate()
    return spec


def _checkpoint_lookup(ctx: Context):
    def lookup(name: str) -> str | None:
        try:
            return ctx.resolve_checkpoint(name)
        except Exception:  # noqa: BLE001 - an unknown checkpoint is refused when generating, with the nearest names
            return None

    return lookup


def spec_from_form(
    ctx: Context,
    candidates: list[dict[str, Any]],
    control: Any,
    prompts: Any,
    seeds: Any,
    settings: dict[str, Any] | None = None,
    *,
    name: str = "tournament",
    negative_prompt: str = "",
    first_version: bool = False,
    profile: str | None = None,
) -> dict[str, Any]:
    """A tournament spec from the tab's form (candidates picked from the host's lists, one control, the
    profile's prompt set unless edited), validated by the same parser as a JSON spec."""
    from ..eval.forms import tournament_spec_from_form

    d = tournament_spec_from_form(
        candidates,
        control,
        prompts,
        seeds,
        settings,
        name=name,
        negative_prompt=negative_prompt,
        first_version=first_version,
        checkpoint_path=_checkpoint_lookup(ctx),
        profile=profile or None,
        lorakit_settings=ctx.settings(),
    )
    spec_of(d)  # the same checks as the JSON route
    return d


def create(ctx: Context, req: TournamentRequest | dict, parent: str | None = None, round_no: int = 1) -> str:
    return ctx.tournaments().create(spec_of(req, ctx), parent=parent, round_no=round_no)


def tournaments(ctx: Context) -> list[dict[str, Any]]:
    return ctx.tournaments().list()


def summary(ctx: Context, tid: str) -> dict[str, Any]:
    """A tournament's state; its spec and lineage only after Reveal."""
    from ..eval.tournament import lineage

    rec = ctx.tournaments().get(tid)
    out = {k: v for k, v in rec.items() if k != "spec"}
    out["prompts"] = len(rec["spec"]["prompts"])
    out["candidates"] = len(rec["spec"]["candidates"])
    if rec["revealed"]:
        out["spec"] = rec["spec"]
        out["lineage"] = lineage(ctx.tournaments(), tid)
    return out


def _builder(ctx: Context, exclusive: Any = None):
    from .merge import build_candidate

    def build(c, name):
        if isinstance(ctx, LocalContext) and not ctx.models_dir:
            raise RecipeError(
                f"Candidate {c.id} is a merge: lorakit needs the WebUI's checkpoint folder on this "
                f"machine to build it.",
                fix="Name the WebUI's checkpoint folder (models dir).",
            )
        if exclusive is not None:
            with exclusive():
                return build_candidate(ctx, c.merge, name)
        return build_candidate(ctx, c.merge, name)

    return build


def generate(ctx: Context, tid: str, outputs: str | None = None, progress=None, cancel=None) -> dict[str, Any]:
    """Build merge candidates and generate every image now; returns the run record."""
    from ..eval.tournament import generate as gen

    ctx.tournaments().get(tid)
    backend = ctx.backend("generate a tournament")
    return gen(
        ctx.tournaments(),
        tid,
        backend,
        outputs or ctx.outputs_dir(),
        build_merge=_builder(ctx),
        progress=progress,
        cancel=cancel,
    )


def blind_progress(progress):
    """Job messages anyone may read (GET /jobs): counts only, never a candidate id, a checkpoint or a recipe."""
    if progress is None:
        return None

    def say(frac: float, msg: str) -> None:
        m = re.match(r"(image \d+/\d+)", msg or "")
        progress(frac, m.group(1) if m else ("merging candidates" if frac < 1 else msg.split(":")[0]))

    return say


def blind_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A generation record without the warnings (they name checkpoints and LoRAs; the log has them)."""
    import logging

    out = dict(rec)
    warnings = out.pop("warnings", None) or []
    if warnings:
        logging.getLogger("lorakit").warning("tournament generation warnings: %s", "; ".join(map(str, warnings)))
    out["warnings"] = len(warnings)
    notes = out.pop("pool_notes", None) or []  # a pool's notes name the files a WebUI lacks
    out["pool_notes"] = len(notes)
    out["members"] = [{**m, "lacks": len(m.get("lacks") or [])} for m in out.get("members") or []]
    return out


def start_generate(ctx: Context, tid: str) -> Job:
    """Build merge candidates and generate every image, as a job (each image waits for the queue)."""
    from ..eval.tournament import generate as gen

    ctx.tournaments().get(tid)
    backend = ctx.backend(
        "generate a tournament",
        "Generate in the WebUI or from the command line with a WebUI "
        "URL; the standalone launcher can run the blind ranking.",
    )
    lock = getattr(getattr(ctx, "host", None), "queue_lock", None)

    def work(progress, cancel) -> dict[str, Any]:
        rec = gen(
            ctx.tournaments(),
            tid,
            backend,
            ctx.outputs_dir(),
            build_merge=_builder(ctx, lock),
            progress=blind_progress(progress),
            cancel=cancel,
        )
        return {"tournament": tid, "record": blind_record(rec)}

    return ctx.submit("tournament", {"tournament": tid}, work, exclusive=False)


def ballot(ctx: Context, tid: str, evaluator: str) -> dict[str, Any]:
    from ..eval.tournament import ballot as make_ballot

    if not (evaluator or "").strip():
        raise RecipeError("No evaluator name.", fix="Type your name: each evaluator gets their own shuffle.")
    return make_ballot(ctx.tournaments(), tid, evaluator)


def image_path(ctx: Context, tid: str, evaluator: str, prompt: int, letter: str) -> str:
    from ..eval.tournament import image_path as path_of

    return path_of(ctx.tournaments(), tid, evaluator, prompt, letter)


def image_png(ctx: Context, tid: str, evaluator: str, prompt: int, letter: str) -> bytes:
    """A ballot image's bytes; before Reveal without its text chunks (the infotext names the checkpoint and the
    LoRAs, which would tell an evaluator who is who)."""
    from ..gen.image import strip_png_text

    path = image_path(ctx, tid, evaluator, prompt, letter)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RecipeError(
            f"Tournament {tid}: image {letter} of prompt {prompt} cannot be read ({e.strerror}).",
            fix="Generate again: it fills what is missing.",
        ) from None
    if ctx.tournaments().get(tid).get("revealed"):
        return data
    try:
        return strip_png_text(data)
    except ValueError as e:
        raise RecipeError(
            f"Tournament {tid}: image {letter} of prompt {prompt} is damaged ({e}).",
            fix="Generate again: it fills what is missing.",
        ) from None


def vote(ctx: Context, tid: str, req: VotesRequest | dict) -> dict[str, Any]:
    """Record votes in one transaction (a replayed client/seq is ignored)."""
    req = VotesRequest.parse(req)
    _refuse_missing_images(ctx, tid, req)
    try:
        n = ctx.tournaments().vote(tid, req.evaluator.strip(), [v.dump() for v in req.votes])
    except ValueError as e:
        raise RecipeError(f"Tournament {tid}: {e}.") from None
    return {"recorded": n}


def _refuse_missing_images(ctx: Context, tid: str, req: VotesRequest) -> None:
    """A rank or a bomb can only be given to an image the evaluator saw: not to one that is missing or failed."""
    from ..eval.tournament import ballot as ballot_of

    if not any(v.ranks or v.bombs for v in req.votes):
        return
    try:
        prompts = ballot_of(ctx.tournaments(), tid, req.evaluator.strip())["prompts"]
    except ValueError:
        return  # the store's own check names the problem
    for v in req.votes:
        if not 0 <= v.prompt < len(prompts) or len(v.ranks) > 3 or set(v.ranks) & set(v.bombs):
            continue  # the store names these problems
        status = {e["letter"]: e["status"] for e in prompts[v.prompt]["entries"] if e["image"] is None}
        bad = [x for x in list(v.ranks) + list(v.bombs) if x in status]
        if bad:
            raise RecipeError(
                f"Tournament {tid}, prompt {v.prompt}: image {', '.join(dict.fromkeys(bad))} is "
                f"{status[bad[0]]}; only images on the ballot can be ranked or bombed.",
                fix="Generate the missing images first (generate again fills only what is missing), "
                "or vote without them.",
            )


def scores(ctx: Context, tid: str, resamples: int = 1000) -> dict[str, Any]:
    from ..eval.tournament import scores as score

    return score(ctx.tournaments(), tid, resamples=max(100, min(int(resamples), 20000)))


def chart_png(ctx: Context, tid: str) -> bytes:
    buf = io.BytesIO()
    chart_image(scores(ctx, tid)).save(buf, format="PNG")
    return buf.getvalue()


def chart_image(sc: dict[str, Any]):
    """The score chart of :func:`scores`' result, as a PIL image."""
    from ..eval.chart import score_chart

    return score_chart(sc)


def reveal(ctx: Context, tid: str) -> dict[str, Any]:
    ctx.tournaments().get(tid)
    ctx.tournaments().update(tid, revealed=1)
    return {"id": tid, "revealed": True}


def report(ctx: Context, tid: str, format: str = "md") -> str:
    from ..eval.tournament import report_csv, report_markdown

    if format not in ("md", "csv"):
        raise RecipeError(f"Unknown report format {format!r}.", fix="Use md or csv.")
    return report_csv(ctx.tournaments(), tid) if format == "csv" else report_markdown(ctx.tournaments(), tid)


def contact_png(ctx: Context, tid: str, prompt: int) -> bytes:
    from ..eval.tournament import contact_sheet

    buf = io.BytesIO()
    contact_sheet(ctx.tournaments(), tid, prompt).save(buf, format="PNG")
    return buf.getvalue()


def winner(ctx: Context, tid: str) -> dict[str, Any]:
    from ..eval.tournament import winner_recipe

    return winner_recipe(ctx.tournaments(), tid)


def next_round(ctx: Context, tid: str, req: NextRoundRequest | dict) -> dict[str, Any]:
    """Propose (and optionally create) the next round from the winner."""
    from ..eval.tournament import propose_next

    req = NextRoundRequest.parse(req)
    if not ctx.tournaments().get(tid).get("revealed"):  # the proposal names the winner and its recipe
        raise RecipeError(
            f"Tournament {tid} is still blind: the next round names the winner and its recipe.",
            fix="Reveal the tournament first (when every evaluator is done).",
        )
    if req.mode not in ("narrow", "dial-in"):
        raise RecipeError(f"Unknown mode {req.mode!r}.", fix="Use narrow or dial-in.")
    prop = propose_next(ctx.tournaments(), tid, req.mode, step=req.step, axis=req.axis, values=req.values)
    if req.create:
        body = {
            "name": f"{ctx.tournaments().get(tid)['name']} r{prop['round']}",
            **{k: prop[k] for k in ("candidates", "prompts", "settings", "first_version", "profile") if k in prop},
        }
        prop["id"] = create(ctx, body, parent=tid, round_no=prop["round"])
    return prop
