"""What every command shares: the parser class, progress on the terminal, writing files safely."""

from __future__ import annotations

import argparse
import json
import sys


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's exit code 2 matches "bad input"
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def progress_printer(enabled: bool):
    """A progress callback drawing ``[ 42%] message`` on stderr (only on a terminal)."""
    if not enabled or not sys.stderr.isatty():
        return None
    state = {"last": -1}

    def show(frac: float, msg: str) -> None:
        pct = int(frac * 100)
        if pct != state["last"]:
            state["last"] = pct
            sys.stderr.write(f"\r[{pct:3d}%] {msg[:70]:<70}")
            sys.stderr.flush()
            if frac >= 1.0:
                sys.stderr.write("\n")

    return show


def write_text(path: str, text: str | bytes, overwrite: bool = True) -> None:
    """Write a report file atomically (temp file + rename); refuse an existing one unless ``overwrite``."""
    from ..ops.files import write_file

    write_file(path, text, overwrite=overwrite)


def write_json(path: str | None, data: dict) -> None:
    if path:
        write_text(path, json.dumps(data, indent=2) + "\n")


def gen_args(x: argparse.ArgumentParser, webui_required: bool = True) -> None:
    """The options of every command that generates through a WebUI (defaults: the generation profile's)."""
    webui_args(x, webui_required)
    x.add_argument(
        "--checkpoint", help="checkpoint from the WebUI's list (default: the loaded one; restored after each image)"
    )
    x.add_argument(
        "--strengths",
        help="'0, 0.25, 0.5' or '0-1.5:0.25' (default: 0 up to each LoRA's max-safe "
        "strength from the inspector); 0, the baseline, is always in",
    )
    x.add_argument("--seeds", help="'1, 2, 3' or '3x' (default 1)")
    x.add_argument("--epochs", action="store_true", help="rows are the epoch files of each LoRA's training run")
    x.add_argument("--prompts", metavar="FILE", help="prompts, one per line")
    x.add_argument("--negative", default="", help="negative prompt")
    x.add_argument(
        "--profile",
        help="generation profile: sd15, sdxl, pony, illustrious, noobai-eps, noobai-vpred "
        "(default: detected from the checkpoint); the options below override it",
    )
    x.add_argument("--steps", type=int, help="sampling steps (default: the profile's)")
    x.add_argument("--cfg-scale", type=float, help="CFG scale (default: the profile's)")
    x.add_argument("--width", type=int, help="width (default: the profile's)")
    x.add_argument("--height", type=int, help="height (default: the profile's)")
    x.add_argument("--sampler", help="sampler (default: the profile's)")
    x.add_argument("--scheduler", help="scheduler (A1111 1.9+/Forge), e.g. Karras (default: the profile's)")
    x.add_argument("--clip-skip", type=int, help="CLIP skip (default: the profile's, or the WebUI's setting)")
    x.add_argument("--data-dir", metavar="DIR", help="lorakit's data folder (edited max-safe strength table)")


def webui_args(x: argparse.ArgumentParser, required: bool = True) -> None:
    """--webui (repeatable: a pool of WebUIs), their credentials, the batch size."""
    x.add_argument(
        "--webui",
        required=required,
        action="append",
        metavar="URL",
        help="a WebUI started with --api, e.g. http://127.0.0.1:7860; repeat it to generate on several "
        "(a pool); credentials per URL as http://USER:PASSWORD@host:port",
    )
    x.add_argument("--api-auth", metavar="USER:PASSWORD", help="the WebUIs' --api-auth credentials (all of them)")
    x.add_argument(
        "--webui-auth",
        action="append",
        metavar="USER:PASSWORD",
        help="credentials per --webui, in the same order (instead of --api-auth)",
    )
    x.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="images per WebUI request for cells differing only in consecutive seeds (default: the profile's)",
    )


def print_members(rec: dict) -> None:
    """A pool's work per WebUI and its notes (who was left out of what), on stderr."""
    members = rec.get("members") or []
    if len(members) > 1 or any(m.get("state") == "down" for m in members):
        for m in members:
            extra = f", {m['note']}" if m.get("note") else ""
            print(
                f"  {m['name']}: {m['made']} made, {m['failed']} failed, {m['model_switches']} checkpoint switch(es), "
                f"{m['state']}{extra}",
                file=sys.stderr,
            )
    notes = rec.get("pool_notes")
    for n in notes if isinstance(notes, list) else []:
        print(f"  note: {n}", file=sys.stderr)


def gen_fields(args: argparse.Namespace) -> dict:
    """The generation settings given on the command line, as request fields (unset ones left out)."""
    out = {
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "width": args.width,
        "height": args.height,
        "sampler_name": args.sampler,
        "scheduler": args.scheduler,
        "clip_skip": args.clip_skip,
        "profile": args.profile,
    }
    return {k: v for k, v in out.items() if v is not None}


def read_prompts(path: str | None) -> list[str] | None:
    from ..errors import RecipeError

    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the prompts file ({e.strerror}).") from None
    if not lines:
        raise RecipeError(f"{path}: no prompts (one per line; # starts a comment).")
    return lines


def local(args: argparse.Namespace, **kw):
    """The operations' context for a command: file paths, its data folder and WebUI."""
    from ..engineopts import cli_kwargs
    from ..ops import LocalContext

    engine = cli_kwargs(args) if hasattr(args, "no_hash_cache") else None
    return LocalContext(
        getattr(args, "data_dir", None),
        webui=getattr(args, "webui", None),
        api_auth=getattr(args, "webui_auth", None) or getattr(args, "api_auth", None),
        batch_size=getattr(args, "batch_size", None),
        engine=engine,
        **kw,
    )


def data_arg(x: argparse.ArgumentParser) -> None:
    x.add_argument(
        "--data-dir",
        default="lorakit-data",
        help="lorakit's data folder with lorakit.db (default "
        "./lorakit-data; the WebUI's is extensions/lorakit's "
        "data folder)",
    )


__all__ = [
    "Parser",
    "data_arg",
    "gen_args",
    "gen_fields",
    "local",
    "print_members",
    "progress_printer",
    "read_prompts",
    "webui_args",
    "write_json",
    "write_text",
]
