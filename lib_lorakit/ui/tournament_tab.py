"""Tournament sub-tab: create and generate (WebUI), rank blind by keyboard, reveal, scores, report, rounds.

The blind ranking runs in the browser (``javascript/lorakit_tournament.js``) against the
``/lorakit/v1/tournaments`` routes; this module builds the controls around it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import gradio as gr

from ..errors import LorakitError
from ..gen.profiles import default_settings
from ..ops import tournament as tour_op
from ..ops.context import HostContext
from .common import POLL_S, error_md, progress_html

VIEWER = """
<div id="lorakit-tour-view" class="lorakit-tour">
  <div id="lorakit-tour-head">Pick a tournament and type your evaluator name.</div>
  <div id="lorakit-tour-grid" class="lorakit-tour-grid"></div>
  <div id="lorakit-tour-flags" class="lorakit-warn"></div>
  <div class="lorakit-triage-buttons">
    <button data-lorakit-tour="1">1st <kbd>1</kbd></button>
    <button data-lorakit-tour="2">2nd <kbd>2</kbd></button>
    <button data-lorakit-tour="3">3rd <kbd>3</kbd></button>
    <button data-lorakit-tour="bomb" class="lorakit-no">Bomb <kbd>B</kbd></button>
    <button data-lorakit-tour="submit" class="lorakit-yes">Save and next <kbd>Enter</kbd></button>
  </div>
  <div class="lorakit-triage-help">← → select · 1 2 3 rank · B bomb · X all bad · 0 no preference · Enter save and
    next · PgUp/PgDn move between prompts</div>
  <div id="lorakit-tour-status"></div>
</div>
"""

EXAMPLE = json.dumps({
    "name": "v4 candidates",
    "candidates": [
        {"id": "v3", "checkpoint": "my_model_v3.safetensors", "control": True},
        {"id": "mix-70-20-10", "merge": {"models": [{"name": "my_model_v3.safetensors", "weight": 0.7},
                                                    {"name": "secondary.safetensors", "weight": 0.2},
                                                    {"name": "accent.safetensors", "weight": 0.1}]}},
        {"id": "v3+detail", "checkpoint": "my_model_v3.safetensors", "loras": [{"name": "detail", "strength": 0.5}]}],
    "prompts": [{"prompt": p, "negative_prompt": "lowres, blurry", "seed": 1000 + i} for i, p in enumerate([
        "portrait of a woman, upper body, soft light", "a knight in armour, full body, castle background",
        "a cat on a windowsill, morning light", "a busy street at night, neon signs, rain",
        "hands holding a cup of coffee, close-up"])],
    "settings": {**default_settings(), "cfg_scale": 6, "width": 832, "height": 1216},
}, indent=1)


def _choices(service: HostContext) -> list[str]:
    return [f"{t['id']} · r{t['round']} · {t['name']} ({t['state']}{', revealed' if t['revealed'] else ''})"
            for t in tour_op.tournaments(service)]


PROPOSAL_ONLY = ("parent", "round", "winner", "mode", "id")


def _tid(choice: str | None) -> str:
    return (choice or "").split(" · ")[0].strip()


def scores_md(sc: dict) -> str:
    names = list(sc["schemes"])
    rows = ["| candidate | " + " | ".join(names) + " | BT 90% | P(best) |", "|---|" + "---:|" * (len(names) + 2)]
    bt = sc["bradley_terry"]
    if not sc.get("enough_votes", True):
        return ("" if sc["revealed"] else "*Blind: candidates are numbered until Reveal.*\n\n") + \
            f"**{sc['separability']['text']}**"
    for c in sc["candidates"]:
        iv = bt["interval90"].get(c)
        interval = f"{iv[0]:+.2f} … {iv[1]:+.2f}" if iv else "—"
        pbest = f"{bt['p_best'][c]:.0%}" if c in bt["p_best"] else "—"
        rows.append(f"| {c} | " + " | ".join(f"{sc['schemes'][n][c]:.2f}" for n in names) + f" | {interval} | {pbest} |")
    notes = [f"- {n}" for n in sc["notes"]]
    if sc["separability"].get("text") and sc["separability"]["text"] not in sc["notes"]:
        notes.append(f"- {sc['separability']['text']}")
    for c, v in (sc.get("versus_control") or {}).items():
        notes.append(f"- {c} beats the control in {v['beats']} of {v['prompts']} prompts")
    head = "" if sc["revealed"] else "*Blind: candidates are numbered until Reveal.*\n\n"
    return head + "\n".join(rows) + ("\n\n" + "\n".join(notes) if notes else "")


def build_tournament_tab(service: HostContext) -> None:
    choices = _choices(service)
    with gr.Row():
        pick = gr.Dropdown(label="Tournament", choices=choices, value=choices[0] if choices else None,
                           elem_id="lorakit_tour_pick", scale=4)
        evaluator = gr.Textbox(label="Evaluator (your name)", elem_id="lorakit_tour_evaluator", scale=2)
        refresh = gr.Button("Refresh", elem_id="lorakit_tour_refresh", scale=1)
    tid = gr.Textbox(value=_tid(choices[0]) if choices else "", elem_id="lorakit_tour_id", show_label=False,
                     elem_classes=["lorakit-hidden"])
    gr.HTML(VIEWER, elem_id="lorakit_tour_viewer")
    with gr.Accordion("Scores, reveal, report, next round", open=False):
        with gr.Row():
            scores_btn = gr.Button("Scores", elem_id="lorakit_tour_scores_btn")
            reveal_ok = gr.Checkbox(label="Reveal who is who (ends the blind part)", value=False,
                                    elem_id="lorakit_tour_reveal_ok")
            reveal_btn = gr.Button("Reveal", variant="stop", elem_id="lorakit_tour_reveal")
            report_btn = gr.Button("Report", elem_id="lorakit_tour_report_btn")
            winner_btn = gr.Button("Winner's recipe (for Bake/Merge)", elem_id="lorakit_tour_winner")
        out_md = gr.Markdown(elem_id="lorakit_tour_out")
        chart = gr.Image(label="Scores", type="pil", interactive=False, elem_id="lorakit_tour_chart")
        with gr.Row():
            mode = gr.Dropdown(label="Next round", choices=["narrow", "dial-in"], value="narrow")
            step = gr.Number(label="Step (narrow)", value=0.1)
            propose = gr.Button("Propose from the winner", elem_id="lorakit_tour_propose")
        proposal = gr.Code(label="Next round (edit, then create)", language="json", elem_id="lorakit_tour_proposal")
        create_next = gr.Button("Create this round", elem_id="lorakit_tour_create_next")
    with gr.Accordion("New tournament", open=not choices):
        spec = gr.Code(label="Spec (JSON): candidates (one control), at least 5 prompts, settings", language="json",
                       value=EXAMPLE, elem_id="lorakit_tour_spec")
        with gr.Row():
            create = gr.Button("Create", elem_id="lorakit_tour_create")
            generate = gr.Button("Generate images", variant="primary", elem_id="lorakit_tour_generate")
        progress = gr.HTML(progress_html(0, "", "idle"), elem_id="lorakit_tour_progress")
        message = gr.Markdown(elem_id="lorakit_tour_message")

    def do_refresh(current):
        c = _choices(service)
        val = next((x for x in c if _tid(x) == _tid(current)), c[0] if c else None)
        return gr.update(choices=c, value=val), _tid(val)

    refresh.click(do_refresh, [pick], [pick, tid])
    pick.change(lambda v: _tid(v), [pick], [tid])

    def do_scores(v):
        try:
            sc = tour_op.scores(service, _tid(v))
        except Exception as e:  # noqa: BLE001
            return error_md(e), None
        return scores_md(sc), tour_op.chart_image(sc)

    scores_btn.click(do_scores, [pick], [out_md, chart])

    def do_reveal(v, ok):
        if not ok:
            return "Tick the box first: Reveal shows every evaluator who is who."
        try:
            tour_op.reveal(service, _tid(v))
        except Exception as e:  # noqa: BLE001
            return error_md(e)
        return "Revealed. Reload the ballot (Refresh) to see the recipes under the images."

    reveal_btn.click(do_reveal, [pick, reveal_ok], [out_md])

    def do_report(v):
        try:
            return tour_op.report(service, _tid(v))
        except Exception as e:  # noqa: BLE001
            return error_md(e)

    report_btn.click(do_report, [pick], [out_md])

    def do_winner(v):
        try:
            w = tour_op.winner(service, _tid(v))
        except Exception as e:  # noqa: BLE001
            return error_md(e)
        return (f"Winner **{w['candidate']}**: {w['recipe']}. Use this body with `POST /lorakit/v1/merge` or "
                f"`/bake`, or copy the names into the Merge/Bake tabs:\n\n```json\n{json.dumps(w, indent=1)}\n```")

    winner_btn.click(do_winner, [pick], [out_md])

    def do_propose(v, m, st):
        try:
            return json.dumps(tour_op.next_round(service, _tid(v), {"mode": m, "step": float(st or 0.1)}), indent=1)
        except Exception as e:  # noqa: BLE001
            return json.dumps({"error": str(e)})

    propose.click(do_propose, [pick, mode, step], [proposal])

    def do_create(text, parent=None):
        try:
            data = json.loads(text or "{}")
            if not isinstance(data, dict):
                raise LorakitError("The spec must be a JSON object {name, candidates, prompts, settings}.")
            round_no = int(data.get("round", 1))
            parent = data.get("parent") or parent
            for k in PROPOSAL_ONLY:  # a next-round proposal carries these beside the spec
                data.pop(k, None)
            new = tour_op.create(service, {**data, "name": data.get("name") or f"round {round_no}"},
                                 parent=parent, round_no=round_no)
        except Exception as e:  # noqa: BLE001
            return error_md(e), gr.update(), gr.update()
        c = _choices(service)
        val = next((x for x in c if _tid(x) == new), None)
        return f"Created `{new}`; now **Generate images**.", gr.update(choices=c, value=val), new

    create.click(do_create, [spec], [message, pick, tid])
    create_next.click(do_create, [proposal], [message, pick, tid])

    def do_generate(v) -> Iterator[tuple]:
        try:
            job = tour_op.start_generate(service, _tid(v))
        except Exception as e:  # noqa: BLE001
            yield progress_html(0, "not started", "error"), error_md(e)
            return
        while not job.wait(POLL_S):
            yield progress_html(job.progress, job.message, job.state), gr.update()
        if job.state == "done":
            rec = job.result["record"]
            yield progress_html(1, "done", "done"), (f"{rec['ok']} images made, {rec['failed']} failed, "
                                                     f"{rec['flagged']} flagged. Rank them above (Refresh).")
        else:
            yield progress_html(job.progress, job.state, job.state), error_md(Exception(job.error or job.state))

    generate.click(do_generate, [pick], [progress, message])
