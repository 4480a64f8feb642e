"""The HTTP API, ``/lorakit/v1``: one router per feature over :mod:`lib_lorakit.ops`.

Mounted on the WebUI's FastAPI app by ``scripts/lorakit.py`` (and on the standalone
launcher's). A route's body is the operation's request type, so the routes, their bounds
and their descriptions appear in the host's ``/docs``. Errors are JSON
``{"error": kind, "message": text}`` with 400/401/403/404/409/500/501 — request validation
errors and malformed JSON included — never a stack trace. With ``--api-auth`` the host's
credentials are required.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..ops.context import HostContext
from . import bake, doctor, inspect, jobs, tournament, triage, workshop
from .common import PREFIX, LorakitRoute, auth_dependency, parse_credentials

__all__ = ["PREFIX", "build_router", "parse_credentials"]


def build_router(ctx: HostContext, credentials: dict[str, str] | None = None) -> APIRouter:
    """Every lorakit route, on one router (``credentials``: user -> password, or None for no auth)."""
    deps = [Depends(auth_dependency(credentials))] if credentials else []
    r = APIRouter(prefix=PREFIX, tags=["lorakit"], dependencies=deps, route_class=LorakitRoute)
    for feature in (bake, inspect, triage, tournament, workshop, doctor, jobs):
        r.include_router(feature.router(ctx))
    return r
