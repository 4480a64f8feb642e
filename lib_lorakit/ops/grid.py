"""Strength grids and the auto-test of fresh LoRAs."""

from __future__ import annotations

from typing import Any, List, Optional, Union

from ..jobs import Job
from .context import Context, Progress
from .gen import ProfiledSettings, check_seeds, overrides_of, with_batch
from .model import Field


class GridRequest(ProfiledSettings):
    LIMITS = {"loras": 200, "prompt": 50, "strengths": 100, "seeds": 50}
    loras: List[str] = Field(
        default_factory=list, description="LoRAs from the host's list (rows); empty: those tagged in the prompt"
    )
    prompt: Union[str, List[str]] = Field(
        ..., description="The prompt (or several); the tested LoRAs' tags are taken out and set per cell"
    )
    negative_prompt: str = ""
    strengths: Optional[Union[str, List[float]]] = Field(
        None,
        description="'0, 0.25, 0.5' or '0-1.5:0.25'; empty: 0 up to each LoRA's max-safe strength. 0 (the "
        "baseline) is always in",
    )
    epochs: bool = Field(False, description="Rows are the epoch files of each LoRA's training run")
    seeds: Optional[Union[str, List[int]]] = Field(None, description="'1, 2, 3' or '3x' (default 1)")
    checkpoint: Optional[str] = Field(
        None, description="A checkpoint from the host's list (default: the loaded one; restored afterwards)"
    )


class AutotestRequest(ProfiledSettings):
    LIMITS = {"loras": 1000, "prompts": 50, "seeds": 50}
    loras: List[str] = Field(default_factory=list, description="LoRA files or folders")
    prompts: Optional[List[str]] = Field(None, description="Prompts (default: the profile's prompt set)")
    negative_prompt: str = ""
    strengths: Optional[str] = None
    seeds: Optional[Union[str, List[int]]] = None
    checkpoint: Optional[str] = None
    epochs: bool = False
    use_trigger: bool = Field(True, description="Add the inspector's trigger to the prompts")


def missing(run_dir: str) -> tuple[int, int]:
    """(images still to make, images planned) of a run folder."""
    from ..gen.run import Run

    run = Run(run_dir)
    return len(run.missing()), len(run.cells)


def prepare(ctx: Context, req: GridRequest, backend) -> tuple[Any, list[str]]:
    """The grid's spec and notes, names checked against the (refreshed) lists of the backend."""
    from ..gen.backend import resolve_name
    from ..gen.grid import build_spec, parse_seeds

    backend.refresh()
    ckpt = req.checkpoint or backend.current_checkpoint()
    ckpt_path = resolve_name(ckpt, backend.checkpoints(), "checkpoint").path if ckpt else None
    return build_spec(
        backend.loras(),
        loras=req.loras,
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        strengths=req.strengths,
        epochs=req.epochs,
        seeds=check_seeds(parse_seeds(req.seeds)),
        checkpoint=req.checkpoint or None,
        checkpoint_path=ckpt_path,
        settings=overrides_of(req),
        inspector_settings=ctx.settings(),
        profile=req.profile,
    )


def grid(
    ctx: Context,
    req: GridRequest | dict,
    outputs: str | None = None,
    progress: Progress | None = None,
    cancel: Any = None,
    notes_out: list[str] | None = None,
) -> dict[str, Any]:
    """Run a strength grid now; returns the run's result (verdicts, record, files)."""
    from ..gen.grid import run_grid

    req = GridRequest.parse(req)
    backend = with_batch(ctx.backend("run a strength grid"), req)
    spec, notes = prepare(ctx, req, backend)
    if notes_out is not None:
        notes_out.extend(notes)
    res = run_grid(backend, spec, outputs or ctx.outputs_dir(), notes=notes, progress=progress, cancel=cancel)
    res.pop("grid_image", None)
    return res


def resume(ctx: Context, run_dir: str, progress: Progress | None = None) -> dict[str, Any]:
    """Make only the missing or failed images of an earlier grid run."""
    from ..gen.grid import finish
    from ..gen.run import Run, execute

    run = Run(run_dir)
    execute(run, ctx.backend("resume a strength grid"), progress=progress)
    res = finish(run)
    res.pop("grid_image", None)
    return res


def start(ctx: Context, req: GridRequest | dict) -> Job:
    """A strength grid as a job. Each image waits for the host's queue on its own, so the WebUI stays
    usable between images; the job's progress counts images."""
    from ..gen.grid import run_grid

    req = GridRequest.parse(req)
    backend = with_batch(
        ctx.backend("run a strength grid", "Run it in the WebUI, or use the command line's autotest with a WebUI URL."),
        req,
    )
    spec, notes = prepare(ctx, req, backend)
    cells = spec.cells()  # refuse an oversized grid before starting

    def work(progress, cancel) -> dict[str, Any]:
        res = run_grid(backend, spec, ctx.outputs_dir(), notes=notes, progress=progress, cancel=cancel)
        res.pop("grid_image", None)
        return res

    return ctx.submit(
        "grid", {**req.dump(), "images": len(cells)}, work, exclusive=False, running=f"{len(cells)} images"
    )


def autotest(
    ctx: Context,
    req: AutotestRequest | dict,
    outputs: str,
    *,
    watch: str | None = None,
    interval: float = 10.0,
    watch_for: float | None = None,
    log=print,
) -> list[dict[str, Any]]:
    """Inspect each LoRA and run its strength grid through the backend (optionally watching a folder)."""
    from ..gen.autotest import AutotestOptions, run_autotest
    from ..gen.grid import parse_seeds

    req = AutotestRequest.parse(req)
    opts = AutotestOptions(
        negative_prompt=req.negative_prompt,
        strengths=req.strengths,
        seeds=check_seeds(parse_seeds(req.seeds)),
        checkpoint=req.checkpoint,
        settings=overrides_of(req),
        epochs=req.epochs,
        use_trigger=req.use_trigger,
        profile=req.profile,
    )
    if req.prompts:
        opts.prompts = list(req.prompts)
    return run_autotest(
        with_batch(ctx.backend("auto-test LoRAs"), req),
        req.loras,
        outputs,
        opts,
        watch=watch,
        interval=interval,
        watch_for=watch_for,
        log=log,
        inspector_settings=ctx.settings(),
    )
