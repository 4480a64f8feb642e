"""Tournament sub-tab: create and generate (WebUI), rank blind by keyboard, reveal, scores, report, rounds.

The blind ranking runs in the browser (``javascript/lorakit_tournament.js``) against the
``/lorakit/v1/tournaments`` routes; this module builds the controls around it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import gradio as gr

from ..errors import LorakitError
from ..ops import tournament as tour_op
from ..ops.context import HostContext
from . import lists
from .common import POLL_S, empty_table, error_md, progress_html, settings_boxes
from .tournament_parts import FORM_HEADERS, VIEWER, _form_rows, _merge_models, example_spec, scores_md


def _choices(service: HostContext) -> list[str]:
    return [
        f"{t['id']} · r{t['round']} · {t['name']} ({t['state']}{', revealed' if t['revealed'] else ''})"
        for t in tour_op.tournaments(service)
    ]


PROPOSAL_ONLY = ("parent", "round", "winner", "mode", "id")


def _tid(choice: str | None) -> str:
    return (choice or "").split(" · ")[0].strip()


def build_tournament_tab(service: HostContext) -> None:
    choices = _choices(service)
    with gr.Row():
        pick = gr.Dropdown(
            label="Tournament",
            choices=choices,
            value=choices[0] if choices else None,
            elem_id="lorakit_tour_pick",
            scale=4,
        )
        gr.Textbox(label="Evaluator (your name)", elem_id="lorakit_tour_evaluator", scale=2)
        refresh = gr.Button("Refresh", elem_id="lorakit_tour_refresh", scale=1)
    tid = gr.Textbox(
        value=_tid(choices[0]) if choices else "",
        elem_id="lorakit_tour_id",
        show_label=False,
        elem_classes=["lorakit-hidden"],
    )
    gr.HTML(VIEWER, elem_id="lorakit_tour_viewer")
    with gr.Accordion("Scores, reveal, report, next round", open=False):
        with gr.Row():
            scores_btn = gr.Button("Scores", elem_id="lorakit_tour_scores_btn")
            reveal_ok = gr.Checkbox(
                label="Reveal who is who (ends the blind part)", value=False, elem_id="lorakit_tour_reveal_ok"
            )
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
    ckpts = [e.name for e in service.checkpoints()]
    with gr.Accordion("New tournament", open=not choices):
        gr.Markdown(
            "Pick the candidates from the WebUI's lists — a checkpoint, a checkpoint with LoRAs on top, or a "
            "merge recipe — and mark the version you ship today as the **control**. Prompts and settings come "
            "from the control checkpoint's generation profile; edit what you like."
        )
        with gr.Row():
            f_ckpt = lists.add(
                gr.Dropdown(label="Checkpoint", choices=ckpts, elem_id="lorakit_tour_f_ckpt", scale=3),
                lambda: [e.name for e in service.checkpoints()],
                current=True,
            )
            f_loras = gr.Textbox(
                label="LoRAs on top (optional)",
                placeholder="name:0.8, other:0.5",
                elem_id="lorakit_tour_f_loras",
                scale=3,
            )
            f_add = gr.Button("Add candidate", elem_id="lorakit_tour_f_add", scale=1, min_width=120)
        with gr.Row():
            f_merge = gr.Textbox(
                label="Or a merge recipe (checkpoints with weights)",
                placeholder="a:0.7, b:0.2, c:0.1",
                elem_id="lorakit_tour_f_merge",
                scale=6,
            )
            f_add_merge = gr.Button("Add merge candidate", elem_id="lorakit_tour_f_add_merge", scale=1, min_width=120)
        # the candidates picked so far, as JSON in a hidden box (a gr.State's config does not serialise in gradio 4.40)
        f_rows = gr.Textbox(
            value="[]", elem_id="lorakit_tour_f_rows", elem_classes=["lorakit-hidden"], show_label=False
        )
        f_table = gr.Dataframe(
            headers=FORM_HEADERS,
            value=empty_table(FORM_HEADERS),
            datatype=["number", "str", "str"],
            interactive=False,
            label="Candidates",
            elem_id="lorakit_tour_f_candidates",
            wrap=True,
        )
        with gr.Row():
            f_control = gr.Dropdown(
                label="Control (the previous version)", choices=[], elem_id="lorakit_tour_f_control", scale=2
            )
            f_first = gr.Checkbox(
                label="First version: no control (the report says so)",
                value=False,
                elem_id="lorakit_tour_f_first",
                scale=2,
            )
            f_clear = gr.Button("Clear candidates", elem_id="lorakit_tour_f_clear", scale=1, min_width=120)
        f_profile = gr.Markdown("", elem_id="lorakit_tour_f_profile")
        f_prompts = gr.Textbox(
            label="Prompts, one per line (at least 5; empty: the profile's set)",
            lines=6,
            max_lines=12,
            elem_id="lorakit_tour_f_prompts",
        )
        with gr.Row():
            f_name = gr.Textbox(label="Name", value="", placeholder="v4 candidates", elem_id="lorakit_tour_f_name")
            f_seeds = gr.Textbox(
                label="Seeds (one: counted up per prompt)", value="1000", elem_id="lorakit_tour_f_seeds"
            )
            f_steps = gr.Number(label="Steps (0: the profile's)", value=0, precision=0, elem_id="lorakit_tour_f_steps")
            f_cfg = gr.Number(label="CFG (0: the profile's)", value=0, elem_id="lorakit_tour_f_cfg")
            f_width = gr.Number(label="Width (0: the profile's)", value=0, precision=0, elem_id="lorakit_tour_f_width")
            f_height = gr.Number(
                label="Height (0: the profile's)", value=0, precision=0, elem_id="lorakit_tour_f_height"
            )
        with gr.Row():
            f_create = gr.Button("Create", variant="primary", elem_id="lorakit_tour_f_create")
            generate = gr.Button("Generate images", variant="primary", elem_id="lorakit_tour_generate")
        with gr.Accordion("Advanced: a JSON spec instead of the form", open=False):
            spec = gr.Code(
                label="Spec (JSON): candidates (one control), at least 5 prompts, settings",
                language="json",
                value=example_spec(ckpts),
                elem_id="lorakit_tour_spec",
                lines=12,
            )
            create = gr.Button("Create from JSON", elem_id="lorakit_tour_create")
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
        return (
            f"Winner **{w['candidate']}**: {w['recipe']}. Use this body with `POST /lorakit/v1/merge` or "
            f"`/bake`, or copy the names into the Merge/Bake tabs:\n\n```json\n{json.dumps(w, indent=1)}\n```"
        )

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
            new = tour_op.create(
                service, {**data, "name": data.get("name") or f"round {round_no}"}, parent=parent, round_no=round_no
            )
        except Exception as e:  # noqa: BLE001
            return error_md(e), gr.update(), gr.update()
        c = _choices(service)
        val = next((x for x in c if _tid(x) == new), None)
        return f"Created `{new}`; now **Generate images**.", gr.update(choices=c, value=val), new

    def form_profile(rows, control):
        ref = None
        if rows:
            idx = int(control) - 1 if str(control or "").isdigit() and 0 < int(control) <= len(rows) else 0
            r = rows[idx]
            ref = r.get("checkpoint") or (r["merge"]["models"][0]["name"] if r.get("merge") else None)
        try:
            from ..ops import gen as gen_op

            chosen = gen_op.profile_for(service, ref) if ref else None
        except Exception:  # noqa: BLE001 - shown when creating
            chosen = None
        if not chosen:
            return "", gr.update()
        s_ = chosen["settings"]
        text = (
            f"Generation profile **{chosen['label']}** ({chosen['reason']}): {s_['width']}×{s_['height']}, "
            f"{s_['steps']} steps, CFG {s_['cfg_scale']:g}, {s_['sampler_name']}."
        )
        from ..gen.profiles import prompt_set

        return text, "\n".join(prompt_set(chosen))

    def _rows(value) -> list[dict]:
        try:
            rows = json.loads(value or "[]")
        except ValueError:
            return []
        return rows if isinstance(rows, list) else []

    def form_update(rows, control):
        ids = [str(i + 1) for i in range(len(rows))]
        ctl = control if control in ids else (ids[0] if ids else None)
        text, prompts = form_profile(rows, ctl)
        return json.dumps(rows), _form_rows(rows), gr.update(choices=ids, value=ctl), text, prompts

    def do_add(rows, ck, loras_text, control):
        rows = _rows(rows)
        if not ck:
            return (
                json.dumps(rows),
                _form_rows(rows),
                gr.update(),
                error_md(LorakitError("No checkpoint picked.", fix="Choose one from the list.")),
                gr.update(),
            )
        row = {
            "kind": "recipe" if (loras_text or "").strip() else "checkpoint",
            "checkpoint": ck,
            "loras": (loras_text or "").strip(),
        }
        return form_update(rows + [row], control)

    def do_add_merge(rows, text, control):
        rows = _rows(rows)
        models = _merge_models(text)
        return form_update(rows + [{"kind": "merge", "merge": {"models": models}}], control)

    form_out = [f_rows, f_table, f_control, f_profile, f_prompts]
    f_add.click(do_add, [f_rows, f_ckpt, f_loras, f_control], form_out)
    f_add_merge.click(do_add_merge, [f_rows, f_merge, f_control], form_out)
    f_clear.click(lambda: ("[]", empty_table(FORM_HEADERS), gr.update(choices=[], value=None), "", ""), [], form_out)
    f_control.change(lambda rows, c: form_profile(_rows(rows), c), [f_rows, f_control], [f_profile, f_prompts])

    def do_create_form(rows, control, first, prompts_text, seeds_text, steps_v, cfg_v, width_v, height_v, name_v):
        rows = _rows(rows)
        try:
            settings = settings_boxes(steps=steps_v, cfg_scale=cfg_v, width=width_v, height=height_v)
            ctl = None if first or not control else int(control) - 1
            d = tour_op.spec_from_form(
                service,
                list(rows or []),
                ctl,
                prompts_text or None,
                seeds_text or None,
                settings,
                name=name_v or "tournament",
                first_version=bool(first),
            )
            new = tour_op.create(service, d)
        except Exception as e:  # noqa: BLE001 - shown to the user
            return error_md(e), gr.update(), gr.update()
        c = _choices(service)
        val = next((x for x in c if _tid(x) == new), None)
        return (
            f"Created `{new}` with {len(rows)} candidates; now **Generate images**.",
            gr.update(choices=c, value=val),
            new,
        )

    f_create.click(
        do_create_form,
        [f_rows, f_control, f_first, f_prompts, f_seeds, f_steps, f_cfg, f_width, f_height, f_name],
        [message, pick, tid],
    )
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
            yield (
                progress_html(1, "done", "done"),
                (
                    f"{rec['ok']} images made, {rec['failed']} failed, "
                    f"{rec['flagged']} flagged. Rank them above (Refresh)."
                ),
            )
        else:
            yield progress_html(job.progress, job.state, job.state), error_md(Exception(job.error or job.state))

    generate.click(do_generate, [pick], [progress, message])
