"""HTTP Basic auth over a whole ASGI app (the standalone launcher with ``--api-auth``).

The API routes check credentials through a FastAPI dependency (``common.auth_dependency``), as inside the
WebUI. The standalone app also serves the Gradio tab, its queue (a websocket under gradio 3.41, server-sent
events under 4.x), its file routes, ``/docs`` and ``/openapi.json``: this middleware guards every one of
them, for http and websocket requests alike, in front of both gradio versions. A browser asks for the
user name and password once and sends them with every request of the page, the queue's included.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets


class BasicAuthMiddleware:
    """Answer 401 (or close the websocket) unless the request carries one of ``credentials`` (user -> password)."""

    def __init__(self, app, credentials: dict[str, str], realm: str = "lorakit"):
        self.app = app
        self.credentials = dict(credentials)
        self.realm = realm

    def allowed(self, headers) -> bool:
        for name, value in headers:
            if name.lower() != b"authorization":
                continue
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() != "basic":
                return False
            try:
                user, _, pw = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return False
            want = self.credentials.get(user)
            return want is not None and secrets.compare_digest(pw.encode(), want.encode())
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self.allowed(scope.get("headers") or []):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps(
            {
                "error": "unauthorized",
                "message": "This lorakit server requires a user name and password (its --api-auth).",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", f'Basic realm="{self.realm}"'.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


__all__ = ["BasicAuthMiddleware"]
