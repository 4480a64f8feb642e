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


def build_ui(service: HostContext, **blocks_kw) -> gr.Blocks:
    """Build the whole lorakit tab as a Blocks (the WebUI adds it as a top-level tab)."""
    with gr.Blocks(analytics_enabled=False, **blocks_kw) as block, lists.collect(service) as refills:
        # selected= names a tab: without it gradio 4 warns "Attempted to select a non-interactive or hidden tab"
        # once per tab registered
        with gr.Tabs(elem_id="lorakit_tabs", selected="bake"):
            for label, key, build in TABS:
                with gr.Tab(label, id=key, elem_id=f"lorakit_tab_{key}") as tab:
                    build(service)
                lists.trigger(tab.select)
        # clicked by javascript/lorakit.js whenever the lorakit tab comes into view (page load included)
        shown = gr.Button("refresh lists", elem_id="lorakit_show", elem_classes=["lorakit-hidden"])
        lists.trigger(shown.click)
        refills.wire()
    return block
