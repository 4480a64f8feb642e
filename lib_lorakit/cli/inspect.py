"""Command: inspect."""

from __future__ import annotations

import argparse
import json
import sys

from ..ops import inspect as inspect_op
from .common import local, progress_printer


def cmd_inspect(args: argparse.Namespace) -> int:
    # one process with reading threads by default: the tensor tables are parsed and matched once per
    # distinct table, so worker processes (each importing the library and planning again) cost more
    # than they save (bench/README.md, inspect_scan.py)
    jobs = args.jobs if args.jobs is not None else 1
    reports = inspect_op.inspect(
        local(args),
        {"loras": args.lora, "checkpoint": args.checkpoint, "weights": args.weights},
        progress=progress_printer(not args.quiet and not args.json),
        processes=jobs,
    )
    failed = 0
    for rep in reports:
        if "error" in rep:
            failed += 1
        elif args.write_user_metadata:
            rep["user_metadata_written"] = inspect_op.write_user_metadata_file(rep)
        if args.json:
            print(json.dumps(rep, ensure_ascii=False), flush=True)
        else:
            print(inspect_op.render(rep, tags=args.tags), flush=True)
            if rep.get("user_metadata_written"):
                print(f"  wrote {rep['user_metadata_written']['path']}: {rep['user_metadata_written']['after']}\n")
    if not args.json and len(reports) > 1:
        kinds = {k: sum(r.get("kind") == k for r in reports) for k in ("passive", "trigger-dependent")}
        print(
            f"{len(reports)} files: {kinds['passive']} passive, {kinds['trigger-dependent']} trigger-dependent, "
            f"{failed} unreadable"
        )
    broken = sum("broken" in r for r in reports)
    if failed:
        names = ", ".join(str(r.get("file", "?")) for r in reports if "error" in r)
        print(
            f"error: {failed} of {len(reports)} file(s) could not be read (see above): {names[:400]}", file=sys.stderr
        )
    if broken:
        print(
            f"error: {broken} of {len(reports)} file(s) hold NaN/inf weights: "
            + "; ".join(r["broken"].split("\n")[0] for r in reports if "broken" in r)[:400],
            file=sys.stderr,
        )
    if failed or broken:
        return 2
    return 0


def add_parsers(sub) -> None:
    i = sub.add_parser(
        "inspect",
        help="what a LoRA really is: family, network, real trigger, kind, category, max-safe strength",
        description="Inspect LoRA files (folders are scanned recursively). Reads headers only, "
        "unless --weights asks for per-block weight statistics.",
    )
    i.add_argument("lora", nargs="+", help="LoRA files or folders")
    i.add_argument(
        "--checkpoint",
        metavar="CKPT",
        help="the checkpoint it will be used with: family checks and cross-lineage ceilings (its header "
        "only); with --weights, ‖ΔW‖/‖W‖ per block",
    )
    i.add_argument(
        "--weights",
        action="store_true",
        help="per-block ‖ΔW‖ at strength 1, relative to --checkpoint's weights when given (reads tensors)",
    )
    i.add_argument("--json", action="store_true", help="one JSON object per file, one per line")
    i.add_argument("--tags", type=int, default=12, help="tags shown per training folder (12)")
    i.add_argument(
        "--data-dir",
        metavar="DIR",
        help="lorakit's data folder, for the edited max-safe strength table (settings.json)",
    )
    i.add_argument(
        "--write-user-metadata",
        action="store_true",
        help="write the trigger and max-safe strength into each LoRA's <name>.json (the WebUI's "
        "'activation text' and 'preferred weight'), keeping its other fields",
    )
    i.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="worker processes for large folders (default 1: one process, reading threads)",
    )
    i.add_argument("-q", "--quiet", action="store_true")
    i.set_defaults(func=cmd_inspect)
