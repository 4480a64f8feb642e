"""The lorakit tab: one top-level block with a sub-tab per feature."""

from __future__ import annotations

import gradio as gr

from ..ops.context import HostContext
from .bake_tab import build_bake_tab
from .inspect_tab import build_inspect_tab
from .merge_tab import build_merge_tab
from .tournament_tab import build_tournament_tab
from .triage_tab import build_triage_tab
from .workshop_tab import build_workshop_tab


def build_ui(service: HostContext, **blocks_kw) -> gr.Blocks:
    """Build the whole lorakit tab as a Blocks (the WebUI adds it as a top-level tab)."""
    with gr.Blocks(analytics_enabled=False, **blocks_kw) as block:
        with gr.Tabs(elem_id="lorakit_tabs"):
            with gr.Tab("Bake", elem_id="lorakit_tab_bake"):
                build_bake_tab(service)
            with gr.Tab("Merge", elem_id="lorakit_tab_merge"):
                build_merge_tab(service)
            with gr.Tab("Inspect", elem_id="lorakit_tab_inspect"):
                build_inspect_tab(service)
            with gr.Tab("Triage", elem_id="lorakit_tab_triage"):
                build_triage_tab(service)
            with gr.Tab("Tournament", elem_id="lorakit_tab_tournament"):
                build_tournament_tab(service)
            with gr.Tab("Workshop", elem_id="lorakit_tab_workshop"):
                build_workshop_tab(service)
    return block
