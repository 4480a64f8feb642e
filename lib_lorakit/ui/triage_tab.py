"""Triage sub-tab: create a triage (WebUI), then review pairs from the keyboard.

The review runs in the browser (``javascript/lorakit_triage.js``) against the
``/lorakit/v1/triage`` routes, so a key press shows the next (preloaded) pair without a
round trip; decisions are saved as they are made. This module builds the controls and the
empty viewer the script fills.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator

import gradio as gr

from ..ops import triage as triage_op
from ..ops.context import HostContext
from . import lists
from .common import POLL_S, error_md, progress_html, settings_boxes

VIEWER = """
<div id="lorakit-triage-view" class="lorakit-triage" tabindex="0">
  <div class="lorakit-triage-top">
    <span id="lorakit-triage-counts">Pick a triage above.</span>
    <span class="lorakit-triage-filters">
      <button data-lorakit-filter="all" class="lorakit-on">all</button>
      <button data-lorakit-filter="undecided">undecided</button>
      <button data-lorakit-filter="yes">yes</button>
      <button data-lorakit-filter="maybe">maybe</button>
      <button data-lorakit-filter="no">no</button>
    </span>
  </div>
  <div class="lorakit-triage-pair" style="visibility:hidden">
    <figure><img id="lorakit-triage-img-lora" alt="with the LoRA"><figcaption>with the LoRA
      <span id="lorakit-triage-badge-lora"></span></figcaption></figure>
    <figure><img id="lorakit-triage-img-base" alt="baseline"><figcaption>baseline (no LoRA, same seed)
      <span id="lorakit-triage-badge-base"></span></figcaption></figure>
  </div>
  <div id="lorakit-triage-info"></div>
  <div class="lorakit-triage-buttons">
    <button data-lorakit-decide="yes" class="lorakit-yes" disabled>YES <kbd>Y</kbd></button>
    <button data-lorakit-decide="maybe" class="lorakit-maybe" disabled>MAYBE <kbd>M</kbd></button>
    <button data-lorakit-decide="no" class="lorakit-no" disabled>NO <kbd>N</kbd></button>
  </div>
  <div class="lorakit-triage-help">← → move · U undo · decisions are saved at once</div>
  <div id="lorakit-triage-status"></div>
</div>
"""


def _choices(service: HostContext) -> list[str]:
    return [f"{t['id']} · {t['name']} ({t['state']})" for t in triage_op.triages(service)]


def _form_defaults(service: HostContext, checkpoint: str | None) -> dict:
    try:
        return triage_op.form_defaults(service, checkpoint or None)
    except Exception:  # noqa: BLE001 - the form still opens; creating names the problem
        return triage_op.form_defaults(service, None, profile="sd15")


def _profile_md(form: dict) -> str:
    s = form["settings"]
    return (
        f"Generation profile **{form['label']}** ({form['reason']}): {s['width']}×{s['height']}, "
        f"{s['steps']} steps, CFG {s['cfg_scale']:g}, {s['sampler_name']}"
        + (f", negative prompt *{form['negative_prompt'][:80]}*" if form.get("negative_prompt") else "")
        + "."
    )


def _tid(choice: str | None) -> str:
    return (choice or "").split(" · ")[0].strip()


def build_triage_tab(service: HostContext) -> None:
    def ckpt_names() -> list[str]:
        return [e.name for e in service.checkpoints()]

    choices = _choices(service)
    with gr.Row():
        pick = gr.Dropdown(
            label="Triage",
            choices=choices,
            value=choices[0] if choices else None,
            elem_id="lorakit_triage_pick",
            scale=4,
        )
        refresh = gr.Button("Refresh", elem_id="lorakit_triage_refresh", scale=1)
    tid = gr.Textbox(
        value=_tid(choices[0]) if choices else "",
        elem_id="lorakit_triage_id",
        show_label=False,
        elem_classes=["lorakit-hidden"],
    )
    gr.HTML(VIEWER, elem_id="lorakit_triage_viewer")
    with gr.Accordion("Report and archive", open=False):
        with gr.Row():
            report_btn = gr.Button("Report (markdown)", elem_id="lorakit_triage_report_btn")
            csv_btn = gr.Button("Report (CSV)")
            archive_btn = gr.Button("Archive NO files", variant="stop", elem_id="lorakit_triage_archive_btn")
            confirm = gr.Checkbox(
                label="Yes, move the NO LoRAs (and their sidecars) into the archive folder",
                value=False,
                elem_id="lorakit_triage_archive_confirm",
            )
        with gr.Row():
            batch = gr.Textbox(
                label="Archive batch to restore", placeholder="the batch folder name", elem_id="lorakit_triage_batch"
            )
            restore_btn = gr.Button("Restore batch")
            pass_btn = gr.Button("Start a new pass", elem_id="lorakit_triage_new_pass")
        report = gr.Markdown(elem_id="lorakit_triage_report")
        report_file = gr.Textbox(label="CSV", lines=6, visible=False)
    with gr.Accordion("New triage", open=not choices):
        with gr.Row():
            folder = gr.Textbox(
                label="LoRA folder (inside the LoRA folder; empty: all)", elem_id="lorakit_triage_folder"
            )
            ckpt = lists.add(
                gr.Dropdown(
                    label="Checkpoint (empty: the loaded one)", choices=ckpt_names(), elem_id="lorakit_triage_ckpt"
                ),
                ckpt_names,
                current=True,
            )
        with gr.Row():
            arch = gr.Dropdown(label="Architecture", choices=["", "sd15", "sdxl"], value="")
            category = gr.Textbox(label="Category", placeholder="e.g. style")
            name = gr.Textbox(label="Name filter", placeholder="substring or regular expression")
            seeds = gr.Textbox(label="Seeds", value="1")
            strength = gr.Textbox(label="Strength (empty: each LoRA's max-safe)")

        form = _form_defaults(service, None)
        profile_md = gr.Markdown(_profile_md(form), elem_id="lorakit_triage_profile")
        prompts = gr.Code(
            label="Prompt per category (the trigger is added for trigger-dependent LoRAs)",
            language="json",
            value=json.dumps(form["prompts"], indent=1),
            elem_id="lorakit_triage_prompts",
        )
        with gr.Row():
            steps = gr.Number(
                label="Steps", value=form["settings"]["steps"], precision=0, elem_id="lorakit_triage_steps"
            )
            width = gr.Number(
                label="Width", value=form["settings"]["width"], precision=0, elem_id="lorakit_triage_width"
            )
            height = gr.Number(
                label="Height", value=form["settings"]["height"], precision=0, elem_id="lorakit_triage_height"
            )
            start = gr.Button("Create and generate", variant="primary", elem_id="lorakit_triage_start")
        progress = gr.HTML(progress_html(0, "", "idle"), elem_id="lorakit_triage_progress")
        message = gr.Markdown()

    def do_refresh(current):
        c = _choices(service)
        val = current if current in c else (c[0] if c else None)
        return gr.update(choices=c, value=val), _tid(val)

    refresh.click(do_refresh, [pick], [pick, tid])
    pick.change(lambda v: _tid(v), [pick], [tid])

    def do_report(v, fmt):
        try:
            text = triage_op.report(service, _tid(v), fmt)
        except Exception as e:  # noqa: BLE001 - shown to the user
            return error_md(e), gr.update(visible=False)
        if fmt == "csv":
            return "", gr.update(value=text, visible=True)
        return text, gr.update(visible=False)

    report_btn.click(lambda v: do_report(v, "md"), [pick], [report, report_file])
    csv_btn.click(lambda v: do_report(v, "csv"), [pick], [report, report_file])

    def do_archive(v, ok):
        if not ok:
            return "Tick the box to confirm first: the NO files will be moved (not deleted) into the archive folder."
        try:
            res = triage_op.archive(service, _tid(v), {"decision": "no"})
        except Exception as e:  # noqa: BLE001
            return error_md(e)
        return (
            f"Archived {res['loras']} LoRA(s), {res['files']} file(s), {res['bytes'] / 2**20:.1f} MB into "
            f"`{html.escape(res['batch'])}`. Restore with the batch name `{res['batch'].rsplit('/', 1)[-1]}`."
        )

    archive_btn.click(do_archive, [pick, confirm], [report])

    def do_restore(b):
        try:
            res = triage_op.restore(service, {"batch": (b or "").strip()})
        except Exception as e:  # noqa: BLE001
            return error_md(e)
        extra = "".join(f"\n- left in the archive (path taken): `{html.escape(c)}`" for c in res["conflicts"])
        return f"**{res['state']}**: {len(res['restored'])} file(s) back in place.{extra}"

    restore_btn.click(do_restore, [batch], [report])

    def do_pass(v):
        try:
            n = triage_op.new_pass(service, _tid(v))["pass"]
        except Exception as e:  # noqa: BLE001
            return error_md(e)
        return (
            f"Pass {n} started: every LoRA is undecided again; earlier passes stay in the history. Reload the triage."
        )

    pass_btn.click(do_pass, [pick], [report])

    def do_profile(ck):
        form = _form_defaults(service, ck)
        return (
            json.dumps(form["prompts"], indent=1),
            form["settings"]["steps"],
            form["settings"]["width"],
            form["settings"]["height"],
            _profile_md(form),
        )

    ckpt.input(do_profile, [ckpt], [prompts, steps, width, height, profile_md])  # the user's pick
    lists.on_preselect(do_profile, [prompts, steps, width, height, profile_md])  # the host's current one

    def do_start(folder_v, ck, arch_v, cat, nm, seeds_v, st, prompts_v, steps_v, w, h) -> Iterator[tuple]:
        import time

        try:
            table = json.loads(prompts_v) if (prompts_v or "").strip() else None
            if table is not None and not (isinstance(table, dict) and all(isinstance(v, str) for v in table.values())):
                raise ValueError("the prompts must be a JSON object of category -> prompt")
            req = {
                "folder": folder_v or None,
                "checkpoint": ck or None,
                "arch": arch_v or None,
                "prompts": table,
                "category": cat or None,
                "name_filter": nm or None,
                "seeds": seeds_v or None,
                "strength": float(st) if str(st or "").strip() else None,
                **settings_boxes(steps=steps_v, width=w, height=h),
            }
            job, new = triage_op.start(service, req)
        except Exception as e:  # noqa: BLE001
            yield progress_html(0, "not started", "error"), error_md(e), gr.update(), gr.update()
            return
        c = _choices(service)
        val = next((x for x in c if x.startswith(new)), None)
        yield progress_html(0, job.message, job.state), f"Triage `{new}` created.", gr.update(choices=c, value=val), new
        while not job.wait(POLL_S):
            yield progress_html(job.progress, job.message, job.state), gr.update(), gr.update(), gr.update()
        if job.state == "done":
            st = job.result["state"]
            yield (
                progress_html(1, "done", "done"),
                f"Triage `{new}`: {st['items']} pairs ready, {st['skipped']} skipped. Review them above.",
                gr.update(choices=_choices(service), value=val),
                new,
            )
        else:
            yield (
                progress_html(job.progress, job.state, job.state),
                error_md(Exception(job.error or job.state)),
                gr.update(),
                gr.update(),
            )
        time.sleep(0)

    start.click(
        do_start,
        [folder, ckpt, arch, category, name, seeds, strength, prompts, steps, width, height],
        [progress, message, pick, tid],
    )
