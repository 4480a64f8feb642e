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
PROFILES_OPTION = "lorakit_generation_profiles"
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
    opts.add_option(
        PROFILES_OPTION,
        OptionInfo(
            "",
            "Generation profiles: your changes to the shipped table, as JSON {profile: {field: value}} "
            '(e.g. {"sdxl": {"steps": 30}, "noobai-vpred": {"cfg_scale": 4.5}}; empty: the shipped table; '
            "profiles and fields: the README's table or GET /lorakit/v1/profiles). Checked when applied; a "
            "refused change is put back and the reason is printed in the console",
            gr.Code,
            {"language": "json"},  # A1111 sends these back through Code.update, which takes no "lines" in 3.41
            onchange=profiles_changed,
            section=SECTION,
            # no comment_before/after: A1111's settings.js puts them beside a 'label span', which a Code has
            # not, and its hint set-up then fails for every setting
        ),
    )
    # lorakit's settings.json holds the changes (the API edits them too): show what is in use
    try:
        opts.data[PROFILES_OPTION] = profiles_text()
    except Exception as e:  # a damaged settings file is named when a feature reads it
        log.error("lorakit: %s", str(e).splitlines()[0])


def profiles_text() -> str:
    """The user's changes to the generation profiles as the Settings field shows them ("" for none)."""
    import json

    from ..ops import gen

    changes = gen.profile_changes(service())
    return json.dumps(changes, indent=2, sort_keys=True) if changes else ""


def profiles_changed() -> None:
    """Settings → lorakit → Generation profiles was applied: check the text and store it as the user's
    changes (replacing the previous ones). A refused text is put back to what is in use, and the reason is
    printed in one line (the host would print a traceback for a raised error)."""
    import json

    from modules import shared

    from ..errors import LorakitError, RecipeError
    from ..ops import gen

    text = (shared.opts.data.get(PROFILES_OPTION) or "").strip()
    try:
        try:
            changes = json.loads(text) if text else {}
        except ValueError as e:
            raise RecipeError(
                f"Generation profiles: the text is not JSON ({e}).",
                fix='Write an object such as {"sdxl": {"steps": 30}}, or empty it.',
            ) from None
        if not isinstance(changes, dict):
            raise RecipeError(
                "Generation profiles: the text must be an object of profile name -> {field: value}.",
                fix='Write an object such as {"sdxl": {"steps": 30}}, or empty it.',
            )
        gen.update_profiles(service(), {"profiles": changes, "replace": True})
        log.info("lorakit: generation profiles changed: %s", ", ".join(sorted(changes)) or "back to the shipped table")
    except LorakitError as e:
        log.error("lorakit: the generation profiles were not changed: %s", str(e).replace("\n", " "))
        shared.opts.data[PROFILES_OPTION] = profiles_text()


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
