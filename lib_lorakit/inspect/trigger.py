"""The real trigger of a LoRA, and whether the LoRA needs it (trigger-dependent) or not (passive).

The WebUI shows a LoRA's most frequent training tags as "trigger words"; those are
``1girl, solo, long hair`` — what the images have in common, not what activates the
LoRA. A trigger is a tag that (1) sits in (nearly) every caption, (2) is rare as text, so
the text encoder had nothing attached to it before training (a made-up word splits into
several CLIP tokens), and usually (3) comes first in the captions (kohya's keep_tokens
pins it there) or names the image folder / the LoRA itself. Each candidate carries the
evidence for its score; below the threshold the answer is "no trigger".
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

from .metadata import Training
from .tokens import ClipBPE, is_generic, rarity

TRIGGER_THRESHOLD = 3.0
MIN_SHARE = 0.6  # a trigger is in (nearly) every caption of its folder


@dataclass
class Candidate:
    tag: str
    share: float  # of the training images (non-regularisation folders)
    count: int
    score: float = 0.0
    evidence: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "share": round(self.share, 3),
            "count": self.count,
            "score": round(self.score, 2),
            "evidence": self.evidence,
        }


@dataclass
class Verdict:
    trigger: str | None
    candidates: list[Candidate]
    reason: str  # why this trigger, or why none
    kind: str  # "passive" | "trigger-dependent"
    kind_evidence: list[str]
    baking: str  # what the kind means for baking


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


@functools.lru_cache(maxsize=1 << 16)
def _norm(s: str) -> str:
    return _NON_ALNUM.sub("", s.lower())


def _name_hit(tag: str, names: list[str]) -> str | None:
    t = _norm(tag)
    if len(t) < 3:
        return None
    for n in names:
        nn = _norm(n)
        if len(nn) >= 3 and (t in nn or (len(nn) >= 4 and nn in t)):
            return n
    return None


def rank_candidates(
    tr: Training,
    names: list[str],
    bpe: ClipBPE | None,
    collection_counts: dict[str, int] | None = None,
    collection_size: int = 0,
) -> list[Candidate]:
    """Score every tag that is in most captions of some training folder.

    Args:
        tr: parsed training metadata.
        names: the file name, output name and title, for "the tag names the LoRA".
        bpe: CLIP's tokenizer when available (rarity by token split), else an estimate.
        collection_counts: tag -> number of LoRAs in the scanned collection whose top tags include it.
        collection_size: how many LoRAs were scanned together.
    """
    folders = [f for f in tr.folders if not f.is_reg and f.tags]
    if not folders:
        return []
    total_images = sum(f.images or max(f.tags.values()) for f in folders)
    counts: dict[str, int] = {}
    for f in folders:
        for t, c in f.tags.items():
            counts[t] = counts.get(t, 0) + c
    # the tags each folder's captions start with (kept in place by keep_tokens): one set per folder
    first = [
        set(list(f.tags)[: max(1, f.keep_tokens if f.keep_tokens is not None else tr.keep_tokens)]) for f in folders
    ]
    cands: list[Candidate] = []
    for tag, count in counts.items():
        share = min(1.0, count / total_images) if total_images else 0.0
        if share < MIN_SHARE * 0.5:
            continue
        c = Candidate(tag=tag, share=share, count=count)
        c.score += 2.0 * share
        c.evidence.append(f"in {count} of {total_images} captions ({share:.0%})")
        if is_generic(tag):
            c.score -= 4.0
            c.evidence.append("a generic description/quality tag, never a trigger")
        r, why = rarity(tag, bpe)
        c.score += 2.0 * r
        c.evidence.append(f"rarity {r:.2f}: {why}")
        for f, lead in zip(folders, first):
            keep = f.keep_tokens if f.keep_tokens is not None else tr.keep_tokens
            if tag in lead:
                c.score += 1.5 if keep >= 1 else 1.0
                c.evidence.append(
                    f"first tag of folder {f.name!r}'s captions"
                    + (f" (kept in place by keep_tokens={keep})" if keep >= 1 else "")
                )
                break
        for f in folders:
            if f.class_tokens and (
                _norm(tag) == _norm(f.class_tokens) or _norm(tag) in {_norm(w) for w in f.class_tokens.split()}
            ):
                c.score += 2.0
                c.evidence.append(f"is the class token of folder {f.name!r}")
                break
        hit = _name_hit(tag, names)
        if hit:
            c.score += 1.5
            c.evidence.append(f"matches the LoRA's name {hit!r}")
        if collection_counts and collection_size >= 5:
            n = collection_counts.get(tag, 0)
            if n > max(2, collection_size // 20):
                c.score -= 2.0
                c.evidence.append(f"also a top tag of {n} of the {collection_size} LoRAs scanned with it")
        if share < MIN_SHARE:
            c.score -= 1.0
            c.evidence.append(f"missing from {1 - share:.0%} of the captions")
        cands.append(c)
    for trig, src in tr.declared_triggers:
        for c in cands:
            if _norm(c.tag) and _norm(c.tag) in _norm(trig):
                c.score += 3.0
                c.evidence.append(f"declared by the author in {src}")
    cands.sort(key=lambda c: (-c.score, -c.share, c.tag))
    return cands


def decide(tr: Training, cands: list[Candidate], components: list[str]) -> Verdict:
    """Pick the trigger (or none) and classify the LoRA as passive or trigger-dependent."""
    top = cands[0] if cands else None
    trigger = None
    if tr.declared_triggers and not (top and top.score >= TRIGGER_THRESHOLD):
        trigger, src = tr.declared_triggers[0]
        reason = (
            f"declared by the author in {src} (the captions do not confirm it)"
            if cands
            else f"declared by the author in {src} (no caption statistics in the file)"
        )
    elif top and top.score >= TRIGGER_THRESHOLD and top.share >= MIN_SHARE and not is_generic(top.tag):
        trigger = top.tag
        reason = f"{top.tag!r}: " + "; ".join(e for e in top.evidence if not e.startswith("rarity 0.00"))
        if (
            len(cands) > 1
            and cands[1].score >= TRIGGER_THRESHOLD
            and cands[1].share >= MIN_SHARE
            and not is_generic(cands[1].tag)
        ):
            reason += f". Runner-up {cands[1].tag!r} (score {cands[1].score:.1f}) may be part of it."
    elif not cands:
        reason = "no trigger: the file has no caption statistics (ss_tag_frequency) and no declared trigger"
    else:
        best = top.tag if top else ""
        reason = (
            (
                f"no trigger: no tag is both in nearly every caption and rare, first or named after the LoRA "
                f"(best {best!r} scored {top.score:.1f} < {TRIGGER_THRESHOLD})"
            )
            if top
            else "no trigger"
        )

    dep, pas = [], []
    if trigger:
        dep.append(f"a dominant activation tag {trigger!r}")
    elif cands:
        pas.append("captions carry no dominant rare tag (diffuse tags)")
    te = [c for c in components if c in ("te1", "te2")]
    if te:
        dep.append(f"the text encoder{'s' if len(te) > 1 else ''} ({', '.join(te)}) were trained")
    elif components:
        pas.append("UNet only (no text-encoder modules)")
    if tr.keep_tokens >= 1:
        dep.append(f"keep_tokens = {tr.keep_tokens} (the first caption tag was pinned)")
    score = len(dep) - len(pas) + (1 if trigger else 0)
    kind = "trigger-dependent" if trigger and score >= 1 else "passive"
    if kind == "trigger-dependent":
        baking = (
            f"Baked into a checkpoint it stays tied to {trigger!r}: without the trigger in the prompt the effect "
            "is weak. Keep it as a runtime LoRA, or bake and always prompt the trigger."
        )
    else:
        baking = "Works without a trigger word, so it bakes cleanly: the baked model shows it in every image."
    return Verdict(
        trigger=trigger,
        candidates=cands,
        reason=reason,
        kind=kind,
        kind_evidence=[f"+ {d}" for d in dep] + [f"- {p}" for p in pas],
        baking=baking,
    )


MULTI_MIN_RARITY = 0.3  # not an everyday caption word
MULTI_MIN_SHARE = 0.2  # a concept of a multi-concept LoRA is in at least this share of its folder's captions


def find_triggers(
    tr: Training,
    names: list[str],
    bpe: ClipBPE | None,
    collection_counts: dict[str, int] | None = None,
    collection_size: int = 0,
) -> list[dict[str, Any]]:
    """The triggers of a multi-concept LoRA (two characters, each with its own word), or [] for one concept.

    kohya records tag counts per image folder, not per image, so the concepts are found two ways:
    each folder decided on its own (a folder per character, the usual layout), and, inside one folder,
    rare tags that each sit in part of the captions and together cover (nearly) all of them.
    Each trigger comes with its evidence and its share of the training images.
    """
    folders = [f for f in tr.folders if not f.is_reg and f.tags]
    sizes = {f.name: f.images or max(f.tags.values()) for f in folders}
    total = sum(sizes.values())
    found: dict[str, dict[str, Any]] = {}

    def add(tag: str, images: int, folder: str, why: str) -> None:
        e = found.setdefault(tag, {"tag": tag, "images": 0, "folders": [], "evidence": []})
        e["images"] += images
        e["folders"].append(folder)
        e["evidence"].append(why)

    if len(folders) >= 2:
        for f in folders:
            sub = Training(trainer=tr.trainer, fields=tr.fields, folders=[f], keep_tokens=tr.keep_tokens)
            cands = rank_candidates(sub, names + [f.name], bpe, collection_counts, collection_size)
            v = decide(sub, cands, [])
            if v.trigger:
                add(v.trigger, sizes[f.name], f.name, f"folder {f.name!r}: {v.reason}")
    for f in folders:
        n = sizes[f.name]
        rare = []
        for t, c in f.tags.items():
            share = c / n if n else 0.0
            if MULTI_MIN_SHARE <= share < MIN_SHARE and not is_generic(t):
                r, why = rarity(t, bpe)
                if r >= MULTI_MIN_RARITY:
                    rare.append((t, c, share, r, why))
        if len(rare) >= 2 and sum(x[2] for x in rare) >= 0.8:
            for t, c, share, r, why in rare:
                add(
                    t,
                    c,
                    f.name,
                    f"in {c} of {n} captions of folder {f.name!r} ({share:.0%}), rarity {r:.2f} ({why}); "
                    f"with {', '.join(repr(x[0]) for x in rare if x[0] != t)} it splits the folder's images",
                )
    out = sorted(found.values(), key=lambda e: (-e["images"], e["tag"]))
    for e in out:
        e["share"] = round(min(1.0, e["images"] / total), 3) if total else None
    return out if len(out) >= 2 else []
