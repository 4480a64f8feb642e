"""Workshop commands of the lorakit CLI: extract, resize, lora-merge, clean, hash.

:func:`add_parsers` adds them to the main parser's subparsers; :func:`run` runs the parsed command.
"""

from __future__ import annotations

import argparse
import json

COMMANDS = ("extract", "resize", "lora-merge", "clean", "hash")


def _dyn(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dynamic",
        metavar="RULE",
        help="rank per layer: sv_fro:0.9, sv_ratio:8 or sv_cumulative:0.9 (as kohya's resize_lora.py; --rank caps it)",
    )


def add_parsers(sub) -> None:
    """Add the workshop commands to ``sub`` (the main parser's subparsers)."""
    e = sub.add_parser(
        "extract",
        help="extract a LoRA from a fine-tune: SVD of (tuned - base) per layer",
        description="Extract a kohya-format LoRA (lora_unet_/lora_te1_/lora_te2_) from TUNED - BASE.",
    )
    e.add_argument("tuned")
    e.add_argument("base")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--rank", type=int, default=32, help="rank of linear layers (default 32; the cap with --dynamic)")
    e.add_argument("--conv-rank", type=int, default=None, help="rank of 3x3 convolutions (default: none extracted)")
    _dyn(e)
    e.add_argument(
        "--min-diff",
        type=float,
        default=0.0,
        help="skip layers whose largest absolute difference is at most this (default 0: unchanged only)",
    )
    e.add_argument("--blocks", help="only these components/blocks, e.g. unet or te1,te2 or IN04,OUT05")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.add_argument(
        "--method",
        choices=("auto", "exact"),
        default="auto",
        help="auto: randomized SVD where it settles, else exact; exact: full SVD of every layer",
    )
    e.add_argument("--save", choices=("fp16", "bf16", "fp32"), default="fp16")
    e.add_argument("--no-hash", action="store_true", help="do not record the inputs' SHA-256 in the metadata")

    r = sub.add_parser("resize", help="re-factor a LoRA to a lower rank (or a dynamic rank per layer)")
    r.add_argument("lora")
    r.add_argument("-o", "--output", required=True)
    r.add_argument("--rank", type=int, default=None, help="new rank (the cap with --dynamic)")
    r.add_argument("--conv-rank", type=int, default=None, help="new rank of 3x3 conv modules (default: --rank)")
    _dyn(r)
    r.add_argument("--base", help="base checkpoint (needed for DoRA; gives LoHa/LoKr shapes)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--save", choices=("fp16", "bf16", "fp32"), default="fp16")

    m = sub.add_parser("lora-merge", help="merge LoRAs into one LoRA: concat (exact) or svd to a rank")
    m.add_argument("loras", nargs="+", metavar="LORA[:W[:TE_W]]")
    m.add_argument("-o", "--output", required=True)
    m.add_argument("--mode", choices=("concat", "svd"), default="concat")
    m.add_argument("--rank", type=int, default=None, help="target rank (svd mode)")
    m.add_argument("--conv-rank", type=int, default=None)
    _dyn(m)
    m.add_argument("--blocks", help="only these components/blocks, e.g. unet or IN04,OUT05")
    m.add_argument("--base", help="base checkpoint (needed for DoRA inputs)")
    m.add_argument("--device", default="cpu")
    m.add_argument("--save", choices=("fp16", "bf16", "fp32"), default="fp16")

    c = sub.add_parser(
        "clean",
        help="clean a checkpoint: safe .ckpt conversion, drop EMA/optimizer, repair "
        "position_ids, swap VAE, NaN scan, hashes, metadata",
    )
    c.add_argument("checkpoint")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--keep-ema", action="store_true", help="keep model_ema.* copies")
    c.add_argument("--keep-other", action="store_true", help="keep keys that are not model weights")
    c.add_argument("--no-repair", action="store_true", help="leave CLIP position_ids as they are")
    c.add_argument("--save", choices=("keep", "fp16", "bf16", "fp32"), default="keep")
    c.add_argument("--vae", help="replace the VAE from this VAE file or checkpoint")
    c.add_argument("--title")
    c.add_argument("--author")
    c.add_argument("--description")
    c.add_argument("--trigger-words")
    c.add_argument("--preferred-weight", type=float)
    c.add_argument("--strip-training", action="store_true", help="remove ss_*/sshs_* training metadata")
    c.add_argument("--no-scan", action="store_true", help="skip the NaN/Inf scan")

    h = sub.add_parser("hash", help="the hashes the WebUI shows: SHA-256, short hash, legacy and safetensors hash")
    h.add_argument("files", nargs="+")

    for p in (e, r, m, c, h):
        p.add_argument("--json", action="store_true", help="print the full report as JSON")
        if p is not h:
            p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
            p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
        p.set_defaults(func=run)


def _lora_inputs(items: list[str]) -> list[dict]:
    """``LORA[:W[:TE_W]]`` items as request entries (the path may itself contain ':')."""
    out = []
    for text in items:
        parts = text.rsplit(":", 2)
        nums: list[float] = []
        while len(parts) > 1:
            try:
                nums.insert(0, float(parts[-1]))
            except ValueError:
                break
            parts.pop()
        out.append(
            {
                "name": ":".join(parts),
                "weight": nums[0] if nums else 1.0,
                "te_weight": nums[1] if len(nums) > 1 else None,
            }
        )
    return out


def run(args: argparse.Namespace) -> int:
    """Run a parsed workshop command through the operations layer (LorakitError: exit 2)."""
    from ..ops import workshop as W
    from .common import local, progress_printer

    ctx = local(args)
    cmd = args.command
    if cmd == "hash":
        out = {f: W.hashes(ctx, checkpoint=f) for f in args.files}
        if args.json:
            print(json.dumps(out, indent=1))
        else:
            for f, hs in out.items():
                print(
                    f"{f}\n  sha256 {hs['sha256']}\n  short  {hs['shorthash']}\n  legacy {hs['legacy']}"
                    + (f"\n  addnet {hs['addnet']} ({hs['addnet_short']})" if "addnet" in hs else "")
                )
        return 0
    say = progress_printer(not args.quiet)
    common = {"output": args.output, "overwrite": args.overwrite}
    if cmd == "extract":
        res = W.extract(
            ctx,
            {
                **common,
                "tuned": args.tuned,
                "base": args.base,
                "rank": args.rank,
                "conv_rank": args.conv_rank,
                "dynamic": args.dynamic,
                "min_diff": args.min_diff,
                "blocks": args.blocks,
                "device": args.device,
                "save": args.save,
                "method": args.method,
                "hash_inputs": not args.no_hash,
            },
            progress=say,
        )
    elif cmd == "resize":
        res = W.resize(
            ctx,
            {
                **common,
                "lora": args.lora,
                "rank": args.rank,
                "conv_rank": args.conv_rank,
                "dynamic": args.dynamic,
                "base": args.base,
                "device": args.device,
                "save": args.save,
            },
            progress=say,
        )
    elif cmd == "lora-merge":
        res = W.lora_merge(
            ctx,
            {
                **common,
                "loras": _lora_inputs(args.loras),
                "mode": args.mode,
                "rank": args.rank,
                "conv_rank": args.conv_rank,
                "dynamic": args.dynamic,
                "blocks": args.blocks,
                "base": args.base,
                "device": args.device,
                "save": args.save,
            },
            progress=say,
        )
    else:
        res = W.clean(
            ctx,
            {
                **common,
                "checkpoint": args.checkpoint,
                "drop_ema": not args.keep_ema,
                "drop_other": not args.keep_other,
                "repair_position_ids": not args.no_repair,
                "save": args.save,
                "vae": args.vae,
                "title": args.title,
                "author": args.author,
                "description": args.description,
                "trigger_words": args.trigger_words,
                "preferred_weight": args.preferred_weight,
                "strip_training": args.strip_training,
                "scan": not args.no_scan,
            },
            progress=say,
        )
    rep = res["report"]
    print(json.dumps(rep, indent=1, default=str) if args.json else W.summary(cmd, rep))
    return 0
