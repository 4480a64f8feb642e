"""Bake: write a LoRA recipe into a checkpoint (one request type, checked once, run sync or as a job)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, List, Literal, Optional

from ..errors import RecipeError
from ..jobs import Job
from ..prompt import parse_tags
from .context import Context, Progress
from .model import Field, Request

STRENGTH_LIMIT = 20.0  # |strength| above this is a typo, not a recipe
MAX_RECIPE = 64  # LoRAs in one bake (listed and tagged in the prompt together)


class LoraEntry(Request):
    name: str = Field(
        ...,
        min_length=1,
        description="A LoRA from the host's list (as in <lora:NAME:w>), or a path "
        "inside the LoRA folders (a file path on the command line)",
    )
    strength: float = Field(1.0, ge=-STRENGTH_LIMIT, le=STRENGTH_LIMIT, description="UNet strength")
    te_strength: Optional[float] = Field(
        None, ge=-STRENGTH_LIMIT, le=STRENGTH_LIMIT, description="Text-encoder strength (default: strength)"
    )
    blocks: Optional[str] = Field(
        None, description="LoRA Block Weight preset or vector, e.g. INALL or 17/26 (SD1.5), 12/20 (SDXL) values"
    )


class BakeRequest(Request):
    LIMITS = {"loras": MAX_RECIPE}
    base: str = Field(
        ...,
        min_length=1,
        description="Base checkpoint: a name from the host's list or a path inside its checkpoint folders",
    )
    output: str = Field("", description="Output file name, written into the checkpoint folder (.safetensors added)")
    loras: List[LoraEntry] = Field(default_factory=list, description="The recipe")
    prompt: Optional[str] = Field(
        None,
        max_length=100_000,
        description="Alternatively (or additionally): prompt text whose <lora:name:w> tags become the recipe",
    )
    save_dtype: Optional[str] = Field(None, description="fp16, bf16 or fp32 (default: lorakit's setting, fp16)")
    overwrite: bool = Field(False, description="Replace an existing output")
    allow_unmatched: bool = Field(False, description="Bake what matches and report the rest instead of failing")
    dry_run: bool = Field(False, description="Check and plan only; write nothing")
    device: Optional[Literal["auto", "cpu", "cuda"]] = Field(
        None, description="Where the fp32 maths runs: auto, cpu or cuda (default: lorakit's setting, auto)"
    )
    scale_source: Literal["writer", "runtime"] = Field(
        "writer",
        description="writer: the scale the LoRA's writer meant (alpha tensors, else PEFT/diffusers "
        "adapter metadata); runtime: alpha tensors only, as A1111/Forge read it",
    )


@dataclass
class BakePlan:
    base: str
    specs: list  # lib_lorakit.bake.LoraSpec
    output: str | None
    save_dtype: str


def summary(report: dict[str, Any]) -> str:
    """The bake report in words (terminal and tab)."""
    from ..bake import summary as render

    return render(report)


def entry_of_text(text: str) -> dict[str, Any]:
    """``PATH[:STRENGTH[:TE_STRENGTH]]`` (the command line's form) as a :class:`LoraEntry` dict."""
    from ..bake import parse_lora_arg

    s = parse_lora_arg(text)
    not_a_number(s.path, "strength", "PATH[:STRENGTH[:TE_STRENGTH]]")
    return {"name": s.path, "strength": s.strength, "te_strength": s.te_strength, "blocks": s.blocks}


_MODEL_EXT = re.compile(r"^(.*\.(?:safetensors|ckpt|pt|pth|bin))((?::[^:/\\]*){1,2})$", re.I)


def not_a_number(path: str, what: str, form: str) -> None:
    """Refuse ``file.safetensors:abc`` (a number after a model file's name that is not one) when no such file
    exists: the user meant a strength, and "file not found" would point the wrong way."""
    m = _MODEL_EXT.match(path)
    if m is None or os.path.exists(path):
        return
    bad = [x for x in m.group(2).split(":")[1:]]
    raise RecipeError(
        f"{path!r}: the {what} {bad[0] if len(bad) == 1 else ':'.join(bad)!r} after {m.group(1)!r} is not a number.",
        fix=f"Write {form} with numbers, e.g. {os.path.basename(m.group(1))}:0.8.",
    )


def entries_of_prompt(text: str) -> list[dict[str, Any]]:
    """The ``<lora:…>`` tags of a prompt as LoRA entries (UNet strength, TE strength, block weights)."""
    return [
        {"name": t.name, "strength": t.strength, "te_strength": t.te_strength, "blocks": t.blocks}
        for t in parse_tags(text)
    ]


def save_dtype_of(ctx: Context, value: str | None) -> str:
    """The save dtype asked for (or the context's default), checked against the engine's list."""
    from ..bake import SAVE_DTYPES

    dtype = value or ctx.default_save_dtype()
    if dtype not in SAVE_DTYPES:
        raise RecipeError(f"Unknown save dtype {dtype!r}.", fix=f"Use one of {', '.join(SAVE_DTYPES)}.")
    return dtype


def entries_of(req: BakeRequest) -> list[LoraEntry]:
    """The recipe: the listed LoRAs, then those tagged in the prompt."""
    out = list(req.loras)
    if req.prompt:
        out += [
            LoraEntry(name=t.name, strength=t.strength, te_strength=t.te_strength, blocks=t.blocks)
            for t in parse_tags(req.prompt)
        ]
    return out


def prepare(ctx: Context, req: BakeRequest) -> BakePlan:
    """Resolve every name and check the request; raises the error the user sees (no file is touched)."""
    from ..bake import LoraSpec
    from ..formats.safetensors_io import check_output_path

    entries = entries_of(req)
    if len(entries) > MAX_RECIPE:
        raise RecipeError(
            f"The recipe has {len(entries)} LoRAs; at most {MAX_RECIPE} are accepted in one bake.",
            fix=f"Bake in steps of at most {MAX_RECIPE} LoRAs (bake the result again).",
        )
    if not entries:
        raise RecipeError("The recipe has no LoRA.", fix="Add LoRAs, or paste a prompt with <lora:name:weight> tags.")
    base = ctx.resolve_checkpoint(req.base)
    specs = []
    for e in entries:
        path = ctx.resolve_lora(e.name)
        specs.append(
            LoraSpec(
                path=path,
                strength=float(e.strength),
                te_strength=None if e.te_strength is None else float(e.te_strength),
                blocks=e.blocks or None,
                name=os.path.splitext(os.path.basename(path))[0],
            )
        )
    dtype = save_dtype_of(ctx, req.save_dtype)
    out = None if req.dry_run else ctx.output_path(req.output)
    if out is not None and os.path.isdir(os.path.dirname(out)):
        check_output_path(out, overwrite=req.overwrite, inputs=[base] + [s.path for s in specs])
    return BakePlan(base, specs, out, dtype)


def execute(
    ctx: Context, req: BakeRequest, plan: BakePlan, progress: Progress | None = None, cancel: Any = None
) -> dict[str, Any]:
    from ..bake import bake as bake_engine
    from .checks import nonfinite_vae_later, warn_nonfinite_vae

    if plan.output is not None:
        os.makedirs(os.path.dirname(plan.output), exist_ok=True)
    vae_check = nonfinite_vae_later(plan.base)  # beside the bake: its output's VAE is the base's, unchanged
    report = bake_engine(
        plan.base,
        plan.specs,
        plan.output,
        save_dtype=plan.save_dtype,
        overwrite=req.overwrite,
        allow_unmatched=req.allow_unmatched,
        dry_run=req.dry_run,
        progress=progress,
        cancel=cancel,
        scale_source=req.scale_source,
        preflight_settings=ctx.settings(),
        **ctx.engine_kwargs(req.device),
    )
    warn_nonfinite_vae(report, plan.base, vae_check())
    return {"report": report, "output": plan.output, "checkpoint": ctx.written(plan.output) if plan.output else None}


def bake(ctx: Context, req: BakeRequest | dict, progress: Progress | None = None, cancel: Any = None) -> dict[str, Any]:
    """Bake now (the command line). Returns ``{"report", "output", "checkpoint"}``."""
    req = BakeRequest.parse(req)
    return execute(ctx, req, prepare(ctx, req), progress, cancel)


def start(ctx: Context, req: BakeRequest | dict) -> Job:
    """Check now (errors answer at once), bake as a job under the host's queue."""
    req = BakeRequest.parse(req)
    plan = prepare(ctx, req)
    params = {
        "base": req.base,
        "loras": [e.dump() for e in req.loras],
        "prompt": req.prompt,
        "output": plan.output,
        "save_dtype": plan.save_dtype,
        "dry_run": req.dry_run,
    }
    return ctx.submit(
        "bake", params, lambda progress, cancel: execute(ctx, req, plan, progress, cancel), title="lorakit: bake"
    )
