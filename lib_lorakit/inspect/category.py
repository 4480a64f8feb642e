"""What kind of LoRA it is, and the strength it can take.

Category evidence comes from names (file, output name, title, comment, modelspec tags)
and from what the training captions share. Each category has a maximum safe strength —
the strength that shows its character without breaking images (sliders ~1.5,
photoreal lighting ~0.6, …) — in an editable table; a LoRA from one SDXL lineage on a
checkpoint of another (Pony on Illustrious, …) gets a lower ceiling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .metadata import Training

CATEGORIES = (
    "slider",
    "style",
    "character",
    "concept",
    "clothing",
    "pose",
    "lighting",
    "detail",
    "background",
    "unknown",
)

DEFAULT_MAX_SAFE: dict[str, float] = {
    "slider": 1.5,
    "style": 0.8,
    "character": 0.9,
    "concept": 0.8,
    "clothing": 0.8,
    "pose": 0.8,
    "lighting": 0.6,
    "detail": 1.0,
    "background": 0.8,
    "unknown": 0.8,
}
# (LoRA lineage, checkpoint lineage) -> ceiling; "*" matches any other known lineage.
DEFAULT_CROSS_LINEAGE: dict[str, float] = {
    "Pony>Illustrious": 0.4,
    "Pony>NoobAI": 0.4,
    "Illustrious>Pony": 0.4,
    "NoobAI>Pony": 0.4,
    "Illustrious>NoobAI": 0.8,
    "NoobAI>Illustrious": 0.7,
    "*>*": 0.5,
}

_NAME_WORDS: dict[str, re.Pattern] = {
    "slider": re.compile(r"slider|\bleco\b|_leco|leco_|\bsld\b|adjuster|\bscale\b", re.I),
    "style": re.compile(
        r"style|artstyle|\bart\b|aesthetic|painting|artist|\bink\b|watercolou?r|sketch|anime ?screencap", re.I
    ),
    "character": re.compile(r"character|\bchar\b|\bwaifu\b|\boc\b|cosplay", re.I),
    "concept": re.compile(r"concept|\beffect\b|\bidea\b", re.I),
    "clothing": re.compile(
        r"outfit|costume|clothes|clothing|uniform|dress|armou?r|bikini|lingerie|kimono|suit\b", re.I
    ),
    "pose": re.compile(r"pose|posing|gesture|\bstance\b", re.I),
    "lighting": re.compile(
        r"light(ing)?\b|photoreal|realistic|cinematic|\bhdr\b|rim ?light|backlight|film ?grain", re.I
    ),
    "detail": re.compile(r"detail|quality|enhanc|\bfix\b|hands?\b|tweaker|sharp", re.I),
    "background": re.compile(r"background|scenery|landscape|\bscene\b|environment|interior|architecture", re.I),
}

_TAG_GROUPS: dict[str, re.Pattern] = {
    "character": re.compile(
        r"\b(hair|eyes|bangs|ahoge|twintails|ponytail|braid|sidelocks|horns|ears|freckles|"
        r"mole|scar|tail|wings|breasts|skin)\b"
    ),
    "clothing": re.compile(
        r"\b(shirt|skirt|dress|jacket|coat|uniform|armor|bikini|swimsuit|kimono|boots|gloves|"
        r"thighhighs|pantyhose|hat|hood|cape|sleeves|leotard|bodysuit|apron|outfit|costume)\b"
    ),
    "pose": re.compile(
        r"\b(sitting|standing|kneeling|lying|squatting|leaning|crossed|arms up|hand on|pose|"
        r"spread|from behind|from above|from below|jumping|bent over|stretching)\b"
    ),
    "lighting": re.compile(
        r"\b(lighting|light|backlighting|rim light|sunlight|shadow|dark|glow|glowing|neon|"
        r"volumetric|silhouette|chiaroscuro|cinematic)\b"
    ),
    "background": re.compile(
        r"\b(scenery|landscape|outdoors|indoors|city|building|room|sky|forest|street|"
        r"mountain|ocean|architecture|no humans)\b"
    ),
    "style": re.compile(
        r"\b(traditional media|watercolor|oil painting|sketch|lineart|monochrome|"
        r"greyscale|cel shading|pixel art|flat color|painting|illustration|3d|chibi)\b"
    ),
}


@dataclass
class Category:
    name: str
    confidence: float  # 0..1
    scores: dict[str, float] = field(default_factory=dict)
    evidence: list[str] = field(default_factory=list)

    @property
    def confidence_label(self) -> str:
        return "high" if self.confidence >= 0.7 else "medium" if self.confidence >= 0.45 else "low"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "confidence": round(self.confidence, 2),
            "confidence_label": self.confidence_label,
            "scores": {k: round(v, 2) for k, v in sorted(self.scores.items(), key=lambda kv: -kv[1]) if v > 0},
            "evidence": self.evidence,
        }


def classify(
    tr: Training, names: list[str], trigger: str | None, components: list[str], has_captions: bool
) -> Category:
    """Guess the category from names, metadata and what the captions share."""
    scores = dict.fromkeys(CATEGORIES, 0.0)
    ev: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    texts = [n for n in names if n]
    texts += [tr.modelspec.get(k, "") for k in ("tags", "description", "usage_hint")]
    comment = tr.value("ss_training_comment")
    if isinstance(comment, str):
        texts.append(comment)
    for cat, rx in _NAME_WORDS.items():
        for t in texts:
            m = rx.search(t.replace("_", " ")) or rx.search(t)
            if m:
                scores[cat] += 2.5
                ev[cat].append(f"{m.group(0)!r} in {t[:60]!r}")
                break
    module = str(tr.value("ss_network_module") or "")
    if "leco" in module.lower():
        scores["slider"] += 4
        ev["slider"].append(f"trained with {module}")
    if not has_captions and tr.trainer == "unknown" and scores["slider"] > 0:
        scores["slider"] += 1
        ev["slider"].append("no caption statistics (sliders are trained from prompt pairs, not images)")

    folders = [f for f in tr.folders if not f.is_reg and f.tags]
    total = sum(f.images or max(f.tags.values()) for f in folders) if folders else 0
    if total:
        merged: dict[str, int] = {}
        for f in folders:
            for t, c in f.tags.items():
                merged[t] = merged.get(t, 0) + c
        frequent = {t: c / total for t, c in merged.items() if c / total >= 0.5}
        for cat, rx in _TAG_GROUPS.items():
            hits = sorted((t for t in frequent if rx.search(t.lower())), key=lambda t: -frequent[t])
            if hits:
                w = min(3.0, 0.8 * len(hits))
                scores[cat] += w
                ev[cat].append(f"frequent tags {', '.join(hits[:4])}")
        if trigger and scores["character"] > 0:
            scores["character"] += 1.0
            ev["character"].append(f"a trigger ({trigger!r}) with fixed looks in most captions")
        spread = len(merged) / max(1, total)
        if not trigger and not frequent:
            scores["style"] += 1.5
            ev["style"].append("no tag in most captions: the images share a look, not a subject")
        elif not trigger and spread > 4:
            scores["style"] += 1.0
            ev["style"].append(f"diverse captions ({len(merged)} distinct tags over {total} images)")
    if trigger and not any(scores[c] for c in CATEGORIES if c != "unknown"):
        scores["concept"] += 1.0
        ev["concept"].append(f"a trigger ({trigger!r}) without other clues")
    if components == ["unet"] and scores["style"] > 0:
        scores["style"] += 0.5
        ev["style"].append("UNet only, typical of style LoRAs")

    best = max(scores, key=lambda c: scores[c])
    if scores[best] <= 0:
        return Category("unknown", 0.0, {}, ["no name, tag or metadata clue"])
    ranked = sorted(scores.values(), reverse=True)
    margin = ranked[0] - ranked[1]
    confidence = min(0.95, 0.3 + 0.1 * ranked[0] + 0.15 * margin)
    return Category(best, confidence, {c: v for c, v in scores.items() if v > 0}, ev[best])


def max_safe(category: str, table: dict[str, float] | None = None) -> float:
    t = {**DEFAULT_MAX_SAFE, **(table or {})}
    return float(t.get(category, t["unknown"]))


def cross_lineage_ceiling(
    lora: list[str], checkpoint: list[str], table: dict[str, float] | None = None
) -> tuple[float, str] | None:
    """The strength ceiling for a LoRA of one lineage on a checkpoint of another, with the pair; None if same/unknown."""
    if not lora or not checkpoint or set(lora) & set(checkpoint):
        return None
    t = {**DEFAULT_CROSS_LINEAGE, **(table or {})}
    best: tuple[float, str] | None = None
    for a in lora:
        for b in checkpoint:
            v = t.get(f"{a}>{b}", t.get("*>*"))
            if v is not None and (best is None or v < best[0]):
                art = "an" if b[:1].upper() in "AEIOU" else "a"
                best = (float(v), f"{a} LoRA on {art} {b} checkpoint")
    return best
