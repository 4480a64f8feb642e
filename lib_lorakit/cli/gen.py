"""Commands that generate through a WebUI: grid, autotest."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import RecipeError
from ..ops import grid as grid_op
from .common import gen_args, gen_fields, local, print_members, progress_printer, read_prompts


def cmd_grid(args: argparse.Namespace) -> int:
    ctx = local(args)
    if args.resume:
        todo, planned = grid_op.missing(args.resume)
        print(f"resuming {args.resume}: {todo} of {planned} image(s) to make", file=sys.stderr)
        return _print_grid(grid_op.resume(ctx, args.resume, progress=progress_printer(not args.quiet)), args.json)
    if not args.prompt and not args.prompts:
        raise RecipeError("The grid needs a prompt.", fix="Give --prompt TEXT or --prompts FILE.")
    req = {
        "loras": args.lora or [],
        "prompt": read_prompts(args.prompts) or args.prompt,
        "negative_prompt": args.negative,
        "strengths": args.strengths,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "checkpoint": args.checkpoint,
        **gen_fields(args),
    }
    notes: list[str] = []
    res = grid_op.grid(ctx, req, outputs=args.out, progress=progress_printer(not args.quiet), notes_out=notes)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    return _print_grid(res, args.json)


def _print_grid(res: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(res, indent=2, default=str))
    else:
        for row, v in res["verdicts"].items():
            print(f"{row}: {v['case']} - {v['text']}")
        rec = res["record"]
        print_members(rec)
        print(
            f"{rec['ok']} images ok, {rec['failed']} failed, {rec['missing']} missing, {rec['flagged']} flagged; "
            f"grid {res['grid']}; summary {res['summary']}"
        )
        if rec["failed"] or rec["missing"]:
            print(f"run it again to fill the gaps: python -m lib_lorakit grid --webui URL --resume {res['run_dir']}")
    return 0 if res["record"]["failed"] == 0 and res["record"]["missing"] == 0 else 3


def cmd_autotest(args: argparse.Namespace) -> int:
    if not args.lora and not args.watch:
        raise RecipeError("Nothing to test.", fix="Give LoRA files or folders, and/or --watch FOLDER.")
    req = {
        "loras": args.lora,
        "prompts": read_prompts(args.prompts),
        "negative_prompt": args.negative,
        "strengths": args.strengths,
        "seeds": args.seeds,
        "checkpoint": args.checkpoint,
        "epochs": args.epochs,
        "use_trigger": not args.no_trigger,
        **gen_fields(args),
    }
    results = grid_op.autotest(
        local(args),
        req,
        args.out,
        watch=args.watch,
        interval=args.interval,
        watch_for=args.watch_for,
        log=lambda m: print(m, flush=True),
    )
    return 2 if any("error" in r for r in results) else 0


def add_parsers(sub) -> None:
    g = sub.add_parser(
        "grid",
        help="LoRA strength grid through a running WebUI",
        description="Generate a LoRA strength grid through a WebUI's API: a baseline column at 0, one "
        "row per LoRA (or epoch), a verdict per row. Writes a run folder with every "
        "image, its manifest, grid.png and summary.md. Exit 3 when images failed.",
    )
    g.add_argument(
        "--lora",
        action="append",
        metavar="NAME",
        help="a LoRA from the WebUI's list (repeat); default: those tagged in the prompt",
    )
    g.add_argument("--prompt", default="", help="the prompt (tags of the tested LoRAs are set per cell)")
    gen_args(g)
    g.add_argument("--out", default="lorakit-runs", help="folder for run folders (default ./lorakit-runs)")
    g.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="make only the missing or failed images of an earlier run (its plan is kept; other options are ignored)",
    )
    g.add_argument("--json", action="store_true")
    g.add_argument("-q", "--quiet", action="store_true")
    g.set_defaults(func=cmd_grid)

    a = sub.add_parser(
        "autotest",
        help="strength grid for each new LoRA (or epoch) through a WebUI; --watch a folder",
        description="For each LoRA file (or each file appearing in --watch FOLDER once complete): "
        "inspect it, run a strength grid through the WebUI over several prompts (its "
        "trigger added, baseline included), and write the grid, the verdict and a "
        "markdown summary into its run folder. Files already tested are skipped.",
    )
    a.add_argument("lora", nargs="*", help="LoRA files or folders (inside the WebUI's LoRA folders)")
    gen_args(a)
    a.add_argument("--watch", metavar="FOLDER", help="keep testing new complete files that appear here")
    a.add_argument("--interval", type=float, default=10.0, help="seconds between looks at --watch (default 10)")
    a.add_argument("--watch-for", type=float, metavar="SECONDS", help="stop watching after this long (default: never)")
    a.add_argument("--no-trigger", action="store_true", help="do not add the inspector's trigger to the prompts")
    a.add_argument(
        "--out", default="lorakit-runs", help="folder for run folders and the state file (default ./lorakit-runs)"
    )
    a.set_defaults(func=cmd_autotest)
