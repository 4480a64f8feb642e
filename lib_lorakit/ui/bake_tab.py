"""The Bake sub-tab: base checkpoint, a recipe of LoRAs (picked or pasted as prompt tags),
per-block weights, save dtype, output name; Bake runs as a job with progress and Cancel."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from ..errors import LorakitError
from ..jobs import FINISHED
from ..ops import bake as bake_op
from ..ops.bake import BakeRequest, LoraEntry
from ..ops.context import HostContext
from . import lists
from .common import POLL_S, empty_table, error_md, progress_html

HEADERS = ["LoRA", "strength", "TE strength", "block weights"]


def rows_to_loras(rows: Any) -> list[LoraEntry]:
    """Dataframe rows -> recipe entries (blank rows skipped; numbers checked)."""
    if hasattr(rows, "values") and hasattr(rows, "columns"):  # pandas
        rows = rows.values.tolist()
    out = []
    for row in rows or []:
        row = list(row) + [""] * (4 - len(row))
        name = str(row[0] or "").strip()
        if not name:
            continue

        def num(v: Any, what: str, default: float | None) -> float | None:
            if v is None or str(v).strip() == "":
                return default
            try:
                return float(v)
            except ValueError:
                raise LorakitError(f"{name}: {what} {v!r} is not a number.") from None

        out.append(
            LoraEntry.parse(
                {
                    "name": name,
                    "strength": num(row[1], "strength", 1.0),
                    "te_strength": num(row[2], "TE strength", None),
                    "blocks": str(row[3] or "").strip() or None,
                },
                what=f"LoRA {name}",
            )
        )
    return out


def summary_md(result: dict) -> str:
    rep = result["report"]
    lines = []
    if result.get("checkpoint"):
        lines.append(f"**Saved** `{result['checkpoint']}` — it is in the checkpoint list now.")
    elif rep.get("dry_run"):
        lines.append("**Dry run**: everything matched; nothing was written.")
    lines.append("```\n" + bake_op.summary(rep) + "\n```")
    return "\n\n".join(lines)


def build_bake_tab(service: HostContext) -> None:
    def ckpt_names() -> list[str]:
        return [e.name for e in service.checkpoints()]

    def lora_names() -> list[str]:
        return [e.name for e in service.loras()]

    with gr.Row():
        base = lists.add(
            gr.Dropdown(label="Base checkpoint", choices=ckpt_names(), elem_id="lorakit_bake_base", scale=4),
            ckpt_names,
            current=True,
        )
        refresh = gr.Button("Refresh lists", elem_id="lorakit_bake_refresh", scale=1, min_width=120)
    with gr.Row():
        lora = lists.add(gr.Dropdown(label="LoRA", choices=lora_names(), elem_id="lorakit_bake_lora"), lora_names)
        strength = gr.Number(label="Strength", value=1.0, elem_id="lorakit_bake_strength")
        te = gr.Textbox(label="TE strength (blank: same)", value="", elem_id="lorakit_bake_te")
        blocks = gr.Textbox(
            label="Block weights (optional)",
            placeholder="INALL or 17/26 values",
            info="A preset (INALL, MIDD, …) or 17/26 values (SD1.5), 12/20 (SDXL)",
            elem_id="lorakit_bake_blocks",
        )
        add = gr.Button("Add to recipe", elem_id="lorakit_bake_add", scale=1, min_width=120)
    recipe = gr.Dataframe(
        value=empty_table(HEADERS),
        headers=HEADERS,
        datatype=["str", "number", "str", "str"],
        type="array",
        row_count=(1, "dynamic"),
        col_count=(4, "fixed"),
        interactive=True,
        label="Recipe",
        elem_id="lorakit_bake_recipe",
    )
    with gr.Accordion("Paste prompt tags", open=False):
        prompt = gr.Textbox(
            label="Prompt with <lora:name:weight> tags",
            lines=2,
            placeholder="<lora:style:0.8> <lora:detail:0.5:0.3> <lyco:thing:1:lbw=INALL>",
            elem_id="lorakit_bake_prompt",
        )
        use_prompt = gr.Button("Use these tags as the recipe", elem_id="lorakit_bake_use_prompt")
    with gr.Row():
        dtype = gr.Radio(
            ["fp16", "bf16", "fp32"], value=service.default_save_dtype(), label="Save as", elem_id="lorakit_bake_dtype"
        )
        output = gr.Textbox(label="Output name", placeholder="my-model-baked", elem_id="lorakit_bake_output")
        overwrite = gr.Checkbox(label="Overwrite", value=False, elem_id="lorakit_bake_overwrite")
        allow_unmatched = gr.Checkbox(
            label="Allow unmatched layers", value=False, elem_id="lorakit_bake_allow_unmatched"
        )
    with gr.Row():
        run = gr.Button("Bake", variant="primary", elem_id="lorakit_bake_run")
        check = gr.Button("Check only (dry run)", elem_id="lorakit_bake_check")
        cancel = gr.Button("Cancel", variant="stop", elem_id="lorakit_bake_cancel")
    progress = gr.HTML(progress_html(0, "", "idle"), elem_id="lorakit_bake_progress")
    summary = gr.Markdown("", elem_id="lorakit_bake_summary")
    with gr.Accordion("Full report (JSON)", open=False):
        report = gr.JSON(label="Report", elem_id="lorakit_bake_report")
    job_id = gr.Textbox(value="", elem_id="lorakit_bake_job", elem_classes=["lorakit-hidden"], show_label=False)
    done = gr.Textbox(value="", elem_id="lorakit_bake_done", elem_classes=["lorakit-hidden"], show_label=False)

    def do_add(rows, name, s, t, b):
        rows = [
            list(r)
            for r in (rows.values.tolist() if hasattr(rows, "values") else rows or [])
            if str((list(r) + [""])[0] or "").strip()
        ]
        if name:
            rows.append([name, s if s is not None else 1.0, (t or "").strip(), (b or "").strip()])
        return rows or empty_table(HEADERS)

    def do_prompt(text):
        try:
            tags = bake_op.entries_of_prompt(text)
        except LorakitError as e:
            return gr.update(), error_md(e)
        if not tags:
            return gr.update(), "**No <lora:...> tags found** in the text."
        rows = [
            [t["name"], t["strength"], "" if t["te_strength"] == t["strength"] else t["te_strength"], t["blocks"] or ""]
            for t in tags
        ]
        return rows, f"Recipe set from {len(rows)} tag(s)."

    def do_bake(dry: bool, base_v, rows, dtype_v, out_v, ow, au) -> Iterator[tuple]:
        try:
            req = BakeRequest.parse(
                {
                    "base": base_v or "",
                    "output": out_v or "",
                    "loras": rows_to_loras(rows),
                    "save_dtype": dtype_v,
                    "overwrite": bool(ow),
                    "allow_unmatched": bool(au),
                    "dry_run": dry,
                }
            )
            if not dry and not req.output.strip():
                raise LorakitError("No output name.", fix="Type a name for the new checkpoint.")
            job = bake_op.start(service, req)
        except LorakitError as e:
            yield "", progress_html(0, "not started", "error"), error_md(e), None, gr.update()
            return
        yield job.id, progress_html(0, job.message, job.state), "", None, gr.update()
        while job.state not in FINISHED:
            time.sleep(POLL_S)
            yield job.id, progress_html(job.progress, job.message, job.state), "", None, gr.update()
        if job.state == "done":
            marker = json.dumps({"checkpoint": job.result.get("checkpoint"), "t": time.time()})
            yield (
                job.id,
                progress_html(1, "done", "done"),
                summary_md(job.result),
                job.result["report"],
                marker if job.result.get("checkpoint") else gr.update(),
            )
        else:
            yield (
                job.id,
                progress_html(job.progress, job.state, job.state),
                error_md(Exception(job.error or job.state)),
                None,
                gr.update(),
            )

    def do_cancel(jid):
        j = service.jobs.cancel(jid) if jid else None
        return "Cancelling..." if j is not None else "Nothing to cancel."

    inputs = [base, recipe, dtype, output, overwrite, allow_unmatched]
    outputs = [job_id, progress, summary, report, done]
    lists.trigger(refresh.click)
    add.click(do_add, inputs=[recipe, lora, strength, te, blocks], outputs=[recipe])
    use_prompt.click(do_prompt, inputs=[prompt], outputs=[recipe, summary])
    run.click(lambda *a: (yield from do_bake(False, *a)), inputs=inputs, outputs=outputs)
    check.click(lambda *a: (yield from do_bake(True, *a)), inputs=inputs, outputs=outputs)
    cancel.click(do_cancel, inputs=[job_id], outputs=[summary], queue=False)

    from .doctor_tab import build_doctor_section  # the bake doctor: "Check against runtime" after a bake

    build_doctor_section(service, base, recipe, done, rows_to_loras)
