"""lorakit: bake, merge, inspect and evaluate LoRAs and checkpoints (SD1.5, SDXL).

The library imports without the WebUI; only :mod:`lib_lorakit.host` touches it.
Entry points: :func:`lib_lorakit.bake.bake`, ``python -m lib_lorakit``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import LorakitError  # noqa: E402

__all__ = ["__version__", "LorakitError"]
