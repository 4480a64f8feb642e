"""The host's model lists and in-process generation."""

from __future__ import annotations

import base64
import io
from typing import Any, Optional

from ..errors import LorakitError
from .context import HostContext
from .gen import GenSettings, settings_of
from .model import Field


class NotSupported(LorakitError):
    """The host cannot generate images (the standalone launcher)."""

    http_status = 501


class Txt2ImgRequest(GenSettings):
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, ge=-1, le=2**32 - 1)
    checkpoint: Optional[str] = Field(None, description="Checkpoint for this image only; the previous one is restored")


def checkpoints(ctx: HostContext) -> list[dict[str, str]]:
    from ..safepath import inside

    roots = ctx.host.checkpoint_dirs()  # a link that leaves the checkpoint folders is not listed (nor read)
    return [{"name": e.name, "file": e.as_dict()["file"]} for e in ctx.checkpoints() if inside(e.path, roots)]


def loras(ctx: HostContext) -> list[dict[str, str]]:
    from ..safepath import inside

    roots = ctx.host.lora_dirs()  # a link that leaves the LoRA folders is not listed (nor read)
    return [{"name": e.name, "file": e.as_dict()["file"]} for e in ctx.loras() if inside(e.path, roots)]


def txt2img(ctx: HostContext, req: Txt2ImgRequest | dict) -> dict[str, Any]:
    """One image through the host's own processing (under its queue lock); PNGs as base64."""
    from ..hosts import NotSupported as HostCannot

    req = Txt2ImgRequest.parse(req)
    body = {**req.dump(), **settings_of(req)}
    if req.checkpoint:
        ctx.resolve_checkpoint(req.checkpoint)  # 400/403/404 before generating
    try:
        out = ctx.host.txt2img(body)
    except HostCannot as e:
        raise NotSupported(str(e)) from None
    pngs = []
    for im in out["images"]:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        pngs.append(base64.b64encode(buf.getvalue()).decode())
    return {"images": pngs, "infotexts": out["infotexts"], "seed": int(out["seed"])}
