"""What a strength grid row shows: no visible effect, weak, healthy or overfit.

A row is one LoRA (or one epoch) at several strengths, each image compared with the
no-LoRA baseline of the same seed (:func:`lib_lorakit.gen.image.compare`). Measures are
averaged over seeds per strength. The thresholds are constants here and in the README.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# An image differs visibly from its baseline when either holds:
VISIBLE_MAD = 0.03  # mean absolute pixel difference (0–1) at or above this
VISIBLE_SSIM = 0.90  # or structural similarity at or below this
# "weak": the first visible strength is at or beyond this fraction of the highest strength tested
WEAK_FRACTION = 0.75
# "overfit" from the first strength where any of these holds (against the baseline of the same seed):
OVERFIT_SATURATION = 0.15  # mean saturation up by more than this (0–1)
OVERFIT_CLIPPED = 0.10  # clipped-pixel fraction up by more than this
OVERFIT_EDGES = 1.8  # high-frequency energy more than this many times the baseline's
# an image flagged black/blank/blown-out where the baseline was fine also counts as overfit

CASES = ("no-effect", "weak", "healthy", "overfit", "unjudged")


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarise(cells: Sequence[Mapping[str, Any]]) -> dict[float, dict[str, float]]:
    """Per strength, the seed-averaged measures. ``cells``: {strength, metrics, status, baseline_status}."""
    by: dict[float, list[Mapping[str, Any]]] = {}
    for c in cells:
        by.setdefault(float(c["strength"]), []).append(c)
    out: dict[float, dict[str, float]] = {}
    for s, cs in sorted(by.items()):
        ms = [c["metrics"] for c in cs if c.get("metrics")]
        row = {k: _mean([m[k] for m in ms]) for k in (ms[0].keys() if ms else ())}
        row["flagged"] = sum(c.get("status", "ok") != "ok" and c.get("baseline_status", "ok") == "ok" for c in cs)
        row["seeds"] = len(cs)
        out[s] = row
    return out


def judge(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The verdict for one row.

    ``cells``: one per (strength > 0, seed) with ``strength``, ``metrics`` (from ``compare`` against
    the baseline of its seed), ``status`` (the image's check) and ``baseline_status``.

    Returns {case, text, onset, overfit_from, per_strength}.
    """
    per = summarise([c for c in cells if float(c["strength"]) != 0.0])
    if not per:
        return {
            "case": "unjudged",
            "text": "no strengths above 0 were generated",
            "onset": None,
            "overfit_from": None,
            "per_strength": {},
        }
    if any(c.get("baseline_status", "ok") != "ok" for c in cells):
        bad = sorted({c.get("baseline_status") for c in cells if c.get("baseline_status", "ok") != "ok"})
        return {
            "case": "unjudged",
            "text": f"the baseline image is {'/'.join(bad)}: fix the prompt or checkpoint and generate again",
            "onset": None,
            "overfit_from": None,
            "per_strength": _round(per),
        }
    strengths = sorted(per)
    top = strengths[-1]
    onset = next((s for s in strengths if per[s]["mad"] >= VISIBLE_MAD or per[s]["ssim"] <= VISIBLE_SSIM), None)

    def overfit_reason(s: float) -> str | None:
        m = per[s]
        if m["flagged"]:
            return f"{int(m['flagged'])} of {int(m['seeds'])} image(s) black/blank/blown-out"
        if m["saturation"] - m["saturation_baseline"] > OVERFIT_SATURATION:
            return f"saturation {m['saturation']:.2f} vs {m['saturation_baseline']:.2f} at 0"
        if m["clipped"] - m["clipped_baseline"] > OVERFIT_CLIPPED:
            return f"{m['clipped']:.0%} of pixels clipped vs {m['clipped_baseline']:.0%} at 0"
        if m["edges_baseline"] > 0 and m["edges"] / m["edges_baseline"] > OVERFIT_EDGES:
            return f"high-frequency energy {m['edges'] / m['edges_baseline']:.1f}x the baseline's (artefacts)"
        return None

    over = next(((s, r) for s in strengths if (r := overfit_reason(s))), None)
    res: dict[str, Any] = {"onset": onset, "overfit_from": over[0] if over else None, "per_strength": _round(per)}
    if over:
        s, why = over
        healthy = [x for x in strengths if onset is not None and onset <= x < s]
        span = f"; usable {healthy[0]:g}–{healthy[-1]:g}" if healthy else ""
        res.update(case="overfit", text=f"overfit: saturation/artefacts from {s:g} ({why}){span}")
    elif onset is None:
        peak = max(strengths, key=lambda x: per[x]["mad"])
        res.update(
            case="no-effect",
            text=f"no visible effect up to {top:g} (largest change at {peak:g}: "
            f"mean abs diff {per[peak]['mad']:.3f} < {VISIBLE_MAD}, SSIM {per[peak]['ssim']:.3f} > {VISIBLE_SSIM})",
        )
    elif len(strengths) > 1 and onset >= WEAK_FRACTION * top:
        res.update(
            case="weak",
            text=f"weak until ≥ {onset:g} (mean abs diff {per[onset]['mad']:.3f}, "
            f"SSIM {per[onset]['ssim']:.3f} there; below it no visible change)",
        )
    else:
        lo, hi = per[onset], per[top]
        res.update(
            case="healthy",
            text=f"healthy: smooth change between {onset:g} and {top:g} (mean abs diff "
            f"{lo['mad']:.3f} → {hi['mad']:.3f}, SSIM {lo['ssim']:.3f} → {hi['ssim']:.3f}; no saturation or "
            "artefacts)",
        )
        jumps = [(a, b, per[b]["mad"] - per[a]["mad"]) for a, b in zip(strengths, strengths[1:])]
        if len(jumps) >= 2:
            a, b, d = max(jumps, key=lambda j: j[2])
            if d > 0.6 * max(1e-9, hi["mad"]) and hi["mad"] >= 2 * VISIBLE_MAD:
                res["text"] += f"; most of the change happens between {a:g} and {b:g}"
    return res


def _round(per: dict[float, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {f"{s:g}": {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()} for s, m in per.items()}
