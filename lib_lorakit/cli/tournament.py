"""Commands: tournament create/generate/score/reveal/report/next-round/list."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import RecipeError
from ..ops import tournament as T
from .common import Parser, local, print_members, progress_printer, webui_args, write_text


def _read_spec(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{path}: cannot read the tournament spec ({e}).") from None


def cmd_tournament(args: argparse.Namespace) -> int:
    ctx = local(args, models_dir=getattr(args, "models_dir", None))
    a = args.action
    if a == "list":
        for t in T.tournaments(ctx):
            print(
                f"{t['id']}  round {t['round']}  {t['state']:<10} {'revealed' if t['revealed'] else 'blind':<8} "
                f"{t['name']}"
            )
        return 0
    if a == "create":
        print(T.create(ctx, _read_spec(args.spec)))
        return 0
    if a == "generate":
        rec = T.generate(ctx, args.id, args.out, progress=progress_printer(True))
        print_members(rec)
        print(
            f"{rec['ok']} images ok, {rec['failed']} failed, {rec['missing']} missing; rank them blind in the "
            f"Tournament tab or the standalone launcher (--data-dir {args.data_dir})"
        )
        return 0 if rec["failed"] == 0 and rec["missing"] == 0 else 3
    if a == "score":
        sc = T.scores(ctx, args.id)
        if args.json:
            print(json.dumps(sc, indent=2, default=str))
            return 0
        for name, vals in sc["schemes"].items():
            print(
                f"{name}: "
                + ", ".join(
                    f"{c} {v:.2f}"
                    for c, v in sorted(vals.items(), key=lambda kv: kv[1], reverse=name != "average rank")
                )
            )
        for n in sc["notes"]:
            print(f"note: {n}")
        if sc["separability"].get("text"):
            print(sc["separability"]["text"])
        return 0
    if a == "reveal":
        T.reveal(ctx, args.id)
        print(f"{args.id} revealed")
        return 0
    if a == "report":
        text = T.report(ctx, args.id, "csv" if args.csv else "md")
        if args.sheets:
            os.makedirs(args.sheets, exist_ok=True)
            for p in range(len(ctx.tournaments().spec(args.id).prompts)):
                out = os.path.join(args.sheets, f"prompt-{p + 1:02d}.png")
                write_text(out, T.contact_png(ctx, args.id, p), overwrite=args.overwrite)
            print(f"contact sheets in {args.sheets}", file=sys.stderr)
        if args.output:
            write_text(args.output, text, overwrite=args.overwrite)
        else:
            sys.stdout.write(text)
        return 0
    if a == "next-round":
        prop = T.next_round(ctx, args.id, {"mode": args.mode, "step": args.step, "create": args.create})
        print(json.dumps(prop, indent=2))
        return 0
    raise RecipeError(f"unknown action {a}")


def add_parsers(sub) -> None:
    to = sub.add_parser(
        "tournament",
        help="blind tournaments of checkpoints, recipes and merges",
        description="Blind tournaments: at least 5 prompts, one control (the previous version), hidden "
        "labels, top-3 ranking, scores under several schemes with uncertainty, rounds.",
    )
    tosub = to.add_subparsers(dest="action", required=True, parser_class=Parser)
    t_create = tosub.add_parser("create", help="create from a JSON spec {name, candidates, prompts, settings}")
    t_create.add_argument("spec")
    t_gen = tosub.add_parser("generate", help="build merge candidates and generate the images through a WebUI")
    t_gen.add_argument("id")
    webui_args(t_gen)
    t_gen.add_argument("--models-dir", help="the WebUI's checkpoint folder on this machine (where merges are built)")
    t_gen.add_argument("--out", default="lorakit-runs", help="folder for the run folder (default ./lorakit-runs)")
    t_score = tosub.add_parser("score", help="scores under every scheme (blind until revealed)")
    t_score.add_argument("id")
    t_score.add_argument("--json", action="store_true")
    t_rev = tosub.add_parser("reveal", help="reveal who is who")
    t_rev.add_argument("id")
    t_rep = tosub.add_parser("report", help="markdown (or --csv) report, after reveal")
    t_rep.add_argument("id")
    t_rep.add_argument("--csv", action="store_true")
    t_rep.add_argument("-o", "--output")
    t_rep.add_argument("--overwrite", action="store_true")
    t_rep.add_argument("--sheets", metavar="DIR", help="also write a contact sheet per prompt into DIR")
    t_next = tosub.add_parser("next-round", help="propose the next round from the winner (narrow or dial-in)")
    t_next.add_argument("id")
    t_next.add_argument("--mode", choices=("narrow", "dial-in"), default="narrow")
    t_next.add_argument("--step", type=float, default=0.1)
    t_next.add_argument("--create", action="store_true", help="create the proposed round")
    t_list = tosub.add_parser("list", help="tournaments")
    for x in (t_create, t_gen, t_score, t_rev, t_rep, t_next, t_list):
        x.add_argument("--data-dir", default="lorakit-data", help="lorakit's data folder (default ./lorakit-data)")
        x.set_defaults(func=cmd_tournament)
