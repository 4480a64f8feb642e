"""The Merge sub-tab: ingredients with weights (a 70/20/10 preset), method, blocks, VAE and
text-encoder sources; runs as a job with progress; report and a per-block diagnostics chart.
Below it, Diff: where does one checkpoint differ from another, block by block."""

from __future__ import annotations

import json
import time

import gradio as gr

from ..errors import LorakitError
from ..jobs import FINISHED
from ..merge.registry import METHODS, param_default
from ..ops import merge as merge_op
from ..ops.context import HostContext
from ..ops.merge import MergeModelIn, MergeRequest
from . import lists
from .common import POLL_S, empty_table, error_md, progress_html, table_rows

PRIMARY = "model 1 (primary)"
HEADERS = ["checkpoint", "weight"]
MERGE_TE = "merge them"


def rows_to_models(rows) -> list[MergeModelIn]:
    out = []
    for r in table_rows(rows):
        r = r + [""] * (2 - len(r))
        try:
            w = 1.0 if str(r[1]).strip() == "" else float(r[1])
        except ValueError:
            raise LorakitError(f"{r[0]}: weight {r[1]!r} is not a number.") from None
        out.append(MergeModelIn.parse({"name": str(r[0]).strip(), "weight": w}, what=f"ingredient {r[0]}"))
    return out


def summary_md(result: dict) -> str:
    head = f"**Saved** `{result['checkpoint']}` — it is in the checkpoint list now." if result.get("checkpoint") else ""
    return head + "\n\n```\n" + merge_op.summary(result["report"]) + "\n```"


def build_merge_tab(service: HostContext) -> None:
    def ckpt_names() -> list[str]:
        return [e.name for e in service.checkpoints()]

    def vae_choices(n: int = 3) -> list[str]:
        return [PRIMARY] + [f"model {i}" for i in range(2, max(n, 2) + 1)] + [e.name for e in service.vae_files()]

    with gr.Row():
        pick = lists.add(
            gr.Dropdown(label="Checkpoint", choices=ckpt_names(), elem_id="lorakit_merge_pick", scale=4),
            ckpt_names,
            current=True,
        )
        weight = gr.Number(label="Weight", value=1.0, elem_id="lorakit_merge_weight", scale=1)
        add = gr.Button("Add ingredient", elem_id="lorakit_merge_add", scale=1, min_width=120)
        preset = gr.Button("70 / 20 / 10", elem_id="lorakit_merge_preset", scale=1, min_width=120)
        refresh = gr.Button("Refresh lists", elem_id="lorakit_merge_refresh", scale=1, min_width=120)
    ingredients = gr.Dataframe(
        value=empty_table(HEADERS),
        headers=HEADERS,
        datatype=["str", "number"],
        type="array",
        row_count=(1, "dynamic"),
        col_count=(2, "fixed"),
        interactive=True,
        label="Ingredients (the first is the primary)",
        elem_id="lorakit_merge_models",
    )
    with gr.Row():
        method = gr.Radio(list(METHODS), value="weighted", label="Method", elem_id="lorakit_merge_method")
        base = lists.add(
            gr.Dropdown(
                label="Base C (add-difference, TIES, DARE)", choices=ckpt_names(), elem_id="lorakit_merge_base"
            ),
            ckpt_names,
        )
    with gr.Row():
        blocks = gr.Textbox(
            label="Block factors (optional)",
            placeholder="e.g. IN04=0.3,OUT02=0.5 or a 26/20-value vector",
            elem_id="lorakit_merge_blocks",
        )
        vae = lists.add(
            gr.Dropdown(label="VAE from", choices=vae_choices(), value=PRIMARY, elem_id="lorakit_merge_vae"),
            vae_choices,
        )
        te = gr.Dropdown(
            label="Text encoders",
            choices=[MERGE_TE, "model 1", "model 2", "model 3"],
            value=MERGE_TE,
            elem_id="lorakit_merge_te",
        )
    with gr.Accordion("TIES / DARE settings", open=False):
        with gr.Row():
            normalize = gr.Checkbox(label="Normalise weights (weighted sum)", value=True, elem_id="lorakit_merge_norm")
            density = gr.Number(label="TIES density", value=param_default("density"), elem_id="lorakit_merge_density")
            drop = gr.Number(label="DARE drop rate", value=param_default("drop"), elem_id="lorakit_merge_drop")
            seed = gr.Number(label="DARE seed", value=param_default("seed"), precision=0, elem_id="lorakit_merge_seed")
            scale = gr.Number(label="Difference scale", value=param_default("scale"), elem_id="lorakit_merge_scale")
    with gr.Row():
        dtype = gr.Radio(
            ["fp16", "bf16", "fp32"], value=service.default_save_dtype(), label="Save as", elem_id="lorakit_merge_dtype"
        )
        output = gr.Textbox(label="Output name", placeholder="my-merge", elem_id="lorakit_merge_output")
        overwrite = gr.Checkbox(label="Overwrite", value=False, elem_id="lorakit_merge_overwrite")
    with gr.Row():
        run = gr.Button("Merge", variant="primary", elem_id="lorakit_merge_run")
        cancel = gr.Button("Cancel", variant="stop", elem_id="lorakit_merge_cancel")
    progress = gr.HTML(progress_html(0, "", "idle"), elem_id="lorakit_merge_progress")
    summary = gr.Markdown("", elem_id="lorakit_merge_summary")
    diag = gr.Image(
        label="Second ingredient against the primary, per block",
        type="pil",
        interactive=False,
        elem_id="lorakit_merge_chart",
        visible=False,
    )  # shown once there is a chart
    with gr.Accordion("Full report (JSON)", open=False):
        report = gr.JSON(elem_id="lorakit_merge_report")
    job_id = gr.Textbox(value="", elem_id="lorakit_merge_job", elem_classes=["lorakit-hidden"], show_label=False)
    done = gr.Textbox(value="", elem_id="lorakit_merge_done", elem_classes=["lorakit-hidden"], show_label=False)

    gr.Markdown("### Diff: where does B differ from A?")
    with gr.Row():
        diff_a = lists.add(
            gr.Dropdown(label="A (reference)", choices=ckpt_names(), elem_id="lorakit_diff_a"), ckpt_names, current=True
        )
        diff_b = lists.add(gr.Dropdown(label="B", choices=ckpt_names(), elem_id="lorakit_diff_b"), ckpt_names)
        compare = gr.Button("Compare", elem_id="lorakit_diff_run", scale=0, min_width=120)
    diff_table = gr.Markdown("", elem_id="lorakit_diff_table")
    diff_chart = gr.Image(type="pil", interactive=False, show_label=False, elem_id="lorakit_diff_chart", visible=False)

    def do_add(rows, name, w):
        rows = table_rows(rows)
        if name:
            rows.append([name, 1.0 if w is None else w])
        return rows or empty_table(HEADERS)

    def do_preset(rows):
        rows = table_rows(rows)
        for r, w in zip(rows, (0.7, 0.2, 0.1)):
            r[1] = w
        return rows or empty_table(HEADERS)

    def do_merge(rows, method_v, base_v, blocks_v, vae_v, te_v, norm_v, dens, drp, sd, sc, dtype_v, out_v, ow):
        try:
            vae_from = (
                None if vae_v in (None, "", PRIMARY) else (vae_v.split()[1] if vae_v.startswith("model ") else vae_v)
            )
            te_from = None if te_v in (None, "", MERGE_TE) else int(te_v.split()[1])
            req = MergeRequest.parse(
                {
                    "models": rows_to_models(rows),
                    "output": out_v or "",
                    "method": method_v,
                    "base": base_v or None,
                    "blocks": (blocks_v or "").strip() or None,
                    "vae_from": vae_from,
                    "te_from": te_from,
                    "normalize": bool(norm_v),
                    "density": float(dens),
                    "drop": float(drp),
                    "seed": int(sd or 0),
                    "scale": float(sc),
                    "save_dtype": dtype_v,
                    "overwrite": bool(ow),
                }
            )
            if not req.output.strip():
                raise LorakitError("No output name.", fix="Type a name for the new checkpoint.")
            job = merge_op.start(service, req)
        except LorakitError as e:
            yield "", progress_html(0, "not started", "error"), error_md(e), gr.update(visible=False), None, gr.update()
            return
        while job.state not in FINISHED:
            yield (
                job.id,
                progress_html(job.progress, job.message, job.state),
                "",
                gr.update(visible=False),
                None,
                gr.update(),
            )
            time.sleep(POLL_S)
        if job.state == "done":
            rep = job.result["report"]
            img = (
                merge_op.diff_chart(
                    rep["diagnostics"][0],
                    f"{rep['diagnostics'][0]['ingredient']} vs {rep['diagnostics'][0]['against']}",
                )
                if rep["diagnostics"]
                else None
            )
            marker = json.dumps({"checkpoint": job.result.get("checkpoint"), "t": time.time()})
            yield (
                job.id,
                progress_html(1, "done", "done"),
                summary_md(job.result),
                gr.update(value=img, visible=img is not None),
                rep,
                marker,
            )
        else:
            yield (
                job.id,
                progress_html(job.progress, job.state, job.state),
                error_md(Exception(job.error or job.state)),
                gr.update(visible=False),
                None,
                gr.update(),
            )

    def do_cancel(jid):
        return "Cancelling..." if jid and service.jobs.cancel(jid) is not None else "Nothing to cancel."

    def do_diff(a, b):
        try:
            res = merge_op.diff(service, {"a": a or "", "b": b or ""})
        except LorakitError as e:
            return error_md(e), gr.update(visible=False)
        return merge_op.diff_table(res), gr.update(value=merge_op.diff_chart(res, f"{b} vs {a}"), visible=True)

    lists.trigger(refresh.click)
    add.click(do_add, inputs=[ingredients, pick, weight], outputs=[ingredients])
    preset.click(do_preset, inputs=[ingredients], outputs=[ingredients])
    run.click(
        do_merge,
        inputs=[
            ingredients,
            method,
            base,
            blocks,
            vae,
            te,
            normalize,
            density,
            drop,
            seed,
            scale,
            dtype,
            output,
            overwrite,
        ],
        outputs=[job_id, progress, summary, diag, report, done],
    )
    cancel.click(do_cancel, inputs=[job_id], outputs=[summary], queue=False)
    compare.click(do_diff, inputs=[diff_a, diff_b], outputs=[diff_table, diff_chart])
