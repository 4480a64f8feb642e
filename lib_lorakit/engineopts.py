"""Engine options every door shares: device, maths threads and the hash cache.

The CLI adds them with :func:`add_cli_args` and reads them with :func:`cli_kwargs`; the
service turns a request and the host into the same keyword arguments with
:func:`host_kwargs`.
"""

from __future__ import annotations

import argparse
from typing import Any

DEVICES = ("auto", "cpu", "cuda")
SETTING_DEVICE = "lorakit_device"  # the tab/WebUI setting: auto, cpu or cuda


def add_cli_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the fp32 maths runs: auto (the GPU when torch sees one), cpu or cuda",
    )
    g.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="maths threads (default: 2 for a bake, 4 for a merge, fewer on small machines; each gets its share of the cores)",
    )
    g.add_argument(
        "--hash-cache", metavar="DIR", help="folder of the hash cache (default $LORAKIT_DATA_DIR or ~/.cache/lorakit)"
    )
    g.add_argument("--no-hash-cache", action="store_true", help="hash every input again, remember nothing")


def cli_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    cache: Any = False if args.no_hash_cache else (args.hash_cache or True)
    return {"device": args.device, "workers": args.workers, "hash_cache": cache}


def host_kwargs(host: Any, device: str | None) -> dict[str, Any]:
    """Keyword arguments for bake/merge inside a host: its data folder's hash cache (fed by the
    host's own hashes when it has them), the request's device or the setting, and inside the
    WebUI one core left for its server."""
    from .hashcache import HashCache
    from .streaming import engine_workers

    reserve = 1 if getattr(host, "flavour", "standalone") != "standalone" else 0
    device = device or host.setting(SETTING_DEVICE, "auto") or "auto"
    if device == "auto" and hasattr(host, "engine_device"):
        device = host.engine_device()  # the GPU the WebUI uses (the job runs after its queue lock)
    return {
        "device": device,
        "workers": engine_workers(reserve),
        "reserve_cores": reserve,
        "hash_cache": HashCache(host.data_dir(), lookup=getattr(host, "known_sha256", None)),
    }
