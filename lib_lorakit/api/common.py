"""What every lorakit router shares: the error answers, auth, and the route class that turns request
validation errors into the documented ``{"error", "message"}`` body."""

from __future__ import annotations

import functools
import logging
import secrets
import traceback
from typing import Optional

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from ..errors import LorakitError
from ..ops.model import validation_errors_to_invalid
from .schemas import ErrorOut

log = logging.getLogger("lorakit.api")
PREFIX = "/lorakit/v1"
RESPONSES = {400: {"model": ErrorOut}, 403: {"model": ErrorOut}, 404: {"model": ErrorOut}}
GEN_RESPONSES = {**RESPONSES, 501: {"model": ErrorOut}}
MAX_BODY = 8 * 1024 * 1024  # bytes of one request body (a recipe, a spec, votes); checked before reading it


def error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": kind, "message": message})


def answer(e: LorakitError) -> JSONResponse:
    return error(getattr(e, "http_status", 400), type(e).__name__, str(e))


def guard(fn):
    """Turn lorakit errors into JSON answers, and anything else into a 500 without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LorakitError as e:
            return answer(e)
        except Exception as e:  # logged in full, answered without internals
            log.error("lorakit API error:\n%s", traceback.format_exc())
            return error(
                500,
                "internal",
                f"Unexpected failure ({type(e).__name__}); the details are in the server log (logger 'lorakit.api').",
            )

    return wrapper


class LorakitRoute(APIRoute):
    """A route whose body/query validation errors answer 400 ``{"error", "message"}`` naming the field."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        model = getattr(getattr(self, "body_field", None), "type_", None)

        async def route(request: Request):
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > MAX_BODY:
                return error(
                    413,
                    "RequestTooLarge",
                    f"The request body has {int(size)} bytes; at most {MAX_BODY} "
                    "are accepted.\nFix: Send a smaller request (split the work).",
                )
            if getattr(model, "LIMITS", None) and size is not None:  # oversized lists: refused before validation
                import json

                try:
                    data = json.loads(await request.body())
                except ValueError:
                    data = None  # the handler names the JSON problem
                try:
                    if isinstance(data, dict):
                        model.check_limits(data)
                except LorakitError as e:
                    return answer(e)
            try:
                return await handler(request)
            except RequestValidationError as e:
                return answer(validation_errors_to_invalid(e.errors(), getattr(e, "body", None), model))
            except LorakitError as e:  # raised outside guard (a dependency, a response model)
                return answer(e)
            except HTTPException:
                raise  # 401 from the auth dependency and the like: FastAPI answers them
            except Exception as e:
                log.error("lorakit API error on %s %s:\n%s", request.method, request.url.path, traceback.format_exc())
                return error(
                    500,
                    "internal",
                    f"Unexpected failure ({type(e).__name__}); the details are in the "
                    f"server log (logger 'lorakit.api').",
                )

        return route


def feature_router() -> APIRouter:
    return APIRouter(route_class=LorakitRoute)


def parse_credentials(api_auth: str | None) -> dict[str, str]:
    """``user:pass,user2:pass2`` (the WebUI's --api-auth) -> {user: pass}."""
    out: dict[str, str] = {}
    for item in (api_auth or "").split(","):
        if ":" in item:
            user, _, pw = item.strip().partition(":")
            out[user] = pw
    return out


def auth_dependency(credentials: dict[str, str]):
    basic = HTTPBasic(auto_error=False)

    def check(cred: Optional[HTTPBasicCredentials] = Depends(basic)) -> None:
        ok = (
            cred is not None
            and cred.username in credentials
            and secrets.compare_digest(cred.password.encode(), credentials[cred.username].encode())
        )
        if not ok:
            raise HTTPException(
                status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"}
            )

    return check
