"""The bake doctor: parity check and diagnosis (one request type each, run sync or as a job)."""

from __future__ import annotations

import os
from typing import Any, List, Optional, Union

from ..errors import RecipeError
from ..jobs import Job
from .bake import MAX_RECIPE, LoraEntry, entries_of_prompt, save_dtype_of
from .context import Context, HostContext, Progress
from .gen import ProfiledSettings, overrides_of
from .model import Field

MAX_PROMPTS = 20
MAX_SEEDS = 10


class ParityRequest(ProfiledSettings):
    LIMITS = {"loras": MAX_RECIPE, "prompts": MAX_PROMPTS}
    baked: str = Field(..., min_length=1, description="The baked checkpoint: a name from the host's list or a path")
    base: Optional[str] = Field(
        None, description="The base checkpoint (default: the base recorded in the baked checkpoint's recipe)"
    )
    loras: List[LoraEntry] = Field(
        default_factory=list, description="The runtime recipe (default: the recipe recorded in the baked checkpoint)"
    )
    recipe_prompt: Optional[str] = Field(
        None, max_length=100_000, description="Alternatively: the runtime recipe as <lora:name:w> tags"
    )
    prompts: Optional[List[str]] = Field(None, description="Prompts (default: three built-in ones); at least 1")
    seeds: Optional[Union[str, List[int]]] = Field(None, description="'1, 2' or '2x' (default 1, 2)")
    negative_prompt: Optional[str] = Field(None, description="Negative prompt (default: the profile's)")


class DiagnoseRequest(ParityRequest):
    variants: Optional[List[str]] = Field(
        None,
        description="Variants to run (default all): rebake, fp32, alone, unet, te, sequential, scaled, untagged, cfg",
    )
    save_dtype: Optional[str] = Field(
        None, description="The variants' save dtype (default: the bake's, from its recipe; else lorakit's setting)"
    )
    keep_scratch: bool = Field(False, description="Keep the variant bakes (their folder is reported)")
    scratch_dir: Optional[str] = Field(
        None,
        description="Command line only: a folder the WebUI scans for checkpoints, for the variant bakes "
        "(default: the baked checkpoint's folder)",
    )


def _recipe(ctx: Context, req: ParityRequest, meta: dict[str, Any] | None):
    from ..doctor.parity import RecipeLora
    from ..gen.backend import lora_tag_name

    entries = [e.dump() for e in req.loras] + (entries_of_prompt(req.recipe_prompt) if req.recipe_prompt else [])
    recorded = not entries
    if not entries and meta:
        entries = [
            {
                "name": x.get("file") or x.get("name"),
                "strength": x.get("strength", 1.0),
                "te_strength": x.get("te_strength"),
            }
            for x in meta.get("loras") or []
        ]
    if not entries:
        raise RecipeError(
            f"No runtime recipe to compare with: {req.baked} holds no lorakit recipe and none was given.",
            fix="Give the runtime recipe: the LoRAs and strengths, or the prompt's <lora:name:w> tags.",
        )
    out = []
    for e in entries:
        if e.get("blocks"):
            raise RecipeError(
                f"LoRA {e['name']}: block weights cannot be compared at runtime (the WebUI needs an extension for them).",
                fix="Check a recipe without block weights.",
            )
        path = _lora_path(ctx, e["name"], recorded)
        s = float(e.get("strength", 1.0))
        te = e.get("te_strength")
        out.append(RecipeLora(lora_tag_name(path), path, s, s if te is None else float(te)))
    return out


def _lora_path(ctx: Context, name: str, recorded: bool) -> str:
    """A LoRA's file; a file name recorded in a bake is also looked up in the generating WebUI's list."""
    from ..errors import LorakitError

    try:
        return ctx.resolve_lora(name)
    except LorakitError:
        if not recorded or isinstance(ctx, HostContext):
            raise
    backend = ctx.backend("find the LoRAs recorded in the bake")
    backend.refresh()
    for e in backend.loras():
        if os.path.basename(e.path) == os.path.basename(name) and os.path.isfile(e.path):
            return e.path
    raise RecipeError(
        f"The bake records LoRA {name}, which neither this machine nor the WebUI lists.",
        fix="Give the runtime recipe's LoRA files.",
    )


def prepare(ctx: Context, req: ParityRequest):
    """Resolve names, the recipe and the generation settings (the checkpoint's profile with the request's
    overrides); bad input answers here, before anything renders."""
    from ..doctor import Check
    from ..doctor.parity import DEFAULT_PROMPTS, DEFAULT_SEEDS, baked_recipe
    from ..gen.grid import parse_seeds
    from ..gen.profiles import settings_for

    baked = ctx.resolve_checkpoint(req.baked)
    meta = baked_recipe(baked)
    base_name = req.base or ((meta or {}).get("base") or {}).get("file")
    if not base_name:
        raise RecipeError(
            f"No base checkpoint: {req.baked} does not record the base it was baked on.",
            fix="Name the base checkpoint the recipe runs on.",
        )
    if isinstance(ctx, HostContext) or os.path.isabs(base_name) or req.base:
        base = ctx.resolve_checkpoint(base_name)
    else:  # the recorded file name, beside the baked checkpoint
        base = ctx.resolve_checkpoint(os.path.join(os.path.dirname(baked), base_name))
    if os.path.realpath(base) == os.path.realpath(baked):
        raise RecipeError(f"The base and the baked checkpoint are the same file ({base}).", fix="Pick the baked one.")
    prompts = [p for p in (req.prompts or list(DEFAULT_PROMPTS)) if p.strip()]
    if not prompts:
        raise RecipeError("No prompts.", fix="Give at least one prompt (three or more make a fair check).")
    seeds = parse_seeds(req.seeds) if req.seeds not in (None, "", []) else list(DEFAULT_SEEDS)
    if len(seeds) > MAX_SEEDS:
        raise RecipeError(f"{len(seeds)} seeds; at most {MAX_SEEDS}.", fix="Use fewer seeds.")
    chosen = settings_for(base, overrides_of(req), profile=req.profile or None, settings=ctx.settings())
    negative = req.negative_prompt if req.negative_prompt is not None else chosen.get("negative") or ""
    return Check(
        base=base,
        baked=baked,
        recipe=_recipe(ctx, req, meta),
        prompts=prompts,
        seeds=seeds,
        negative=negative,
        settings=dict(chosen["settings"]),
        save_dtype=(meta or {}).get("save_dtype") or "fp16",
        profile={k: chosen.get(k) for k in ("profile", "label", "reason")},
    )


def summary(report: dict[str, Any]) -> str:
    """The doctor's report in words (terminal and tab)."""
    from ..doctor import summary as render

    return render(report)


def _parity_runner(ctx: Context, req: ParityRequest):
    """Check the request now (errors answer at once); returns the render-and-compare step."""
    from ..doctor import parity as run_parity

    check = prepare(ctx, req)
    backend = ctx.backend("check a bake against its runtime recipe")
    return lambda progress, cancel: run_parity(check, backend, ctx.outputs_dir(), progress=progress, cancel=cancel)


def parity(ctx: Context, req: ParityRequest | dict, progress: Progress | None = None, cancel: Any = None):
    """Render runtime / baked / base and compare (the command line). Returns the report."""
    return _parity_runner(ctx, ParityRequest.parse(req))(progress, cancel)


def _scratch_parent(ctx: Context, req: DiagnoseRequest, check) -> str:
    if isinstance(ctx, HostContext):
        if req.scratch_dir:
            raise RecipeError(
                "The scratch folder is chosen by the host (its checkpoint folder).",
                fix="Leave the scratch folder empty.",
            )
        return os.path.dirname(ctx.output_path("lorakit-doctor.safetensors"))
    return os.path.abspath(req.scratch_dir) if req.scratch_dir else os.path.dirname(check.baked)


def _diagnose_plan(ctx: Context, req: DiagnoseRequest):
    from ..doctor.variants import ALL

    check = prepare(ctx, req)
    for v in req.variants or []:
        if v not in ALL:
            raise RecipeError(f"Unknown variant {v!r}.", fix=f"Use some of {', '.join(ALL)}.")
    if req.save_dtype:
        check.save_dtype = save_dtype_of(ctx, req.save_dtype)
    return check, _scratch_parent(ctx, req, check)


def _diagnose_runner(ctx: Context, req: DiagnoseRequest):
    """Check the request now; returns the variant batch step (its scratch bakes are removed at the end
    or on cancel)."""
    from ..doctor import diagnose as run_diagnose

    check, scratch = _diagnose_plan(ctx, req)
    backend = ctx.backend("diagnose a bake")

    def run(progress, cancel):
        return run_diagnose(
            check,
            backend,
            ctx.outputs_dir(),
            scratch,
            variants=req.variants,
            keep_scratch=req.keep_scratch,
            engine=ctx.engine_kwargs(None),
            progress=progress,
            cancel=cancel,
        )

    return run


def diagnose(ctx: Context, req: DiagnoseRequest | dict, progress: Progress | None = None, cancel: Any = None):
    """Parity plus the variant batch, and the cause(s) named (the command line). Returns the report."""
    return _diagnose_runner(ctx, DiagnoseRequest.parse(req))(progress, cancel)


def _with_summary(run):
    def work(progress, cancel):
        rep = run(progress, cancel)
        return {**rep, "summary": summary(rep)}

    return work


def start_parity(ctx: Context, req: ParityRequest | dict) -> Job:
    """Check now (errors answer at once), render and compare as a job."""
    req = ParityRequest.parse(req)
    work = _with_summary(_parity_runner(ctx, req))
    return ctx.submit("doctor-parity", req.dump(), work, exclusive=False, running="rendering")


def start_diagnose(ctx: Context, req: DiagnoseRequest | dict) -> Job:
    """Check now, run the variant batch as a job (its scratch bakes are removed at the end or on cancel)."""
    req = DiagnoseRequest.parse(req)
    work = _with_summary(_diagnose_runner(ctx, req))
    return ctx.submit("doctor-diagnose", req.dump(), work, exclusive=False, running="rendering")
