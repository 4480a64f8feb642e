"""Triage: review many LoRAs fast (create and generate, decisions, report, archive, restore)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Union

from ..errors import RecipeError
from ..jobs import Job
from .context import Context, HostContext
from .gen import ProfiledSettings, check_seeds, overrides_of, with_batch
from .model import Field, Request

FILTERS = ("all", "undecided", "yes", "maybe", "no")


def default_prompts() -> dict[str, str]:
    """The built-in triage prompt per category (plain sentences; see :func:`form_defaults` for a checkpoint's)."""
    from ..eval.triage import DEFAULT_PROMPTS

    return dict(DEFAULT_PROMPTS)


def form_defaults(ctx: Context, checkpoint: str | None = None, profile: str | None = None) -> dict[str, Any]:
    """What the triage form shows for a checkpoint (default: the host's loaded one): its generation profile,
    the profile's settings and negative prompt, and the category prompts in the profile's style."""
    from ..eval.forms import triage_form_defaults

    name = checkpoint or (ctx.host.current_checkpoint() if isinstance(ctx, HostContext) else None)
    path = None
    if name:
        try:
            path = ctx.resolve_checkpoint(name)
        except Exception:  # noqa: BLE001 - an unknown name shows the default profile; creating says why
            path = None
    return triage_form_defaults(path, profile=profile or None, lorakit_settings=ctx.settings())


class TriageRequest(ProfiledSettings):
    LIMITS = {"seeds": 50}
    folder: Optional[str] = Field(None, description="A folder inside the LoRA folders (recursive); empty: every LoRA")
    checkpoint: Optional[str] = Field(None, description="Checkpoint (default: the loaded one)")
    arch: Optional[str] = Field(None, description="Only sd15 or sdxl LoRAs")
    category: Optional[str] = Field(None, description="Only this inspector category")
    name_filter: Optional[str] = Field(None, description="Only names matching this (substring or regular expression)")
    prompts: Optional[Dict[str, str]] = Field(None, description="Prompt per category (defaults built in)")
    seeds: Optional[Union[str, List[int]]] = Field(None, description="'1, 2' or '2x' (default 1)")
    strength: Optional[float] = Field(None, ge=-20, le=20, description="Override every LoRA's max-safe strength")
    negative_prompt: str = ""
    name: str = ""


class DecisionIn(Request):
    idx: int = Field(..., ge=0)
    decision: str = Field(..., description="yes, maybe, no, or clear (undo)")
    client: Optional[str] = Field(None, description="The deciding client (a browser tab)")
    seq: Optional[int] = Field(
        None, ge=0, description="The client's sequence number: a replay of (client, seq) is ignored"
    )


class DecisionsRequest(Request):
    LIMITS = {"decisions": 10000}
    decisions: List[DecisionIn]


class ArchiveRequest(Request):
    decision: str = Field("no", description="Archive the LoRAs with this decision")


class RestoreRequest(Request):
    batch: str = Field(
        ..., min_length=1, description="An archive batch folder (its name, or its path in lorakit's archive folder)"
    )


def get(ctx: Context, tid: str):
    from ..eval.triage import Triage

    return Triage(ctx.store(), tid)


def triages(ctx: Context) -> list[dict[str, Any]]:
    return ctx.store().triages()


def create(ctx: Context, req: TriageRequest | dict):
    """Plan a triage (bad names and empty folders answer at once) and store it; returns the Triage."""
    from ..eval.triage import create_triage
    from ..gen.grid import parse_seeds
    from ..safepath import PathRefused, inside

    req = TriageRequest.parse(req)
    backend = ctx.backend(
        "generate a triage",
        "Create it in the WebUI or from the command line with a WebUI URL; the standalone launcher can review it.",
    )
    backend = with_batch(backend, req)
    folder, roots = req.folder or None, []
    if isinstance(ctx, HostContext):
        roots = ctx.host.lora_dirs()
        if folder:
            target = folder if os.path.isabs(folder) else os.path.join(roots[0], folder)
            if not inside(target, roots):
                raise PathRefused(f"{req.folder} is outside the LoRA folders.", fix="Pick a folder inside them.")
    elif folder:
        folder = os.path.abspath(folder)
    t = create_triage(
        ctx.store(),
        backend,
        folder=folder,
        roots=roots,
        checkpoint=req.checkpoint,
        prompts=req.prompts,
        seeds=check_seeds(parse_seeds(req.seeds)),
        strength=req.strength,
        negative_prompt=req.negative_prompt,
        settings=overrides_of(req),
        arch=req.arch,
        category=req.category,
        name_filter=req.name_filter,
        inspector_settings=ctx.settings(),
        name=req.name,
        profile=req.profile,
    )
    return t, backend


def generate(ctx: Context, t, backend, outputs: str | None = None, progress=None, cancel=None) -> dict[str, Any]:
    from ..eval.triage import generate as gen

    return gen(t, backend, outputs or ctx.outputs_dir(), progress=progress, cancel=cancel)


def start(ctx: Context, req: TriageRequest | dict) -> tuple[Job, str]:
    """Plan now, generate as a job."""
    req = TriageRequest.parse(req)
    t, backend = create(ctx, req)

    def work(progress, cancel) -> dict[str, Any]:
        rec = generate(ctx, t, backend, progress=progress, cancel=cancel)
        return {"triage_id": t.id, "record": rec, "state": get(ctx, t.id).state()}

    return ctx.submit("triage", {"triage_id": t.id, **req.dump()}, work, exclusive=False, running="generating"), t.id


def items(ctx: Context, tid: str, filter: str = "all") -> list[dict[str, Any]]:
    if filter not in FILTERS:
        raise RecipeError(f"Unknown filter {filter!r}.", fix=f"Use one of {', '.join(FILTERS)}.")
    return get(ctx, tid).views(filter)


def next_items(ctx: Context, tid: str, after: int = -1, filter: str = "undecided") -> dict[str, Any]:
    views = items(ctx, tid, filter)
    rest = [v for v in views if v["idx"] > after] or views
    return {"item": rest[0] if rest else None, "next": rest[1] if len(rest) > 1 else None, "remaining": len(views)}


def decide(ctx: Context, tid: str, req: DecisionsRequest | dict) -> dict[str, Any]:
    """Record decisions in one transaction (a replayed client/seq is ignored)."""
    req = DecisionsRequest.parse(req)
    t = get(ctx, tid)
    try:
        n = t.store.decide(tid, [d.dump() for d in req.decisions])
    except ValueError as e:
        raise RecipeError(f"Triage {tid}: {e}.") from None
    return {"recorded": n, "state": t.state()}


def new_pass(ctx: Context, tid: str) -> dict[str, Any]:
    t = get(ctx, tid)
    return {"pass": t.store.new_pass(tid), "state": t.state()}


def history(ctx: Context, tid: str) -> list[dict[str, Any]]:
    return get(ctx, tid).store.history(tid)


def report(ctx: Context, tid: str, format: str = "md") -> str:
    from ..eval.triage import report_csv, report_markdown

    if format not in ("md", "csv"):
        raise RecipeError(f"Unknown report format {format!r}.", fix="Use md or csv.")
    t = get(ctx, tid)
    return report_csv(t) if format == "csv" else report_markdown(t)


def archive(
    ctx: Context, tid: str, req: ArchiveRequest | dict, archive_dir: str | None = None, roots: list[str] | None = None
) -> dict[str, Any]:
    """Move the LoRAs with a decision (and their sidecars) into an archive batch (reversible)."""
    from ..eval.triage import archive as do_archive

    req = ArchiveRequest.parse(req)
    if req.decision not in ("no", "maybe", "yes"):
        raise RecipeError(f"Unknown decision {req.decision!r}.", fix="Use no, maybe or yes.")
    t = get(ctx, tid)
    if isinstance(ctx, HostContext):
        archive_dir, roots = ctx.archive_dir(), ctx.host.lora_dirs()
    elif roots is None:
        roots = [t.rec["params"]["folder"]] if t.rec["params"].get("folder") else []
    if not archive_dir:
        raise RecipeError("No archive folder given.", fix="Name a folder outside the LoRA folders for the archive.")
    res = do_archive(t, archive_dir, roots, decision=req.decision)
    ctx.loras_changed()
    return res


def restore(ctx: Context, req: RestoreRequest | dict) -> dict[str, Any]:
    """Put an archive batch back, byte for byte (never overwrites)."""
    from ..eval.triage import restore as do_restore
    from ..safepath import PathRefused, inside

    req = RestoreRequest.parse(req)
    path = req.batch
    if isinstance(ctx, HostContext):
        base = ctx.archive_dir()
        path = req.batch if os.path.isabs(req.batch) else os.path.join(base, req.batch)
        if not inside(path, [base]):
            raise PathRefused(f"{req.batch} is not an archive batch of lorakit's archive folder {base}.")
    res = do_restore(path)
    ctx.loras_changed()
    return res
