"""Blind tournaments of checkpoints, checkpoint + LoRA recipes and merge recipes.

A tournament has candidates (exactly one of them the control — the previous version —
unless it is marked "first version, no control"), at least five prompts with fixed seeds,
and shared settings. Its images are made through the generation pipeline (one run folder,
a manifest, each checkpoint loaded once). Each evaluator sees, per prompt, the candidates
under neutral letters in an order shuffled for that prompt and that evaluator and stored;
recipes stay hidden until Reveal. Votes (1st/2nd/3rd, bombs, all bad, no preference) are
kept in SQLite as they are cast; scoring re-reads them under every scheme of
:mod:`lib_lorakit.eval.scoring`. Rounds go wide → narrow → dial-in with their lineage.
"""

from __future__ import annotations

import copy
import csv
import datetime as _dt
import hashlib
import io
import json
import random
import secrets
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import RecipeError
from ..gen.run import Cell, Run
from .scoring import Ballot, score
from .store import Store, TournamentRows

MIN_PROMPTS = 5
LETTERS = string.ascii_uppercase


class TournamentNotFound(RecipeError):
    http_status = 404


@dataclass
class Candidate:
    id: str  # short and unique within the tournament, e.g. "v3" or "mix-70-20-10"
    checkpoint: str | None = None  # a checkpoint name (for kind checkpoint/recipe)
    loras: list[dict[str, Any]] = field(default_factory=list)  # [{name, strength}] added as <lora:...> tags
    merge: dict[str, Any] | None = None  # {models: [{name, weight}], method, base, blocks, ...}: built first
    control: bool = False
    note: str = ""

    @property
    def kind(self) -> str:
        return "merge" if self.merge else ("recipe" if self.loras else "checkpoint")

    def recipe(self) -> str:
        if self.merge:
            ms = ", ".join(f"{m['name']}×{m.get('weight', 1):g}" for m in self.merge.get("models", []))
            s = f"merge({self.merge.get('method', 'weighted')}: {ms})"
        else:
            s = str(self.checkpoint)
        if self.loras:
            s += " + " + ", ".join(f"{x['name']}@{x.get('strength', 1):g}" for x in self.loras)
        return s


@dataclass
class TournamentSpec:
    name: str
    candidates: list[Candidate]
    prompts: list[dict[str, Any]]  # [{prompt, negative_prompt, seed}]
    settings: dict[str, Any] = field(default_factory=dict)
    first_version: bool = False  # no control: stated in the report
    profile: dict[str, Any] = field(default_factory=dict)  # the generation profile the settings came from

    def validate(self) -> None:
        if len(self.prompts) < MIN_PROMPTS:
            raise RecipeError(
                f"A tournament needs at least {MIN_PROMPTS} prompts; this one has {len(self.prompts)}.",
                fix="Fewer prompts pick winners from noise: add prompts that cover what the model must "
                "do well (portraits, full body, scenery, hands, text...).",
            )
        if any(not str(p.get("prompt", "")).strip() for p in self.prompts):
            raise RecipeError("A prompt of the tournament is empty.")
        if len(self.candidates) < 2:
            raise RecipeError("A tournament needs at least two candidates.")
        ids = [c.id for c in self.candidates]
        if len(set(ids)) != len(ids) or any(not i or len(i) > 80 for i in ids):
            raise RecipeError(f"Candidate ids must be unique and non-empty: {ids}.")
        if len(self.candidates) > len(LETTERS):
            raise RecipeError(f"At most {len(LETTERS)} candidates.")
        controls = [c for c in self.candidates if c.control]
        if self.first_version:
            if controls:
                raise RecipeError(
                    "Marked 'first version, no control', but a control is set.", fix="Unmark one of them."
                )
        elif len(controls) != 1:
            raise RecipeError(
                f"Exactly one candidate must be the control (the previous version); {len(controls)} are.",
                fix="Mark the version you ship today as the control, or mark the tournament "
                "'first version, no control' (the report will say so).",
            )
        for c in self.candidates:
            if not c.checkpoint and not c.merge:
                raise RecipeError(f"Candidate {c.id}: no checkpoint and no merge recipe.")

    def as_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "candidates": [asdict(c) for c in self.candidates],
            "prompts": self.prompts,
            "settings": self.settings,
            "first_version": self.first_version,
        }
        if self.profile:
            d["profile"] = self.profile
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TournamentSpec:
        return cls(
            name=d["name"],
            candidates=[Candidate(**c) for c in d["candidates"]],
            prompts=list(d["prompts"]),
            settings=dict(d.get("settings") or {}),
            first_version=bool(d.get("first_version")),
            profile=dict(d.get("profile") or {}),
        )

    def control(self) -> str | None:
        return next((c.id for c in self.candidates if c.control), None)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class Tournaments:
    """Tournament records, shuffles and votes in lorakit's SQLite store."""

    def __init__(self, store: Store):
        self.store = store
        self.rows = TournamentRows(store)

    def create(self, spec: TournamentSpec, *, parent: str | None = None, round_no: int = 1) -> str:
        spec.validate()
        tid = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        self.rows.create(tid, spec.name, spec.as_dict(), parent, round_no)
        return tid

    def get(self, tid: str) -> dict[str, Any]:
        d = self.rows.get(tid)
        if d is None:
            raise TournamentNotFound(f"No tournament {tid!r}.", fix="List the tournaments to see their ids.")
        return d

    def spec(self, tid: str) -> TournamentSpec:
        return TournamentSpec.from_dict(self.get(tid)["spec"])

    def list(self) -> list[dict[str, Any]]:
        return self.rows.list()

    def update(self, tid: str, **fields: Any) -> None:
        self.rows.update(tid, **fields)

    # --- blind ballots ----------------------------------------------------------------------------
    def order(self, tid: str, evaluator: str, prompt: int) -> list[str]:
        """The candidates' order for this evaluator and prompt (letters A, B, ... in this order); made once
        (seeded from a secret, not from the ids) and stored."""

        def make() -> list[str]:
            ids = [c["id"] for c in self.get(tid)["spec"]["candidates"]]
            random.Random(secrets.randbits(64)).shuffle(ids)
            return ids

        return self.rows.order(tid, evaluator, prompt, make)

    def vote(self, tid: str, evaluator: str, votes: Sequence[dict[str, Any]]) -> int:
        """Record votes ``{prompt, ranks: [letters], bombs: [letters], all_bad, no_preference, client, seq}``;
        letters are mapped through this evaluator's stored order. Returns how many were new."""
        if not str(evaluator or "").strip():
            raise ValueError("no evaluator name")
        n_prompts = len(self.get(tid)["spec"]["prompts"])
        rows = []
        for v in votes:
            p = int(v["prompt"])
            if not 0 <= p < n_prompts:
                raise ValueError(f"prompt {p} does not exist (the tournament has {n_prompts})")
            order = self.order(tid, evaluator, p)
            letter = {LETTERS[i]: c for i, c in enumerate(order)}

            def ids(xs: Sequence[str], what: str) -> list[str]:
                bad = [x for x in xs if x not in letter]
                if bad:
                    raise ValueError(f"{what}: {bad} are not letters of this ballot ({', '.join(letter)})")
                return [letter[x] for x in xs]

            ranks_given = list(v.get("ranks") or [])
            if len(ranks_given) > 3:
                raise ValueError(f"prompt {p}: {len(ranks_given)} ranks given ({', '.join(ranks_given)}); at most 3")
            ranks = ids(ranks_given, "ranks")
            bombs = ids(list(v.get("bombs") or []), "bombs")
            if len(set(ranks)) != len(ranks):
                raise ValueError(f"prompt {p}: a candidate is ranked twice")
            both = sorted(set(ranks_given) & set(v.get("bombs") or []))
            if both:
                raise ValueError(f"prompt {p}: {', '.join(both)} both ranked and bombed")
            rows.append(
                (
                    tid,
                    evaluator,
                    p,
                    json.dumps(ranks),
                    json.dumps(bombs),
                    int(bool(v.get("all_bad"))),
                    int(bool(v.get("no_preference"))),
                    str(v.get("client") or "server"),
                    int(v["seq"]) if v.get("seq") is not None else secrets.randbits(62),
                    _now(),
                )
            )
        return self.rows.add_votes(rows)

    def votes(self, tid: str) -> list[dict[str, Any]]:
        return self.rows.votes(tid)

    def ballots(self, tid: str) -> list[Ballot]:
        """The latest vote of every evaluator on every prompt."""
        latest: dict[tuple[str, int], dict[str, Any]] = {}
        for v in self.votes(tid):
            latest[(v["evaluator"], v["prompt"])] = v
        return [
            Ballot(
                prompt=str(p),
                evaluator=e,
                ranks=json.loads(v["ranks"]),
                bombs=json.loads(v["bombs"]),
                all_bad=bool(v["all_bad"]),
                no_preference=bool(v["no_preference"]),
            )
            for (e, p), v in sorted(latest.items())
        ]


# --- generation ---------------------------------------------------------------------------------------


def cells_for(spec: TournamentSpec, checkpoints: dict[str, str]) -> list[Cell]:
    """One cell per candidate and prompt; ``checkpoints``: candidate id -> the checkpoint it generates with."""
    out = []
    for pi, p in enumerate(spec.prompts):
        for c in spec.candidates:
            prompt = p["prompt"]
            for lo in c.loras:
                prompt += f", <lora:{lo['name']}:{float(lo.get('strength', 1.0)):g}>"
            out.append(
                Cell(
                    row=c.id,
                    col=f"p{pi}",
                    prompt=prompt,
                    negative_prompt=p.get("negative_prompt", ""),
                    seed=int(p.get("seed", 1000 + pi)),
                    checkpoint=checkpoints[c.id],
                    lora=c.loras[0]["name"] if c.loras else None,
                    strength=float(c.loras[0].get("strength", 1.0)) if c.loras else None,
                    settings=dict(spec.settings),
                    extra={"prompt": pi, "candidate": c.id},
                )
            )
    return out


def merged_name(tid: str, cand: Candidate) -> str:
    return f"lorakit-t{tid[-6:]}-{cand.id}"


def generate(
    tours: Tournaments,
    tid: str,
    backend,
    outputs_dir: str,
    *,
    build_merge: Callable[[Candidate, str], str] | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancel=None,
) -> dict[str, Any]:
    """Build the merge candidates (``build_merge(candidate, output_name) -> checkpoint name``), then make
    every image in the tournament's run folder (a second call fills only what is missing)."""
    from ..gen.run import execute

    rec = tours.get(tid)
    spec = TournamentSpec.from_dict(rec["spec"])
    ck: dict[str, str] = {}
    for c in spec.candidates:
        if c.merge:
            built = c.merge.get("built")
            if not built:
                if build_merge is None:
                    raise RecipeError(f"Candidate {c.id} is a merge recipe, and no merge builder is available here.")
                tours.update(tid, state="merging")
                built = build_merge(c, merged_name(tid, c))
                c.merge["built"] = built
                tours.update(tid, spec=spec.as_dict())
            ck[c.id] = built
        else:
            ck[c.id] = c.checkpoint
    run = Run(rec["run_dir"]) if rec.get("run_dir") else None
    if run is None:
        meta: dict[str, Any] = {"tournament": tid}
        if spec.profile:
            meta["profile"] = spec.profile
        run = Run.create(outputs_dir, "tournament", cells_for(spec, ck), meta=meta)
        tours.update(tid, run_dir=run.dir)
    tours.update(tid, state="generating")
    try:
        out = execute(run, backend, progress=progress, cancel=cancel)
    except BaseException:
        tours.update(tid, state="incomplete")
        raise
    tours.update(tid, state="ready" if out["missing"] == 0 and out["failed"] == 0 else "incomplete")
    from ..gen.grid import profile_record
    from ..gen.run import update_record

    return update_record(run, **profile_record(spec.settings, spec.profile))


# --- ballots for the UI -------------------------------------------------------------------------------


def ballot(tours: Tournaments, tid: str, evaluator: str) -> dict[str, Any]:
    """Everything an evaluator's screen needs, without revealing who is who (until Reveal)."""
    rec = tours.get(tid)
    spec = TournamentSpec.from_dict(rec["spec"])
    run = Run(rec["run_dir"]) if rec.get("run_dir") else None
    res = run.results() if run else {}
    by_cell = {(c.extra["candidate"], c.extra["prompt"]): c for c in (run.cells if run else [])}
    mine: dict[int, dict[str, Any]] = {}
    for v in tours.votes(tid):
        if v["evaluator"] == evaluator:
            mine[v["prompt"]] = v
    cands = {c.id: c for c in spec.candidates}
    prompts = []
    for pi, p in enumerate(spec.prompts):
        order = tours.order(tid, evaluator, pi)
        entries = []
        for i, cid in enumerate(order):
            cell = by_cell.get((cid, pi))
            ev = res.get(cell.key) if cell else None
            status = "missing" if ev is None else ("failed" if ev["status"] != "ok" else ev["check"]["status"])
            e = {
                "letter": LETTERS[i],
                "status": status,
                "image": f"{pi}/{LETTERS[i]}" if ev and ev["status"] == "ok" else None,
            }
            if rec["revealed"]:
                e.update(candidate=cid, recipe=cands[cid].recipe(), control=cands[cid].control)
            entries.append(e)
        v = mine.get(pi)
        voted = None
        if v:
            back = {c: LETTERS[i] for i, c in enumerate(order)}
            voted = {
                "ranks": [back[c] for c in json.loads(v["ranks"])],
                "bombs": [back[c] for c in json.loads(v["bombs"])],
                "all_bad": bool(v["all_bad"]),
                "no_preference": bool(v["no_preference"]),
            }
        prompts.append({"index": pi, "prompt": p["prompt"], "seed": p.get("seed"), "entries": entries, "vote": voted})
    return {
        "id": tid,
        "name": rec["name"],
        "state": rec["state"],
        "revealed": bool(rec["revealed"]),
        "evaluator": evaluator,
        "prompts": prompts,
        "voted": len(mine),
    }


def image_path(tours: Tournaments, tid: str, evaluator: str, prompt: int, letter: str) -> str:
    rec = tours.get(tid)
    if not rec.get("run_dir"):
        raise TournamentNotFound("The tournament has no images yet.")
    order = tours.order(tid, evaluator, prompt)
    i = LETTERS.find(letter.upper())
    if i < 0 or i >= len(order) or len(letter) != 1:
        raise TournamentNotFound(f"No image {letter!r} on this ballot.")
    run = Run(rec["run_dir"])
    cell = next(
        (c for c in run.cells if c.extra.get("candidate") == order[i] and c.extra.get("prompt") == prompt), None
    )
    ev = run.results().get(cell.key) if cell else None
    if not ev or ev["status"] != "ok":
        raise TournamentNotFound(f"Image {letter} of prompt {prompt} is not made (yet).")
    return run.image_path(ev)


# --- scores, report, rounds ----------------------------------------------------------------------------


def scores(tours: Tournaments, tid: str, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every scheme side by side. Before Reveal the candidates appear only as "candidate N" (an order that
    says nothing about the recipes)."""
    rec = tours.get(tid)
    spec = TournamentSpec.from_dict(rec["spec"])
    ids = [c.id for c in spec.candidates]
    ballots = tours.ballots(tid)
    control = spec.control()
    if not rec["revealed"]:
        hidden = sorted(ids, key=lambda x: hashlib.sha256((tid + x).encode()).hexdigest())
        alias = {c: f"candidate {i + 1}" for i, c in enumerate(hidden)}
        ballots = [
            Ballot(
                b.prompt,
                b.evaluator,
                [alias[x] for x in b.ranks],
                [alias[x] for x in b.bombs],
                b.all_bad,
                b.no_preference,
            )
            for b in ballots
        ]
        ids = [alias[c] for c in hidden]
        control = None  # which one is the control is part of what Reveal shows
    res = score(ballots, ids, control=control, resamples=resamples, seed=seed)
    res["revealed"] = bool(rec["revealed"])
    res["first_version"] = spec.first_version
    return res


def report_markdown(tours: Tournaments, tid: str) -> str:
    rec = tours.get(tid)
    if not rec["revealed"]:
        raise RecipeError("The report names the candidates: reveal the tournament first.")
    spec = TournamentSpec.from_dict(rec["spec"])
    sc = scores(tours, tid)
    run = Run(rec["run_dir"]) if rec.get("run_dir") else None
    lines = [f"# Tournament: {spec.name} (round {rec['round']})", ""]
    if spec.first_version:
        lines.append("**First version: no control.** Nothing here says whether this improves on anything.")
    else:
        lines.append(f"Control (the previous version): **{spec.control()}**.")
    lines += [
        "",
        f"{len(spec.prompts)} prompts, {sc['ballots']} ballots from "
        f"{len({b.evaluator for b in tours.ballots(tid)})} evaluator(s).",
        "",
        "| candidate | recipe | " + " | ".join(sc["schemes"]) + " | BT 90% interval | P(best) |",
        "|---|---|" + "---:|" * (len(sc["schemes"]) + 2),
    ]
    bt = sc["bradley_terry"]
    for c in spec.candidates:
        vals = " | ".join(f"{sc['schemes'][s][c.id]:.2f}" for s in sc["schemes"])
        iv = bt["interval90"].get(c.id)
        interval = f"{iv[0]:+.2f} … {iv[1]:+.2f}" if iv else "—"
        pbest = f"{bt['p_best'][c.id]:.0%}" if c.id in bt["p_best"] else "—"
        lines.append(
            f"| {c.id}{' (control)' if c.control else ''} | {c.recipe()} | {vals}{' | ' if vals else ''}"
            f"{interval} | {pbest} |"
        )
    lines += ["", "Leaders: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in sc["leaders"].items())]
    lines += [f"- {n}" for n in sc["notes"]]
    if sc["separability"].get("text"):
        lines.append(f"- {sc['separability']['text']}")
    if sc.get("versus_control"):
        lines += ["", "Against the control:", ""]
        for c, v in sc["versus_control"].items():
            lines.append(
                f"- {c} beats {spec.control()} in {v['beats']} of {v['prompts']} prompts "
                f"(loses {v['loses']}, ties {v['ties']})"
            )
    lines += [
        "",
        "## Per prompt",
        "",
        "| # | prompt | seed | " + " | ".join(c.id for c in spec.candidates) + " |",
        "|---|---|---:|" + "---|" * len(spec.candidates),
    ]
    ballots = tours.ballots(tid)
    res = run.results() if run else {}
    flags = {
        (c.extra["candidate"], c.extra["prompt"]): (res.get(c.key) or {}).get("check", {}).get("status", "")
        for c in (run.cells if run else [])
    }
    for pi, p in enumerate(spec.prompts):
        cells = []
        for c in spec.candidates:
            places = []
            for b in ballots:
                if b.prompt != str(pi):
                    continue
                if c.id in b.ranks:
                    places.append(str(b.ranks.index(c.id) + 1))
                elif c.id in b.bombs or b.all_bad:
                    places.append("B")
                else:
                    places.append("–")
            f = flags.get((c.id, pi), "")
            cells.append(",".join(places) + (f" ⚠{f}" if f not in ("", "ok") else ""))
        lines.append(f"| {pi + 1} | {p['prompt'][:60]} | {p.get('seed')} | " + " | ".join(cells) + " |")
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in spec.settings.items())]
    if spec.profile:
        lines.append(
            f"Profile: {spec.profile.get('label')} (`{spec.profile.get('profile')}`): {spec.profile.get('reason')}"
        )
    if run:
        pre = next((e for e in run.events() if e.get("event") == "preflight"), None)
        if pre:
            lines.append("Checkpoints: " + ", ".join(f"{v['name']} ({v['hash']})" for v in pre["checkpoints"].values()))
    return "\n".join(lines) + "\n"


def report_csv(tours: Tournaments, tid: str) -> str:
    rec = tours.get(tid)
    if not rec["revealed"]:
        raise RecipeError("The report names the candidates: reveal the tournament first.")
    spec = TournamentSpec.from_dict(rec["spec"])
    sc = scores(tours, tid)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["candidate", "recipe", "control", *sc["schemes"].keys(), "bt_low90", "bt_high90", "p_best"])
    bt = sc["bradley_terry"]
    for c in spec.candidates:
        lo, hi = bt["interval90"].get(c.id, ("", ""))
        w.writerow(
            [
                c.id,
                c.recipe(),
                c.control,
                *(round(sc["schemes"][s][c.id], 4) for s in sc["schemes"]),
                lo if lo == "" else round(lo, 4),
                hi if hi == "" else round(hi, 4),
                round(bt["p_best"][c.id], 4) if c.id in bt["p_best"] else "",
            ]
        )
    return buf.getvalue()


def _winner(sc: dict[str, Any]) -> str:
    """The Bradley–Terry leader; refused while no vote ranks anything."""
    if not sc["bradley_terry"]["log_strength"]:
        raise RecipeError("No winner yet: no vote ranks or bombs a candidate.", fix="Rank the prompts first.")
    return max(sc["bradley_terry"]["log_strength"].items(), key=lambda kv: kv[1])[0]


def propose_next(
    tours: Tournaments,
    tid: str,
    mode: str = "narrow",
    step: float = 0.1,
    axis: int | None = None,
    values: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Candidates for the next round from the winner (Bradley–Terry leader), the control carried over.

    ``narrow``: the winner and its neighbours (each merge weight or LoRA strength ± ``step``);
    ``dial-in``: one axis (ingredient ``axis``, default the last: the accent) swept over ``values``
    (default 0, 0.05, 0.1, 0.15, 0.2 of the total for a merge; 0.25 steps around a LoRA strength)."""
    rec = tours.get(tid)
    spec = TournamentSpec.from_dict(rec["spec"])
    sc = score(tours.ballots(tid), [c.id for c in spec.candidates], resamples=200)
    winner_id = _winner(sc)
    win = next(c for c in spec.candidates if c.id == winner_id)
    out: list[Candidate] = []
    control = next((c for c in spec.candidates if c.control), None)
    if control is not None:
        out.append(copy.deepcopy(control))
    base = copy.deepcopy(win)
    base.control = False
    if base.merge:
        base.merge.pop("built", None)
    if base.id != (control.id if control else None):
        out.append(base)

    def knobs(c: Candidate) -> list[tuple[str, int]]:
        if c.merge:
            return [("merge", i) for i in range(len(c.merge.get("models", [])))]
        return [("lora", i) for i in range(len(c.loras))]

    def get(c: Candidate, k: tuple[str, int]) -> float:
        return (
            float(c.merge["models"][k[1]].get("weight", 1))
            if k[0] == "merge"
            else float(c.loras[k[1]].get("strength", 1))
        )

    def put(c: Candidate, k: tuple[str, int], v: float) -> None:
        if k[0] == "merge":
            c.merge["models"][k[1]]["weight"] = round(v, 4)
        else:
            c.loras[k[1]]["strength"] = round(v, 4)

    ks = knobs(win)
    if not ks:
        raise RecipeError(
            f"The winner {win.id} is a plain checkpoint: there is no recipe to vary.",
            fix="Add candidates by hand for the next round.",
        )
    if mode == "narrow":
        for k in ks:
            for sign in (-1, 1):
                c = copy.deepcopy(base)
                v = get(c, k) + sign * step
                if v < 0:
                    continue
                put(c, k, v)
                c.id = f"{win.id}{'-' if sign < 0 else '+'}{k[0][0]}{k[1] + 1}"
                out.append(c)
    elif mode == "dial-in":
        k = ks[axis if axis is not None else -1]
        if values is None:
            cur = get(win, k)
            values = (
                [0, 0.05, 0.1, 0.15, 0.2] if k[0] == "merge" else [max(0.0, cur + d) for d in (-0.5, -0.25, 0.25, 0.5)]
            )
        for v in values:
            if abs(float(v) - get(win, k)) < 1e-9:
                continue  # that is the winner itself, already in
            c = copy.deepcopy(base)
            put(c, k, float(v))
            c.id = f"{win.id}@{k[0][0]}{k[1] + 1}={float(v):g}"
            if c.id not in [x.id for x in out]:
                out.append(c)
    else:
        raise RecipeError(f"Unknown round mode {mode!r}: narrow or dial-in.")
    return {
        "parent": tid,
        "round": rec["round"] + 1,
        "winner": winner_id,
        "mode": mode,
        "candidates": [asdict(c) for c in out],
        "prompts": spec.prompts,
        "settings": spec.settings,
        "first_version": spec.first_version,
    }


def lineage(tours: Tournaments, tid: str) -> list[dict[str, Any]]:
    """This tournament and its ancestors, oldest first."""
    chain = []
    cur: str | None = tid
    while cur:
        rec = tours.get(cur)
        chain.append(
            {
                "id": rec["id"],
                "round": rec["round"],
                "name": rec["name"],
                "state": rec["state"],
                "candidates": [Candidate(**c).recipe() for c in rec["spec"]["candidates"]],
            }
        )
        cur = rec.get("parent")
    return chain[::-1]


def contact_sheet(tours: Tournaments, tid: str, prompt: int, cell: int = 320):
    """One prompt's images side by side, labelled with the candidates (after Reveal), flags marked."""
    from PIL import Image, ImageDraw, ImageFont

    rec = tours.get(tid)
    if not rec["revealed"]:
        raise RecipeError("A contact sheet names the candidates: reveal the tournament first.")
    spec = TournamentSpec.from_dict(rec["spec"])
    if not 0 <= prompt < len(spec.prompts):
        raise TournamentNotFound(f"No prompt {prompt}.")
    run = Run(rec["run_dir"])
    res = run.results()
    cells = {c.extra["candidate"]: c for c in run.cells if c.extra.get("prompt") == prompt}
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:
        font = ImageFont.load_default()
    sheet = Image.new("RGB", (len(spec.candidates) * (cell + 8) + 8, cell + 58), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    d.text(
        (8, 6),
        f"{prompt + 1}. {spec.prompts[prompt]['prompt'][:120]} (seed {spec.prompts[prompt].get('seed')})",
        fill=(0, 0, 0),
        font=font,
    )
    for i, cand in enumerate(spec.candidates):
        x = 8 + i * (cell + 8)
        ev = res.get(cells[cand.id].key) if cand.id in cells else None
        if ev and ev["status"] == "ok":
            sheet.paste(run.load_image(ev).convert("RGB").resize((cell, cell)), (x, 28))
            flag = ev["check"]["status"]
        else:
            d.rectangle([x, 28, x + cell - 1, 28 + cell - 1], fill=(230, 230, 230))
            flag = "failed" if ev else "missing"
        label = cand.id + (" (control)" if cand.control else "") + ("" if flag == "ok" else f" [{flag.upper()}]")
        d.text((x, cell + 34), label[:40], fill=(160, 0, 0) if flag != "ok" else (0, 0, 0), font=font)
    return sheet


def winner_recipe(tours: Tournaments, tid: str) -> dict[str, Any]:
    """The Bradley–Terry winner as a request for the Bake or Merge routes (after Reveal)."""
    rec = tours.get(tid)
    if not rec["revealed"]:
        raise RecipeError("The winner's recipe names it: reveal the tournament first.")
    spec = TournamentSpec.from_dict(rec["spec"])
    sc = scores(tours, tid, resamples=200)
    win = _winner(sc)
    c = next(x for x in spec.candidates if x.id == win)
    out: dict[str, Any] = {"candidate": c.id, "recipe": c.recipe(), "kind": c.kind}
    if c.merge:
        m = {k: v for k, v in c.merge.items() if k != "built"}
        out["merge"] = {
            "models": m["models"],
            "method": m.get("method", "weighted"),
            "base": m.get("base"),
            "blocks": m.get("blocks"),
            "output": f"{spec.name}-{c.id}".replace(" ", "_"),
        }
        if c.merge.get("built"):
            out["built_checkpoint"] = c.merge["built"]
    if c.loras:
        out["bake"] = {
            "base": c.merge.get("built") if c.merge else c.checkpoint,
            "loras": [{"name": x["name"], "strength": x.get("strength", 1.0)} for x in c.loras],
            "output": f"{spec.name}-{c.id}-baked".replace(" ", "_"),
        }
    return out
