"""Generation settings: the one place that defines what lorakit renders with by default.

Every generating feature (grid Script, grid/autotest jobs, triage, tournaments, the bake
doctor) takes its defaults from here; the request types of the doors read these values
instead of repeating them.

The settings depend on the checkpoint: an SDXL model at 512×512 renders badly, Pony
needs clip skip 2 and its score tags, NoobAI v-pred needs Euler and a low CFG. The
profiles live as data in ``profiles.json`` beside this module (with the model cards each
value comes from); lorakit's settings file can change any field of a shipped profile or
add a profile (key ``generation_profiles``). :func:`detect_profile` picks one from what
the checkpoint's keys and metadata say; :func:`settings_for` returns the settings to
generate with, the user's overrides on top, and says which profile was picked and why.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import RecipeError

PROFILES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles.json")

#: Settings used when nothing better is known about the checkpoint (SD1.5-style defaults).
GEN_DEFAULTS = MappingProxyType(
    {
        "width": 512,
        "height": 512,
        "steps": 20,
        "cfg_scale": 7.0,
        "sampler_name": "Euler a",
    }
)

#: The settings a generation request carries (what a backend sends to txt2img).
GEN_KEYS = ("width", "height", "steps", "cfg_scale", "sampler_name", "scheduler", "clip_skip", "cfg_rescale")
#: Fields that shape the prompts lorakit writes.
PROMPT_KEYS = ("quality", "negative", "prompt_style", "trigger_position")
PROMPT_STYLES = ("booru", "natural")
TRIGGER_POSITIONS = ("first", "after_quality", "after_count")
FALLBACK = "sd15"

_BOUNDS: dict[str, tuple[type, float, float]] = {
    "width": (int, 64, 4096),
    "height": (int, 64, 4096),
    "steps": (int, 1, 150),
    "cfg_scale": (float, 0.0, 30.0),
    "clip_skip": (int, 1, 12),
    "cfg_rescale": (float, 0.0, 1.0),
    "batch_size": (int, 1, 16),
}


def default_settings() -> dict:
    """Return a fresh, mutable copy of the default generation settings."""
    return dict(GEN_DEFAULTS)


@dataclass(frozen=True)
class Profile:
    """One row of the table: the settings and prompt form for one architecture/lineage."""

    name: str
    label: str
    arch: str
    lineage: str | None
    vpred: bool | None
    settings: Mapping[str, Any]  # GEN_KEYS
    quality: str
    negative: str
    prompt_style: str
    trigger_position: str
    host_note: str = ""
    sources: tuple[str, ...] = ()
    batch_size: int = 1  # images per WebUI request, for cells that differ only in their (consecutive) seeds

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "arch": self.arch,
            "lineage": self.lineage,
            "vpred": self.vpred,
            **dict(self.settings),
            "quality": self.quality,
            "negative": self.negative,
            "prompt_style": self.prompt_style,
            "trigger_position": self.trigger_position,
            "host_note": self.host_note,
            "sources": list(self.sources),
            "batch_size": self.batch_size,
        }


@functools.cache
def _shipped() -> dict[str, Any]:
    with open(PROFILES_FILE, encoding="utf-8") as f:
        return json.load(f)


def _check_value(where: str, key: str, value: Any) -> Any:
    if key in _BOUNDS:
        kind, lo, hi = _BOUNDS[key]
        try:
            v = kind(value)
        except (TypeError, ValueError):
            raise RecipeError(
                f"{where}: {key} = {value!r} is not a number.", fix=f"Give a number from {lo:g} to {hi:g}."
            ) from None
        if kind is int and v != float(value):
            raise RecipeError(
                f"{where}: {key} = {value!r} is not a whole number.", fix=f"Give a whole number from {lo:g} to {hi:g}."
            )
        if isinstance(v, float) and not math.isfinite(v) or not lo <= v <= hi:
            raise RecipeError(
                f"{where}: {key} = {value!r} is outside {lo:g}..{hi:g}.",
                fix=f"Give {'a whole number' if kind is int else 'a number'} from {lo:g} to {hi:g}.",
            )
        return v
    if key == "prompt_style" and value not in PROMPT_STYLES:
        raise RecipeError(f"{where}: prompt_style = {value!r} is not one of {', '.join(PROMPT_STYLES)}.")
    if key == "trigger_position" and value not in TRIGGER_POSITIONS:
        raise RecipeError(f"{where}: trigger_position = {value!r} is not one of {', '.join(TRIGGER_POSITIONS)}.")
    if key in ("sampler_name", "scheduler", "quality", "negative", "label", "host_note") and not isinstance(value, str):
        raise RecipeError(f"{where}: {key} must be text, got {type(value).__name__}.")
    return value


_ALLOWED = (
    set(GEN_KEYS) | set(PROMPT_KEYS) | {"label", "arch", "lineage", "vpred", "host_note", "sources", "batch_size"}
)


def _build(name: str, d: Mapping[str, Any], where: str) -> Profile:
    bad = sorted(set(d) - _ALLOWED)
    if bad:
        near = ", ".join(sorted(_ALLOWED & set(GEN_KEYS + PROMPT_KEYS)))
        raise RecipeError(f"{where}: unknown field(s) {', '.join(bad)} in profile {name!r}.", fix=f"Fields: {near}.")
    if d.get("arch") not in ("sd15", "sdxl"):
        raise RecipeError(f"{where}: profile {name!r} has arch {d.get('arch')!r}.", fix="Use 'sd15' or 'sdxl'.")
    vals = {k: _check_value(f"{where} profile {name!r}", k, v) for k, v in d.items()}
    missing = [k for k in ("width", "height", "steps", "cfg_scale", "sampler_name") if k not in vals]
    if missing:
        raise RecipeError(f"{where}: profile {name!r} lacks {', '.join(missing)}.")
    return Profile(
        name=name,
        label=str(vals.get("label") or name),
        arch=vals["arch"],
        lineage=vals.get("lineage"),
        vpred=vals.get("vpred"),
        settings={k: vals[k] for k in GEN_KEYS if k in vals},
        quality=vals.get("quality", ""),
        negative=vals.get("negative", ""),
        prompt_style=vals.get("prompt_style", "natural"),
        trigger_position=vals.get("trigger_position", "first"),
        host_note=vals.get("host_note", ""),
        sources=tuple(vals.get("sources") or ()),
        batch_size=int(vals.get("batch_size", 1)),
    )


def load_profiles(user: Mapping[str, Any] | None = None) -> dict[str, Profile]:
    """The shipped profiles, with the user's changes (``{name: {field: value}}``; a new name adds a profile,
    which then needs at least ``arch`` and the image settings) laid over them field by field."""
    table = copy.deepcopy(_shipped()["profiles"])
    if user:
        if not isinstance(user, Mapping):
            raise RecipeError("Setting generation_profiles must be an object of profile name -> fields.")
        for name, fields in user.items():
            if not isinstance(fields, Mapping):
                raise RecipeError(f"Setting generation_profiles[{name!r}] must be an object of field -> value.")
            table.setdefault(name, {}).update(fields)
    return {
        name: _build(name, d, "settings" if user and name in user else "profiles.json") for name, d in table.items()
    }


def user_profiles(settings: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The ``generation_profiles`` entry of lorakit's settings (see :mod:`lib_lorakit.settings`)."""
    return (settings or {}).get("generation_profiles") or None


# --- detection ------------------------------------------------------------------------------------


@dataclass
class Detected:
    """Which profile a checkpoint gets, and why."""

    profile: str
    reason: str
    family: dict[str, Any] = field(default_factory=dict)


def _family(source: Any):
    """A :class:`~lib_lorakit.formats.arch.Family` from a path, a (shapes, metadata) pair or a Family."""
    from ..formats.arch import Family, detect_checkpoint

    if isinstance(source, Family):
        return source, set()
    if isinstance(source, str):
        from ..inspect import checkpoint_family

        shapes = _key_names(source)
        return checkpoint_family(source), shapes
    if isinstance(source, tuple) and len(source) == 2:
        shapes, meta = source
        return detect_checkpoint(shapes, meta), set(shapes)
    raise RecipeError(
        f"Cannot detect a profile from a {type(source).__name__}.",
        fix="Give a checkpoint path, a (shapes, metadata) pair or a Family.",
    )


def _key_names(path: str) -> set[str]:
    if not path.endswith(".safetensors"):
        return set()
    from ..formats.safetensors_io import read_header

    tensors, _ = read_header(path)
    return {k for k in tensors if "." not in k}  # the flag keys (v_pred, ztsnr) sit at the top level


def detect_profile(
    family, keys: set[str] | frozenset[str] = frozenset(), profiles: Mapping[str, Profile] | None = None
) -> Detected:
    """The profile for a checkpoint's family: v-prediction → NoobAI v-pred; else the lineage named by its
    metadata or file name (NoobAI before Illustrious, which NoobAI is trained from, before Pony); else the
    architecture's base profile. User-added profiles with a matching ``lineage`` win over the shipped one."""
    profiles = profiles or load_profiles()
    fd = family.as_dict()
    if family.arch == "sd15":
        return Detected("sd15", f"SD1.x checkpoint ({'; '.join(family.evidence)})", fd)
    if family.arch != "sdxl":
        return Detected(FALLBACK, "architecture unknown: the SD1.5 defaults", fd)
    lineages = [n for n, _ in family.lineage]
    ev = dict(family.lineage)
    zt = " and a 'ztsnr' key (zero terminal SNR)" if "ztsnr" in keys else ""

    def pick(lineage: str | None, vpred: bool | None, default: str) -> str:
        for p in profiles.values():
            if (
                p.name not in _shipped()["profiles"]
                and p.arch == "sdxl"
                and p.lineage == lineage
                and (vpred is None or p.vpred in (None, vpred))
            ):
                return p.name
        return default

    if family.vpred:
        why = f"v-prediction ({family.vpred_evidence}{zt})"
        if "NoobAI" in lineages:
            why += f"; NoobAI ({ev['NoobAI']})"
        else:
            why += "; NoobAI v-pred is the v-prediction SDXL lineage its settings fit"
        return Detected(pick("NoobAI", True, "noobai-vpred"), why, fd)
    for lin, name in (("NoobAI", "noobai-eps"), ("Illustrious", "illustrious"), ("Pony", "pony")):
        if lin in lineages:
            extra = f" (also named: {', '.join(x for x in lineages if x != lin)})" if len(lineages) > 1 else ""
            return Detected(pick(lin, False, name), f"{lin}: {ev[lin]}{extra}", fd)
    return Detected(
        pick(None, None, "sdxl"),
        f"SDXL without a lineage hint in its metadata or name ({'; '.join(family.evidence)})",
        fd,
    )


def settings_for(
    checkpoint: Any = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    profile: str | None = None,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What to generate with on ``checkpoint``: the detected profile's values, ``overrides`` on top.

    Args:
        checkpoint: a checkpoint path, a ``(shapes, metadata)`` header pair, a Family, or None
            (unknown: the SD1.5 defaults).
        overrides: the user's values for any of ``GEN_KEYS`` and ``PROMPT_KEYS`` (None/"" = not set).
        profile: a profile name that replaces detection.
        settings: lorakit's settings (their ``generation_profiles`` change the table).

    Returns:
        ``{"profile", "label", "reason", "settings", "quality", "negative", "prompt_style",
        "trigger_position", "overridden", "notes", "family"}``; ``settings`` holds only the
        generation keys (what a backend sends).
    """
    from ..errors import LorakitError

    table = load_profiles(user_profiles(settings))
    notes: list[str] = []
    fam: dict[str, Any] = {}
    if profile:
        if profile not in table:
            import difflib

            near = difflib.get_close_matches(profile, list(table), n=1)
            raise RecipeError(
                f"No generation profile {profile!r}.",
                fix=f"Use one of {', '.join(table)}" + (f" (did you mean {near[0]!r}?)" if near else "") + ".",
            )
        det = Detected(profile, "chosen by you")
    elif checkpoint is None:
        det = Detected(FALLBACK, "no checkpoint to read: the SD1.5 defaults")
    else:
        try:
            family, keys = _family(checkpoint)
            det = detect_profile(family, keys, table)
        except (LorakitError, OSError) as e:
            det = Detected(FALLBACK, f"the checkpoint could not be read ({str(e).splitlines()[0]}): the SD1.5 defaults")
    fam = det.family
    p = table[det.profile]
    out_settings = dict(p.settings)
    prompt_fields = {
        "quality": p.quality,
        "negative": p.negative,
        "prompt_style": p.prompt_style,
        "trigger_position": p.trigger_position,
    }
    overridden = []
    for k, v in (overrides or {}).items():
        if v is None or v == "":
            continue
        if k in GEN_KEYS:
            before, out_settings[k] = out_settings.get(k), _check_value("override", k, v)
            changed = before != out_settings[k]
        elif k in PROMPT_KEYS:
            before, prompt_fields[k] = prompt_fields[k], _check_value("override", k, v)
            changed = before != prompt_fields[k]
        else:
            raise RecipeError(f"Unknown generation setting {k!r}.", fix=f"Use {', '.join(GEN_KEYS + PROMPT_KEYS)}.")
        if changed:
            overridden.append(k)
    if p.host_note:
        notes.append(p.host_note)
    if out_settings.get("cfg_rescale"):
        notes.append(
            f"CFG rescale {out_settings['cfg_rescale']:g} is applied only where the host has a CFG rescale "
            "setting; elsewhere lower the CFG instead."
        )
    return {
        "profile": p.name,
        "label": p.label,
        "reason": det.reason,
        "settings": out_settings,
        **prompt_fields,
        "overridden": sorted(set(overridden)),
        "notes": notes,
        "family": fam,
        "batch_size": p.batch_size,
    }


def record_of(chosen: Mapping[str, Any]) -> dict[str, Any]:
    """The part of :func:`settings_for`'s answer a run record keeps."""
    return {
        k: chosen[k]
        for k in (
            "profile",
            "label",
            "reason",
            "settings",
            "quality",
            "negative",
            "prompt_style",
            "trigger_position",
            "overridden",
            "notes",
            "batch_size",
        )
        if k in chosen
    }


# --- prompts -------------------------------------------------------------------------------------

_COUNT = re.compile(r"^(?:\d\+?(?:girl|boy|other)s?|multiple (?:girls|boys|others))$", re.I)


def compose(body: str, *, quality: str = "", trigger: str | None = None, trigger_position: str = "first") -> str:
    """A prompt from its parts, the trigger where the lineage expects it.

    ``first``: trigger, quality, body (plain sentences). ``after_quality``: quality, trigger, body
    (Pony: score tags lead). ``after_count``: quality, the count tags (1girl, 2boys...), trigger, the rest
    (the caption order of Illustrious/NoobAI: ``<1girl>, <character>, <series>, ...``).
    """
    parts = [s.strip() for s in body.split(",")] if body.strip() else []
    q = [quality.strip()] if quality and quality.strip() else []
    t = [trigger.strip()] if trigger and trigger.strip() else []
    if trigger_position == "after_count":
        n = 0
        while n < len(parts) and _COUNT.match(parts[n]):
            n += 1
        out = q + parts[:n] + t + parts[n:]
    elif trigger_position == "after_quality":
        out = q + t + parts
    else:
        out = t + q + parts
    return ", ".join(x for x in out if x)


def category_prompts(chosen: Mapping[str, Any] | None = None, *, style: str | None = None) -> dict[str, str]:
    """The built-in prompt body per LoRA category for a prompt style (from :func:`settings_for`'s answer,
    or ``style`` directly)."""
    style = style or (chosen or {}).get("prompt_style") or "natural"
    return dict(_shipped()["prompts"][style])


def category_prompt(
    chosen: Mapping[str, Any] | None, category: str | None, trigger: str | None = None, body: str | None = None
) -> str:
    """The full prompt for a LoRA of ``category``: the profile's quality tags, the category's prompt (or
    ``body``) in the profile's style, the trigger where the lineage puts it."""
    c = chosen or {}
    if body is None:
        table = category_prompts(c)
        body = table.get(category or "unknown", table["unknown"])
    return compose(
        body, quality=c.get("quality", ""), trigger=trigger, trigger_position=c.get("trigger_position", "first")
    )


def prompt_set(chosen: Mapping[str, Any] | None = None, *, trigger: str | None = None) -> list[str]:
    """The general test prompts (autotest rows, tournament prompts) in the profile's style and quality tags."""
    c = chosen or {}
    style = c.get("prompt_style") or "natural"
    return [
        compose(b, quality=c.get("quality", ""), trigger=trigger, trigger_position=c.get("trigger_position", "first"))
        for b in _shipped()["prompt_sets"][style]
    ]


def table_markdown(profiles: Mapping[str, Profile] | None = None) -> str:
    """The profile table as markdown (the README's table is this output)."""
    profiles = profiles or load_profiles()
    rows = [
        "| profile | detected by | size | sampler / schedule | steps | CFG | clip skip | prompt style | quality tags |",
        "|---|---|---|---|---:|---:|---:|---|---|",
    ]
    how = {
        "sd15": "SD1.x keys",
        "sdxl": "SDXL keys, no lineage hint",
        "pony": "'pony'/'pdxl'/'score_9' in title/name",
        "illustrious": "'illustrious'/'ilxl' in title/name",
        "noobai-eps": "'noob' in title/name",
        "noobai-vpred": "`v_pred` key, prediction_type v, or ss_v_parameterization",
    }
    for p in profiles.values():
        s = p.settings
        cfg = f"{s['cfg_scale']:g}" + (f" (rescale {s['cfg_rescale']:g})" if s.get("cfg_rescale") else "")
        rows.append(
            f"| {p.label} (`{p.name}`) | {how.get(p.name, 'user profile')} | {s['width']}×{s['height']} | "
            f"{s['sampler_name']} / {s.get('scheduler', 'Automatic')} | {s['steps']} | {cfg} | "
            f"{s.get('clip_skip', 'host')} | {p.prompt_style} | {p.quality or '—'} |"
        )
    return "\n".join(rows) + "\n"
