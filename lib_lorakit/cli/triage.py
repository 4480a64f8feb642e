"""Commands: triage create/list/report/decide/archive/restore."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import RecipeError
from ..ops import triage as triage_op
from .common import Parser, data_arg, gen_args, gen_fields, local, print_members, progress_printer, write_text


def cmd_triage(args: argparse.Namespace) -> int:
    ctx = local(args)
    if args.action == "list":
        for t in triage_op.triages(ctx):
            print(f"{t['id']}  {t['state']:<10} pass {t['pass']}  {t['name']}")
        return 0
    if args.action == "create":
        prompts = {}
        for item in args.prompt or []:
            cat, sep, text = item.partition("=")
            if not sep or not text.strip():
                raise RecipeError(f"--prompt {item!r}: write CATEGORY=PROMPT, e.g. style=a village street.")
            prompts[cat.strip()] = text.strip()
        req = {
            "folder": args.folder,
            "checkpoint": args.checkpoint,
            "prompts": prompts or None,
            "seeds": args.seeds,
            "strength": args.strength,
            "negative_prompt": args.negative,
            "arch": args.arch,
            "category": args.category,
            "name_filter": args.name,
            "name": args.title or "",
            **gen_fields(args),
        }
        t, backend = triage_op.create(ctx, req)
        st = t.state()
        print(f"triage {t.id}: {st['items']} LoRAs, {st['skipped']} skipped", file=sys.stderr)
        for it in t.items:
            if it.get("skipped"):
                print(f"  skipped {it['lora']}: {it['skipped']}", file=sys.stderr)
        rec = triage_op.generate(ctx, t, backend, args.out, progress=progress_printer(True))
        print_members(rec)
        print(t.id)
        print(
            f"{rec.get('ok', 0)} images ok, {rec.get('failed', 0)} failed; review it in the WebUI's Triage tab or "
            f"the standalone launcher (--data-dir {args.data_dir})",
            file=sys.stderr,
        )
        return 0 if not rec.get("failed") and not rec.get("missing") else 3
    if args.action == "decide":
        res = triage_op.decide(
            ctx, args.id, {"decisions": [{"idx": args.idx, "decision": args.decision, "client": "cli"}]}
        )
        print(json.dumps(res["state"]))
        return 0
    if args.action == "report":
        text = triage_op.report(ctx, args.id, "csv" if args.csv else "md")
        if args.output:
            write_text(args.output, text, overwrite=args.overwrite)
            print(f"wrote {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0
    if args.action == "archive":
        roots = [args.lora_root] if args.lora_root else None
        res = triage_op.archive(ctx, args.id, {"decision": args.decision}, archive_dir=args.archive_dir, roots=roots)
        print(
            f"archived {res['loras']} LoRA(s), {res['files']} file(s), {res['bytes'] / 2**20:.1f} MB into "
            f"{res['batch']}; undo with: python -m lib_lorakit triage restore {res['batch']}"
        )
        return 0
    raise RecipeError(f"unknown action {args.action}")


def cmd_triage_restore(args: argparse.Namespace) -> int:
    res = triage_op.restore(local(args), {"batch": args.batch})
    print(f"{res['state']}: {len(res['restored'])} file(s) back in place")
    for c in res["conflicts"]:
        print(f"  left in the archive (its original path is taken): {c}", file=sys.stderr)
    for m in res["missing"]:
        print(f"  missing from the archive: {m}", file=sys.stderr)
    return 0 if res["state"] == "restored" else 2


def add_parsers(sub) -> None:
    t = sub.add_parser(
        "triage",
        help="keep/maybe/drop many LoRAs: image pairs, decisions, report, archive",
        description="LoRA triage: one image per LoRA at its max-safe strength beside a no-LoRA "
        "baseline; decisions in the WebUI's Triage tab (or the standalone launcher); a "
        "report; a reversible archive of the NO files.",
    )
    tsub = t.add_subparsers(dest="action", required=True, parser_class=Parser)
    tc = tsub.add_parser("create", help="plan a triage of a LoRA folder and generate its pairs through a WebUI")
    tc.add_argument("--folder", help="a folder inside the WebUI's LoRA folder (default: every LoRA it lists)")
    tc.add_argument("--arch", choices=("sd15", "sdxl"))
    tc.add_argument("--category", help="only this inspector category")
    tc.add_argument("--name", help="only LoRAs whose name matches (substring or regular expression)")
    tc.add_argument("--strength", type=float, help="override every LoRA's max-safe strength")
    tc.add_argument("--prompt", action="append", metavar="CATEGORY=PROMPT", help="prompt for a category (repeat)")
    tc.add_argument("--title", help="a name for the triage")
    gen_args(tc)
    tc.set_defaults(data_dir="lorakit-data")
    tc.add_argument("--out", default="lorakit-runs", help="folder for the run folder (default ./lorakit-runs)")
    tl = tsub.add_parser("list", help="triage sessions")
    tr_ = tsub.add_parser("report", help="markdown (or --csv) report")
    tr_.add_argument("id")
    tr_.add_argument("--csv", action="store_true")
    tr_.add_argument("-o", "--output", help="write to this file (refused if it exists, unless --overwrite)")
    tr_.add_argument("--overwrite", action="store_true")
    td = tsub.add_parser("decide", help="record one decision")
    td.add_argument("id")
    td.add_argument("idx", type=int)
    td.add_argument("decision", choices=("yes", "maybe", "no", "clear"))
    ta = tsub.add_parser("archive", help="move the NO LoRAs and their sidecars into an archive folder (reversible)")
    ta.add_argument("id")
    ta.add_argument("--archive-dir", required=True, help="where archive batches go (outside the LoRA folders)")
    ta.add_argument("--lora-root", help="the LoRA folder (archived paths keep their place below it)")
    ta.add_argument("--decision", default="no", choices=("no", "maybe", "yes"))
    for x in (tl, tr_, td, ta):
        data_arg(x)
        x.set_defaults(func=cmd_triage)
    tc.set_defaults(func=cmd_triage)
    trs = tsub.add_parser("restore", help="put an archive batch back, byte for byte (never overwrites)")
    trs.add_argument("batch", help="the batch folder printed by archive")
    trs.set_defaults(func=cmd_triage_restore)
