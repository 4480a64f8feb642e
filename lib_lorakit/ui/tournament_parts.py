"""Pieces of the Tournament sub-tab that need no host: the blind viewer's markup, the JSON example, the
candidate form's rows and the scores table."""

from __future__ import annotations

import json

from .common import empty_table

VIEWER = """
<div id="lorakit-tour-view" class="lorakit-tour">
  <div id="lorakit-tour-head">Pick a tournament and type your evaluator name.</div>
  <div id="lorakit-tour-grid" class="lorakit-tour-grid"></div>
  <div id="lorakit-tour-flags" class="lorakit-warn"></div>
  <div class="lorakit-triage-buttons">
    <button disabled data-lorakit-tour="1">1st <kbd>1</kbd></button>
    <button disabled data-lorakit-tour="2">2nd <kbd>2</kbd></button>
    <button disabled data-lorakit-tour="3">3rd <kbd>3</kbd></button>
    <button disabled data-lorakit-tour="bomb" class="lorakit-no">Bomb <kbd>B</kbd></button>
    <button disabled data-lorakit-tour="submit" class="lorakit-yes">Save and next <kbd>Enter</kbd></button>
  </div>
  <div class="lorakit-triage-help">← → select · 1 2 3 rank · B bomb · X all bad · 0 no preference · Enter save and
    next · PgUp/PgDn move between prompts</div>
  <div id="lorakit-tour-status"></div>
</div>
"""


def example_spec(checkpoints: list[str]) -> str:
    """A JSON spec to start from, naming the host's own checkpoints (no made-up files)."""
    a = checkpoints[0] if checkpoints else "(a checkpoint from the list)"
    b = checkpoints[1] if len(checkpoints) > 1 else a
    return json.dumps(
        {
            "name": "next version",
            "candidates": [
                {"checkpoint": a, "control": True},
                {"checkpoint": b},
                {"id": "mix-70-30", "merge": {"models": [{"name": a, "weight": 0.7}, {"name": b, "weight": 0.3}]}},
            ],
            "prompts": ["(five or more prompts; empty settings come from the checkpoint's generation profile)"] * 5,
        },
        indent=1,
    )


FORM_HEADERS = ["#", "candidate", "kind"]


def _describe(row: dict) -> str:
    if row.get("merge"):
        return "merge " + ", ".join(f"{m['name']}×{m['weight']:g}" for m in row["merge"]["models"])
    s = str(row.get("checkpoint"))
    if row.get("loras"):
        s += " + " + str(row["loras"])
    return s


def _form_rows(rows: list[dict]) -> list[list] | dict:
    return [[i + 1, _describe(r), r.get("kind", "")] for i, r in enumerate(rows)] or empty_table(FORM_HEADERS)


def _merge_models(text: str) -> list[dict]:
    out = []
    for part in [x.strip() for x in (text or "").split(",") if x.strip()]:
        name, sep, w = part.rpartition(":")
        try:
            out.append({"name": name.strip(), "weight": float(w)} if sep else {"name": part, "weight": 1.0})
        except ValueError:
            out.append({"name": part, "weight": 1.0})
    return out


def scores_md(sc: dict) -> str:
    names = list(sc["schemes"])
    rows = ["| candidate | " + " | ".join(names) + " | BT 90% | P(best) |", "|---|" + "---:|" * (len(names) + 2)]
    bt = sc["bradley_terry"]
    if not sc.get("enough_votes", True):
        return (
            "" if sc["revealed"] else "*Blind: candidates are numbered until Reveal.*\n\n"
        ) + f"**{sc['separability']['text']}**"
    for c in sc["candidates"]:
        iv = bt["interval90"].get(c)
        interval = f"{iv[0]:+.2f} … {iv[1]:+.2f}" if iv else "—"
        pbest = f"{bt['p_best'][c]:.0%}" if c in bt["p_best"] else "—"
        rows.append(
            f"| {c} | " + " | ".join(f"{sc['schemes'][n][c]:.2f}" for n in names) + f" | {interval} | {pbest} |"
        )
    notes = [f"- {n}" for n in sc["notes"]]
    if sc["separability"].get("text") and sc["separability"]["text"] not in sc["notes"]:
        notes.append(f"- {sc['separability']['text']}")
    for c, v in (sc.get("versus_control") or {}).items():
        notes.append(f"- {c} beats the control in {v['beats']} of {v['prompts']} prompts")
    head = "" if sc["revealed"] else "*Blind: candidates are numbered until Reveal.*\n\n"
    return head + "\n".join(rows) + ("\n\n" + "\n".join(notes) if notes else "")
