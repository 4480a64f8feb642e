"""Scoring blind tournament votes under several schemes, with uncertainty.

A ballot is one evaluator's verdict on one prompt: up to three candidates ranked 1st, 2nd,
3rd, a set of bombs (unusable images), or "all bad" / "no preference". The same ballots are
scored side by side:

- **standard** 3/2/1 points for 1st/2nd/3rd;
- **win-heavy** (default 5/2/1);
- **never-bombs**: +1 for every top-3 place, −2 for every bomb (shipping quality: it rewards a
  candidate that is always good enough over one that sometimes fails);
- **average rank**: ranked candidates take their rank; unranked ones share the ranks after
  them, bombed ones the last ranks (lower is better);
- **Bradley–Terry** strengths from the preferences a ballot implies (1st > 2nd > 3rd >
  unranked > bombed), fitted by Hunter's MM algorithm with half a pseudo-win each way per
  pair, and a seeded bootstrap over prompts (≥ 1,000 resamples) for a 90 % interval of each
  log-strength and P(best).

The summary says where the schemes disagree, whether the leader is separable from the
runner-up (and roughly how many prompts would make it so), and how each candidate fared
against the control.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Z90 = 1.2815515655446004  # one-sided 90 %


@dataclass
class Ballot:
    prompt: str  # prompt id
    evaluator: str
    ranks: list[str] = field(default_factory=list)  # candidate ids, best first (at most 3)
    bombs: list[str] = field(default_factory=list)
    all_bad: bool = False
    no_preference: bool = False

    def tiers(self, candidates: Sequence[str]) -> list[list[str]]:
        """Candidates grouped best tier first: each ranked one alone, then the unranked, then the bombed."""
        if self.no_preference:
            return [list(candidates)]
        if self.all_bad:
            return [list(candidates)]
        bombs = [c for c in candidates if c in self.bombs and c not in self.ranks]
        ranked = [c for c in self.ranks if c in candidates]
        rest = [c for c in candidates if c not in ranked and c not in bombs]
        return [[c] for c in ranked] + ([rest] if rest else []) + ([bombs] if bombs else [])


MIN_PROMPTS_FOR_UNCERTAINTY = 3  # a bootstrap over fewer prompts than this states no uncertainty


def points(ballots: Sequence[Ballot], candidates: Sequence[str], table: Sequence[float]) -> dict[str, float]:
    out = {c: 0.0 for c in candidates}
    for b in ballots:
        if b.no_preference or b.all_bad:
            continue
        for place, c in enumerate(b.ranks[: len(table)]):
            if c in out:
                out[c] += table[place]
    return out


def never_bombs(
    ballots: Sequence[Ballot], candidates: Sequence[str], place: float = 1.0, bomb: float = -2.0
) -> dict[str, float]:
    out = {c: 0.0 for c in candidates}
    for b in ballots:
        if b.no_preference:
            continue
        if b.all_bad:
            for c in candidates:
                out[c] += bomb
            continue
        for c in b.ranks[:3]:
            if c in out:
                out[c] += place
        for c in b.bombs:
            if c in out and c not in b.ranks:
                out[c] += bomb
    return out


def average_rank(ballots: Sequence[Ballot], candidates: Sequence[str]) -> dict[str, float]:
    tot = {c: 0.0 for c in candidates}
    n = 0
    for b in ballots:
        n += 1
        pos = 1
        for tier in b.tiers(candidates):
            shared = (pos + pos + len(tier) - 1) / 2  # the tier shares ranks pos .. pos+len-1
            for c in tier:
                tot[c] += shared
            pos += len(tier)
    return {c: (tot[c] / n if n else float("nan")) for c in candidates}


def wins_matrix(ballots: Sequence[Ballot], candidates: Sequence[str]) -> np.ndarray:
    """W[i, j]: how often candidate i was preferred to j (every pair of tiers of every ballot)."""
    idx = {c: i for i, c in enumerate(candidates)}
    w = np.zeros((len(candidates), len(candidates)))
    for b in ballots:
        tiers = b.tiers(candidates)
        for a in range(len(tiers)):
            for z in range(a + 1, len(tiers)):
                for hi in tiers[a]:
                    for lo in tiers[z]:
                        w[idx[hi], idx[lo]] += 1
    return w


def bradley_terry(w: np.ndarray, prior: float = 0.5, iters: int = 2000, tol: float = 1e-10) -> np.ndarray:
    """Log-strengths (mean 0) from a wins matrix, by the MM algorithm with ``prior`` pseudo-wins each way."""
    k = w.shape[0]
    if k == 1:
        return np.zeros(1)
    w = w + prior * (1 - np.eye(k))
    n = w + w.T
    wins = w.sum(axis=1)
    p = np.ones(k)
    for _ in range(iters):
        denom = (n / (p[:, None] + p[None, :])).sum(axis=1)
        new = wins / denom
        new /= np.exp(np.log(new).mean())
        if np.max(np.abs(new - p)) < tol:
            p = new
            break
        p = new
    lp = np.log(p)
    return lp - lp.mean()


def bootstrap_bt(
    ballots: Sequence[Ballot], candidates: Sequence[str], resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Bradley–Terry log-strengths with a bootstrap over prompts: point estimate, 90 % interval, P(best),
    and the resampled strengths (for separability)."""
    prompts = sorted({b.prompt for b in ballots})
    by_prompt = {p: [b for b in ballots if b.prompt == p] for p in prompts}
    per_prompt = {p: wins_matrix(by_prompt[p], candidates) for p in prompts}
    total = sum(per_prompt.values()) if prompts else np.zeros((len(candidates),) * 2)
    est = bradley_terry(total)
    rng = np.random.default_rng(seed)
    samples = np.zeros((resamples, len(candidates)))
    stack = np.stack([per_prompt[p] for p in prompts]) if prompts else None
    for r in range(resamples):
        if stack is None:
            break
        pick = rng.integers(0, len(prompts), len(prompts))
        samples[r] = bradley_terry(stack[pick].sum(axis=0))
    lo, hi = np.percentile(samples, [5, 95], axis=0) if prompts else (est, est)
    best = np.bincount(np.argmax(samples, axis=1), minlength=len(candidates)) / max(1, resamples)
    return {
        "log_strength": {c: float(est[i]) for i, c in enumerate(candidates)},
        "interval90": {c: (float(lo[i]), float(hi[i])) for i, c in enumerate(candidates)},
        "p_best": {c: float(best[i]) for i, c in enumerate(candidates)},
        "samples": samples,
        "prompts": len(prompts),
    }


def versus(ballots: Sequence[Ballot], candidates: Sequence[str], control: str) -> dict[str, dict[str, int]]:
    """Per candidate: in how many prompts it beat the control, lost to it, or tied (majority of evaluators)."""
    out: dict[str, dict[str, int]] = {}
    prompts = sorted({b.prompt for b in ballots})
    for c in candidates:
        if c == control:
            continue
        rec = {"beats": 0, "loses": 0, "ties": 0, "prompts": len(prompts)}
        for p in prompts:
            score = 0
            for b in ballots:
                if b.prompt != p:
                    continue
                tiers = b.tiers(candidates)
                tc = next(i for i, t in enumerate(tiers) if c in t)
                tk = next(i for i, t in enumerate(tiers) if control in t)
                score += (tc < tk) - (tc > tk)
            rec["beats" if score > 0 else "loses" if score < 0 else "ties"] += 1
        out[c] = rec
    return out


def score(
    ballots: Sequence[Ballot],
    candidates: Sequence[str],
    *,
    control: str | None = None,
    win_heavy: Sequence[float] = (5, 2, 1),
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every scheme side by side, with the leaders, disagreements, separability and the control comparison.

    With no ballot there are no scores ("not enough votes yet"); with fewer than
    :data:`MIN_PROMPTS_FOR_UNCERTAINTY` prompts where a vote ranks or bombs there are scores but no intervals or
    P(best) — a bootstrap over one or two prompts would claim a certainty it does not have. Never NaN.
    """
    voted = len({b.prompt for b in ballots if b.ranks or b.bombs})  # prompts where a vote tells candidates apart
    if not ballots:
        text = (
            f"Not enough votes yet: no ballot has been cast. Rank at least {MIN_PROMPTS_FOR_UNCERTAINTY} prompts "
            f"to see scores with their uncertainty."
        )
        return {
            "candidates": list(candidates),
            "schemes": {},
            "leaders": {},
            "enough_votes": False,
            "bradley_terry": {"log_strength": {}, "interval90": {}, "p_best": {}, "prompts": 0},
            "separability": {"leader": None, "runner_up": None, "separable": False, "p_ahead": None, "text": text},
            "notes": [text],
            "ballots": len(ballots),
            "prompts": 0,
        }
    schemes: dict[str, dict[str, float]] = {
        "standard 3/2/1": points(ballots, candidates, (3, 2, 1)),
        f"win-heavy {'/'.join(f'{x:g}' for x in win_heavy)}": points(ballots, candidates, win_heavy),
        "never-bombs": never_bombs(ballots, candidates),
        "average rank": average_rank(ballots, candidates),
    }
    bt = bootstrap_bt(ballots, candidates, resamples=resamples, seed=seed)
    schemes["Bradley-Terry"] = bt["log_strength"]
    leaders: dict[str, list[str]] = {}
    for name, vals in schemes.items():
        if not vals:
            continue
        better = min if name == "average rank" else max
        top = better(vals.values())
        leaders[name] = [c for c, v in vals.items() if math.isclose(v, top, rel_tol=1e-9, abs_tol=1e-9)]
    notes: list[str] = []
    firsts = {tuple(v) for v in leaders.values()}
    if len(firsts) > 1:
        notes.append(
            "The schemes disagree on the winner: "
            + "; ".join(f"{k}: {' = '.join(v)}" for k, v in leaders.items())
            + "."
        )
    for name, v in leaders.items():
        if len(v) > 1:
            others = [k for k, w in leaders.items() if len(w) == 1 and set(w) <= set(v)]
            tail = f" ({', '.join(others)} separate them)" if others else ""
            notes.append(f"{name}: a tie between {' and '.join(v)}{tail}.")
    if voted < MIN_PROMPTS_FOR_UNCERTAINTY:
        bt = {**bt, "interval90": {}, "p_best": {}}
        text = (
            f"Only {voted} prompt(s) ranked: too few to say how sure the order is (intervals and P(best) need "
            f"at least {MIN_PROMPTS_FOR_UNCERTAINTY})."
        )
        sep = {"leader": None, "runner_up": None, "separable": False, "p_ahead": None, "text": text}
        notes.append(text)
    else:
        sep = separability(bt, candidates)
        if sep["leader"] and not sep["separable"]:
            notes.append(sep["text"])
    res = {
        "candidates": list(candidates),
        "schemes": schemes,
        "leaders": leaders,
        "bradley_terry": {k: v for k, v in bt.items() if k != "samples"},
        "separability": sep,
        "notes": notes,
        "ballots": len(ballots),
        "prompts": bt["prompts"],
        "enough_votes": True,
    }
    if control:
        res["versus_control"] = versus(ballots, candidates, control)
    return res


def separability(bt: Mapping[str, Any], candidates: Sequence[str]) -> dict[str, Any]:
    """Is the Bradley–Terry leader ahead of the runner-up in ≥ 90 % of resamples? If not, an estimate of
    the prompts needed (the gap's z-score grows with the square root of the prompts)."""
    ls = bt["log_strength"]
    order = sorted(candidates, key=lambda c: -ls[c])
    if len(order) < 2 or not bt["prompts"]:
        return {"leader": order[0] if order else None, "runner_up": None, "separable": True, "p_ahead": 1.0, "text": ""}
    a, b = order[0], order[1]
    ia, ib = list(candidates).index(a), list(candidates).index(b)
    diff = bt["samples"][:, ia] - bt["samples"][:, ib]
    p_ahead = float((diff > 0).mean())
    n = bt["prompts"]
    sd = float(diff.std())
    z = (ls[a] - ls[b]) / sd if sd > 0 else float("inf")
    separable = p_ahead >= 0.9
    need = None
    if not separable:
        need = int(math.ceil(n * (Z90 / z) ** 2)) if z > 1e-9 else None
    text = f"{a} leads {b} in {p_ahead:.0%} of bootstrap resamples over {n} prompts" + (
        ""
        if separable
        else (
            f": not separable yet; add prompts (about {need} in all, {max(0, need - n)} more, if the gap holds)"
            if need
            else ": no measurable gap; add prompts"
        )
    )
    return {
        "leader": a,
        "runner_up": b,
        "separable": separable,
        "p_ahead": p_ahead,
        "prompts_needed": need,
        "text": text,
    }
