"""The Bake tab's Doctor section: "Check against runtime" after a bake (parity), "Diagnose" (the
variant batch), with the verdict, the numbers and the contact sheets (runtime | baked | base)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from ..errors import LorakitError
from ..jobs import FINISHED
from ..ops import doctor as doctor_op
from ..ops.context import HostContext
from .common import POLL_S, error_md, not_saved, progress_html, settings_boxes

DEFAULT_PROMPTS = (
    "a portrait photo of a woman in a red coat, city street\n"
    "a mountain lake at sunrise, wide landscape\n"
    "a bowl of fruit on a wooden table, still life"
)


def no_sheets():
    """The gallery emptied and hidden (a fresh update for each yield)."""
    return gr.update(value=None, visible=False)


def verdict_md(rep: dict[str, Any]) -> str:
    o = rep["parity"]["overall"]
    head = (
        f"### Verdict: {o['verdict']}\n\n"
        f"baked vs runtime: mean difference **{o['mean_diff']:.2f}** levels (max {o['max_diff']:.0f}), "
        f"SSIM **{o['ssim']:.3f}**; LoRA effect (runtime vs base) **{o.get('effect', 0):.2f}** levels, "
        f"effect ratio **{o.get('effect_ratio')}**"
    )
    return head + "\n\n```\n" + doctor_op.summary(rep) + "\n```"


def baked_of(marker: str) -> str:
    try:
        return (json.loads(marker or "{}") or {}).get("checkpoint") or ""
    except ValueError:
        return ""


def build_doctor_section(service: HostContext, base: Any, recipe_rows: Any, done: Any, rows_to_loras) -> None:
    """Add the Doctor section under a bake. ``done`` holds the last bake's JSON marker (its checkpoint name);
    ``base`` and ``recipe_rows`` are the Bake tab's base and recipe (the runtime recipe)."""
    with gr.Accordion("Doctor: does the bake render like its runtime recipe?", open=True):
        with gr.Row():
            baked = gr.Textbox(
                label="Baked checkpoint (filled after a bake)", value="", elem_id="lorakit_doctor_baked", scale=3
            )
            seeds = gr.Textbox(label="Seeds", value="1, 2", elem_id="lorakit_doctor_seeds", scale=1)
            not_saved(baked)
        prompts = gr.Textbox(
            label="Prompts (one per line; the baked render uses them as written)",
            value=DEFAULT_PROMPTS,
            lines=3,
            elem_id="lorakit_doctor_prompts",
        )
        with gr.Row():
            steps = gr.Number(label="Steps (0: the profile's)", value=0, precision=0, elem_id="lorakit_doctor_steps")
            cfg = gr.Number(label="CFG (0: the profile's)", value=0, elem_id="lorakit_doctor_cfg")
            width = gr.Number(label="Width (0: the profile's)", value=0, precision=0, elem_id="lorakit_doctor_width")
            height = gr.Number(label="Height (0: the profile's)", value=0, precision=0, elem_id="lorakit_doctor_height")
        with gr.Row():
            # both need a baked checkpoint: enabled once the box names one (filled by a bake, or typed)
            check = gr.Button(
                "Check against runtime", variant="primary", interactive=False, elem_id="lorakit_doctor_check"
            )
            diagnose = gr.Button("Diagnose (variant bakes)", interactive=False, elem_id="lorakit_doctor_diagnose")
            cancel = gr.Button("Cancel", variant="stop", elem_id="lorakit_doctor_cancel")
        progress = gr.HTML(progress_html(0, "", "idle"), elem_id="lorakit_doctor_progress")
        verdict = gr.Markdown("", elem_id="lorakit_doctor_verdict")
        # one sheet a row, shown whole (a square thumbnail would crop a wide sheet to its middle column)
        sheets = gr.Gallery(
            label="Contact sheets: runtime | baked | base",
            columns=1,
            object_fit="contain",
            height="auto",
            visible=False,  # shown with the first sheets, not as a blank panel before a check
            elem_id="lorakit_doctor_sheets",
        )
        with gr.Accordion("Doctor report (JSON)", open=False):
            report = gr.JSON(label="Report", elem_id="lorakit_doctor_report")
        job_id = gr.Textbox(value="", elem_id="lorakit_doctor_job", elem_classes=["lorakit-hidden"], show_label=False)

    def run(kind: str, baked_v, base_v, rows, prompts_v, seeds_v, steps_v, cfg_v, w_v, h_v) -> Iterator[tuple]:
        try:
            if not (baked_v or "").strip():
                raise LorakitError("No baked checkpoint.", fix="Bake first, or type the baked checkpoint's name.")
            req: dict[str, Any] = {
                "baked": baked_v.strip(),
                "base": base_v or None,
                "loras": rows_to_loras(rows),
                "prompts": [p for p in (prompts_v or "").splitlines() if p.strip()] or None,
                "seeds": seeds_v or None,
            }
            req.update(settings_boxes(steps=steps_v, cfg_scale=cfg_v, width=w_v, height=h_v))
            start = doctor_op.start_parity if kind == "parity" else doctor_op.start_diagnose
            job = start(service, req)
        except LorakitError as e:
            yield "", progress_html(0, "not started", "error"), error_md(e), no_sheets(), None
            return
        yield job.id, progress_html(0, job.message, job.state), "", no_sheets(), None
        while job.state not in FINISHED:
            time.sleep(POLL_S)
            yield job.id, progress_html(job.progress, job.message, job.state), "", gr.update(), None
        if job.state == "done":
            rep = job.result
            got = rep.get("sheets") or []
            yield (
                job.id,
                progress_html(1, "done", "done"),
                verdict_md(rep),
                gr.update(value=got, visible=bool(got)),
                rep,
            )
        else:
            yield (
                job.id,
                progress_html(job.progress, job.state, job.state),
                error_md(Exception(job.error or job.state)),
                no_sheets(),
                None,
            )

    def do_cancel(jid):
        j = service.jobs.cancel(jid) if jid else None
        return "Cancelling..." if j is not None else "Nothing to cancel."

    inputs = [baked, base, recipe_rows, prompts, seeds, steps, cfg, width, height]
    outputs = [job_id, progress, verdict, sheets, report]
    done.change(baked_of, inputs=[done], outputs=[baked])
    baked.change(
        lambda v: (gr.update(interactive=bool((v or "").strip())),) * 2, inputs=[baked], outputs=[check, diagnose]
    )
    check.click(lambda *a: (yield from run("parity", *a)), inputs=inputs, outputs=outputs)
    diagnose.click(lambda *a: (yield from run("diagnose", *a)), inputs=inputs, outputs=outputs)
    cancel.click(do_cancel, inputs=[job_id], outputs=[verdict], queue=False)
