"""The Workshop sub-tab: extract a LoRA from two checkpoints, resize a LoRA, merge LoRAs into one LoRA,
clean a checkpoint, and look up a model's hashes. Each runs as a job with progress and Cancel."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import gradio as gr

from ..errors import LorakitError
from ..jobs import FINISHED
from ..ops import workshop as W
from ..ops.context import HostContext
from . import lists
from .common import POLL_S, box_value, error_md, progress_html

SAVE = ["fp16", "bf16", "fp32"]


def build_workshop_tab(service: HostContext) -> None:
    def ckpts() -> list[str]:
        return [e.name for e in service.checkpoints()]

    def loras() -> list[str]:
        return [e.name for e in service.loras()]

    gr.Markdown(
        "Make LoRAs from checkpoints and LoRAs, and clean checkpoints before release. New LoRAs go into "
        "the LoRA folder, new checkpoints into the checkpoint folder; nothing is written over an input."
    )
    refresh = gr.Button("Refresh lists", elem_id="lorakit_ws_refresh")
    with gr.Accordion("Extract a LoRA (tuned − base)", open=True):
        with gr.Row():
            x_tuned = lists.add(
                gr.Dropdown(label="Fine-tuned checkpoint", choices=ckpts(), elem_id="lorakit_ws_x_tuned"), ckpts
            )
            x_base = lists.add(
                gr.Dropdown(label="Base it was tuned from", choices=ckpts(), elem_id="lorakit_ws_x_base"), ckpts
            )
        with gr.Row():
            x_rank = gr.Number(label="Rank", value=32, precision=0, elem_id="lorakit_ws_x_rank")
            x_conv = gr.Number(label="Conv rank (0: no conv layers)", value=0, precision=0, elem_id="lorakit_ws_x_conv")
            x_dyn = gr.Textbox(label="Dynamic rank (optional)", placeholder="sv_fro:0.9", elem_id="lorakit_ws_x_dyn")
            x_out = gr.Textbox(label="Output LoRA name", placeholder="my-style-extracted", elem_id="lorakit_ws_x_out")
        x_run = gr.Button("Extract", variant="primary", interactive=False, elem_id="lorakit_ws_x_run")
    with gr.Accordion("Resize a LoRA", open=False):
        with gr.Row():
            r_lora = lists.add(gr.Dropdown(label="LoRA", choices=loras(), elem_id="lorakit_ws_r_lora"), loras)
            r_rank = gr.Number(label="New rank", value=16, precision=0, elem_id="lorakit_ws_r_rank")
            r_dyn = gr.Textbox(label="Dynamic rank (optional)", placeholder="sv_fro:0.9", elem_id="lorakit_ws_r_dyn")
            r_out = gr.Textbox(label="Output LoRA name", elem_id="lorakit_ws_r_out")
        r_run = gr.Button("Resize", variant="primary", interactive=False, elem_id="lorakit_ws_r_run")
    with gr.Accordion("Merge LoRAs into one LoRA", open=False):
        m_inputs = gr.Textbox(
            label="LoRAs with weights", placeholder="style:0.7, detail:0.5", elem_id="lorakit_ws_m_inputs"
        )
        with gr.Row():
            m_mode = gr.Radio(
                ["concat", "svd"], value="concat", label="Mode (concat is exact)", elem_id="lorakit_ws_m_mode"
            )
            m_rank = gr.Number(label="Rank (svd mode; 0 in concat)", value=0, precision=0, elem_id="lorakit_ws_m_rank")
            m_out = gr.Textbox(label="Output LoRA name", elem_id="lorakit_ws_m_out")
        m_run = gr.Button("Merge LoRAs", variant="primary", elem_id="lorakit_ws_m_run")
    with gr.Accordion("Clean a checkpoint", open=False):
        with gr.Row():
            c_ckpt = lists.add(
                gr.Dropdown(label="Checkpoint", choices=ckpts(), elem_id="lorakit_ws_c_ckpt"), ckpts, current=True
            )
            c_vae = gr.Dropdown(
                label="Replace the VAE from (optional)", choices=[""] + ckpts(), elem_id="lorakit_ws_c_vae"
            )
            c_save = gr.Radio(["keep"] + SAVE, value="keep", label="Save as", elem_id="lorakit_ws_c_save")
        with gr.Row():
            c_ema = gr.Checkbox(label="Drop EMA copies", value=True, elem_id="lorakit_ws_c_ema")
            c_other = gr.Checkbox(label="Drop non-model keys", value=True, elem_id="lorakit_ws_c_other")
            c_pos = gr.Checkbox(label="Repair CLIP position_ids", value=True, elem_id="lorakit_ws_c_pos")
            c_strip = gr.Checkbox(label="Strip training metadata", value=False, elem_id="lorakit_ws_c_strip")
        with gr.Row():
            c_title = gr.Textbox(label="Title (metadata)", elem_id="lorakit_ws_c_title")
            c_author = gr.Textbox(label="Author", elem_id="lorakit_ws_c_author")
            c_trig = gr.Textbox(label="Trigger words", elem_id="lorakit_ws_c_trig")
            c_out = gr.Textbox(label="Output checkpoint name", elem_id="lorakit_ws_c_out")
        c_run = gr.Button("Clean", variant="primary", elem_id="lorakit_ws_c_run")
    with gr.Accordion("Hashes", open=False):
        with gr.Row():
            h_ckpt = lists.add(
                gr.Dropdown(label="Checkpoint", choices=ckpts(), elem_id="lorakit_ws_h_ckpt"), ckpts, current=True
            )
            h_run = gr.Button("Hashes", elem_id="lorakit_ws_h_run")
        h_out = gr.Markdown(elem_id="lorakit_ws_h_out")
    with gr.Row():
        cancel = gr.Button("Cancel", variant="stop", elem_id="lorakit_ws_cancel")
    progress = gr.HTML(progress_html(0, "", "idle"), elem_id="lorakit_ws_progress")
    summary = gr.Markdown("", elem_id="lorakit_ws_summary")
    job_id = gr.Textbox(value="", elem_id="lorakit_ws_job", elem_classes=["lorakit-hidden"], show_label=False)

    def follow(kind: str, body: dict) -> Iterator[tuple]:
        try:
            job = W.start(service, kind, body)
        except LorakitError as e:
            yield "", progress_html(0, "not started", "error"), error_md(e)
            return
        while job.state not in FINISHED:
            yield job.id, progress_html(job.progress, job.message, job.state), ""
            time.sleep(POLL_S)
        if job.state == "done":
            res = job.result
            where = res.get("lora") or res.get("checkpoint") or res["output"]
            yield (
                job.id,
                progress_html(1, "done", "done"),
                f"**Saved** `{where}` — it is in the WebUI's list now.\n\n```\n{W.summary(kind, res['report'])}\n```",
            )
        else:
            yield job.id, progress_html(job.progress, job.state, job.state), error_md(Exception(job.error or job.state))

    def do_extract(tuned, base, rank, conv, dyn, out):
        yield from follow(
            "extract",
            {
                "tuned": tuned or "",
                "base": base or "",
                "output": out or "",
                "rank": box_value(rank) or 32,
                "conv_rank": box_value(conv),
                "dynamic": dyn or None,
            },
        )

    def do_resize(lora, rank, dyn, out):
        yield from follow(
            "resize", {"lora": lora or "", "output": out or "", "rank": box_value(rank), "dynamic": dyn or None}
        )

    def do_merge(text, mode, rank, out):
        items = []
        for part in [x.strip() for x in (text or "").split(",") if x.strip()]:
            name, sep, w = part.rpartition(":")
            try:
                items.append({"name": name.strip(), "weight": float(w)} if sep else {"name": part})
            except ValueError:
                items.append({"name": part})
        yield from follow("lora-merge", {"loras": items, "output": out or "", "mode": mode, "rank": box_value(rank)})

    def do_clean(ck, vae, save, ema, other, pos, strip, title, author, trig, out):
        yield from follow(
            "clean",
            {
                "checkpoint": ck or "",
                "output": out or "",
                "vae": vae or None,
                "save": save,
                "drop_ema": bool(ema),
                "drop_other": bool(other),
                "repair_position_ids": bool(pos),
                "strip_training": bool(strip),
                "title": title or None,
                "author": author or None,
                "trigger_words": trig or None,
            },
        )

    def do_hash(ck):
        try:
            h = W.hashes(service, checkpoint=ck or "")
        except LorakitError as e:
            return error_md(e)
        return "```\n" + json.dumps(h, indent=1) + "\n```"

    def do_cancel(jid):
        return "Cancelling..." if jid and service.jobs.cancel(jid) is not None else "Nothing to cancel."

    outs = [job_id, progress, summary]
    # a button that needs a selection waits for it
    for box in (x_tuned, x_base):
        box.change(lambda t, b: gr.update(interactive=bool(t and b)), [x_tuned, x_base], [x_run], queue=False)
    r_lora.change(lambda v: gr.update(interactive=bool(v)), [r_lora], [r_run], queue=False)
    x_run.click(do_extract, [x_tuned, x_base, x_rank, x_conv, x_dyn, x_out], outs)
    r_run.click(do_resize, [r_lora, r_rank, r_dyn, r_out], outs)
    m_run.click(do_merge, [m_inputs, m_mode, m_rank, m_out], outs)
    c_run.click(
        do_clean, [c_ckpt, c_vae, c_save, c_ema, c_other, c_pos, c_strip, c_title, c_author, c_trig, c_out], outs
    )
    h_run.click(do_hash, [h_ckpt], [h_out])
    cancel.click(do_cancel, [job_id], [summary], queue=False)
    lists.add(c_vae, lambda: [""] + ckpts())
    lists.trigger(refresh.click)
