"""A loopback HTTP server with the WebUI's /sdapi/v1 surface that lorakit's HTTP backend uses,
generating with the deterministic fake (tests only). Like the WebUI, its lists are cached
until a refresh call, and an unknown checkpoint override silently falls back to the
loaded model (which lorakit must catch from the infotext)."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fake_gen import FakeBackend


class FakeWebUI:
    def __init__(self, fake: FakeBackend, auth: str | None = None):
        self.fake = fake
        self.auth = auth
        self.requests: list[tuple[str, str, dict | None]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self):
                if not outer.auth:
                    return True
                want = "Basic " + base64.b64encode(outer.auth.encode()).decode()
                if self.headers.get("Authorization") == want:
                    return True
                self._send(401, {"detail": "Not authenticated"})
                return False

            def do_GET(self):
                outer.requests.append(("GET", self.path, None))
                if not self._authorised():
                    return
                f = outer.fake
                if self.path == "/sdapi/v1/sd-models":
                    self._send(
                        200,
                        [
                            {
                                "title": c.name,
                                "model_name": os.path.splitext(os.path.basename(c.path))[0],
                                "hash": c.hash[:8],
                                "sha256": None,
                                "filename": c.path,
                                "config": None,
                            }
                            for c in f.checkpoints()
                        ],
                    )
                elif self.path == "/sdapi/v1/loras":
                    self._send(
                        200, [{"name": l.name, "alias": l.name, "path": l.path, "metadata": {}} for l in f.loras()]
                    )
                elif self.path == "/sdapi/v1/options":
                    self._send(200, {"sd_model_checkpoint": f.loaded})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                outer.requests.append(("POST", self.path, body))
                if not self._authorised():
                    return
                f = outer.fake
                if self.path in ("/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras"):
                    f.refresh()
                    self._send(200, None)
                elif self.path == "/sdapi/v1/txt2img":
                    ck = (body.get("override_settings") or {}).get("sd_model_checkpoint")
                    if ck not in [c.name for c in f.checkpoints()]:
                        ck = f.loaded  # the WebUI's silent fallback
                    req = {**body, "checkpoint": ck}
                    try:
                        out = f.txt2img(req)
                    except Exception as e:
                        self._send(500, {"error": type(e).__name__, "detail": str(e)})
                        return
                    buf = io.BytesIO()
                    out.image.save(buf, format="PNG")
                    info = {"infotexts": [out.infotext], "seed": out.seed, "all_seeds": [out.seed]}
                    self._send(
                        200,
                        {
                            "images": [base64.b64encode(buf.getvalue()).decode()],
                            "parameters": body,
                            "info": json.dumps(info),
                        },
                    )
                else:
                    self._send(404, {"detail": "Not Found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
