"""The only part of lorakit that talks to the WebUI (A1111 1.10 or Forge), always lazily.

``get_host()`` returns the :class:`~lib_lorakit.hosts.Host` for the running WebUI. The
flavour is decided once: Forge ships a ``backend`` package (and ``modules_forge``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

_HOST: Any = None


def detect_flavour() -> str:
    """'forge' when Forge's packages are importable, else 'a1111'."""
    for name in ("modules_forge", "backend"):
        try:
            if importlib.util.find_spec(name) is not None:
                return "forge"
        except (ImportError, ValueError):
            continue
    return "a1111"


def get_host():
    """The WebUI host adapter (created on first use)."""
    global _HOST
    if _HOST is None:
        from .webui import WebUIHost

        _HOST = WebUIHost(detect_flavour())
    return _HOST


def reset() -> None:
    """Forget the adapter (tests; script reloads)."""
    global _HOST
    _HOST = None
