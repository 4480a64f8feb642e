"""Dropdowns filled from the host's lists when the tab is shown, not only when it is built.

In the WebUI the tab is built before the host has loaded a model, so the lists and the current
checkpoint are read again whenever the lorakit tab or one of its sub-tabs is shown, and on each
*Refresh* button. The sub-tabs register their dropdowns here while they are built; ``wire`` then
connects one refill to every trigger (gradio 3.41 and 4.x alike).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

_active: list[Refills] = []


class Refills:
    def __init__(self, service: Any):
        self.service = service
        self.items: list[tuple[Any, Callable[[], list[str]], bool]] = []
        self.triggers: list[Any] = []

    def add(self, comp: Any, choices: Callable[[], list[str]], current: bool = False) -> Any:
        self.items.append((comp, choices, current))
        return comp

    def refill(self, *values: Any) -> list[Any]:
        """New choices for every registered dropdown; its value kept when still listed, else the host's
        current checkpoint (where asked for), else empty."""
        try:
            cur = self.service.host.current_checkpoint()
        except Exception:  # noqa: BLE001 - no model loaded yet: nothing to preselect
            cur = None
        out = []
        for (_, choices, current), v in zip(self.items, values):
            names = choices()
            if v not in (None, "") and v in names:
                val = v
            elif current and cur and cur in names:
                val = cur
            else:
                val = names[0] if names and names[0] == "" else None
            out.append(gr.update(choices=names, value=val))
        return out

    def wire(self) -> None:
        comps = [c for c, _, _ in self.items]
        for t in self.triggers:
            t(self.refill, inputs=comps, outputs=comps)


def add(comp: Any, choices: Callable[[], list[str]], current: bool = False) -> Any:
    """Register a dropdown with the refill being built (a no-op outside :func:`collect`)."""
    if _active:
        _active[-1].add(comp, choices, current)
    return comp


def trigger(event: Any) -> None:
    """Refill every registered dropdown on ``event`` (e.g. ``button.click``)."""
    if _active:
        _active[-1].triggers.append(event)


@contextlib.contextmanager
def collect(service: Any) -> Iterator[Refills]:
    r = Refills(service)
    _active.append(r)
    try:
        yield r
    finally:
        _active.pop()
