"""From a form to a spec: what the Tournament and Triage tabs call instead of asking for JSON.

The form gives candidates picked from the host's lists (a checkpoint, a checkpoint plus
LoRAs, or a merge recipe), which one is the control, prompts (by default the checkpoint
lineage's prompt set), seeds and setting overrides. The spec that comes back is the one
the JSON route takes, already checked by :meth:`TournamentSpec.validate`, with the
settings of the control's generation profile (the user's values on top) and the profile
it came from.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import RecipeError
from ..gen.profiles import prompt_set, record_of, settings_for
from .tournament import MIN_PROMPTS, Candidate, TournamentSpec

CANDIDATE_KINDS = ("checkpoint", "recipe", "merge")


def _loras(value: Any, where: str) -> list[dict[str, Any]]:
    """LoRAs from a list of {name, strength} or text like ``styleA:0.8, detail``."""
    if not value:
        return []
    if isinstance(value, str):
        out = []
        for part in [x.strip() for x in value.split(",") if x.strip()]:
            name, _, s = part.rpartition(":") if re.search(r":\s*-?[\d.]+$", part) else (part, "", "1")
            try:
                out.append({"name": name.strip(), "strength": float(s)})
            except ValueError:
                raise RecipeError(f"{where}: LoRA strength {s!r} is not a number.", fix="Write name:0.8.") from None
        return out
    out = []
    for x in value:
        if not isinstance(x, Mapping) or not str(x.get("name") or "").strip():
            raise RecipeError(f"{where}: each LoRA needs a name (got {x!r}).")
        try:
            out.append({"name": str(x["name"]).strip(), "strength": float(x.get("strength", 1.0))})
        except (TypeError, ValueError):
            raise RecipeError(
                f"{where}: LoRA {x['name']!r} has strength {x.get('strength')!r}, not a number."
            ) from None
    return out


def _slug(text: str) -> str:
    s = re.sub(r"\.(safetensors|ckpt)$", "", text.split(" [")[0], flags=re.I)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", s).strip("-")[:60] or "candidate"


def _candidate(row: Mapping[str, Any], i: int) -> Candidate:
    where = f"Candidate {i + 1}"
    kind = str(row.get("kind") or ("merge" if row.get("merge") else "recipe" if row.get("loras") else "checkpoint"))
    if kind not in CANDIDATE_KINDS:
        raise RecipeError(f"{where}: kind {kind!r} is not one of {', '.join(CANDIDATE_KINDS)}.")
    loras = _loras(row.get("loras"), where)
    if kind == "recipe" and not loras:
        raise RecipeError(f"{where} is a checkpoint + LoRA recipe without a LoRA.", fix="Pick at least one LoRA.")
    merge = None
    ck = str(row.get("checkpoint") or "").strip() or None
    if kind == "merge":
        m = row.get("merge") or {}
        models = [
            {"name": str(x.get("name")).strip(), "weight": float(x.get("weight", 1.0))}
            for x in (m.get("models") or [])
            if isinstance(x, Mapping) and x.get("name")
        ]
        if len(models) < 2:
            raise RecipeError(
                f"{where} is a merge recipe with {len(models)} model(s).", fix="Pick two or more checkpoints."
            )
        merge = {k: v for k, v in m.items() if k != "models"}
        merge["models"] = models
        ck = None
    elif not ck:
        raise RecipeError(f"{where}: no checkpoint picked.", fix="Pick a checkpoint from the list.")
    cid = str(row.get("id") or "").strip()
    if not cid:
        base = _slug(ck) if ck else "merge-" + "-".join(_slug(m["name"])[:12] for m in merge["models"])
        cid = base + "".join(f"+{_slug(x['name'])}@{x['strength']:g}" for x in loras)
    return Candidate(id=cid[:80], checkpoint=ck, loras=loras, merge=merge, note=str(row.get("note") or ""))


def _prompts(prompts: Any, chosen: Mapping[str, Any]) -> list[str]:
    if (
        prompts is None
        or (isinstance(prompts, str) and not prompts.strip())
        or (not isinstance(prompts, str) and not prompts)
    ):
        return prompt_set(chosen)
    if isinstance(prompts, str):
        return [p.strip() for p in prompts.splitlines() if p.strip()]
    return [str(p.get("prompt") if isinstance(p, Mapping) else p).strip() for p in prompts]


def _seeds(seeds: Any, n: int) -> list[int]:
    from ..gen.grid import parse_seeds

    vals = parse_seeds(seeds, default=1000) if not isinstance(seeds, int) else [seeds]
    if len(vals) == 1:
        return [vals[0] + i for i in range(n)]  # one seed per prompt, counted up from the one given
    if len(vals) != n:
        raise RecipeError(
            f"{len(vals)} seeds for {n} prompts.", fix="Give one seed (counted up per prompt) or one per prompt."
        )
    return vals


def tournament_spec_from_form(
    candidates: Sequence[Mapping[str, Any]],
    control: str | int | None,
    prompts: Sequence[Any] | str | None,
    seeds: Sequence[int] | str | int | None,
    settings: Mapping[str, Any] | None = None,
    *,
    name: str = "tournament",
    negative_prompt: str = "",
    first_version: bool = False,
    checkpoint_path: Callable[[str], str | None] | Mapping[str, str] | None = None,
    profile: str | None = None,
    lorakit_settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A tournament spec (the JSON route's body) from a form, validated.

    Args:
        candidates: rows ``{kind, checkpoint, loras, merge, id?, note?}``; ``loras`` as a list of
            ``{name, strength}`` or text ``a:0.8, b``; ``merge`` as ``{models: [{name, weight}], method, ...}``.
            Ids are made from the recipe when not given.
        control: the control candidate's id or index (None with ``first_version``).
        prompts: one per line, a list, or empty for the profile's prompt set.
        seeds: one seed (counted up per prompt), one per prompt, or empty (1000, 1001, ...).
        settings: the user's overrides of the profile's settings (and prompt fields).
        checkpoint_path: checkpoint name -> file (the host's list), to detect the profile.
        profile: a profile name instead of the detected one.
        lorakit_settings: lorakit's settings (user profiles).
    """
    if not candidates:
        raise RecipeError("The tournament has no candidates.", fix="Add at least two candidates.")
    cands = [_candidate(row, i) for i, row in enumerate(candidates)]
    seen: dict[str, int] = {}
    for c in cands:  # two rows of the same recipe get -2, -3...
        if c.id in seen:
            seen[c.id] += 1
            c.id = f"{c.id}-{seen[c.id]}"[:80]
        else:
            seen[c.id] = 1
    if control is not None and control != "" and not first_version:
        idx = control if isinstance(control, int) else next((i for i, c in enumerate(cands) if c.id == control), None)
        if idx is None and isinstance(control, str) and control.isdigit():
            idx = int(control)
        if idx is None or not 0 <= idx < len(cands):
            raise RecipeError(
                f"The control {control!r} is not one of the candidates ({', '.join(c.id for c in cands)}).",
                fix="Mark one of the candidates as the control.",
            )
        cands[idx].control = True
    lookup = checkpoint_path.get if isinstance(checkpoint_path, Mapping) else checkpoint_path
    ref = next((c for c in cands if c.control), cands[0])
    ref_ck = ref.checkpoint or (ref.merge["models"][0]["name"] if ref.merge else None)
    path = lookup(ref_ck) if lookup and ref_ck else None
    chosen = settings_for(path, settings, profile=profile, settings=lorakit_settings)
    reason = f"{chosen['reason']} (from {'the control' if ref.control else 'the first candidate'} {ref_ck})"
    chosen = {**chosen, "reason": reason}
    texts = _prompts(prompts, chosen)
    if len(texts) < MIN_PROMPTS and not prompts:
        texts = (texts * MIN_PROMPTS)[:MIN_PROMPTS]
    neg = negative_prompt or chosen["negative"]
    ps = [{"prompt": t, "negative_prompt": neg, "seed": s} for t, s in zip(texts, _seeds(seeds, len(texts)))]
    spec = TournamentSpec(
        name=str(name or "tournament"),
        candidates=cands,
        prompts=ps,
        settings=dict(chosen["settings"]),
        first_version=bool(first_version),
        profile=record_of(chosen),
    )
    spec.validate()
    out = spec.as_dict()
    TournamentSpec.from_dict(out).validate()  # what the JSON route will parse
    return out


def triage_form_defaults(
    checkpoint_path: str | None, *, profile: str | None = None, lorakit_settings: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What the Triage form shows for a checkpoint: the profile, its settings, its negative prompt and the
    category prompts in its style (with its quality tags)."""
    from ..gen.profiles import category_prompt, category_prompts

    chosen = settings_for(checkpoint_path, profile=profile, settings=lorakit_settings)
    return {
        "profile": chosen["profile"],
        "label": chosen["label"],
        "reason": chosen["reason"],
        "settings": chosen["settings"],
        "negative_prompt": chosen["negative"],
        "notes": chosen["notes"],
        "prompts": {cat: category_prompt(chosen, cat) for cat in category_prompts(chosen)},
    }


def spec_with_profile(
    data: Mapping[str, Any],
    *,
    checkpoint_path: Callable[[str], str | None] | Mapping[str, str] | None = None,
    profile: str | None = None,
    lorakit_settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON tournament spec with the control's generation profile under its ``settings`` (the spec's own
    values win) and the profile recorded: what the JSON route does so that a hand-written spec renders like
    a form-made one. Prompts stay as written; an empty negative prompt becomes the profile's."""
    d = dict(data)
    cands = list(d.get("candidates") or [])
    ref = next((c for c in cands if c.get("control")), cands[0] if cands else {})
    ref_ck = ref.get("checkpoint") or (((ref.get("merge") or {}).get("models") or [{}])[0].get("name"))
    lookup = checkpoint_path.get if isinstance(checkpoint_path, Mapping) else checkpoint_path
    path = lookup(ref_ck) if lookup and ref_ck else None
    chosen = settings_for(path, d.get("settings") or {}, profile=profile, settings=lorakit_settings)
    d["settings"] = dict(chosen["settings"])
    d["profile"] = record_of({**chosen, "reason": f"{chosen['reason']} (from {ref_ck})"})
    d["prompts"] = [
        {**p, "negative_prompt": p.get("negative_prompt") or chosen["negative"]} for p in (d.get("prompts") or [])
    ]
    TournamentSpec.from_dict({"name": d.get("name") or "tournament", **d}).validate()
    return d
