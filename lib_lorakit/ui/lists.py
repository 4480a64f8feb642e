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
        self._preselected: set[Any] = set()
        self.hooks: list[tuple[Callable[[str], tuple], list[Any]]] = []

    def add(self, comp: Any, choices: Callable[[], list[str]], current: bool = False) -> Any:
        self.items.append((comp, choices, current))
        return comp

    def refill(self, request: gr.Request) -> list[Any]:
        """New choices for every registered dropdown; the host's current checkpoint preselected once per page
        (the first time the host has one), after that the user's choice is left alone.

        No inputs on purpose: gradio 4.40's client warns "Too many arguments provided for the endpoint." for
        every event sent with inputs; the page is told apart by its session instead."""
        try:
            cur = self.service.host.current_checkpoint()
        except Exception:  # noqa: BLE001 - no model loaded yet: nothing to preselect
            cur = None
        page = getattr(request, "session_hash", None) if request is not None else None
        first = bool(cur) and page not in self._preselected
        if first:
            self._preselected.add(page)
        out = []
        for _, choices, current in self.items:
            names = choices()
            if first and current and cur in names:
                out.append(gr.update(choices=names, value=cur))
            else:
                out.append(gr.update(choices=names))
        for fn, outs in self.hooks:  # what follows from the preselected checkpoint (e.g. its generation profile)
            out.extend(fn(cur) if first else [gr.update() for _ in outs])
        return out

    def wire(self) -> None:
        comps = [c for c, _, _ in self.items] + [o for _, outs in self.hooks for o in outs]
        for t in self.triggers:
            t(self.refill, inputs=None, outputs=comps)


def add(comp: Any, choices: Callable[[], list[str]], current: bool = False) -> Any:
    """Register a dropdown with the refill being built (a no-op outside :func:`collect`)."""
    if _active:
        _active[-1].add(comp, choices, current)
    return comp


def on_preselect(fn: Callable[[str], tuple], outputs: list[Any]) -> None:
    """Also update ``outputs`` with ``fn(checkpoint)`` when the current checkpoint gets preselected (a
    dropdown's own change event would send its value back: gradio 4.40 warns about that on every show)."""
    if _active:
        _active[-1].hooks.append((fn, outputs))


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
