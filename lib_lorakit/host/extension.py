"""Wire lorakit into the WebUI: the tab, the settings section, the API routes, and clean-up.

Called by ``scripts/lorakit.py``. Everything registered here is unregistered when the
WebUI unloads its scripts (Reload UI), so nothing is left behind or doubled.
"""

from __future__ import annotations

import logging
from typing import Any

from . import get_host

log = logging.getLogger("lorakit")
SECTION = ("lorakit", "lorakit")
_state: dict[str, Any] = {"service": None, "app": None}


def service():
    """The operations' context for this WebUI (one per process: its jobs and store)."""
    from ..ops import HostContext

    if _state["service"] is None:
        _state["service"] = HostContext(get_host())
    return _state["service"]


def on_ui_tabs():
    from ..ui import build_ui

    return [(build_ui(service()), "lorakit", "lorakit")]


def on_ui_settings():
    import gradio as gr
    from modules import shared

    opts, OptionInfo = shared.opts, shared.OptionInfo
    opts.add_option(
        "lorakit_save_dtype",
        OptionInfo(
            "fp16", "Bake: default save dtype", gr.Radio, {"choices": ["fp16", "bf16", "fp32"]}, section=SECTION
        ),
    )
    opts.add_option(
        "lorakit_device",
        OptionInfo(
            "auto",
            "Bake and merge: where the maths runs (auto: the WebUI's GPU when there is one)",
            gr.Radio,
            {"choices": ["auto", "cpu", "cuda"]},
            section=SECTION,
        ),
    )
    opts.add_option(
        "lorakit_output_subdir",
        OptionInfo(
            "", "Bake: sub-folder of the checkpoint folder for baked models (blank: the folder itself)", section=SECTION
        ),
    )
    opts.add_option(
        "lorakit_pool_webuis",
        OptionInfo(
            "",
            "Generate also on these WebUIs (URLs started with --api, comma-separated; credentials as "
            "http://USER:PASSWORD@host:port): grids, triage and tournaments use this WebUI and them as a pool",
            section=SECTION,
        ),
    )


def on_app_started(_demo, app) -> None:
    from modules import shared

    from ..api import PREFIX, build_router, parse_credentials

    remove_routes(app, PREFIX)
    creds = parse_credentials(getattr(shared.cmd_opts, "api_auth", None)) or None
    app.include_router(build_router(service(), creds))
    _state["app"] = app


def remove_routes(app, prefix: str) -> int:
    """Drop the routes under ``prefix`` from a FastAPI app; returns how many."""
    if app is None:
        return 0
    before = len(app.router.routes)
    app.router.routes[:] = [r for r in app.router.routes if not str(getattr(r, "path", "")).startswith(prefix)]
    if getattr(app, "openapi_schema", None) is not None:
        app.openapi_schema = None  # rebuilt on the next /docs
    return before - len(app.router.routes)


def on_script_unloaded() -> None:
    from ..api import PREFIX

    remove_routes(_state["app"], PREFIX)
    _state["app"] = None


def register() -> None:
    from modules import script_callbacks

    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_app_started(on_app_started)
    script_callbacks.on_script_unloaded(on_script_unloaded)
