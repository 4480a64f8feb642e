"""A loopback HTTP server with the WebUI's /sdapi/v1 surface that lorakit's HTTP backend uses,
generating with the deterministic fake (tests only). Like the WebUI, its lists are cached
until a refresh call, and an unknown checkpoint override silently falls back to the
loaded model (which lorakit must catch from the infotext).

For pools and batches: ``latency`` seconds per image (plus ``request_latency`` per request), one
request generating at a time as in the WebUI's queue; ``batch_size`` images with seeds seed,
seed+1, ... and one infotext each (``all_seeds``, as /sdapi/v1/txt2img); :meth:`kill` (or
``kill_after`` images) makes it vanish mid-run: the request in flight gets no answer and later
ones find no server. A missing file: ``fake.hidden`` (see fake_gen)."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fake_gen import FakeBackend


class FakeWebUI:
    def __init__(
        self,
        fake: FakeBackend,
        auth: str | None = None,
        latency: float = 0.0,
        request_latency: float = 0.0,
        kill_after: int | None = None,
        engine: str = "a1111",
        samplers: tuple[str, ...] = ("Euler a", "Euler", "DPM++ 2M"),
        cmd_flags: dict | None = None,
    ):
        self.fake = fake
        self.auth = auth
        self.latency, self.request_latency = latency, request_latency
        self.kill_after = kill_after  # images made before it vanishes
        self.engine = engine  # "forge": its settings carry forge_* keys, as Forge's do
        self.samplers = samplers
        self.cmd_flags = cmd_flags  # None: no /sdapi/v1/cmd-flags route
        self.made = 0
        self.dead = False
        self.interrupts = 0
        self.gen_lock = threading.Lock()  # the WebUI's queue: one request generates at a time
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
                if outer.dead:
                    self.close_connection = True
                    return
                if not self._authorised():
                    return
                f = outer.fake
                if self.path.startswith("/sdapi/v1/progress"):
                    self._send(200, {"progress": 0.0, "state": {}})
                elif self.path == "/sdapi/v1/samplers":
                    self._send(200, [{"name": n, "aliases": [], "options": {}} for n in outer.samplers])
                elif self.path == "/sdapi/v1/sd-models":
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
                elif self.path == "/sdapi/v1/cmd-flags" and outer.cmd_flags is not None:
                    if outer.engine == "forge":  # Forge's flags fail its response model: HTTP 500, flags in "body"
                        self._send(500, {"error": "ResponseValidationError", "detail": "", "body": outer.cmd_flags})
                    else:
                        self._send(200, outer.cmd_flags)
                elif self.path == "/sdapi/v1/options":
                    opts = {"sd_model_checkpoint": f.loaded}
                    if outer.engine == "forge":
                        opts["forge_preset"] = "sd"
                    self._send(200, opts)
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                outer.requests.append(("POST", self.path, body))
                if outer.dead:
                    self.close_connection = True
                    return
                if not self._authorised():
                    return
                f = outer.fake
                if self.path == "/sdapi/v1/interrupt":
                    outer.interrupts += 1
                    self._send(200, None)
                elif self.path in ("/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras"):
                    f.refresh()
                    self._send(200, None)
                elif self.path == "/sdapi/v1/txt2img":
                    ck = (body.get("override_settings") or {}).get("sd_model_checkpoint")
                    if ck not in [c.name for c in f.checkpoints()]:
                        ck = f.loaded  # the WebUI's silent fallback
                    n = int(body.get("batch_size") or 1)
                    seed = int(body.get("seed", -1))
                    outs = []
                    with outer.gen_lock:
                        time.sleep(outer.request_latency)
                        for i in range(n):
                            time.sleep(outer.latency)
                            if outer.dead:
                                break
                            try:
                                outs.append(f.txt2img({**body, "checkpoint": ck, "seed": seed + i}))
                            except Exception as e:
                                self._send(500, {"error": type(e).__name__, "detail": str(e)})
                                return
                            outer.made += 1
                            if outer.kill_after is not None and outer.made >= outer.kill_after:
                                outer.kill()
                    if outer.dead:  # vanished mid-request: no answer at all
                        self.close_connection = True
                        return
                    images = []
                    for out in outs:
                        buf = io.BytesIO()
                        out.image.save(buf, format="PNG")
                        images.append(base64.b64encode(buf.getvalue()).decode())
                    info = {
                        "infotexts": [o.infotext for o in outs],
                        "seed": outs[0].seed,
                        "all_seeds": [o.seed for o in outs],
                        "index_of_first_image": 0,
                    }
                    self._send(200, {"images": images, "parameters": body, "info": json.dumps(info)})
                else:
                    self._send(404, {"detail": "Not Found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def kill(self):
        """Vanish: no answer to the request in flight, no server for the next ones."""
        if self.dead:
            return
        self.dead = True
        threading.Thread(target=self.close, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
