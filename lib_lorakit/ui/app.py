"""The lorakit tab: one top-level block with a sub-tab per feature."""

from __future__ import annotations

import gradio as gr

from ..ops.context import HostContext
from . import lists
from .bake_tab import build_bake_tab
from .inspect_tab import build_inspect_tab
from .merge_tab import build_merge_tab
from .tournament_tab import build_tournament_tab
from .triage_tab import build_triage_tab
from .workshop_tab import build_workshop_tab

TABS = [
    ("Bake", "bake", build_bake_tab),
    ("Merge", "merge", build_merge_tab),
    ("Inspect", "inspect", build_inspect_tab),
    ("Triage", "triage", build_triage_tab),
    ("Tournament", "tournament", build_tournament_tab),
    ("Workshop", "workshop", build_workshop_tab),
]


def _show(i: int, n: int):
    """The click of sub-tab button ``i``: its panel shown, the others hidden, its button marked."""

    def fn():
        return [gr.update(visible=j == i) for j in range(n)] + [
            gr.update(variant="primary" if j == i else "secondary") for j in range(n)
        ]

    return fn


def build_ui(service: HostContext, **blocks_kw) -> gr.Blocks:
    """Build the whole lorakit tab as a Blocks (the WebUI adds it as a top-level tab).

    The sub-tabs are a row of buttons over panels shown one at a time, not a gr.Tabs: gradio 4.40's
    Tabs warns "Attempted to select a non-interactive or hidden tab" in the browser console once at
    mount, before its tabs register, whatever ``selected`` says (javascript/lorakit.js gives the row
    the tablist roles)."""
    n = len(TABS)
    with gr.Blocks(analytics_enabled=False, **blocks_kw) as block, lists.collect(service) as refills:
        with gr.Row(elem_id="lorakit_tabs", elem_classes=["lorakit-nav"]):
            buttons = [
                gr.Button(
                    label,
                    variant="primary" if i == 0 else "secondary",
                    size="sm",
                    elem_id=f"lorakit_nav_{key}",
                    scale=0,
                    min_width=110,
                )
                for i, (label, key, _) in enumerate(TABS)
            ]
        panels = []
        for i, (_, key, build) in enumerate(TABS):
            with gr.Column(visible=i == 0, elem_id=f"lorakit_tab_{key}", elem_classes=["lorakit-panel"]) as panel:
                build(service)
            panels.append(panel)
        for i, b in enumerate(buttons):
            b.click(_show(i, n), inputs=None, outputs=panels + buttons, queue=False, show_progress="hidden")
            lists.trigger(b.click)  # each sub-tab shown reads the host's lists again
        # clicked by javascript/lorakit.js whenever the lorakit tab comes into view (page load included)
        shown = gr.Button("refresh lists", elem_id="lorakit_show", elem_classes=["lorakit-hidden"])
        lists.trigger(shown.click)
        refills.wire()
    return block
