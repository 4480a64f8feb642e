"""Command line: ``python -m lib_lorakit <command>``.

One module per command group; each command builds an operation's request from its arguments
and calls :mod:`lib_lorakit.ops` with a :class:`~lib_lorakit.ops.LocalContext` (models are file
paths). Exit codes: 0 done, 2 bad input (the message on stderr says what to do), 3 some images
failed (generation), 1 unexpected failure, 130 interrupted. No command leaves a partial output.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
from typing import NoReturn

from .. import __version__
from ..errors import LorakitError
from ..lazyimport import defer

# torch loads when a command first touches a tensor: reading headers (inspect) never needs it
defer("torch")
defer("numpy")

from . import bake, doctor, gen, inspect, tournament, triage, workshop  # noqa: E402
from .common import Parser  # noqa: E402

log = logging.getLogger("lorakit")


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(args.dir, arch=args.arch, keep=args.keep)


def cmd_ui(args: argparse.Namespace) -> int:
    from ..ui.standalone import serve

    serve(
        args.models_dir,
        args.loras_dir,
        port=args.port,
        host=args.host,
        api_auth=args.api_auth,
        data_dir=args.data_dir,
        current=args.checkpoint,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m lib_lorakit", description="lorakit: bake LoRA recipes into SD1.5/SDXL checkpoints.")
    p.add_argument("--version", action="version", version=f"lorakit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log details (and tracebacks) to stderr")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    bake.add_parsers(sub)
    inspect.add_parsers(sub)

    u = sub.add_parser("ui", help="serve the lorakit tab and /lorakit/v1 API locally, without a WebUI")
    u.add_argument("--models-dir", required=True, help="checkpoint folder (the host's Stable-diffusion folder)")
    u.add_argument("--loras-dir", required=True, help="LoRA folder")
    u.add_argument("--port", type=int, default=7870)
    u.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    u.add_argument("--api-auth", help="require user:password[,user2:password2] for the API, like the WebUI's option")
    u.add_argument(
        "--data-dir",
        help="lorakit's data folder (settings, triage decisions); default "
        "MODELS_DIR/.lorakit — give the CLI's --data-dir to review its triages here",
    )
    u.add_argument(
        "--checkpoint",
        help="the checkpoint the tab preselects, as a WebUI's loaded model (a name "
        "from the folder; preselected once the file is there)",
    )
    u.set_defaults(func=cmd_ui)

    gen.add_parsers(sub)
    triage.add_parsers(sub)
    tournament.add_parsers(sub)
    workshop.add_parsers(sub)
    doctor.add_parsers(sub)

    d = sub.add_parser("demo", help="build a small demo workspace (real key layout, tiny sizes) and bake it")
    d.add_argument("--dir", default="lorakit-demo", help="workspace folder (default ./lorakit-demo)")
    d.add_argument("--arch", choices=("sdxl", "sd15"), default="sdxl")
    d.add_argument("--keep", action="store_true", help="reuse an existing workspace's inputs")
    d.set_defaults(func=cmd_demo)
    return p


def _interrupt(*_):
    raise KeyboardInterrupt()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    # SIGTERM behaves like Ctrl-C: the same cleanup runs and no partial output remains. The previous
    # handler comes back afterwards (main() also runs inside test processes and other programs).
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except LorakitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from ..ops.files import remove_partial_outputs

        remove_partial_outputs()
        print("\ninterrupted; no output was written", file=sys.stderr)
        return 130
    except Exception:
        print("lorakit failed unexpectedly; please report this with the traceback below.", file=sys.stderr)
        traceback.print_exc()
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def leave(code: object = 0) -> NoReturn:
    """End the command line's process with ``code`` (as ``sys.exit`` takes it) without the interpreter's
    teardown.

    Once torch is loaded, tearing the interpreter down takes 0.4 s on the 2-core VM (the CPU build), the
    modules' objects freed one by one. Everything a command writes is closed and renamed before
    :func:`main` returns, so the teardown does nothing a user needs: the threads that are not daemons are
    joined and the ``atexit`` handlers run (logging's flush among them), then the process exits.
    """
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        status = 1
    try:
        me = threading.current_thread()
        for t in threading.enumerate():
            if t is not me and not t.daemon:
                t.join()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)


__all__ = ["build_parser", "leave", "main"]
