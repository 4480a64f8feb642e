"""Generation settings: the one place that defines what lorakit renders with by default.

Every generating feature (grid Script, grid/autotest jobs, triage, tournaments, the bake
doctor) takes its defaults from here; the request types of the doors read these values
instead of repeating them.
"""
from __future__ import annotations

from types import MappingProxyType

#: Settings used when nothing better is known about the checkpoint (SD1.5-style defaults).
GEN_DEFAULTS = MappingProxyType({
    "width": 512,
    "height": 512,
    "steps": 20,
    "cfg_scale": 7.0,
    "sampler_name": "Euler a",
})


def default_settings() -> dict:
    """Return a fresh, mutable copy of the default generation settings."""
    return dict(GEN_DEFAULTS)
