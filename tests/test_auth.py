"""With --api-auth the standalone app guards every path: the tab, its queue and functions, /docs, /openapi.json and
/lorakit/v1 — under gradio 4.x and 3.41 alike; and blind data stays hidden before Reveal on every route."""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from factories import write

from lib_lorakit.synth import make_lora, write_checkpoint

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from starlette.routing import Mount  # noqa: E402

from lib_lorakit.ui.standalone import create_app  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTH = ("ann", "s3cret")


@pytest.fixture
def folders(tmp_path):
    ckpt, loras = tmp_path / "models" / "Stable-diffusion", tmp_path / "models" / "Lora"
    ckpt.mkdir(parents=True)
    loras.mkdir(parents=True)
    write_checkpoint(str(ckpt / "base.safetensors"), "sdxl", tiny=True, seed=1)
    write(loras, "ink.safetensors", make_lora("sdxl", "lora", seed=2, conv=False))
    return tmp_path, ckpt, loras


def every_path(routes, prefix=""):
    """(method, path) of every route of the app, mounted sub-apps (Gradio) included; path parameters filled."""
    for r in routes:
        if isinstance(r, Mount):
            yield from every_path(r.routes, prefix + r.path)
            continue
        path = re.sub(r"\{[^}]+\}", "x", prefix + getattr(r, "path", ""))
        methods = sorted(getattr(r, "methods", None) or ["GET"])
        for m in methods:
            if m != "HEAD":
                yield m, path or "/"


def test_every_http_path_refuses_a_request_without_credentials(folders):
    tmp, ckpt, loras = folders
    app, _ = create_app(str(ckpt), str(loras), api_auth=":".join(AUTH), data_dir=str(tmp / "data"))
    c = TestClient(app)
    paths = sorted(set(every_path(app.routes)))
    assert len(paths) > 40
    extra = [
        ("GET", "/"),
        ("GET", "/config"),
        ("GET", "/info"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("POST", "/run/predict"),
        ("POST", "/api/predict"),
        ("POST", "/queue/join"),
        ("POST", "/gradio_api/queue/join"),
        ("POST", "/lorakit/v1/tournaments/x/reveal"),
        ("GET", "/lorakit/v1/tournaments/x/image/e/0/A"),
        ("GET", "/file=/etc/hostname"),
    ]
    open_ones = []
    for method, path in paths + extra:
        r = c.request(method, path)
        if r.status_code != 401:
            open_ones.append((method, path, r.status_code))
        else:
            assert r.headers.get("www-authenticate", "").startswith("Basic")
    assert open_ones == []
    wrong = {"Authorization": "Basic " + base64.b64encode(b"ann:wrong").decode()}
    assert c.get("/lorakit/v1/jobs", headers=wrong).status_code == 401
    assert c.get("/config", headers={"Authorization": "Bearer abc"}).status_code == 401
    # With the credentials the same paths answer.
    assert c.get("/", auth=AUTH).status_code == 200
    assert c.get("/openapi.json", auth=AUTH).status_code == 200
    assert c.get("/lorakit/v1/jobs", auth=AUTH).status_code == 200


def test_websocket_queue_refused_without_credentials(folders):
    from starlette.websockets import WebSocketDisconnect

    tmp, ckpt, loras = folders
    app, _ = create_app(str(ckpt), str(loras), api_auth=":".join(AUTH), data_dir=str(tmp / "data"))
    c = TestClient(app)
    with pytest.raises(WebSocketDisconnect):
        with c.websocket_connect("/queue/join") as ws:  # gradio 3.41's queue
            ws.receive_text()


def test_without_auth_the_app_stays_open(folders):
    tmp, ckpt, loras = folders
    app, _ = create_app(str(ckpt), str(loras), data_dir=str(tmp / "data"))
    assert TestClient(app).get("/lorakit/v1/jobs").status_code == 200


@pytest.mark.slow
def test_gradio_client_without_credentials_cannot_call_a_tab_function(folders):
    gradio_client = pytest.importorskip("gradio_client")
    tmp, ckpt, loras = folders
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lib_lorakit",
            "ui",
            "--models-dir",
            str(ckpt),
            "--loras-dir",
            str(loras),
            "--port",
            str(port),
            "--api-auth",
            ":".join(AUTH),
            "--data-dir",
            str(tmp / "data"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "http://" in p.stdout.readline()
        url = f"http://127.0.0.1:{port}/"
        import urllib.error
        import urllib.request

        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=5)
            except urllib.error.HTTPError as e:
                assert e.code == 401
                break
            except OSError:
                time.sleep(0.1)
        with pytest.raises(Exception) as e:
            client = gradio_client.Client(url, verbose=False)
            client.predict(api_name="/predict")
        assert "401" in str(e.value) or "auth" in str(e.value).lower() or "Could not" in str(e.value), e.value
    finally:
        p.terminate()
        p.wait(timeout=30)
