"""The Inspect sub-tab: what a LoRA really is, a scan of the whole LoRA list, writing the found trigger and
strength into the WebUI's per-LoRA metadata (after confirmation), and the max-safe strength table."""

from __future__ import annotations

import html
import json
import time
from typing import Any

import gradio as gr

from ..errors import LorakitError
from ..jobs import FINISHED
from ..ops import inspect as inspect_op
from ..ops.context import HostContext
from . import lists
from .common import POLL_S, empty_table, error_md, not_saved, progress_html, table_rows

SUMMARY_HEADERS = ["LoRA", "model", "network", "rank", "trigger", "kind", "category", "max safe", "warnings"]


def _e(v: Any) -> str:
    return html.escape(str(v))


def report_md(rep: dict[str, Any]) -> str:
    """A report for the tab: the four answers first, then the facts and the evidence."""
    if "error" in rep:
        return f"**{_e(rep.get('lora') or rep['file'])}** could not be read: {_e(rep['error'])}"
    if rep.get("file_type") == "checkpoint":  # a checkpoint, not a LoRA: the inspector's own text
        return "```\n" + inspect_op.render(rep) + "```"
    st, tr, cd = rep["structure"], rep["training"], rep["category_detail"]
    trig = f"`{_e(rep['trigger'])}`" if rep["trigger"] else "none"
    lines = [
        f"### {_e(rep.get('lora') or rep['name'])}",
        "| trigger | kind | category | max safe strength |",
        "|---|---|---|---|",
        f"| {trig} | {_e(rep['kind'])} | {_e(rep['category'])} ({cd['confidence_label']}) | "
        f"**{rep['max_safe_strength']:g}** |",
        "",
        f"**Trigger:** {_e(rep['trigger_reason'])}",
        "",
        f"**Kind:** {_e(rep['kind'])} — " + "; ".join(_e(x) for x in rep["kind_evidence"]) + f". {_e(rep['baking'])}",
        "",
        f"**Strength:** {_e(rep['max_safe_reason'])}. **Category evidence:** "
        + ("; ".join(_e(x) for x in cd["evidence"]) or "none"),
        "",
    ]
    fam = rep["family"]
    lin = ", ".join(f"{_e(x['lineage'])} ({_e(x['evidence'])})" for x in fam["lineage"])
    rs = st["rank_spread"]
    ranks = f"{rep['rank']}" + (f" ({rs['min']}–{rs['max']})" if rs and rs["min"] != rs["max"] else "")
    lines += [
        "| | |",
        "|---|---|",
        f"| model | {_e(rep['architecture_label'])}" + (f" · lineage {lin}" if lin else "") + " |",
        f"| network | {_e(', '.join(rep['algorithms']) or 'none recognised')} · {st['modules']} modules "
        f"({_e(', '.join(f'{c} {n}' for c, n in st['modules_per_component'].items()))}) |",
        f"| rank / alpha | {ranks} / {rep['alpha'] if rep['alpha'] is not None else '—'} ({_e(st['alpha_source'])}) |",
        f"| blocks | {_e(' '.join(f'{b}:{n}' for b, n in st['blocks'].items()))} |",
        f"| trainer | {_e(tr['trainer'])} |",
    ]
    for f, v in tr["fields"].items():
        if f in (
            "ss_sd_model_name",
            "ss_num_epochs",
            "ss_steps",
            "ss_learning_rate",
            "ss_resolution",
            "ss_keep_tokens",
            "ss_caption_dropout_rate",
        ):
            lines.append(f"| {_e(f[3:])} | {_e(v)} |")
    if tr["network_args"]:
        lines.append(f"| network args | {_e(', '.join(f'{k}={v}' for k, v in tr['network_args'].items()))} |")
    lines.append("")
    if rep["trigger_candidates"]:
        lines += ["**Trigger candidates**", "", "| tag | share | score | evidence |", "|---|---|---|---|"]
        for c in rep["trigger_candidates"][:6]:
            lines.append(f"| `{_e(c['tag'])}` | {c['share']:.0%} | {c['score']:.1f} | {_e('; '.join(c['evidence']))} |")
        lines.append("")
    for f in tr["folders"]:
        head = f"**Folder `{_e(f['name'])}`** — {f['images'] if f['images'] is not None else '?'} images"
        head += f" × {f['repeats']} repeats" if f["repeats"] else ""
        lines.append(head + (" (regularisation)" if f["is_reg"] else ""))
        if f["tags"]:
            lines.append(
                "  \n"
                + ", ".join(
                    f"{_e(t['tag'])} {t['share']:.0%}" if t["share"] is not None else f"{_e(t['tag'])} ×{t['count']}"
                    for t in f["tags"][:24]
                )
                + (" …" if f["distinct_tags"] > 24 else "")
            )
        lines.append("")
    ws = rep.get("weight_stats")
    if ws:
        what = "‖ΔW‖/‖W‖" if ws["relative"] else "‖ΔW‖"
        lines += [f"**Per-block {what} at strength 1**", "", "| block | modules | value |", "|---|---|---|"]
        for b in ws["blocks"]:
            v = b.get("relative") if ws["relative"] else b["delta_norm"]
            lines.append(
                f"| {b['block']} | {b['modules']} | "
                f"{(f'{v:.2%}' if ws['relative'] else f'{v:.4g}') if v is not None else '—'} |"
            )
        lines.append("")
    if rep["warnings"]:
        lines += ["**Warnings**", ""] + [f"- {_e(w)}" for w in rep["warnings"]]
    return "\n".join(lines)


def summary_rows(reports: list[dict[str, Any]]) -> list[list]:
    rows = []
    for r in reports:
        if "error" in r:
            rows.append([r.get("lora") or r["file"], "unreadable", "", "", "", "", "", "", r["error"][:120]])
            continue
        rows.append(
            [
                r.get("lora") or r["name"],
                r["architecture_label"],
                ", ".join(r["algorithms"]),
                r["rank"] if r["rank"] is not None else "",
                r["trigger"] or "",
                r["kind"],
                r["category"],
                r["max_safe_strength"],
                len(r["warnings"]),
            ]
        )
    return rows


def strength_rows(settings: dict[str, Any]) -> list[list]:
    table = settings["max_safe_strength"]
    return [[c, table.get(c, table["unknown"])] for c in inspect_op.categories()]


def lineage_rows(settings: dict[str, Any]) -> list[list]:
    return [[k, v] for k, v in settings["cross_lineage"].items()]


def build_inspect_tab(service: HostContext) -> None:
    def lora_names() -> list[str]:
        return [e.name for e in service.loras()]

    def ckpt_names() -> list[str]:
        return [""] + [e.name for e in service.checkpoints()]

    with gr.Row():
        lora = lists.add(
            gr.Dropdown(label="LoRA", choices=lora_names(), elem_id="lorakit_inspect_lora", scale=4), lora_names
        )
        ckpt = lists.add(
            gr.Dropdown(
                label="Used with checkpoint (optional)",
                choices=ckpt_names(),
                value="",
                elem_id="lorakit_inspect_ckpt",
                scale=3,
            ),
            ckpt_names,
            current=True,
        )
        weights = gr.Checkbox(
            label="Per-block weight statistics (reads the tensors)",
            value=False,
            elem_id="lorakit_inspect_weights",
            scale=2,
        )
    with gr.Row():
        run = gr.Button("Inspect", variant="primary", elem_id="lorakit_inspect_run", interactive=False)
        scan = gr.Button("Inspect every LoRA", elem_id="lorakit_inspect_all")
        refresh = gr.Button("Refresh lists", elem_id="lorakit_inspect_refresh")
    progress = gr.HTML(progress_html(0, "", "idle"), elem_id="lorakit_inspect_progress")
    result = gr.Markdown("", elem_id="lorakit_inspect_report")
    with gr.Group():
        with gr.Row():
            act = gr.Textbox(
                label="Activation text (the WebUI adds it with the LoRA)", elem_id="lorakit_inspect_act", scale=4
            )
            pref = gr.Number(label="Preferred weight", value=1.0, elem_id="lorakit_inspect_pref", scale=1)
            ask = gr.Button(
                "Write to the LoRA's user metadata…", elem_id="lorakit_inspect_write", scale=2, interactive=False
            )
            not_saved(act, pref)
        with gr.Row(visible=False) as confirm_row:
            confirm_text = gr.Markdown("", elem_id="lorakit_inspect_confirm_text")
            confirm = gr.Button("Confirm: write it", variant="primary", elem_id="lorakit_inspect_confirm")
            dismiss = gr.Button("Cancel", elem_id="lorakit_inspect_dismiss")
    written = gr.Markdown("", elem_id="lorakit_inspect_written")
    summary = gr.Dataframe(
        headers=SUMMARY_HEADERS,
        value=empty_table(SUMMARY_HEADERS),
        interactive=False,
        label="All LoRAs",
        elem_id="lorakit_inspect_summary",
        wrap=True,
    )
    with gr.Accordion("Full report (JSON)", open=False):
        report = gr.JSON(elem_id="lorakit_inspect_json")
    with gr.Accordion("Max-safe strength table", open=False):
        gr.Markdown(
            "The strength each category can take without breaking images. The Inspect report, the "
            "strength grid and triage use it. Cross-lineage pairs are 'LoRA lineage>checkpoint lineage'."
        )
        with gr.Row():
            strengths = gr.Dataframe(
                headers=["category", "max safe strength"],
                datatype=["str", "number"],
                value=strength_rows(service.settings()),
                type="array",
                col_count=(2, "fixed"),
                interactive=True,
                elem_id="lorakit_inspect_strengths",
            )
            lineages = gr.Dataframe(
                headers=["lineage pair", "ceiling"],
                datatype=["str", "number"],
                value=lineage_rows(service.settings()),
                type="array",
                row_count=(1, "dynamic"),
                col_count=(2, "fixed"),
                interactive=True,
                elem_id="lorakit_inspect_lineages",
            )
        save = gr.Button("Save table", elem_id="lorakit_inspect_save")
        saved = gr.Markdown("", elem_id="lorakit_inspect_saved")

    def do_inspect(name, ck, deep):
        try:
            if not name:
                raise LorakitError("No LoRA picked.", fix="Choose a LoRA from the list.")
            rep = inspect_op.inspect(service, {"loras": [name], "checkpoint": ck or None, "weights": bool(deep)})[0]
        except LorakitError as e:
            return progress_html(0, "", "error"), error_md(e), None, gr.update(), gr.update()
        if "error" in rep:
            return progress_html(0, "", "error"), report_md(rep), rep, gr.update(), gr.update()
        return (progress_html(1, "done", "done"), report_md(rep), rep, rep["trigger"] or "", rep["max_safe_strength"])

    def do_scan(ck):
        try:
            job = inspect_op.start_all(service, {"checkpoint": ck or None})
        except LorakitError as e:
            yield progress_html(0, "", "error"), error_md(e), gr.update()
            return
        while job.state not in FINISHED:
            yield progress_html(job.progress, job.message, job.state), "", gr.update()
            time.sleep(POLL_S)
        if job.state != "done":
            yield (
                progress_html(job.progress, job.state, job.state),
                error_md(Exception(job.error or job.state)),
                gr.update(),
            )
            return
        reps = job.result["reports"]
        kinds = {k: sum(r.get("kind") == k for r in reps) for k in ("passive", "trigger-dependent")}
        bad = sum("error" in r for r in reps)
        msg = (
            f"**{len(reps)} LoRAs** in {job.result['seconds']:.1f} s: {kinds['passive']} passive, "
            f"{kinds['trigger-dependent']} trigger-dependent" + (f", {bad} unreadable" if bad else "") + "."
        )
        yield progress_html(1, "done", "done"), msg, summary_rows(reps)

    def do_ask(name, text, weight):
        if not name:
            return gr.update(visible=False), "", error_md(LorakitError("No LoRA picked."))
        try:
            current = inspect_op.user_metadata(service, name)
        except LorakitError as e:
            return gr.update(visible=False), "", error_md(e)
        old_t, old_w = current.get("activation text", ""), current.get("preferred weight", "")
        text_md = (
            f"Update `{_e(name)}.json`: activation text `{_e(old_t) or '—'}` → `{_e(text or '')}`, "
            f"preferred weight `{old_w if old_w != '' else '—'}` → `{weight}`. Other fields are kept."
        )
        return gr.update(visible=True), text_md, ""

    def do_write(name, text, weight):
        try:
            res = inspect_op.write_user_metadata(
                service, {"lora": name or "", "activation_text": text, "preferred_weight": weight}
            )
        except LorakitError as e:
            return gr.update(visible=False), error_md(e)
        return gr.update(visible=False), f"Wrote `{_e(res['path'])}`: {_e(json.dumps(res['after']))}"

    def do_save(rows, pairs):
        try:
            table = {}
            for r in table_rows(rows):
                table[str(r[0]).strip()] = float(r[1])
            lin = {}
            for r in table_rows(pairs):
                lin[str(r[0]).strip()] = float(r[1])
            st = service.update_settings({"max_safe_strength": table, "cross_lineage": lin})
        except (LorakitError, ValueError, TypeError) as e:
            return gr.update(), gr.update(), error_md(e)
        return strength_rows(st), lineage_rows(st), "Saved."

    lists.trigger(refresh.click)
    lora.change(lambda v: (gr.update(interactive=bool(v)),) * 2, inputs=[lora], outputs=[run, ask])
    run.click(do_inspect, inputs=[lora, ckpt, weights], outputs=[progress, result, report, act, pref])
    scan.click(do_scan, inputs=[ckpt], outputs=[progress, result, summary])
    ask.click(do_ask, inputs=[lora, act, pref], outputs=[confirm_row, confirm_text, written])
    confirm.click(do_write, inputs=[lora, act, pref], outputs=[confirm_row, written])
    dismiss.click(lambda: (gr.update(visible=False), "Not written."), inputs=[], outputs=[confirm_row, written])
    save.click(do_save, inputs=[strengths, lineages], outputs=[strengths, lineages, saved])
