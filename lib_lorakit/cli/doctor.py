"""Commands: doctor parity / doctor diagnose (through a WebUI's API)."""

from __future__ import annotations

import argparse
import sys

from ..ops import doctor as doctor_op
from ..ops.bake import entry_of_text
from .common import Parser, gen_fields, local, progress_printer, read_prompts, write_json


def _request(args: argparse.Namespace) -> dict:
    req = {
        "baked": args.baked,
        "base": args.base,
        "loras": [entry_of_text(x) for x in args.lora or []],
        "recipe_prompt": args.recipe,
        "prompts": read_prompts(args.prompts) or (args.prompt or None),
        "seeds": args.seeds,
        "negative_prompt": args.negative,
        **gen_fields(args),
    }
    if args.command_doctor == "diagnose":
        req.update(
            variants=[v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None,
            save_dtype=args.save_dtype,
            keep_scratch=args.keep_scratch,
            scratch_dir=args.scratch_dir,
        )
    return req


def cmd_doctor(args: argparse.Namespace) -> int:
    ctx = local(args, outputs_dir=args.out)
    req = _request(args)
    run = doctor_op.parity if args.command_doctor == "parity" else doctor_op.diagnose
    rep = run(ctx, req, progress=progress_printer(True))
    print(doctor_op.summary(rep))
    write_json(args.json, rep)
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    failed = (rep.get("record") or {}).get("failed") or rep.get("failed_cells")
    if failed:
        return 3
    return 0 if rep["parity"]["overall"]["verdict"] in ("identical", "equivalent") else 4


def add_parsers(sub) -> None:
    d = sub.add_parser(
        "doctor",
        help="check that a baked checkpoint renders like its runtime recipe (parity), and name the cause when "
        "it does not (diagnose); through a WebUI",
    )
    dsub = d.add_subparsers(dest="command_doctor", required=True, parser_class=Parser)
    for name, what in (
        ("parity", "render runtime | baked | base and compare (exit 0 identical/equivalent, 4 otherwise)"),
        ("diagnose", "parity plus the variant bakes; names the cause(s) with their evidence and a fix"),
    ):
        x = dsub.add_parser(name, help=what)
        x.add_argument("baked", help="the baked checkpoint (a file the WebUI lists)")
        x.add_argument("--base", help="the base checkpoint (default: the one recorded in the bake's recipe)")
        x.add_argument(
            "--lora",
            action="append",
            metavar="PATH[:STRENGTH[:TE_STRENGTH]]",
            help="a LoRA of the runtime recipe (repeat; default: the recipe recorded in the bake)",
        )
        x.add_argument("--recipe", metavar="TAGS", help="the runtime recipe as <lora:name:w> tags")
        x.add_argument("--prompt", action="append", help="a prompt (repeat; default: three built-in prompts)")
        x.add_argument("--prompts", metavar="FILE", help="prompts, one per line")
        x.add_argument("--seeds", help="'1, 2' or '2x' (default 1, 2)")
        x.add_argument("--negative", help="negative prompt (default: the profile's)")
        x.add_argument("--webui", required=True, metavar="URL", help="a WebUI started with --api")
        x.add_argument("--api-auth", metavar="USER:PASSWORD", help="the WebUI's --api-auth credentials")
        x.add_argument("--profile", help="generation profile (default: detected from the base checkpoint)")
        x.add_argument("--steps", type=int, help="sampling steps (default: the profile's)")
        x.add_argument("--cfg-scale", type=float, help="CFG scale (default: the profile's)")
        x.add_argument("--width", type=int, help="width (default: the profile's)")
        x.add_argument("--height", type=int, help="height (default: the profile's)")
        x.add_argument("--sampler", help="sampler (default: the profile's)")
        x.add_argument("--scheduler", help="scheduler (default: the profile's)")
        x.add_argument("--clip-skip", type=int, help="CLIP skip (default: the profile's)")
        x.add_argument("--out", default="lorakit-runs", help="where run folders go (default ./lorakit-runs)")
        x.add_argument("--json", metavar="FILE", help="also write the report as JSON")
        x.add_argument("--data-dir", metavar="DIR", help="lorakit's data folder (user generation profiles)")
        if name == "diagnose":
            x.add_argument(
                "--variants",
                help="comma-separated subset of rebake, fp32, alone, unet, te, sequential, scaled, untagged, cfg "
                "(default all)",
            )
            x.add_argument(
                "--save-dtype", choices=("fp16", "bf16", "fp32"), help="the variants' dtype (default: the bake's)"
            )
            x.add_argument("--keep-scratch", action="store_true", help="keep the variant bakes")
            x.add_argument(
                "--scratch-dir",
                help="a folder the WebUI scans for checkpoints, for the variant bakes (default: the baked file's folder)",
            )
        x.set_defaults(func=cmd_doctor)


__all__ = ["add_parsers", "cmd_doctor"]
