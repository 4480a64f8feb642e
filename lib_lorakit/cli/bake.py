"""Commands: bake, merge, diff."""

from __future__ import annotations

import argparse
import json
import os

from .. import engineopts
from ..errors import RecipeError
from ..merge.registry import METHODS, param_default
from ..ops import bake as bake_op
from ..ops import merge as merge_op
from ..ops.files import check_writable
from .common import local, progress_printer, write_json, write_text


def lora_entries(args: argparse.Namespace) -> list[dict]:
    """``--lora PATH[:STRENGTH[:TE]]`` and ``--blocks NAME=WEIGHTS`` as the request's LoRA entries."""
    entries = [bake_op.entry_of_text(x) for x in args.lora or []]

    def names(e: dict) -> tuple[str, ...]:
        base = os.path.basename(e["name"])
        return tuple(dict.fromkeys((e["name"], base, os.path.splitext(base)[0])))

    for item in args.blocks or []:
        hits = [(e, item[len(n) + 1 :]) for e in entries for n in names(e) if item.startswith(n + "=")]
        if not hits:
            given = ", ".join(names(e)[-1] for e in entries) or "none"
            raise RecipeError(
                f"--blocks {item!r} names no --lora (LoRAs: {given}).",
                fix="Write --blocks NAME=PRESET_OR_VECTOR with NAME the LoRA's path, file name or "
                "name without extension.",
            )
        for e, weights in hits:
            e["blocks"] = weights
    return entries


def cmd_bake(args: argparse.Namespace) -> int:
    check_writable(args.report)
    req = {
        "base": args.base,
        "output": args.output or "",
        "loras": lora_entries(args),
        "save_dtype": args.save_dtype,
        "overwrite": args.overwrite,
        "allow_unmatched": args.allow_unmatched,
        "dry_run": args.dry_run,
        "scale_source": args.scale_source,
    }
    report = bake_op.bake(local(args), req, progress=progress_printer(not args.quiet))["report"]
    write_json(args.report, report)
    print(json.dumps(report, indent=2) if args.json else bake_op.summary(report))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    check_writable(args.report)
    models = [merge_op.model_of_text(x) for x in args.model]
    te_from = None
    if args.te_from is not None:
        try:
            te_from = int(args.te_from)
        except ValueError:
            raise RecipeError(f"--te-from {args.te_from!r} must be a model number (1 for the first --model).") from None
    req = {
        "models": models,
        "output": args.output,
        "method": args.method,
        "base": args.base,
        "blocks": args.blocks,
        "vae_from": args.vae_from,
        "te_from": te_from,
        "normalize": not args.no_normalize,
        "density": args.density,
        "drop": args.drop,
        "seed": args.seed,
        "scale": args.scale,
        "save_dtype": args.save_dtype,
        "overwrite": args.overwrite,
    }
    report = merge_op.merge(local(args), req, progress=progress_printer(not args.quiet))["report"]
    write_json(args.report, report)
    print(json.dumps(report, indent=2) if args.json else merge_op.summary(report))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    import io

    check_writable(args.chart)
    result = merge_op.diff(local(args), {"a": args.a, "b": args.b}, progress=progress_printer(not args.quiet))
    if args.chart:
        buf = io.BytesIO()
        merge_op.diff_chart(result, f"{os.path.basename(args.b)} vs {os.path.basename(args.a)}").save(buf, format="PNG")
        write_text(args.chart, buf.getvalue())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{os.path.basename(args.b)} against {os.path.basename(args.a)} ({result['arch']}):")
        print(merge_op.diff_table(result))
        for what in ("only_in_a", "only_in_b", "shape_mismatch"):
            if result[what]:
                print(f"{what.replace('_', ' ')}: {len(result[what])} keys, e.g. {result[what][0]}")
    return 0


def add_parsers(sub) -> None:
    b = sub.add_parser(
        "bake",
        help="write a LoRA recipe permanently into a checkpoint",
        description="Bake LoRA/LyCORIS files into a checkpoint. Maths in fp32, one rounding to the "
        "save dtype; a LoRA layer that matches nothing is an error.",
    )
    b.add_argument("base", help="base checkpoint (.safetensors; .ckpt/.pt read weights-only)")
    b.add_argument(
        "--lora",
        action="append",
        metavar="PATH[:STRENGTH[:TE_STRENGTH]]",
        help="a LoRA and its strength (default 1); TE_STRENGTH for the text encoders (default STRENGTH). "
        "Repeat for a recipe.",
    )
    b.add_argument("-o", "--output", help="output .safetensors (refused if it exists, unless --overwrite)")
    b.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="default fp16")
    b.add_argument(
        "--blocks",
        action="append",
        metavar="PATH=PRESET_OR_VECTOR",
        help="per-block weights for one LoRA: a LoRA Block Weight preset (INALL, OUTALL, ...) or vector "
        "(17/26 values SD1.5, 12/20 SDXL), or named 'IN04=0.5,OUT05=0'",
    )
    b.add_argument("--overwrite", action="store_true", help="replace an existing output")
    b.add_argument(
        "--allow-unmatched",
        action="store_true",
        help="bake what matches and list unmatched LoRA layers in the report instead of failing",
    )
    b.add_argument("--dry-run", action="store_true", help="check and plan everything, write nothing")
    b.add_argument(
        "--scale-source",
        choices=("writer", "runtime"),
        default="writer",
        help="writer: the scale the LoRA's writer meant (alpha tensors, else PEFT/diffusers adapter "
        "metadata); runtime: alpha tensors only, as A1111/Forge apply the file (default writer)",
    )
    b.add_argument("--report", metavar="FILE", help="write the full report as JSON")
    b.add_argument("--json", action="store_true", help="print the report as JSON instead of a summary")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    engineopts.add_cli_args(b)
    b.set_defaults(func=cmd_bake)

    m = sub.add_parser(
        "merge",
        help="merge checkpoints: " + ", ".join(METHODS),
        description="Merge N checkpoints in fp32 with one rounding, streaming. The VAE is never "
        "averaged: it is copied from one source.",
    )
    m.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="PATH[:WEIGHT]",
        help="an ingredient and its weight; the first is the primary. Add-difference: A, then B:w",
    )
    m.add_argument("--method", default="weighted", help="one of: " + ", ".join(METHODS) + " (weighted)")
    m.add_argument("--base", metavar="PATH", help="C for add-difference (A + w(B - C)), TIES and DARE")
    m.add_argument(
        "--blocks",
        metavar="PRESET_OR_VECTOR",
        help="per-block factors on the non-primary contributions (SuperMerger block order: BASE,IN00..,"
        "M00,OUT..); with the second model at weight 1 a vector is SuperMerger's per-block alpha",
    )
    m.add_argument("--vae-from", metavar="N|PATH", help="copy the VAE from model N (default 1) or a VAE file")
    m.add_argument("--te-from", metavar="N", help="copy the text encoders from model N instead of merging them")
    m.add_argument("-o", "--output", required=True)
    m.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    m.add_argument("--no-normalize", action="store_true", help="use the weights as given (default: scale to sum 1)")
    from ..merge.registry import REGISTRY

    for name, flag, kind in (
        ("density", "--density", float),
        ("drop", "--drop", float),
        ("seed", "--seed", int),
        ("scale", "--scale", float),
    ):
        helptext = next(p.help for mm in REGISTRY.values() for p in mm.params if p.name == name)
        m.add_argument(flag, type=kind, default=param_default(name), help=f"{helptext} ({param_default(name)})")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--report", metavar="FILE")
    m.add_argument("--json", action="store_true")
    m.add_argument("-q", "--quiet", action="store_true")
    engineopts.add_cli_args(m)
    m.set_defaults(func=cmd_merge)

    df = sub.add_parser("diff", help="where does B differ from A: relative change and cosine per block")
    df.add_argument("a")
    df.add_argument("b")
    df.add_argument("--chart", metavar="PNG", help="also write a bar chart")
    df.add_argument("--json", action="store_true")
    df.add_argument("-q", "--quiet", action="store_true")
    df.set_defaults(func=cmd_diff)
