"""``python -m lib_lorakit ui``: the lorakit tab and API on a local server, without a WebUI.

Folders stand in for the WebUI's lists; image generation is not available here.
"""

from __future__ import annotations

import os

import gradio as gr

from ..api import build_router, parse_credentials
from ..hosts import LocalHost
from ..ops import HostContext
from .app import build_ui

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def assets() -> tuple[str, str]:
    """The extension's style.css and javascript, as the WebUI would load them."""
    css = js = ""
    p = os.path.join(ROOT, "style.css")
    if os.path.exists(p):
        with open(p) as f:
            css = f.read()
    jdir = os.path.join(ROOT, "javascript")
    if os.path.isdir(jdir):
        for fn in sorted(os.listdir(jdir)):
            if fn.endswith(".js"):
                with open(os.path.join(jdir, fn)) as f:
                    js += f.read() + "\n"
    return css, js


def create_app(
    models_dir: str,
    loras_dir: str,
    *,
    api_auth: str | None = None,
    data_dir: str | None = None,
    current: str | None = None,
):
    """The FastAPI app: the lorakit tab at /, the API at /lorakit/v1. Returns (app, service)."""
    from fastapi import FastAPI

    service = HostContext(LocalHost(models_dir, loras_dir, data_dir=data_dir, current=current))
    css, js = assets()
    head = '<script src="/lorakit.js"></script>' if js else None
    kw = {"title": "lorakit", "css": css}
    if head and int(gr.__version__.split(".")[0]) >= 4:
        kw["head"] = head  # gradio 3.41 has no head=; the WebUI injects scripts itself
    demo = build_ui(service, **kw)
    if js and "head" not in kw:  # gradio 3.41: load the script once the page is up
        loader = (
            "() => { if (!window.lorakitLoaded) { window.lorakitLoaded = 1; const s = document.createElement('script');"
            " s.src = '/lorakit.js'; document.head.appendChild(s); } }"
        )
        with demo:
            demo.load(None, None, None, _js=loader)
    demo.queue()
    app = FastAPI(title="lorakit")
    app.include_router(build_router(service, parse_credentials(api_auth) or None))
    if js:
        from fastapi.responses import Response

        @app.get("/lorakit.js", include_in_schema=False)
        def _js():
            return Response(js, media_type="application/javascript")

    app = gr.mount_gradio_app(app, demo, path="/")
    if api_auth:  # every path: the tab, its queue and functions, /docs, /openapi.json and the API
        from ..api.auth import BasicAuthMiddleware

        app.add_middleware(BasicAuthMiddleware, credentials=parse_credentials(api_auth))
    return app, service


def serve(
    models_dir: str,
    loras_dir: str,
    *,
    port: int = 7870,
    host: str = "127.0.0.1",
    api_auth: str | None = None,
    data_dir: str | None = None,
    current: str | None = None,
) -> None:
    import socket

    import uvicorn

    from ..errors import LorakitError

    for what, d in (("checkpoint folder", models_dir), ("LoRA folder", loras_dir)):
        if not os.path.isdir(d):
            raise LorakitError(f"The {what} {d} is not a folder.", fix="Give an existing folder.")
    if api_auth is not None and not parse_credentials(api_auth):
        raise LorakitError(
            "The API credentials are not in the form user:password[,user2:password2].",
            fix="Give them as user:password.",
        )
    # The port first: the URL is printed only once the server can really listen there.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise LorakitError(
                f"Cannot listen on {host}:{port}: {e.strerror or e}.",
                fix="Another program uses that port: pick another one, or stop it.",
            ) from None
    from ..ops.files import sweep_orphans

    sweep_orphans(models_dir)  # what a killed bake or merge left in the output folder (logged)
    app, service = create_app(models_dir, loras_dir, api_auth=api_auth, data_dir=data_dir, current=current)
    print(f"lorakit: http://{host}:{port}/  (API: http://{host}:{port}/lorakit/v1, docs: /docs)", flush=True)
    # SIGTERM/Ctrl-C: uvicorn stops within 2 s even with a stuck job or an open queue connection; the job
    # threads are daemons, so they do not hold the process.
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
