"""Generation settings shared by every generating request (grid, autotest, triage, tournaments).

Each field left empty takes its value from the generation defaults (``lib_lorakit.gen.profiles``),
so the defaults are written once; the run record stores the settings actually used.
"""

from __future__ import annotations

from typing import Any, Optional

from ..gen.profiles import default_settings
from .model import Field, Request

SETTING_FIELDS = ("steps", "cfg_scale", "width", "height", "sampler_name", "scheduler")
MAX_SEEDS = 1000


class GenSettings(Request):
    steps: Optional[int] = Field(None, ge=1, le=150, description="Sampling steps (default: the generation profile's)")
    cfg_scale: Optional[float] = Field(None, ge=0, le=100, description="CFG scale (default: the profile's)")
    width: Optional[int] = Field(None, ge=16, le=8192, description="Width in pixels (default: the profile's)")
    height: Optional[int] = Field(None, ge=16, le=8192, description="Height in pixels (default: the profile's)")
    sampler_name: Optional[str] = Field(None, description="Sampler (default: the profile's)")
    scheduler: Optional[str] = Field(None, description="Schedule type, e.g. Karras (A1111 1.10 / Forge)")


def settings_of(req: Any) -> dict[str, Any]:
    """The generation settings of a request: what it gives, the defaults for the rest."""
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
