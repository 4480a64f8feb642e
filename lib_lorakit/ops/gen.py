"""Generation settings shared by every generating request (grid, autotest, triage, tournaments).

Each field left empty takes its value from the checkpoint's generation profile
(``lib_lorakit.gen.profiles``: SD1.5, SDXL, Pony, Illustrious, NoobAI eps/v-pred), so a field a
user gives is an override and nothing else is; the run record stores the settings used.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from ..gen.profiles import default_settings
from .model import Field, Request

SETTING_FIELDS = ("steps", "cfg_scale", "width", "height", "sampler_name", "scheduler", "clip_skip", "cfg_rescale")
MAX_SEEDS = 1000


class GenSettings(Request):
    steps: Optional[int] = Field(None, ge=1, le=150, description="Sampling steps (default: the generation profile's)")
    cfg_scale: Optional[float] = Field(None, ge=0, le=100, description="CFG scale (default: the profile's)")
    width: Optional[int] = Field(None, ge=16, le=8192, description="Width in pixels (default: the profile's)")
    height: Optional[int] = Field(None, ge=16, le=8192, description="Height in pixels (default: the profile's)")
    sampler_name: Optional[str] = Field(None, description="Sampler (default: the profile's)")
    scheduler: Optional[str] = Field(None, description="Schedule type, e.g. Karras (A1111 1.10 / Forge)")
    clip_skip: Optional[int] = Field(None, ge=1, le=12, description="CLIP skip (default: the profile's, or the host's)")
    cfg_rescale: Optional[float] = Field(None, ge=0, le=1, description="CFG rescale, where the host applies it")


class ProfiledSettings(GenSettings):
    profile: Optional[str] = Field(
        None,
        description="A generation profile by name (sd15, sdxl, pony, illustrious, "
        "noobai-eps, noobai-vpred, or one of the user's); default: "
        "detected from the checkpoint",
    )
    batch_size: Optional[int] = Field(
        None,
        ge=1,
        le=16,
        description="Images per WebUI request, for cells that differ only in consecutive seeds "
        "(default: the generation profile's batch_size)",
    )


def with_batch(backend: Any, req: Any) -> Any:
    """The backend, with the request's batch size when it is a pool (which batches)."""
    n = getattr(req, "batch_size", None)
    if n and getattr(backend, "kind", "") == "pool":
        backend.batch_size = backend.user_batch = int(n)
    return backend


def overrides_of(req: Any) -> dict[str, Any]:
    """The settings a request gives (the profile supplies the rest)."""
    out = {}
    for k in SETTING_FIELDS:
        v = getattr(req, k, None) if not isinstance(req, dict) else req.get(k)
        if v not in (None, ""):
            out[k] = v
    return out


def settings_of(req: Any) -> dict[str, Any]:
    """The generation settings of a request: what it gives, the defaults for the rest (no checkpoint known)."""
    out = default_settings()
    for k in SETTING_FIELDS:
        v = getattr(req, k, None) if not isinstance(req, dict) else req.get(k)
        if v not in (None, ""):
            out[k] = v
    return out


def check_seeds(seeds: list[int], what: str = "seeds") -> list[int]:
    from ..errors import RecipeError

    if len(seeds) > MAX_SEEDS:
        raise RecipeError(f"{what}: {len(seeds)} seeds; at most {MAX_SEEDS}.", fix="Use fewer seeds.")
    return seeds


class ProfilesRequest(Request):
    profiles: Dict[str, Dict[str, Any]] = Field(
        ...,
        description="profile name -> {field: value}, merged field by "
        "field over the shipped table (new names add a "
        "profile)",
    )
    replace: bool = Field(
        False,
        description="true: these become all of your changes (a profile or field left out goes back to the "
        "shipped value)",
    )


def profiles(ctx: Any) -> dict[str, Any]:
    """The generation profiles in use (shipped, with the user's changes) and the table as markdown."""
    from ..gen.profiles import load_profiles, table_markdown, user_profiles

    table = load_profiles(user_profiles(ctx.settings()))
    return {"profiles": {k: v.as_dict() for k, v in table.items()}, "markdown": table_markdown(table)}


def update_profiles(ctx: Any, req: ProfilesRequest | dict) -> dict[str, Any]:
    """Change fields of the generation profiles (checked before they are stored)."""
    req = ProfilesRequest.parse(req)
    ctx.update_settings({"generation_profiles": req.profiles}, ("generation_profiles",) if req.replace else ())
    return profiles(ctx)


def profile_changes(ctx: Any) -> dict[str, Any]:
    """The user's changes to the shipped profiles alone (what Settings → lorakit edits)."""
    from ..gen.profiles import user_profiles

    return dict(user_profiles(ctx.settings()) or {})


def profile_for(ctx: Any, checkpoint: str | None = None, profile: str | None = None) -> dict[str, Any]:
    """The profile a checkpoint gets (default: the host's loaded one), with why, and its settings."""
    from ..gen.profiles import settings_for

    name = checkpoint or (ctx.host.current_checkpoint() if hasattr(ctx, "host") else None)
    path = ctx.resolve_checkpoint(name) if name else None
    return settings_for(path, profile=profile or None, settings=ctx.settings())
